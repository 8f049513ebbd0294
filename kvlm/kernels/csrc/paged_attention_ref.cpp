// Scalar reference of the paged attention inner loops (compiled for the baseline ISA); the SIMD
// files are held to it by the tests.
#include "paged_attention.h"

namespace kvlm {
namespace paged {
namespace {

struct RefOps {
  static void scales(const uint16_t* sc, const int64_t* soff, int64_t n, int64_t nsc,
                     float* out) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < nsc; ++g) out[j * nsc + g] = half_to_float(sc[soff[j] + g]);
  }

  static void scores(int format, const float* q, int64_t R, const uint8_t* k,
                     const int64_t* off, const float* ks, int64_t nsc, int64_t group, int64_t n,
                     int64_t hd, float* s) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < n; ++j) {
        float sum = 0.0f;
        for (int64_t d = 0; d < hd; ++d)
          sum += q[r * hd + d] * element(format, k + off[j], ks + j * nsc, group, d);
        s[r * kKeyTile + j] = sum;
      }
  }

  static float exp_sum(float* s, int64_t n, float m) {
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
    return sum;
  }

  static void accumulate(int format, const float* p, int64_t R, const uint8_t* v,
                         const int64_t* off, const float* vs, int64_t nsc, int64_t group,
                         int64_t n, int64_t hd, float* acc) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < n; ++j) {
        const float w = p[r * kKeyTile + j];
        for (int64_t d = 0; d < hd; ++d)
          acc[r * hd + d] += w * element(format, v + off[j], vs + j * nsc, group, d);
      }
  }

  static void scale_rows(float* x, int64_t n, float c) {
    for (int64_t i = 0; i < n; ++i) x[i] *= c;
  }
};

}  // namespace

void paged_attention_ref(const Args& a, int64_t i0, int64_t i1) { run_items<RefOps>(a, i0, i1); }

}  // namespace paged
}  // namespace kvlm
