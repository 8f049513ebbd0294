// AVX-512 inner loops of the paged attention (paged_attention.h): as the AVX2 file, 16 lanes
// wide (a 64-wide head is 4 registers), same register blocks. Only this file is compiled for
// these instructions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "avx2_math.h"
#include "paged_attention.h"  // the driver, compiled for these instructions too

namespace kvlm {
namespace paged {
namespace {

// e^x, avx2::exp8's polynomial on 16 lanes.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), x);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// 16 stored values of one head row from element d, before their scale.
template <int F>
inline __m512 load16(const uint8_t* src, int64_t d) {
  if constexpr (F == kF32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(src) + d);
  } else if constexpr (F == kF16 || F == kBF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * d));
    if constexpr (F == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kInt8) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else if constexpr (F == kFp8) {
    const __m512i x =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
    const __m512 mag = _mm512_mul_ps(
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x7F)), 20)),
        _mm512_set1_ps(0x1p120f));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign));
  } else {  // int4: 8 bytes, even element in the low nibble, stored offset by 8
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d / 2));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i nibbles =
        _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m512i x = _mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles), _mm512_set1_epi32(8));
    return _mm512_cvtepi32_ps(x);
  }
}

inline __m256 fold(__m512 x) {
  return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
}

// As the AVX2 file's, 16 lanes: keys j .. j + KB - 1 at element d, dequantized.
template <int F, int KB>
inline void load_keys(const uint8_t* k, const int64_t* off, const float* ks, int64_t nsc,
                      int64_t j, int64_t n, int64_t d, __m512* out) {
  for (int i = 0; i < KB; ++i) {
    const int64_t key = std::min(j + i, n - 1);
    out[i] = load16<F>(k + off[key], d);
    if constexpr (F >= kInt8) out[i] = _mm512_mul_ps(out[i], _mm512_set1_ps(ks[key * nsc + scale_index(nsc, d)]));
  }
}

// RB query rows x KB = 8 / RB keys a round, folded to 8 lanes and transposed; the columns past
// the last multiple of 16 are left to scores_tail (as the AVX2 file).
template <int F, int RB>
void scores_rows(const float* q, const uint8_t* k, const int64_t* off, const float* ks,
                 int64_t nsc, int64_t n, int64_t hd, float* s) {
  constexpr int KB = 8 / RB;
  const int64_t hv = hd / 16 * 16;
  for (int64_t j = 0; j < n; j += KB) {
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hv; d += 16) {
      __m512 kv[KB];
      load_keys<F, KB>(k, off, ks, nsc, j, n, d, kv);
      for (int r = 0; r < RB; ++r) {
        const __m512 qv = _mm512_loadu_ps(q + r * hd + d);
        for (int i = 0; i < KB; ++i) acc[r * KB + i] = _mm512_fmadd_ps(qv, kv[i], acc[r * KB + i]);
      }
    }
    __m256 half[8];
    for (int i = 0; i < 8; ++i) half[i] = fold(acc[i]);
    alignas(32) float sums[8];
    _mm256_store_ps(sums, avx2::transpose_sum(half));
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < KB; ++i) s[r * kKeyTile + j + i] = sums[r * KB + i];
  }
}

