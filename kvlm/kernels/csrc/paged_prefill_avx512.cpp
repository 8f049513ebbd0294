// AVX-512 vectors of the paged prefill (paged_prefill.h): 16 lanes, register blocks of 6 rows x
// 4 vectors (24 accumulators). Only this file is compiled for these instructions.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "avx2_math.h"
#include "paged_prefill.h"  // the driver, compiled for these instructions too

namespace kvlm {
namespace prefill {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16, kRows = 6, kCols = 4;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }

  static V exp(V x) {  // avx2::exp8 on each half
    return _mm512_insertf32x8(_mm512_castps256_ps512(avx2::exp8(_mm512_castps512_ps256(x))),
                              avx2::exp8(_mm512_extractf32x8_ps(x, 1)), 1);
  }
  static float sum(V x) { return _mm512_reduce_add_ps(x); }

  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float max(V x) { return _mm512_reduce_max_ps(x); }
  static void halves(const uint16_t* h, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                    reinterpret_cast<const __m256i*>(h + i))));
    for (; i < n; ++i) out[i] = half_to_float(h[i]);
  }
};

}  // namespace

void paged_prefill_avx512(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                          int64_t num_items) {
  run_items<Avx512>(a, next, order, num_items);
}

}  // namespace prefill
}  // namespace kvlm

#pragma GCC pop_options
