// AVX-512 pieces the VNNI and AMX matmul kernels share: scale loads, a block's weights by
// k-group, and the float step that adds one block's int32 sums to an activation row's
// accumulator. Both kernels take these, so they round alike: bit for bit the same results.
// Include only inside a `#pragma GCC target` region that enables AVX-512 (qgemm_avx512.cpp,
// qgemm_amx.cpp), never from code that runs on a CPU without it.
#pragma once
#include <immintrin.h>

#include "qgemm.h"

namespace kvlm {
namespace avx512 {

template <bool F16>
inline __m512 load_scales(const uint8_t* p) {
  if constexpr (F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

// Weights of k-group j of one block (16 rows x 4 columns per register).
template <int BITS, int G>
inline __m512i weight_kgroup(const uint8_t* blk, int j) {
  if constexpr (BITS == 4) {
    constexpr int HALF = G / 8;
    const __m512i v = _mm512_loadu_si512(blk + 64 * (j % HALF));
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    return j < HALF ? _mm512_and_si512(v, low4) : _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
  } else {
    return _mm512_loadu_si512(blk + 64 * j);
  }
}

// A block's 16 scales d and minimums m (-128 d in a symmetric block).
template <int BITS, int G, bool F16>
struct BlockScales {
  __m512 d, mn;
  BlockScales(const QGemmArgs& a, const uint8_t* blk) {
    constexpr int QB = kTileRows * G * BITS / 8;  // quant bytes per block
    constexpr int SB = F16 ? 2 : 4;
    d = load_scales<F16>(blk + QB);
    mn = a.symmetric ? _mm512_mul_ps(d, _mm512_set1_ps(-128.0f))
                     : load_scales<F16>(blk + QB + kTileRows * SB);
  }
};

// Activation row m's scale da over block g and da * (its sum over the block's columns): the
// two factors `add_block` takes.
template <int G>
inline void row_factors(const QGemmArgs& a, int64_t m, int64_t g, float* dav, float* sa) {
  *dav = a.da[m * a.ldd + g * G / kActBlock];
  const int32_t* as = a.asum + m * a.lds;
  *sa = *dav * (float)(G == 32 ? as[2 * g] + as[2 * g + 1] : as[g]);
}

// acc (16 weight rows of one activation row) += one block's part: total * d * da + m * sa,
// total being the int32 dot products over the block's columns (da, sa from row_factors).
inline __m512 add_block(__m512i total, __m512 d, __m512 mn, float dav, float sa, __m512 acc) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, _mm512_set1_ps(dav)), acc);
  return _mm512_fmadd_ps(mn, _mm512_set1_ps(sa), acc);
}

// Stores the first N - n0 (at most 16) lanes of acc at out.
inline void store_rows(const QGemmArgs& a, int64_t m, int64_t n0, __m512 acc) {
  const int64_t valid = a.N - n0 < kTileRows ? a.N - n0 : kTileRows;
  _mm512_mask_storeu_ps(a.out + m * a.ldo + n0, (__mmask16)((1u << valid) - 1), acc);
}

}  // namespace avx512
}  // namespace kvlm
