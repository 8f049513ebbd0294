// AVX2 + FMA + F16C inner loops of the paged attention (paged_attention.h). K/V rows are read
// where the store holds them and converted in registers (F16C, int4 nibbles unpacked, fp8 by
// exponent shift), each vector once for a block of up to 4 query rows: q.k as 4 rows x 2 keys
// (... 1 row x 8 keys) of independent sums added by one transpose, p.v as 4 rows x 2 registers
// of output (... 1 x 8). A quantized format's per-32 scales never multiply a vector: q.k sums
// each scale group apart and multiplies the sum by its key's scale, and p.v reads p times each
// key's scale (on AVX2 the multiply per vector made int8 keys 1.7x the time of float16 ones).
// The exp is avx2_math.h's polynomial. Only this file is compiled for these instructions.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qgemm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "avx2_math.h"
#include "paged_attention.h"  // the driver, compiled for these instructions too

namespace kvlm {
namespace paged {
namespace {

// 8 stored values of one head row from element d, before their scale.
template <int F>
inline __m256 load8(const uint8_t* src, int64_t d) {
  if constexpr (F == kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(src) + d);
  } else if constexpr (F == kF16 || F == kBF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * d));
    if constexpr (F == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kInt8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else if constexpr (F == kFp8) {
    const __m256i x =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d)));
    const __m256 mag = _mm256_mul_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7F)), 20)),
        _mm256_set1_ps(0x1p120f));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
    return _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
  } else {  // int4: 4 bytes, even element in the low nibble, stored offset by 8
    int32_t word;
    std::memcpy(&word, src + d / 2, 4);
    const __m128i b = _mm_cvtsi32_si128(word), low4 = _mm_set1_epi8(0x0F);
    const __m128i nibbles =
        _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
    const __m256i x = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), _mm256_set1_epi32(8));
    return _mm256_cvtepi32_ps(x);
  }
}

// The stored rows' vectors at element d of keys j .. j + KB - 1 (the last key standing in for
// those past n), before any scale.
template <int F, int KB>
inline void load_keys(const uint8_t* k, const int64_t* off, int64_t j, int64_t n, int64_t d,
                      __m256* out) {
  for (int i = 0; i < KB; ++i) out[i] = load8<F>(k + off[std::min(j + i, n - 1)], d);
}

// RB query rows x KB = 8 / RB keys a round: 8 independent sums, one transpose to add them; each
// key vector is dequantized once for the RB rows. Columns past the last multiple of 8 are
// left to scores_tail; rows of s are written up to a multiple of KB keys (kKeyTile is one).
template <int F, int RB>
void scores_rows(const float* q, const uint8_t* k, const int64_t* off, int64_t n, int64_t hd,
                 float* s) {
  constexpr int KB = 8 / RB;
  const int64_t hv = hd / 8 * 8;
  for (int64_t j = 0; j < n; j += KB) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hv; d += 8) {
      __m256 kv[KB];
      load_keys<F, KB>(k, off, j, n, d, kv);
      for (int r = 0; r < RB; ++r) {
        const __m256 qv = _mm256_loadu_ps(q + r * hd + d);
        for (int i = 0; i < KB; ++i) acc[r * KB + i] = _mm256_fmadd_ps(qv, kv[i], acc[r * KB + i]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, avx2::transpose_sum(acc));
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < KB; ++i) s[r * kKeyTile + j + i] = sums[r * KB + i];
  }
}

