// AMX int8 kernels for 16 or more activation rows: per block (16 weight rows x G columns) one
// TDPBSUD multiplies 16 activation rows (signed) by the block (unsigned) into 16 x 16 int32
// sums, the same sums vpdpbusd forms; the float steps after it are the AVX-512 kernel's
// (qgemm_avx512.h), in its order, so the results equal it and the scalar reference bit for bit.
// Rows past the last whole 16 go to the AVX-512 kernel. A k-group (64 bytes: [16 rows][4
// columns]) is one row of the weight tile as stored; 4-bit blocks are unpacked to bytes first.
// Only this file is compiled for AMX; ops.cpp picks it after checking the CPU's flags and
// getting the tile state from Linux (`amx_status`).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "qgemm_avx512.h"

namespace kvlm {
namespace {

constexpr int kRows = 16;  // activation rows per tile product

// Tile registers: two sets (activations, weights, sums), used by turns.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row
  uint8_t rows[16] = {};
};

TileConfig config_for(int group) {
  TileConfig c;
  for (int set = 0; set < 2; ++set) {
    const int base = 3 * set;
    c.rows[base] = kRows;  // activations [16 rows][G] int8
    c.colsb[base] = (uint16_t)group;
    c.rows[base + 1] = (uint8_t)(group / 4);  // weights [G / 4 k-groups][16 rows x 4] uint8
    c.colsb[base + 1] = 64;
    c.rows[base + 2] = kRows;  // sums [16 activation rows][16 weight rows] int32
    c.colsb[base + 2] = 64;
  }
  return c;
}

// The tile product of one block: the intrinsics name tile registers by literal numbers.
#define KVLM_TILE_SUMS(A, B, C, weights, qa, lda, sums) \
  do {                                                \
    _tile_loadd(B, weights, 64);                      \
    _tile_loadd(A, qa, lda);                          \
    _tile_zero(C);                                    \
    _tile_dpbsud(C, A, B);                            \
    _tile_stored(C, sums, 64);                        \
  } while (0)

// sums[m][r] = dot(activation row m0 + m, weight row r) over one block's G columns, in tile
// set SET: `weights` are its G / 4 k-groups as bytes, qa points at row m0, its first column.
template <int SET>
inline void block_sums(const QGemmArgs& a, const uint8_t* weights, const int8_t* qa,
                       int32_t* sums) {
  if constexpr (SET == 0) {
    KVLM_TILE_SUMS(0, 1, 2, weights, qa, a.lda, sums);
  } else {
    KVLM_TILE_SUMS(3, 4, 5, weights, qa, a.lda, sums);
  }
}

#undef KVLM_TILE_SUMS

// acc[m] += block g's part for activation rows m0 .. m0 + 15 (sums from block_sums; dav and
// sa [16][n_groups] from row_factors).
template <int BITS, int G, bool F16>
inline void add_sums(const QGemmArgs& a, const uint8_t* blk, int64_t g, const int32_t* sums,
                     const float* dav, const float* sa, __m512* acc) {
  const avx512::BlockScales<BITS, G, F16> sc(a, blk);
  for (int m = 0; m < kRows; ++m) {
    const int64_t i = m * a.n_groups + g;
    acc[m] = avx512::add_block(_mm512_load_si512(sums + kTileRows * m), sc.d, sc.mn, dav[i],
                               sa[i], acc[m]);
  }
}

// The blocks of a row block are walked in chunks of kChunk, tile after tile: chunk q + 1's
// products are issued (and a 4-bit chunk q + 2 unpacked) before chunk q's sums are scaled, as
// reading memory right after a store to it (tile sums, unpacked weights) stalls.
constexpr int kChunk = 8;

// Rows m0 .. m0 + 15 of out for tiles [t0, t1).
template <int BITS, int G, bool F16>
void row_block(const QGemmArgs& a, int64_t m0, int64_t t0, int64_t t1, float* dav, float* sa) {
  constexpr int KG = G / 4 * 64;  // bytes of a block's k-groups as bytes
  alignas(64) int32_t sums[2][kChunk][kRows * kTileRows];
  alignas(64) uint8_t unpacked[2][BITS == 4 ? kChunk * KG : 64];
  const int64_t bb = a.block_bytes, ng = a.n_groups;
  for (int m = 0; m < kRows; ++m)
    for (int64_t g = 0; g < ng; ++g)
      avx512::row_factors<G>(a, m0 + m, g, dav + m * ng + g, sa + m * ng + g);
  const int8_t* qa = a.qa + m0 * a.lda;
  const int64_t per_tile = (ng + kChunk - 1) / kChunk, num_chunks = (t1 - t0) * per_tile;
  // Chunk q: tile t0 + q / per_tile, blocks [g0, g1) of it.
  auto blocks = [&](int64_t q, const uint8_t*& w, int64_t& g0, int64_t& g1) {
    w = a.w + (t0 + q / per_tile) * ng * bb;
    g0 = q % per_tile * kChunk;
    g1 = std::min<int64_t>(g0 + kChunk, ng);
  };
  auto unpack = [&](int64_t q) {
    if constexpr (BITS == 4) {
      if (q >= num_chunks) return;
      const uint8_t* w;
      int64_t g0, g1;
      blocks(q, w, g0, g1);
      for (int64_t g = g0; g < g1; ++g)
        for (int j = 0; j < G / 4; ++j)
          _mm512_store_si512(unpacked[q % 2] + (g - g0) * KG + 64 * j,
                             avx512::weight_kgroup<BITS, G>(w + g * bb, j));
    }
  };
  auto products = [&](int64_t q) {
    if (q >= num_chunks) return;
    const uint8_t* w;
    int64_t g0, g1;
    blocks(q, w, g0, g1);
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* weights = BITS == 4 ? unpacked[q % 2] + (g - g0) * KG : w + g * bb;
      int32_t* out = sums[q % 2][g - g0];
      if (g % 2 == 0) {
        block_sums<0>(a, weights, qa + g * G, out);
      } else {
        block_sums<1>(a, weights, qa + g * G, out);
      }
    }
  };
  __m512 acc[kRows];
  unpack(0);
  products(0);
  unpack(1);
  for (int64_t q = 0; q < num_chunks; ++q) {
    products(q + 1);
    unpack(q + 2);
    const uint8_t* w;
    int64_t g0, g1;
    blocks(q, w, g0, g1);
    if (g0 == 0)
      for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = g0; g < g1; ++g)
      add_sums<BITS, G, F16>(a, w + g * bb, g, sums[q % 2][g - g0], dav, sa, acc);
    if (g1 == ng) {
      const int64_t t = t0 + q / per_tile;
      for (int m = 0; m < kRows; ++m) avx512::store_rows(a, m0 + m, t * kTileRows, acc[m]);
    }
  }
}

