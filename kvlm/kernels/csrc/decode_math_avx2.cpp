// AVX2 + FMA versions of decode_math.h. exp is a degree-6 polynomial after range reduction
// (relative error ~1e-7), so softmax, SiLU and GELU never call libm per element.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "decode_math.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_math.h"

namespace kvlm {
namespace decode {
namespace {

using avx2::exp8;
using avx2::hmax;
using avx2::hsum;
using avx2::transpose_sum;

// x . y for n a multiple of 8, four independent sums.
inline float dot(const float* x, const float* y, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24), s3);
  }
  for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
  return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

}  // namespace

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

namespace {

template <int T>  // KVType
inline __m256 load8(const void* base, int64_t offset) {
  if constexpr (T == kKVFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + offset);
  } else {
    const __m128i h = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + offset));
    if constexpr (T == kKVFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <int T>
void attend_t(const float* q, const void* k, const void* v, const int64_t* rows, int64_t n,
              int64_t stride, int64_t hd, float scale, float* scores, float* out) {
  const __m256 sv = _mm256_set1_ps(scale);
  __m256 mxv = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // 8 keys a round: 8 independent sums, one transpose to add them
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int r = 0; r < 8; ++r)
        acc[r] = _mm256_fmadd_ps(qv, load8<T>(k, rows[j + r] * stride + d), acc[r]);
    }
    const __m256 s = _mm256_mul_ps(transpose_sum(acc), sv);
    _mm256_storeu_ps(scores + j, s);
    mxv = _mm256_max_ps(mxv, s);
  }
  float mx = hmax(mxv);
  for (; j < n; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8<T>(k, rows[j] * stride + d), acc);
    scores[j] = hsum(acc) * scale;
    mx = scores[j] > mx ? scores[j] : mx;
  }
  mxv = _mm256_set1_ps(mx);
  __m256 sumv = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mxv));
    _mm256_storeu_ps(scores + j, e);
    sumv = _mm256_add_ps(sumv, e);
  }
  float sum = hsum(sumv);
  if (j < n) {  // the tail through a padded register
    alignas(32) float tail[8] = {0};
    for (int64_t t = j; t < n; ++t) tail[t - j] = scores[t] - mx;
    alignas(32) float e[8];
    _mm256_store_ps(e, exp8(_mm256_load_ps(tail)));
    for (int64_t t = j; t < n; ++t) {
      scores[t] = e[t - j];
      sum += e[t - j];
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int64_t c = 0; c < hd; c += 64) {  // 64 output columns (8 registers) per pass over v
    const int width = (int)(hd - c < 64 ? hd - c : 64) / 8;
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t base = rows[t] * stride + c;
      const __m256 p = _mm256_set1_ps(scores[t]);
      for (int r = 0; r < width; ++r) acc[r] = _mm256_fmadd_ps(p, load8<T>(v, base + 8 * r), acc[r]);
    }
    for (int r = 0; r < width; ++r) _mm256_storeu_ps(out + c + 8 * r, _mm256_mul_ps(acc[r], inv));
  }
}

}  // namespace

void attend(const float* q, const void* k, const void* v, const int64_t* rows, int64_t n,
            int64_t stride, int64_t hd, float scale, float* scores, float* out, KVType type) {
  switch (type) {
    case kKVFloat32: attend_t<kKVFloat32>(q, k, v, rows, n, stride, hd, scale, scores, out); break;
    case kKVFloat16: attend_t<kKVFloat16>(q, k, v, rows, n, stride, hd, scale, scores, out); break;
    case kKVBFloat16: attend_t<kKVBFloat16>(q, k, v, rows, n, stride, hd, scale, scores, out); break;
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