// scores_rows for a quantized format: each scale group's dot products are summed unscaled,
// then times the key's scale (one multiply-add per group and key, not a multiply per vector).
// KB = 6 / RB keys a round (1 for 4 rows) keeps 2 x RB x KB sums, KB keys and q in 16
// registers; sums past the keys are not written.
template <int F, int RB>
void scores_rows_quantized(const float* q, const uint8_t* k, const int64_t* off, const float* ks,
                           int64_t nsc, int64_t n, int64_t hd, float* s) {
  constexpr int KB = RB >= 4 ? 1 : 6 / RB;
  const int64_t hv = hd / 8 * 8;
  const int64_t width = nsc > 1 ? kScaleGroup : hv;  // elements per scale, a multiple of 8
  for (int64_t j = 0; j < n; j += KB) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d0 = 0; d0 < hv; d0 += width) {
      __m256 part[RB * KB];
      for (int i = 0; i < RB * KB; ++i) part[i] = _mm256_setzero_ps();
      for (int64_t d = d0; d < d0 + width; d += 8) {
        __m256 kv[KB];
        load_keys<F, KB>(k, off, j, n, d, kv);
        for (int r = 0; r < RB; ++r) {
          const __m256 qv = _mm256_loadu_ps(q + r * hd + d);
          for (int i = 0; i < KB; ++i) part[r * KB + i] = _mm256_fmadd_ps(qv, kv[i], part[r * KB + i]);
        }
      }
      for (int i = 0; i < KB; ++i) {
        const __m256 sc = _mm256_set1_ps(ks[std::min(j + i, n - 1) * nsc + scale_index(nsc, d0)]);
        for (int r = 0; r < RB; ++r) acc[r * KB + i] = _mm256_fmadd_ps(part[r * KB + i], sc, acc[r * KB + i]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, avx2::transpose_sum(acc));
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < KB && j + i < n; ++i) s[r * kKeyTile + j + i] = sums[r * KB + i];
  }
}

// acc[r][c .. c + 8 CB) += sum_j p[r][j] v[j] for RB rows: each value vector is converted
// once for the RB rows. For a quantized format p comes times each key's scale for these
// columns (accumulate_f), so no vector is multiplied by its scale.
template <int F, int RB, int CB>
void accumulate_cols(const float* p, const uint8_t* v, const int64_t* off, int64_t n, int64_t hd,
                     int64_t c, float* acc) {
  __m256 o[RB * CB];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < CB; ++i) o[r * CB + i] = _mm256_loadu_ps(acc + r * hd + c + 8 * i);
  for (int64_t j = 0; j < n; ++j) {
    __m256 w[RB];
    for (int r = 0; r < RB; ++r) w[r] = _mm256_set1_ps(p[r * kKeyTile + j]);
    const uint8_t* row = v + off[j];
    for (int i = 0; i < CB; ++i) {
      const __m256 x = load8<F>(row, c + 8 * i);
      for (int r = 0; r < RB; ++r) o[r * CB + i] = _mm256_fmadd_ps(w[r], x, o[r * CB + i]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < CB; ++i) _mm256_storeu_ps(acc + r * hd + c + 8 * i, o[r * CB + i]);
}

// All columns of RB rows: 8 / RB registers per row a pass (at most one scale group's 4 for a
// quantized format), then single registers, then scalars. `scaled(c)`: p as accumulate_cols
// reads it for the columns from c (p itself for float formats).
template <int F, int RB, class Scaled>
void accumulate_rows(const float* p, Scaled scaled, const uint8_t* v, const int64_t* off,
                     const float* vs, int64_t nsc, int64_t group, int64_t n, int64_t hd,
                     float* acc) {
  constexpr int CB = F >= kInt8 && 8 / RB > 4 ? 4 : 8 / RB;  // 8 CB columns within a group
  const int64_t hv = hd / 8 * 8;
  int64_t c = 0;
  for (; c + 8 * CB <= hv; c += 8 * CB) accumulate_cols<F, RB, CB>(scaled(c), v, off, n, hd, c, acc);
  for (; c < hv; c += 8) accumulate_cols<F, RB, 1>(scaled(c), v, off, n, hd, c, acc);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = hv; d < hd; ++d) {
      const float x = element(F, v + off[j], vs + j * nsc, group, d);
      for (int r = 0; r < RB; ++r) acc[r * hd + d] += p[r * kKeyTile + j] * x;
    }
}

