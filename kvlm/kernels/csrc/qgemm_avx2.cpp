// AVX2 kernels (llama.cpp's int8 dot on these CPUs): vpmaddubsw multiplies unsigned weights by
// signed activations into int16 pairs, vpmaddwd sums those into int32, one ymm lane per output
// row, so a 16-row tile is two 8-row halves. 4-bit products are small enough to sum all 8
// k-groups of a block in int16 before widening; 8-bit weights (up to 255) would saturate, so they
// are recentred to signed (u - 128), multiplied with the abs/sign trick, and 128 * sum(qa) is
// added back in integers; 6-bit weights (q < 64: Q5_*, Q6_K) need no guard and sum two
// k-groups in int16. Only this file is compiled for AVX2/FMA/F16C.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace kvlm {
namespace {

constexpr int kMaxRows = 4;
constexpr int kHalf = kTileRows / 2;

template <bool F16>
inline __m256 load_scales(const uint8_t* p) {
  if constexpr (F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

// acc[m] (rows 8h .. 8h + 8 of the tile) += dot products with activation rows m0 .. m0 + MT.
template <int BITS, int G, bool F16, int MT>
inline void half_rows(const QGemmArgs& a, const uint8_t* wb, int h, int64_t m0, __m256* acc) {
  constexpr int NJ = G / 4;
  constexpr int QB = kTileRows * G * (BITS == 4 ? 4 : 8) / 8;
  constexpr int SB = F16 ? 2 : 4;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i bias = _mm256_set1_epi8((char)0x80);
  const int8_t* qa[MT];
  const float* da[MT];
  const int32_t* as[MT];
  for (int m = 0; m < MT; ++m) {
    qa[m] = a.qa + (m0 + m) * a.lda;
    da[m] = a.da + (m0 + m) * a.ldd;
    as[m] = a.asum + (m0 + m) * a.lds;
  }
  const uint8_t* wh = wb + 32 * h;
  for (int64_t g = 0; g < a.n_groups; ++g, wh += a.block_bytes) {
    const int64_t k0 = g * G;
    const int32_t* ap[MT];
    for (int m = 0; m < MT; ++m) ap[m] = reinterpret_cast<const int32_t*>(qa[m] + k0);
    __m256i isum[MT];
    if constexpr (BITS == 4) {
      __m256i s16[MT];
      for (int m = 0; m < MT; ++m) s16[m] = _mm256_setzero_si256();
      for (int c = 0; c < NJ / 2; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh + 64 * c));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int m = 0; m < MT; ++m) {
          s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ap[m][c])));
          s16[m] = _mm256_add_epi16(
              s16[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ap[m][c + NJ / 2])));
        }
      }
      for (int m = 0; m < MT; ++m) isum[m] = _mm256_madd_epi16(s16[m], ones16);
    } else if constexpr (BITS == 6) {
      // q < 64: a product pair is at most 2 * 63 * 127, so two k-groups add up in int16
      for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
      for (int j = 0; j < NJ; j += 2) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh + 64 * j));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh + 64 * j + 64));
        for (int m = 0; m < MT; ++m) {
          const __m256i p = _mm256_add_epi16(
              _mm256_maddubs_epi16(v0, _mm256_set1_epi32(ap[m][j])),
              _mm256_maddubs_epi16(v1, _mm256_set1_epi32(ap[m][j + 1])));
          isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(p, ones16));
        }
      }
    } else {
      for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
      for (int j = 0; j < NJ; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh + 64 * j));
        const __m256i s = _mm256_xor_si256(v, bias);  // u - 128 as int8
        const __m256i abs_s = _mm256_abs_epi8(s);
        for (int m = 0; m < MT; ++m) {
          const __m256i p =
              _mm256_maddubs_epi16(abs_s, _mm256_sign_epi8(_mm256_set1_epi32(ap[m][j]), s));
          isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(p, ones16));
        }
      }
    }
    const __m256 d = load_scales<F16>(wh - 32 * h + QB + kHalf * SB * h);
    const __m256 mn = a.symmetric
                          ? _mm256_mul_ps(d, _mm256_set1_ps(-128.0f))
                          : load_scales<F16>(wh - 32 * h + QB + kTileRows * SB + kHalf * SB * h);
    for (int m = 0; m < MT; ++m) {
      const int32_t s = G == 32 ? as[m][2 * g] + as[m][2 * g + 1] : as[m][g];
      if constexpr (BITS == 8) isum[m] = _mm256_add_epi32(isum[m], _mm256_set1_epi32(128 * s));
      const float dav = da[m][k0 / kActBlock];
      const __m256 fs = _mm256_cvtepi32_ps(isum[m]);
      acc[m] = _mm256_fmadd_ps(fs, _mm256_mul_ps(d, _mm256_set1_ps(dav)), acc[m]);
      acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(dav * (float)s), acc[m]);
    }
  }
}

