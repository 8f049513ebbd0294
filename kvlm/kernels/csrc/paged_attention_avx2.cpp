// AVX2 + FMA + F16C inner loops of the paged attention (paged_attention.h): one K or V tile is
// dequantized into L1 (int4 nibbles unpacked in registers, fp8 by exponent shift), then 8 keys
// a round give 8 dot products per query row; the exp is avx2_math.h's polynomial. Only this
// file is compiled for these instructions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_math.h"
#include "paged_attention.h"  // the driver, compiled for these instructions too

namespace kvlm {
namespace paged {
namespace {

// 8 stored values of one head row from element d, before their scale.
template <int F>
inline __m256 load8(const uint8_t* src, int64_t d) {
  if constexpr (F == kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(src) + d);
  } else if constexpr (F == kF16 || F == kBF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * d));
    if constexpr (F == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kInt8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else if constexpr (F == kFp8) {
    const __m256i x =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d)));
    const __m256 mag = _mm256_mul_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7F)), 20)),
        _mm256_set1_ps(0x1p120f));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
    return _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
  } else {  // int4: 4 bytes, even element in the low nibble, stored offset by 8
    int32_t word;
    std::memcpy(&word, src + d / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(word), low4 = _mm_set1_epi8(0x0F);
    const __m128i nibbles =
        _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m256i x = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), _mm256_set1_epi32(8));
    return _mm256_cvtepi32_ps(x);
  }
}

template <int F>
void dequant_rows(const Args& a, const uint8_t* src, const uint16_t* scales, int64_t n,
                  float* out) {
  const int64_t hd = a.hd, group = a.num_scales ? hd / a.num_scales : hd;
  const int64_t vec_end = group % 8 == 0 && a.num_scales <= 8 ? hd : 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* row = src + j * a.row_bytes;
    const uint16_t* sc = scales ? scales + j * a.scale_row : nullptr;
    float* o = out + j * hd;
    alignas(32) float scale[8];  // the row's scales, converted once (num_scales <= 8 here)
    if constexpr (F >= kInt8)
      if (vec_end) {
        alignas(16) uint16_t halves[8] = {0};
        std::memcpy(halves, sc, a.num_scales * sizeof(uint16_t));
        _mm256_store_ps(scale, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<__m128i*>(halves))));
      }
    for (int64_t d = 0; d < vec_end; d += 8) {
      __m256 x = load8<F>(row, d);
      if constexpr (F >= kInt8) x = _mm256_mul_ps(x, _mm256_set1_ps(scale[d / group]));
      _mm256_storeu_ps(o + d, x);
    }
    dequant_tail(F, row, sc, hd, group, vec_end, o);
  }
}

inline float dot_tail(const float* x, const float* y, int64_t d0, int64_t hd) {
  float sum = 0.0f;
  for (int64_t d = d0; d < hd; ++d) sum += x[d] * y[d];
  return sum;
}

struct Avx2Ops {
  static void dequant(const Args& a, const uint8_t* src, const uint16_t* scales, int64_t n,
                      float* out) {
    switch (a.format) {
      case kF32: dequant_rows<kF32>(a, src, scales, n, out); break;
      case kF16: dequant_rows<kF16>(a, src, scales, n, out); break;
      case kBF16: dequant_rows<kBF16>(a, src, scales, n, out); break;
      case kInt8: dequant_rows<kInt8>(a, src, scales, n, out); break;
      case kInt4: dequant_rows<kInt4>(a, src, scales, n, out); break;
      default: dequant_rows<kFp8>(a, src, scales, n, out); break;
    }
  }

  static void scores(const float* q, int64_t R, const float* k, int64_t ldk, int64_t n,
                     int64_t hd, float* s) {
    const int64_t hv = hd / 8 * 8;
    for (int64_t r = 0; r < R; ++r, q += hd, s += kKeyTile) {
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {  // 8 independent sums, one transpose to add them
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < hv; d += 8) {
          const __m256 qv = _mm256_loadu_ps(q + d);
          for (int i = 0; i < 8; ++i)
            acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (j + i) * ldk + d), acc[i]);
        }
        _mm256_storeu_ps(s + j, avx2::transpose_sum(acc));
        if (hv < hd)
          for (int i = 0; i < 8; ++i) s[j + i] += dot_tail(q, k + (j + i) * ldk, hv, hd);
      }
      for (; j < n; ++j) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < hv; d += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + j * ldk + d), acc);
        s[j] = avx2::hsum(acc) + dot_tail(q, k + j * ldk, hv, hd);
      }
    }
  }

  static float exp_sum(float* s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = avx2::hsum(sum);
    if (j < n) {  // the tail through a padded register
      alignas(32) float tail[8] = {0};
      for (int64_t t = j; t < n; ++t) tail[t - j] = s[t] - m;
      _mm256_store_ps(tail, avx2::exp8(_mm256_load_ps(tail)));
      for (int64_t t = j; t < n; ++t) total += (s[t] = tail[t - j]);
    }
    return total;
  }

  static void accumulate(const float* p, int64_t R, const float* v, int64_t ldv, int64_t n,
                         int64_t hd, float* acc) {
    const int64_t hv = hd / 8 * 8;
    for (int64_t r = 0; r < R; ++r, p += kKeyTile, acc += hd) {
      for (int64_t c = 0; c < hv; c += 64) {  // 64 output columns (8 registers) per pass
        const int width = (int)(std::min<int64_t>(hv - c, 64) / 8);
        __m256 o[8];
        for (int i = 0; i < width; ++i) o[i] = _mm256_loadu_ps(acc + c + 8 * i);
        for (int64_t j = 0; j < n; ++j) {
          const __m256 w = _mm256_set1_ps(p[j]);
          const float* vj = v + j * ldv + c;
          for (int i = 0; i < width; ++i) o[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vj + 8 * i), o[i]);
        }
        for (int i = 0; i < width; ++i) _mm256_storeu_ps(acc + c + 8 * i, o[i]);
      }
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = hv; d < hd; ++d) acc[d] += p[j] * v[j * ldv + d];
    }
  }

  static void scale_rows(float* x, int64_t n, float c) {
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), cv));
    for (; i < n; ++i) x[i] *= c;
  }
};

}  // namespace

void paged_attention_avx2(const Args& a, int64_t i0, int64_t i1) { run_items<Avx2Ops>(a, i0, i1); }

}  // namespace paged
}  // namespace kvlm

#pragma GCC pop_options
