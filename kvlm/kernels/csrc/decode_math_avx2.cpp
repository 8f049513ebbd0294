// AVX2 + FMA versions of decode_math.h. exp is a degree-6 polynomial after range reduction
// (relative error ~1e-7), so softmax, SiLU and GELU never call libm per element.
#include <immintrin.h>

#include <cmath>

#include "decode_math.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace kvlm {
namespace decode {
namespace {

// e^x for x in [-87.3, 88.3] (clamped there: 2^n stays a normal float).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln2, ln2 in two parts
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

void attend(const float* q, const float* k, const float* v, const int64_t* rows, int64_t n,
            int64_t stride, int64_t hd, float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float s = dot(q, k + rows[j] * stride, hd) * scale;
    scores[j] = s;
    mx = s > mx ? s : mx;
  }
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sumv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
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
    const int64_t width = hd - c < 64 ? hd - c : 64;
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const float* vr = v + rows[t] * stride + c;
      const __m256 p = _mm256_set1_ps(scores[t]);
      for (int r = 0; r < width / 8; ++r)
        acc[r] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * r), acc[r]);
    }
    for (int r = 0; r < width / 8; ++r) _mm256_storeu_ps(out + c + 8 * r, _mm256_mul_ps(acc[r], inv));
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

void add(float* x, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) x[i] += y[i];
}

}  // namespace decode
}  // namespace kvlm

#pragma GCC pop_options
