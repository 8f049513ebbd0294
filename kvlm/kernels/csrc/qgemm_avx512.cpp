// AVX-512 VNNI kernels: one zmm lane per output row of a 16-row tile, 4 columns per lane per
// vpdpbusd (unsigned weights x signed activations). Each unpacked weight register is reused
// by up to kMaxRows activation rows. Only this file is compiled for these
// instructions; ops.cpp calls it after checking the CPU's flags.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")

namespace kvlm {
namespace {

constexpr int kMaxRows = 4;

template <bool F16>
inline __m512 load_scales(const uint8_t* p) {
  if constexpr (F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

// Weights of k-group j of one block (16 rows x 4 columns per register).
template <int BITS, int G>
inline __m512i weight_kgroup(const uint8_t* blk, int j) {
  if constexpr (BITS == 4) {
    constexpr int HALF = G / 8;
    const __m512i v = _mm512_loadu_si512(blk + 64 * (j % HALF));
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    return j < HALF ? _mm512_and_si512(v, low4) : _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  } else {
    return _mm512_loadu_si512(blk + 64 * j);
  }
}

// acc[m] (the 16 rows of one tile) += dot products with activation rows m0 .. m0 + MT. Each
// weight register is used by all MT rows. One row (decode) splits each int32 sum into two
// chains to hide vpdpbusd latency. Tiles are walked one at a time: a single stream through
// memory per thread was faster than two interleaved tiles at every row count measured
// (1 to 256 rows; 1 row: 5.8 vs 8.4 ms per SmolLM2 forward on one Zen 4 core).
template <int BITS, int G, bool F16, int MT>
inline void tile_rows(const QGemmArgs& a, const uint8_t* wb, int64_t m0, __m512* acc) {
  constexpr int NJ = G / 4;                     // k-groups of 4 columns per block
  constexpr int QB = kTileRows * G * BITS / 8;  // quant bytes per block
  constexpr int SB = F16 ? 2 : 4;
  constexpr int CH = MT == 1 ? 2 : 1;  // independent sum chains per row
  const int8_t* qa[MT];
  const float* da[MT];
  const int32_t* as[MT];
  for (int m = 0; m < MT; ++m) {
    qa[m] = a.qa + (m0 + m) * a.lda;
    da[m] = a.da + (m0 + m) * a.ldd;
    as[m] = a.asum + (m0 + m) * a.lds;
  }
  for (int64_t g = 0; g < a.n_groups; ++g, wb += a.block_bytes) {
    const int64_t k0 = g * G;
    __m512i isum[MT][CH];
    for (int m = 0; m < MT; ++m)
      for (int c = 0; c < CH; ++c) isum[m][c] = _mm512_setzero_si512();
    for (int j = 0; j < NJ; ++j) {
      const __m512i w = weight_kgroup<BITS, G>(wb, j);
      for (int m = 0; m < MT; ++m) {
        const __m512i x = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(qa[m] + k0)[j]);
        isum[m][j % CH] = _mm512_dpbusd_epi32(isum[m][j % CH], w, x);
      }
    }
    const __m512 d = load_scales<F16>(wb + QB);
    const __m512 mn = a.symmetric ? _mm512_mul_ps(d, _mm512_set1_ps(-128.0f))
                                  : load_scales<F16>(wb + QB + kTileRows * SB);
    for (int m = 0; m < MT; ++m) {
      const float dav = da[m][k0 / kActBlock];
      const int32_t s = G == 32 ? as[m][2 * g] + as[m][2 * g + 1] : as[m][g];
      __m512i total = isum[m][0];
      if constexpr (CH == 2) total = _mm512_add_epi32(total, isum[m][1]);
      const __m512 fs = _mm512_cvtepi32_ps(total);
      acc[m] = _mm512_fmadd_ps(fs, _mm512_mul_ps(d, _mm512_set1_ps(dav)), acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(dav * (float)s), acc[m]);
    }
  }
}

template <int BITS, int G, bool F16, int MT>
inline void tile_store(const QGemmArgs& a, int64_t t, int64_t m0) {
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  tile_rows<BITS, G, F16, MT>(a, a.w + t * a.n_groups * a.block_bytes, m0, acc);
  const int64_t n0 = t * kTileRows;
  const int64_t valid = a.N - n0 < kTileRows ? a.N - n0 : kTileRows;
  const __mmask16 mask = (__mmask16)((1u << valid) - 1);
  for (int m = 0; m < MT; ++m) _mm512_mask_storeu_ps(a.out + (m0 + m) * a.ldo + n0, mask, acc[m]);
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