template <int BITS, int G, bool F16, int MT>
inline void half_store(const QGemmArgs& a, int64_t t, int h, int64_t m0) {
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  half_rows<BITS, G, F16, MT>(a, a.w + t * a.n_groups * a.block_bytes, h, m0, acc);
  const int64_t n0 = t * kTileRows + kHalf * h;
  const int64_t valid = a.N - n0;
  for (int m = 0; m < MT; ++m) {
    float* out = a.out + (m0 + m) * a.ldo + n0;
    if (valid >= kHalf) {
      _mm256_storeu_ps(out, acc[m]);
    } else {
      alignas(32) float tmp[kHalf];
      _mm256_store_ps(tmp, acc[m]);
      for (int64_t r = 0; r < valid; ++r) out[r] = tmp[r];
    }
  }
}

template <int BITS, int G, bool F16>
void run(const QGemmArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int h = 0; h < 2; ++h) {
      if (t * kTileRows + kHalf * h >= a.N) break;
      int64_t m0 = 0;
      for (; m0 + kMaxRows <= a.M; m0 += kMaxRows) half_store<BITS, G, F16, kMaxRows>(a, t, h, m0);
      switch (a.M - m0) {
        case 3: half_store<BITS, G, F16, 3>(a, t, h, m0); break;
        case 2: half_store<BITS, G, F16, 2>(a, t, h, m0); break;
        case 1: half_store<BITS, G, F16, 1>(a, t, h, m0); break;
        default: break;
      }
    }
  }
}

}  // namespace

void quantize_rows_avx2(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa,
                        float* da, int32_t* asum, int64_t m0, int64_t m1) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    int8_t* qr = qa + m * Kp;
    for (int64_t b = 0; b < Kp / kActBlock; ++b) {
      const int64_t k0 = b * kActBlock;
      if (K - k0 < kActBlock) {  // the zero-padded last block: the scalar code itself
        quantize_block(xr + k0, K - k0, qr + k0, da + m * (Kp / kActBlock) + b,
                       asum + m * (Kp / 16) + 2 * b);
        continue;
      }
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xr + k0 + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
      a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
      const float d = _mm_cvtss_f32(a4) / 127.0f;
      const float id = d > 0.0f ? 1.0f / d : 0.0f;
      const __m256 idv = _mm256_set1_ps(id);
      __m256i q[4];
      for (int i = 0; i < 4; ++i)  // x * id rounded to nearest even, as the scalar code
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], idv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // int32 -> int8 (|q| <= 127): packs interleave 128-bit lanes, the permute restores order
      const __m256i w16 = _mm256_packs_epi32(q[0], q[1]);
      const __m256i w16b = _mm256_packs_epi32(q[2], q[3]);
      const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, w16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k0), b8);
      const __m256i s01 = _mm256_add_epi32(q[0], q[1]), s23 = _mm256_add_epi32(q[2], q[3]);
      alignas(32) int32_t lo[8], hi[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lo), s01);
      _mm256_store_si256(reinterpret_cast<__m256i*>(hi), s23);
      int32_t s0 = 0, s1 = 0;
      for (int i = 0; i < 8; ++i) {
        s0 += lo[i];
        s1 += hi[i];
      }
      da[m * (Kp / kActBlock) + b] = d;
      asum[m * (Kp / 16) + 2 * b] = s0;
      asum[m * (Kp / 16) + 2 * b + 1] = s1;
    }
  }
}

void qgemm_avx2(const QGemmArgs& a, int64_t t0, int64_t t1) {
  const bool f16 = a.scale_bytes == 2;
  if (a.bits == 4) {
    f16 ? run<4, 32, true>(a, t0, t1) : run<4, 32, false>(a, t0, t1);
  } else if (a.bits == 6 && a.group == 32) {
    f16 ? run<6, 32, true>(a, t0, t1) : run<6, 32, false>(a, t0, t1);
  } else if (a.bits == 6) {
    f16 ? run<6, 16, true>(a, t0, t1) : run<6, 16, false>(a, t0, t1);
  } else if (a.group == 32) {
    f16 ? run<8, 32, true>(a, t0, t1) : run<8, 32, false>(a, t0, t1);
  } else {
    f16 ? run<8, 16, true>(a, t0, t1) : run<8, 16, false>(a, t0, t1);
  }
}

}  // namespace kvlm

#pragma GCC pop_options
