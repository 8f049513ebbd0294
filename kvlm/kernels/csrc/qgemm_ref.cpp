// Scalar reference kernels, compiled for the baseline ISA. The SIMD kernels perform the same
// floating-point operations in the same order, so their results equal these bit for bit.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "qgemm.h"

namespace kvlm {

namespace {

inline float load_scale(const uint8_t* p, int scale_bytes, int r) {
  if (scale_bytes == 2) {
    uint16_t h;
    std::memcpy(&h, p + 2 * r, 2);
    return half_to_float(h);
  }
  float f;
  std::memcpy(&f, p + 4 * r, 4);
  return f;
}

// Row r's minimum: stored after the scales, or -128 d in a symmetric block (exact in fp32).
inline float minimum(const uint8_t* scales, const QGemmArgs& a, int r, float d) {
  return a.symmetric ? -128.0f * d : load_scale(scales + kTileRows * a.scale_bytes, a.scale_bytes, r);
}

// Quantized value of row r, column k (0 <= k < group) of one block.
inline int weight_q(const uint8_t* blk, int bits, int group, int r, int k) {
  const int j = k / 4, i = k % 4;
  if (bits != 4) return blk[j * 64 + r * 4 + i];
  const int half_groups = group / 8;  // k-groups per nibble half
  const uint8_t byte = blk[(j % half_groups) * 64 + r * 4 + i];
  return j < half_groups ? (byte & 0x0F) : (byte >> 4);
}

// Round to nearest, ties to even, for |v| < 2^22: the same result as the SIMD conversions.
inline int32_t round_even(float v) {
  const float t = v + 12582912.0f;  // 1.5 * 2^23
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  return bits - 0x4B400000;
}

}  // namespace

void quantize_block(const float* x, int64_t n, int8_t* q, float* d, int32_t* s) {
  float amax = 0.0f;
  for (int64_t k = 0; k < n; ++k) amax = std::fmax(amax, std::fabs(x[k]));
  *d = amax / 127.0f;
  const float id = *d > 0.0f ? 1.0f / *d : 0.0f;
  s[0] = s[1] = 0;
  for (int64_t k = 0; k < kActBlock; ++k) {
    q[k] = (int8_t)(k < n ? round_even(x[k] * id) : 0);
    s[k / 16] += q[k];
  }
}

void quantize_rows(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa, float* da,
                   int32_t* asum, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < Kp / kActBlock; ++b) {
      const int64_t k0 = b * kActBlock;
      quantize_block(x + m * ldx + k0, std::min<int64_t>(K - k0, kActBlock), qa + m * Kp + k0,
                     da + m * (Kp / kActBlock) + b, asum + m * (Kp / 16) + 2 * b);
    }
  }
}

void dequantize_row(const QGemmArgs& a, int64_t row, int64_t K, float* out) {
  const int64_t qbytes = quant_bytes(a.bits, a.group);
  const int64_t t = row / kTileRows;
  const int r = (int)(row % kTileRows);
  for (int64_t g = 0; g * a.group < K; ++g) {
    const uint8_t* blk = a.w + (t * a.n_groups + g) * a.block_bytes;
    const float d = load_scale(blk + qbytes, a.scale_bytes, r);
    const float mn = minimum(blk + qbytes, a, r, d);
    for (int k = 0; k < a.group && g * a.group + k < K; ++k) {
      const float prod = (float)weight_q(blk, a.bits, a.group, r, k) * d;  // rounded, then
      out[g * a.group + k] = prod + mn;                                      // the minimum added
    }
  }
}

void qgemm_ref(const QGemmArgs& a, int64_t t0, int64_t t1) {
  const int64_t qbytes = quant_bytes(a.bits, a.group);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc[kTileRows] = {0};
      const int8_t* qa = a.qa + m * a.lda;
      for (int64_t g = 0; g < a.n_groups; ++g) {
        const uint8_t* blk = a.w + (t * a.n_groups + g) * a.block_bytes;
        const int64_t k0 = g * a.group;
        const float dav = a.da[m * a.ldd + k0 / kActBlock];
        const int32_t* as = a.asum + m * a.lds;
        const int32_t s = a.group == 32 ? as[2 * g] + as[2 * g + 1] : as[g];
        const float sa = dav * (float)s;
        for (int r = 0; r < kTileRows; ++r) {
          int32_t isum = 0;
          for (int k = 0; k < a.group; ++k)
            isum += weight_q(blk, a.bits, a.group, r, k) * (int32_t)qa[k0 + k];
          const float d = load_scale(blk + qbytes, a.scale_bytes, r);
          const float mn = minimum(blk + qbytes, a, r, d);
          acc[r] = std::fma((float)isum, d * dav, acc[r]);
          acc[r] = std::fma(mn, sa, acc[r]);
        }
      }
      for (int r = 0; r < kTileRows; ++r) {
        const int64_t n = t * kTileRows + r;
        if (n < a.N) a.out[m * a.ldo + n] = acc[r];
      }
    }
  }
}

}  // namespace kvlm
