// Shared declarations for the quantized matmul kernels. No torch headers here: the ISA files
// include only this and <immintrin.h>, so nothing compiled for AVX-512 can leak into code that
// runs on a CPU without it.
//
// Weight layout (one uint8 tensor [n_tiles, n_groups, block_bytes]): 16 output rows form a tile;
// each tile holds one block per group of G (16 or 32) input columns. A block is
//   quants: G/4 k-groups of 4 columns; k-group j is 64 bytes [16 rows][4 columns], one value per
//           byte for 6- and 8-bit formats (6-bit: every value < 64); for 4-bit formats chunk c (c < G/8) holds k-group c in its low
//           nibbles and k-group c + G/8 in its high nibbles (so 16 * G / 2 bytes)
//   d:      16 scales (fp16 or fp32), one per row
//   m:      16 minimums (same type); absent from a symmetric 8-bit block (Q8_0: int8 values
//           stored as q + 128), whose minimums are -128 d
// and row r's weights in the block are w[k] = d[r] * q[r][k] + m[r], q unsigned, q < 2^bits.
//
// Activations are quantized per row in blocks of 32: x[k] ~= da[k / 32] * qa[k], qa int8 in
// [-127, 127], with integer sums asum[k / 16] of qa over each 16 columns (for the m term).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>

namespace kvlm {

struct QGemmArgs {
  const uint8_t* w;    // [n_tiles, n_groups, block_bytes]
  int64_t n_groups;    // padded in_features / group
  int64_t block_bytes;
  int bits;            // 4 (nibbles), 6 or 8 (bytes; 6: every q < 64)
  int group;           // 16 or 32
  int scale_bytes;     // 2 (fp16) or 4 (fp32)
  bool symmetric;      // no stored minimums: m = -128 d (8-bit only)
  const int8_t* qa;    // [M, lda]
  int64_t lda;
  const float* da;     // [M, ldd]
  int64_t ldd;
  const int32_t* asum; // [M, lds]
  int64_t lds;
  float* out;          // [M, ldo]
  int64_t ldo;
  int64_t M;
  int64_t N;           // valid output columns (rows of the weight)
};

constexpr int kTileRows = 16;
constexpr int kActBlock = 32;

// Input columns padded to whole activation blocks (what quantize_rows writes per row).
inline int64_t padded_k(int64_t k) { return (k + kActBlock - 1) / kActBlock * kActBlock; }

// Rows per chunk when quantizing rows in parallel, and weight tiles per chunk of a matmul over
// M rows: enough work (~16k values, ~64k multiply-adds) that a thread is worth waking for.
inline int64_t quantize_grain(int64_t kp) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(kp, 1));
}
inline int64_t tile_grain(int64_t M, int64_t kp) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(M * kp * kTileRows, 1));
}

// Quant bytes of one block (16 rows x group columns; 4-bit values two to a byte).
inline int64_t quant_bytes(int64_t bits, int64_t group) {
  return kTileRows * group * (bits == 4 ? 4 : 8) / 8;
}

// The weight's half of the arguments; the caller fills in activations and output.
inline QGemmArgs weight_args(const uint8_t* w, int64_t n_groups, int64_t block_bytes, int64_t bits,
                             int64_t group, int64_t scale_bytes, bool symmetric) {
  QGemmArgs a{};
  a.w = w;
  a.n_groups = n_groups;
  a.block_bytes = block_bytes;
  a.bits = (int)bits;
  a.group = (int)group;
  a.scale_bytes = (int)scale_bytes;
  a.symmetric = symmetric;
  return a;
}

// Bytes of one block, with or without its minimums.
inline int64_t block_size(int64_t bits, int64_t group, int64_t scale_bytes, bool symmetric) {
  return quant_bytes(bits, group) + (symmetric ? 1 : 2) * kTileRows * scale_bytes;
}

// Whether a packed weight whose blocks are `bytes` long is symmetric; -1 if it is neither form.
inline int symmetric_blocks(int64_t bits, int64_t group, int64_t scale_bytes, int64_t bytes) {
  if (bytes == block_size(bits, group, scale_bytes, false)) return 0;
  if (bits == 8 && bytes == block_size(bits, group, scale_bytes, true)) return 1;
  return -1;
}

// Each computes out[:, 16 * t0 : 16 * t1] (clipped to N) for all M rows.
void qgemm_ref(const QGemmArgs& a, int64_t t0, int64_t t1);
void qgemm_avx2(const QGemmArgs& a, int64_t t0, int64_t t1);
void qgemm_avx512(const QGemmArgs& a, int64_t t0, int64_t t1);
// AMX int8 tiles for each whole 16 rows of M, qgemm_avx512 for the rest: the same results.
void qgemm_amx(const QGemmArgs& a, int64_t t0, int64_t t1);

using QGemmKernel = void (*)(const QGemmArgs&, int64_t t0, int64_t t1);
constexpr int64_t kIsaRef = 1, kIsaAvx2 = 2, kIsaAvx512 = 3;

// The best kernel this CPU runs (kIsa*), detected once; and the kernel of an ISA code (avx512:
// qgemm_amx where amx_status() is empty).
int64_t cpu_isa();
QGemmKernel qgemm_kernel(int64_t isa);
// Why the avx512 matmuls do not use AMX tiles (the CPU lacks them, or Linux refused the tile
// state); empty when they do. Decided once per process.
const std::string& amx_status();

// Quantize rows [m0, m1) of x [M, K] (row stride ldx) into qa/da/asum (padded to a multiple of 32).
// The AVX2 version gives the same bytes as the scalar one; `quantize_rows_for(isa)` picks.
void quantize_rows(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa, float* da,
                   int32_t* asum, int64_t m0, int64_t m1);
void quantize_rows_avx2(const float* x, int64_t ldx, int64_t K, int64_t Kp, int8_t* qa,
                        float* da, int32_t* asum, int64_t m0, int64_t m1);
// One block of n <= 32 values (zero-padded to 32): q, its scale d and the sums of q over each
// 16 columns, s[0] and s[1]. The scalar definition both quantizers share.
void quantize_block(const float* x, int64_t n, int8_t* q, float* d, int32_t* s);
using QuantizeRows = void (*)(const float*, int64_t, int64_t, int64_t, int8_t*, float*, int32_t*,
                              int64_t, int64_t);
inline QuantizeRows quantize_rows_for(int64_t isa) {
  return isa >= kIsaAvx2 ? quantize_rows_avx2 : quantize_rows;
}

// Row `row` of a packed weight (n_groups blocks per tile), dequantized: out[k] = d * q + m for
// k < K (the product rounded before the sum, as PlainQuant.dequantize).
void dequantize_row(const QGemmArgs& a, int64_t row, int64_t K, float* out);

// Scalar fp16 -> fp32 (exact, subnormals included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

}  // namespace kvlm