// acc[r][c .. c + 16 CB) += sum_j p[r][j] v[j] for RB rows.
template <int F, int RB, int CB>
void accumulate_cols(const float* p, const uint8_t* v, const int64_t* off, const float* vs,
                     int64_t nsc, int64_t n, int64_t hd, int64_t c, float* acc) {
  __m512 o[RB * CB];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < CB; ++i) o[r * CB + i] = _mm512_loadu_ps(acc + r * hd + c + 16 * i);
  for (int64_t j = 0; j < n; ++j) {
    __m512 w[RB];
    for (int r = 0; r < RB; ++r) w[r] = _mm512_set1_ps(p[r * kKeyTile + j]);
    const uint8_t* row = v + off[j];
    for (int i = 0; i < CB; ++i) {
      __m512 x = load16<F>(row, c + 16 * i);
      if constexpr (F >= kInt8)
        x = _mm512_mul_ps(x, _mm512_set1_ps(vs[j * nsc + scale_index(nsc, c + 16 * i)]));
      for (int r = 0; r < RB; ++r) o[r * CB + i] = _mm512_fmadd_ps(w[r], x, o[r * CB + i]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < CB; ++i) _mm512_storeu_ps(acc + r * hd + c + 16 * i, o[r * CB + i]);
}

template <int F, int RB>
void accumulate_rows(const float* p, const uint8_t* v, const int64_t* off, const float* vs,
                     int64_t nsc, int64_t group, int64_t n, int64_t hd, float* acc) {
  constexpr int CB = 8 / RB;
  const int64_t hv = hd / 16 * 16;
  int64_t c = 0;
  for (; c + 16 * CB <= hv; c += 16 * CB)
    accumulate_cols<F, RB, CB>(p, v, off, vs, nsc, n, hd, c, acc);
  for (; c < hv; c += 16) accumulate_cols<F, RB, 1>(p, v, off, vs, nsc, n, hd, c, acc);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = hv; d < hd; ++d) {
      const float x = element(F, v + off[j], vs + j * nsc, group, d);
      for (int r = 0; r < RB; ++r) acc[r * hd + d] += p[r * kKeyTile + j] * x;
    }
}

template <int F>
void scores_f(const float* q, int64_t R, const uint8_t* k, const int64_t* off, const float* ks,
              int64_t nsc, int64_t group, int64_t n, int64_t hd, float* s) {
  row_blocks(R, [&](auto rows, int64_t r) {
    scores_rows<F, rows.value>(q + r * hd, k, off, ks, nsc, n, hd, s + r * kKeyTile);
  });
  if (hd % 16) scores_tail(F, q, R, k, off, ks, nsc, group, n, hd / 16 * 16, hd, s);
}

template <int F>
void accumulate_f(const float* p, int64_t R, const uint8_t* v, const int64_t* off,
                  const float* vs, int64_t nsc, int64_t group, int64_t n, int64_t hd,
                  float* acc) {
  row_blocks(R, [&](auto rows, int64_t r) {
    accumulate_rows<F, rows.value>(p + r * kKeyTile, v, off, vs, nsc, group, n, hd, acc + r * hd);
  });
}

struct Avx512Ops {
  static void scales(const uint16_t* sc, const int64_t* soff, int64_t n, int64_t nsc,
                     float* out) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < nsc; g += 16) {
        const __mmask16 live = (__mmask16)((1u << std::min<int64_t>(nsc - g, 16)) - 1);
        _mm512_mask_storeu_ps(out + j * nsc + g, live,
                              _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, sc + soff[j] + g)));
      }
  }

  static void scores(int format, const float* q, int64_t R, const uint8_t* k,
                     const int64_t* off, const float* ks, int64_t nsc, int64_t group, int64_t n,
                     int64_t hd, float* s) {
    KVLM_BY_FORMAT(format, scores_f, q, R, k, off, ks, nsc, group, n, hd, s)
  }

  static float exp_sum(float* s, int64_t n, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 live = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), mv));
      _mm512_mask_storeu_ps(s + j, live, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, e));
    }
    return _mm512_reduce_add_ps(sum);
  }

  static void accumulate(int format, const float* p, int64_t R, const uint8_t* v,
                         const int64_t* off, const float* vs, int64_t nsc, int64_t group,
                         int64_t n, int64_t hd, float* acc) {
    KVLM_BY_FORMAT(format, accumulate_f, p, R, v, off, vs, nsc, group, n, hd, acc)
  }

  static void scale_rows(float* x, int64_t n, float c) {
    const __m512 cv = _mm512_set1_ps(c);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), cv));
    for (; i < n; ++i) x[i] *= c;
  }
};

}  // namespace

void paged_attention_avx512(const Args& a, int64_t i0, int64_t i1) {
  run_items<Avx512Ops>(a, i0, i1);
}

}  // namespace paged
}  // namespace kvlm

#pragma GCC pop_options
