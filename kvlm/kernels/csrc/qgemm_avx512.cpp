// AVX-512 VNNI kernels: one zmm lane per output row of a 16-row tile, 4 columns per lane per
// vpdpbusd (unsigned weights x signed activations). Each unpacked weight block is reused by up to
// kMaxRows activation rows before the next block is read. Only this file is compiled for these
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

// acc[m] (16 rows of the tile) += this tile's dot products with activation rows m0 .. m0 + MT.
template <int BITS, int G, bool F16, int MT>
inline void tile_rows(const QGemmArgs& a, const uint8_t* wb, int64_t m0, __m512* acc) {
  constexpr int NJ = G / 4;                      // k-groups of 4 columns per block
  constexpr int QB = kTileRows * G * BITS / 8;   // quant bytes per block
  constexpr int SB = F16 ? 2 : 4;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int8_t* qa[MT];
  const float* da[MT];
  const int32_t* as[MT];
  for (int m = 0; m < MT; ++m) {
    qa[m] = a.qa + (m0 + m) * a.lda;
    da[m] = a.da + (m0 + m) * a.ldd;
    as[m] = a.asum + (m0 + m) * a.lds;
  }
  for (int64_t g = 0; g < a.n_groups; ++g, wb += a.block_bytes) {
    __m512i w[NJ];
    if constexpr (BITS == 4) {
      for (int c = 0; c < NJ / 2; ++c) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * c);
        w[c] = _mm512_and_si512(v, low4);
        w[c + NJ / 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
    } else {
      for (int j = 0; j < NJ; ++j) w[j] = _mm512_loadu_si512(wb + 64 * j);
    }
    const __m512 d = load_scales<F16>(wb + QB);
    const __m512 mn = load_scales<F16>(wb + QB + kTileRows * SB);
    const int64_t k0 = g * G;
    for (int m = 0; m < MT; ++m) {
      const int32_t* ap = reinterpret_cast<const int32_t*>(qa[m] + k0);
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int j = 0; j < NJ; j += 2) {
        s0 = _mm512_dpbusd_epi32(s0, w[j], _mm512_set1_epi32(ap[j]));
        s1 = _mm512_dpbusd_epi32(s1, w[j + 1], _mm512_set1_epi32(ap[j + 1]));
      }
      const float dav = da[m][k0 / kActBlock];
      const int32_t s = G == 32 ? as[m][2 * g] + as[m][2 * g + 1] : as[m][g];
      const __m512 isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      acc[m] = _mm512_fmadd_ps(isum, _mm512_mul_ps(d, _mm512_set1_ps(dav)), acc[m]);
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
  if (a.bits == 4) {
    f16 ? run<4, 32, true>(a, t0, t1) : run<4, 32, false>(a, t0, t1);
  } else if (a.group == 32) {
    f16 ? run<8, 32, true>(a, t0, t1) : run<8, 32, false>(a, t0, t1);
  } else {
    f16 ? run<8, 16, true>(a, t0, t1) : run<8, 16, false>(a, t0, t1);
  }
}

}  // namespace kvlm

#pragma GCC pop_options