template <int BITS, int G, bool F16>
void run(const QGemmArgs& a, int64_t t0, int64_t t1) {
  std::vector<float> factors(2 * kRows * a.n_groups);
  float* dav = factors.data();
  for (int64_t m0 = 0; m0 + kRows <= a.M; m0 += kRows)
    row_block<BITS, G, F16>(a, m0, t0, t1, dav, dav + kRows * a.n_groups);
}

template <int BITS, int G, bool F16>
void run_tiles(const QGemmArgs& a, int64_t t0, int64_t t1) {
  const TileConfig config = config_for(G);
  _tile_loadconfig(&config);
  run<BITS, G, F16>(a, t0, t1);
  _tile_release();
}

}  // namespace

void qgemm_amx(const QGemmArgs& a, int64_t t0, int64_t t1) {
  const bool f16 = a.scale_bytes == 2;
  const int64_t whole = a.M / kRows * kRows;  // rows the tiles take
  if (whole > 0) {
    if (a.bits == 4) {  // 6-bit values are stored as bytes: the 8-bit kernel reads them as is
      f16 ? run_tiles<4, 32, true>(a, t0, t1) : run_tiles<4, 32, false>(a, t0, t1);
    } else if (a.group == 32) {
      f16 ? run_tiles<8, 32, true>(a, t0, t1) : run_tiles<8, 32, false>(a, t0, t1);
    } else {
      f16 ? run_tiles<8, 16, true>(a, t0, t1) : run_tiles<8, 16, false>(a, t0, t1);
    }
  }
  if (whole == a.M) return;
  QGemmArgs rest = a;  // the last M % 16 rows
  rest.qa += whole * a.lda;
  rest.da += whole * a.ldd;
  rest.asum += whole * a.lds;
  rest.out += whole * a.ldo;
  rest.M -= whole;
  qgemm_avx512(rest, t0, t1);
}

}  // namespace kvlm

#pragma GCC pop_options