template <int F>
void scores_f(const float* q, int64_t R, const uint8_t* k, const int64_t* off, const float* ks,
              int64_t nsc, int64_t group, int64_t n, int64_t hd, float* s) {
  row_blocks(R, [&](auto rows, int64_t r) {
    if constexpr (F >= kInt8)
      scores_rows_quantized<F, rows.value>(q + r * hd, k, off, ks, nsc, n, hd, s + r * kKeyTile);
    else
      scores_rows<F, rows.value>(q + r * hd, k, off, n, hd, s + r * kKeyTile);
  });
  if (hd % 8) scores_tail(F, q, R, k, off, ks, nsc, group, n, hd / 8 * 8, hd, s);
}

template <int F>
void accumulate_f(const float* p, int64_t R, const uint8_t* v, const int64_t* off,
                  const float* vs, int64_t nsc, int64_t group, int64_t n, int64_t hd,
                  float* acc) {
  if constexpr (F >= kInt8) {
    // p times each key's scale, per scale group g: pv[g * kPlane + p's index]
    constexpr int64_t kPlane = kMaxRows * kKeyTile;
    thread_local std::vector<float> pv;
    if ((int64_t)pv.size() < nsc * kPlane) pv.resize(nsc * kPlane);
    for (int64_t g = 0; g < nsc; ++g)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < n; ++j)
          pv[g * kPlane + r * kKeyTile + j] = p[r * kKeyTile + j] * vs[j * nsc + g];
    row_blocks(R, [&](auto rows, int64_t r) {
      auto scaled = [&](int64_t c) { return pv.data() + scale_index(nsc, c) * kPlane + r * kKeyTile; };
      accumulate_rows<F, rows.value>(p + r * kKeyTile, scaled, v, off, vs, nsc, group, n, hd,
                                     acc + r * hd);
    });
  } else {
    row_blocks(R, [&](auto rows, int64_t r) {
      auto same = [&](int64_t) { return p + r * kKeyTile; };
      accumulate_rows<F, rows.value>(p + r * kKeyTile, same, v, off, vs, nsc, group, n, hd,
                                     acc + r * hd);
    });
  }
}

struct Avx2Ops {
  static void scales(const uint16_t* sc, const int64_t* soff, int64_t n, int64_t nsc,
                     float* out) {
    for (int64_t j = 0; j < n; ++j) {  // 8 at a time, the rest one F16C convert each (a
      int64_t g = 0;                   // padded copy through memcpy cost ~50 instructions a key)
      for (; g + 8 <= nsc; g += 8)
        _mm256_storeu_ps(out + j * nsc + g, _mm256_cvtph_ps(_mm_loadu_si128(
                                                reinterpret_cast<const __m128i*>(sc + soff[j] + g))));
      for (; g < nsc; ++g) out[j * nsc + g] = _cvtsh_ss(sc[soff[j] + g]);
    }
  }

  static void scores(int format, const float* q, int64_t R, const uint8_t* k,
                     const int64_t* off, const float* ks, int64_t nsc, int64_t group, int64_t n,
                     int64_t hd, float* s) {
    KVLM_BY_FORMAT(format, scores_f, q, R, k, off, ks, nsc, group, n, hd, s)
  }

  static float exp_sum(float* s, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = avx2::hsum(sum);
    if (j < n) {  // the tail through a padded register
      alignas(32) float tail[8] = {0};
      for (int64_t t = j; t < n; ++t) tail[t - j] = s[t] - m;
      _mm256_store_ps(tail, avx2::exp8(_mm256_load_ps(tail)));
      for (int64_t t = j; t < n; ++t) total += (s[t] = tail[t - j]);
    }
    return total;
  }

  static void accumulate(int format, const float* p, int64_t R, const uint8_t* v,
                         const int64_t* off, const float* vs, int64_t nsc, int64_t group,
                         int64_t n, int64_t hd, float* acc) {
    KVLM_BY_FORMAT(format, accumulate_f, p, R, v, off, vs, nsc, group, n, hd, acc)
  }

  static void scale_rows(float* x, int64_t n, float c) {
    const __m256 cv = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), cv));
    for (; i < n; ++i) x[i] *= c;
  }
};

}  // namespace

void paged_attention_avx2(const Args& a, int64_t i0, int64_t i1) { run_items<Avx2Ops>(a, i0, i1); }

}  // namespace paged
}  // namespace kvlm

#pragma GCC pop_options
