// AVX2 + FMA versions of decode_math.h. exp is a degree-6 polynomial after range reduction
// (relative error ~1e-7, avx2_math.h), so SiLU and GELU never call libm per element.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "decode_math.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_math.h"

namespace kvlm {
namespace decode {

using avx2::exp8;
using avx2::hsum;

void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / (float)n + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i,
                     _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) out[i] = x[i] * r * w[i];
}

void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h, x += hd) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * cos[i] + b * sin[i];
      x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

void store_row(const float* x, void* dst, int64_t n, KVType type) {
  if (type == kKVFloat32) {
    std::memcpy(dst, x, n * sizeof(float));
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    if (type == kKVFloat16) {
      out[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
    } else {
      uint32_t bits;
      std::memcpy(&bits, &x[i], 4);
      const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
      out[i] = nan ? (uint16_t)((bits >> 16) | 0x40) : (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }
  }
}

void gated_act(const float* gate, const float* up, float* out, int64_t n, int act) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    __m256 a;
    if (act == 0) {  // g * sigmoid(g)
      a = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    } else {  // 0.5 g (1 + tanh(u)), tanh(u) = 1 - 2 / (e^2u + 1)
      const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
      const __m256 e = exp8(_mm256_add_ps(u, u));
      const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
      a = _mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, t));
    }
    _mm256_storeu_ps(out + i, _mm256_mul_ps(a, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    const float a = act == 0 ? g / (1.0f + std::exp(-g))
                             : 0.5f * g * (1.0f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    out[i] = a * up[i];
  }
}

int64_t argmax(const float* x, int64_t n) {
  int64_t i = 0, best = 0;
  float best_value = x[0];
  if (n >= 8 && n < (int64_t{1} << 31)) {
    __m256 maxv = _mm256_loadu_ps(x);
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = idx;
    __m256 nan = _mm256_cmp_ps(maxv, maxv, _CMP_UNORD_Q);
    const __m256i eight = _mm256_set1_epi32(8);
    for (i = 8; i + 8 <= n; i += 8) {
      cur = _mm256_add_epi32(cur, eight);
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 gt = _mm256_cmp_ps(v, maxv, _CMP_GT_OQ);  // strict: a lane keeps its first
      maxv = _mm256_blendv_ps(maxv, v, gt);
      idx = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(cur), gt));
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    if (_mm256_movemask_ps(nan)) {  // rare: find the first NaN the plain way
      for (int64_t j = 0; j < n; ++j)
        if (std::isnan(x[j])) return j;
    }
    alignas(32) float values[8];
    alignas(32) int32_t indices[8];
    _mm256_store_ps(values, maxv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(indices), idx);
    best_value = values[0];
    best = indices[0];
    for (int r = 1; r < 8; ++r)  // the largest value; among equal ones, the first index
      if (values[r] > best_value || (values[r] == best_value && indices[r] < best)) {
        best_value = values[r];
        best = indices[r];
      }
  }
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > best_value) {
      best_value = x[i];
      best = i;
    }
  }
  return best;
}

void add(float* x, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) x[i] += y[i];
}

}  // namespace decode
}  // namespace kvlm

#pragma GCC pop_options
