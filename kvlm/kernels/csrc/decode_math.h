// Row math of a decode step (norms, rope, cache row writes, gated activations), in
// float32. Compiled for AVX2 + FMA in decode_math_avx2.cpp; the decode plan calls it only on
// CPUs that have both. No torch headers, like qgemm.h. Widths: n any size unless stated.
#pragma once
#include <cstdint>

namespace kvlm {
namespace decode {

// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]; out may be x.
void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps);

// Rotate-half rope on `heads` rows of hd (hd even) in place, as kvlm's apply_rope:
// x[i] * cos[i] + roll(x, hd / 2)[i] * sin[i], sin sign-folded ((-sin | sin)).
void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t hd);

// Element type of float cache rows (the codes of paged::Format's float formats).
enum KVType { kKVFloat32 = 0, kKVFloat16 = 1, kKVBFloat16 = 2 };

// dst[0 .. n) = x in `type`, rounded to nearest even (as torch's .to(dtype)).
void store_row(const float* x, void* dst, int64_t n, KVType type);

// out[i] = act(gate[i]) * up[i]; act 0 = SiLU, 1 = GELU (tanh approximation).
void gated_act(const float* gate, const float* up, float* out, int64_t n, int act);

// Index of the largest of x[0 .. n) (n >= 1): the first one on ties, the first NaN if any
// (torch.argmax's answer).
int64_t argmax(const float* x, int64_t n);

// x[i] += y[i]
void add(float* x, const float* y, int64_t n);

}  // namespace decode
}  // namespace kvlm
