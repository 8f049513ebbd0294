// AVX-512 VNNI kernels: one zmm lane per output row of a 16-row tile, 4 columns per lane per
// vpdpbusd (unsigned weights x signed activations). Each unpacked weight register is reused
// by up to kMaxRows activation rows. Only this file is compiled for these
// instructions; ops.cpp calls it after checking the CPU's flags.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

#include "qgemm_avx512.h"

namespace kvlm {
namespace {

constexpr int kMaxRows = 4;

// acc[m] (the 16 rows of one tile) += dot products with activation rows m0 .. m0 + MT. Each
// weight register is used by all MT rows. One row (decode) splits each int32 sum into two
// chains to hide vpdpbusd latency. Tiles are walked one at a time: a single stream through
// memory per thread was faster than two interleaved tiles at every row count measured
// (1 to 256 rows; 1 row: 5.8 vs 8.4 ms per SmolLM2 forward on one Zen 4 core).
template <int BITS, int G, bool F16, int MT>
inline void tile_rows(const QGemmArgs& a, const uint8_t* wb, int64_t m0, __m512* acc) {
  constexpr int NJ = G / 4;            // k-groups of 4 columns per block
  constexpr int CH = MT == 1 ? 2 : 1;  // independent sum chains per row
  const int8_t* qa[MT];
  for (int m = 0; m < MT; ++m) qa[m] = a.qa + (m0 + m) * a.lda;
  for (int64_t g = 0; g < a.n_groups; ++g, wb += a.block_bytes) {
    const int64_t k0 = g * G;
    __m512i isum[MT][CH];
    for (int m = 0; m < MT; ++m)
      for (int c = 0; c < CH; ++c) isum[m][c] = _mm512_setzero_si512();
    for (int j = 0; j < NJ; ++j) {
      const __m512i w = avx512::weight_kgroup<BITS, G>(wb, j);
      for (int m = 0; m < MT; ++m) {
        const __m512i x = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(qa[m] + k0)[j]);
        isum[m][j % CH] = _mm512_dpbusd_epi32(isum[m][j % CH], w, x);
      }
    }
    const avx512::BlockScales<BITS, G, F16> sc(a, wb);
    for (int m = 0; m < MT; ++m) {
      __m512i total = isum[m][0];
      if constexpr (CH == 2) total = _mm512_add_epi32(total, isum[m][1]);
      float dav, sa;
      avx512::row_factors<G>(a, m0 + m, g, &dav, &sa);
      acc[m] = avx512::add_block(total, sc.d, sc.mn, dav, sa, acc[m]);
    }
  }
}

template <int BITS, int G, bool F16, int MT>
inline void tile_store(const QGemmArgs& a, int64_t t, int64_t m0) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  tile_rows<BITS, G, F16, MT>(a, a.w + t * a.n_groups * a.block_bytes, m0, acc);
  for (int m = 0; m < MT; ++m) avx512::store_rows(a, m0 + m, t * kTileRows, acc[m]);
}

template <int BITS, int G, bool F16>
void run(const QGemmArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m0 = 0;
    for (; m0 + kMaxRows <= a.M; m0 += kMaxRows) tile_store<BITS, G, F16, kMaxRows>(a, t, m0);
    switch (a.M - m0) {
      case 3: tile_store<BITS, G, F16, 3>(a, t, m0); break;
      case 2: tile_store<BITS, G, F16, 2>(a, t, m0); break;
      case 1: tile_store<BITS, G, F16, 1>(a, t, m0); break;
      default: break;
    }
  }
}

}  // namespace

void qgemm_avx512(const QGemmArgs& a, int64_t t0, int64_t t1) {
  const bool f16 = a.scale_bytes == 2;
  if (a.bits == 4) {  // 6-bit values are stored as bytes: the 8-bit kernel reads them as is
    f16 ? run<4, 32, true>(a, t0, t1) : run<4, 32, false>(a, t0, t1);
  } else if (a.group == 32) {
    f16 ? run<8, 32, true>(a, t0, t1) : run<8, 32, false>(a, t0, t1);
  } else {
    f16 ? run<8, 16, true>(a, t0, t1) : run<8, 16, false>(a, t0, t1);
  }
}

}  // namespace kvlm

#pragma GCC pop_options
