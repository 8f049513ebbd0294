// Scalar vectors of the paged prefill (paged_prefill.h): one lane, the same driver (compiled for
// the baseline ISA); the tests hold every path to the torch reference.
#include "paged_prefill.h"

namespace kvlm {
namespace prefill {
namespace {

struct Scalar {
  using V = float;
  static constexpr int W = 1, kRows = 1, kCols = 1;
  static V zero() { return 0.0f; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V set1(float x) { return x; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V exp(V x) { return std::exp(x); }
  static float sum(V x) { return x; }
  static V max(V a, V b) { return std::max(a, b); }
  static float max(V x) { return x; }
  static void halves(const uint16_t* h, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
  }
};

}  // namespace

void paged_prefill_ref(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                       int64_t num_items) {
  run_items<Scalar>(a, next, order, num_items);
}

}  // namespace prefill
}  // namespace kvlm
