// AVX2 vectors of the paged prefill (paged_prefill.h): 8 lanes, register blocks of 6 rows x
// 2 vectors (12 accumulators of the 16 registers). Only this file is compiled for these
// instructions.
#include <immintrin.h>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_math.h"
#include "paged_prefill.h"  // the driver, compiled for these instructions too

namespace kvlm {
namespace prefill {
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8, kRows = 6, kCols = 2;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

  static V exp(V x) { return avx2::exp8(x); }
  static float sum(V x) { return avx2::hsum(x); }

  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float max(V x) { return avx2::hmax(x); }
  static void halves(const uint16_t* h, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    for (; i < n; ++i) out[i] = half_to_float(h[i]);
  }
};

}  // namespace

void paged_prefill_avx2(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                        int64_t num_items) {
  run_items<Avx2>(a, next, order, num_items);
}

}  // namespace prefill
}  // namespace kvlm

#pragma GCC pop_options
