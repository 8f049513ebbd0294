// Paged prefill: the paged attention of paged_attention.h (same Args, same visibility rule,
// same sinks / window / softcap / int4 rotation handling) for long chunks, GEMM-shaped.
//
// Work item = (query tile, kv head): up to kQueryTokens tokens x the kv head's G query heads,
// R = tokens * G rows. Each key tile of kKeyTile keys some row of the item sees is dequantized
// ONCE into float buffers (keys transposed, kt [hd, kKeyTile]; values vf [kKeyTile, hdp]) and
// serves all R rows through two register-blocked GEMMs, S = Q kt and O += P vf, with online
// softmax per row in between. Key tiles no row of the item sees (behind every row's window,
// past the last row) are never read, so blocks a window released (the null block) never are.
//
// The driver is written once over a vector type S (an ISA file's struct):
//   V, W (floats per vector), kRows x kCols (register block: rows x vectors of C),
//   zero(), load(p), store(p, v), set1(x), fma(a, b, c) = a * b + c, exp(v) (lane by lane,
//   avx2::exp8's polynomial in the SIMD files), sum(v) / max(v) (of the lanes), max(a, b),
//   halves(h, n, out): out[i] = float of float16 h[i].
// Rows and the value columns are padded (to kRows, to W) so the GEMMs have no tails.
//
// No torch headers: the ISA files include this and <immintrin.h> only. Everything defined here
// has internal linkage, so each ISA file gets its own copy compiled for its instructions.
#pragma once
#include <atomic>

#include "paged_attention.h"  // Args, Format, stored_value, fp8_to_float, hadamard, load_query

namespace kvlm {
namespace prefill {

using paged::Args;

constexpr int64_t kQueryTokens = 64;  // tokens per query tile (x G query heads)
constexpr int64_t kKeyTile = 64;      // keys per key tile (a multiple of every W)

// Each computes work items order[i] for i taken from `next` until num_items: item = tile * nkv
// + kv head (a.tiles as make_tiles below gives them).
void paged_prefill_ref(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                       int64_t num_items);
void paged_prefill_avx2(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                        int64_t num_items);
void paged_prefill_avx512(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                          int64_t num_items);

// [num_tiles * 5] tiles (sequence, first row, end row, 0, G) of at most kQueryTokens tokens.
std::vector<int64_t> make_tiles(const int64_t* query_start, int64_t B, int64_t group);

// Every work item of `a` (a.tiles from make_tiles) across threads, the most keys first, with
// the kernel of isa (kIsa*).
void run(const Args& a, int64_t num_tiles, int64_t isa);

namespace {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One block of C (+)= A B: RB rows x CB vectors of C, A [RB, K] broadcast by element (row
// stride lda), B [K, CB * W] and C rows of floats (strides ldb, ldc).
template <class S, int RB, int CB>
inline void gemm_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, int64_t K, bool accumulate) {
  typename S::V c[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < CB; ++i)
      c[r][i] = accumulate ? S::load(C + r * ldc + i * S::W) : S::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename S::V b[CB];
    for (int i = 0; i < CB; ++i) b[i] = S::load(B + k * ldb + i * S::W);
    for (int r = 0; r < RB; ++r) {
      const typename S::V x = S::set1(A[r * lda + k]);
      for (int i = 0; i < CB; ++i) c[r][i] = S::fma(x, b[i], c[r][i]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int i = 0; i < CB; ++i) S::store(C + r * ldc + i * S::W, c[r][i]);
}

// C[M, N] (+)= A[M, K] B[K, N] with M a multiple of S::kRows and N of S::W.
template <class S>
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 int64_t M, int64_t N, int64_t K, bool accumulate) {
  constexpr int64_t wide = S::kCols * S::W;
  for (int64_t r = 0; r < M; r += S::kRows) {
    int64_t c = 0;
    for (; c + wide <= N; c += wide)
      gemm_block<S, S::kRows, S::kCols>(A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, K,
                                        accumulate);
    for (; c < N; c += S::W)
      gemm_block<S, S::kRows, 1>(A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, K,
                                 accumulate);
  }
}

// s[j] = exp(s[j] - m) for j < n; returns their sum. (The fmas by -1 and 1 are exactly the
// subtraction and the sum.)
template <class S>
inline float exp_sum(float* s, int64_t n, float m) {
  const typename S::V minus_m = S::set1(-m), one = S::set1(1.0f);
  typename S::V acc = S::zero();
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) {
    const typename S::V e = S::exp(S::fma(one, minus_m, S::load(s + j)));
    S::store(s + j, e);
    acc = S::fma(one, e, acc);
  }
  float total = S::sum(acc);
  for (; j < n; ++j) total += (s[j] = std::exp(s[j] - m));
  return total;
}

// The largest of s[0 .. n).
template <class S>
inline float row_max(const float* s, int64_t n) {
  typename S::V acc = S::set1(-INFINITY);
  int64_t j = 0;
  for (; j + S::W <= n; j += S::W) acc = S::max(acc, S::load(s + j));
  float mx = S::max(acc);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// out[hd] = one stored head row of format F, dequantized with its float16 scales sc (quantized
// formats; group = hd / num_scales elements a scale). Plain loops the compiler vectorizes.
template <class S, int F>
inline void dequant_row(const uint8_t* src, const uint16_t* sc, int64_t hd, int64_t group,
                        float* out) {
  if constexpr (F == paged::kF32) {
    std::memcpy(out, src, hd * sizeof(float));
  } else if constexpr (F == paged::kF16) {
    S::halves(reinterpret_cast<const uint16_t*>(src), hd, out);
  } else if constexpr (F == paged::kBF16) {
    for (int64_t d = 0; d < hd; ++d) {
      uint16_t h;
      std::memcpy(&h, src + 2 * d, 2);
      out[d] = paged::bits_float((uint32_t)h << 16);
    }
  } else {
    for (int64_t d0 = 0; d0 < hd; d0 += group) {
      const float s = half_to_float(sc[d0 / group]);
      for (int64_t d = d0; d < d0 + group; ++d) {
        float x;
        if constexpr (F == paged::kInt8)
          x = (float)(int8_t)src[d];
        else if constexpr (F == paged::kInt4)
          x = (float)((d & 1 ? src[d / 2] >> 4 : src[d / 2] & 0x0F) - 8);
        else
          x = paged::fp8_to_float(src[d]);
        out[d] = x * s;
      }
    }
  }
}

// Buffers of one thread, allocated once for all its items.
struct Workspace {
  std::vector<float> q, sq, o, s, kt, vf, key, m, l;
  std::vector<int64_t> pos;  // per row
  Workspace(int64_t rows, int64_t hd, int64_t hdp)
      : q(rows * hd, 0.0f), sq(rows * hd, 0.0f), o(rows * hdp, 0.0f), s(rows * kKeyTile, 0.0f),
        kt(hd * kKeyTile, 0.0f), vf(kKeyTile * hdp, 0.0f), key(hdp, 0.0f), m(rows), l(rows),
        pos(rows) {}
};

// One work item (query tile x kv head) of format F.
template <class S, int F>
void run_item(const Args& a, int64_t item, Workspace& w) {
  const int64_t hd = a.hd, hdp = round_up(hd, S::W), G = a.nh / a.nkv;
  const int64_t group = a.num_scales ? hd / a.num_scales : hd;
  const int64_t* tile = a.tiles + 5 * (item / a.nkv);
  const int64_t kvh = item % a.nkv, b = tile[0], t0 = tile[1], t1 = tile[2];
  const int64_t cached = a.num_cached[b], first = a.query_start[b];
  const int64_t ws = a.window ? std::max<int64_t>(cached - a.window + 1, 0) : 0;
  const int64_t ns = std::min(a.num_sinks, ws);  // keys [0, ns) are sinks by place
  const int64_t R = (t1 - t0) * G, Rp = round_up(R, S::kRows);
  for (int64_t r = 0; r < R; ++r) {  // row r: token t0 + r / G, query head kvh * G + r % G
    const int64_t t = t0 + r / G, head = kvh * G + r % G;
    paged::load_query(a, a.q + t * a.q_stride + head * hd, w.q.data() + r * hd);
    if (a.num_sinks)
      paged::load_query(a, a.sink_q + t * a.sink_q_stride + head * hd, w.sq.data() + r * hd);
    w.pos[r] = cached + t - first;
    w.m[r] = -INFINITY;
    w.l[r] = 0.0f;
  }
  std::fill(w.q.begin() + R * hd, w.q.begin() + Rp * hd, 0.0f);
  std::fill(w.sq.begin() + R * hd, w.sq.begin() + Rp * hd, 0.0f);
  std::fill(w.o.begin(), w.o.begin() + Rp * hdp, 0.0f);
  const int64_t p_first = w.pos[0], p_last = w.pos[R - 1];
  const int64_t lo = a.window ? std::max<int64_t>(p_first - a.window + 1, 0) : 0;
  const int64_t* table = a.block_table + b * a.max_blocks;
  auto row_of = [&](int64_t kp) {  // store row of key kp
    return table[kp / a.block_size] * a.rows_per_block + kp % a.block_size;
  };
  auto unseen = [&](int64_t key, int64_t p) {
    return key > p || (a.window && key <= p - a.window && key >= a.num_sinks);
  };
  auto visit = [&](int64_t k0, int64_t k1, const float* q) {  // keys [k0, k1) against q
    // [Rp, hd] (w.q, or w.sq for the sink keys)
    for (int64_t kp = k0; kp < k1; kp += kKeyTile) {
      const int64_t n = std::min(k1 - kp, kKeyTile);
      for (int64_t j = 0; j < n; ++j) {  // dequantize the tile's keys and values once
        const int64_t row = row_of(kp + j);
        const int64_t off = row * a.row_bytes + kvh * a.head_bytes;
        const int64_t sc = row * a.scale_row + kvh * a.num_scales;
        float* key = w.key.data();
        dequant_row<S, F>(a.k + off, a.k_scales ? a.k_scales + sc : nullptr, hd, group, key);
        for (int64_t d = 0; d < hd; ++d) w.kt[d * kKeyTile + j] = key[d];
        dequant_row<S, F>(a.v + off, a.v_scales ? a.v_scales + sc : nullptr, hd, group,
                          w.vf.data() + j * hdp);
      }
      // S [Rp, kKeyTile] = Q [Rp, hd] kt [hd, kKeyTile] (columns past n unused)
      gemm<S>(q, hd, w.kt.data(), kKeyTile, w.s.data(), kKeyTile, Rp, kKeyTile, hd,
              false);
      const int64_t last = kp + n - 1;
      for (int64_t r = 0; r < R; ++r) {
        float* sr = w.s.data() + r * kKeyTile;
        const int64_t p = w.pos[r];
        if (a.softcap > 0.0f)
          for (int64_t j = 0; j < n; ++j) sr[j] = std::tanh(sr[j] / a.softcap) * a.softcap;
        const bool all_seen =
            !unseen(kp, p) && !unseen(last, p) && !(a.window && kp < a.num_sinks);
        if (!all_seen)
          for (int64_t j = 0; j < n; ++j)
            if (unseen(kp + j, p)) sr[j] = -INFINITY;
        const float mx = row_max<S>(sr, n);
        if (mx == -INFINITY) {  // nothing of this tile for this row
          std::fill(sr, sr + n, 0.0f);
          continue;
        }
        const float m_new = std::max(w.m[r], mx);
        const float corr = std::exp(w.m[r] - m_new);
        w.l[r] = w.l[r] * corr + exp_sum<S>(sr, n, m_new);
        if (!all_seen)  // exp(-inf) may be a tiny positive number in the SIMD exp
          for (int64_t j = 0; j < n; ++j)
            if (unseen(kp + j, p)) sr[j] = 0.0f;
        if (corr != 1.0f) {
          float* o = w.o.data() + r * hdp;
          for (int64_t d = 0; d < hdp; ++d) o[d] *= corr;
        }
        w.m[r] = m_new;
      }
      // O [Rp, hdp] += P [Rp, n] vf [n, hdp]
      gemm<S>(w.s.data(), kKeyTile, w.vf.data(), hdp, w.o.data(), hdp, Rp, hdp, n, true);
    }
  };
  const int64_t sinks_end = a.window ? std::min(a.num_sinks, lo) : 0;  // before the window
  visit(0, std::min(ns, sinks_end), w.sq.data());  // sinks by place
  visit(ns, sinks_end, w.q.data());  // not yet sinks by place
  visit(lo, p_last + 1, w.q.data());
  for (int64_t r = 0; r < R; ++r) {
    float* o = w.o.data() + r * hdp;
    const float inv = 1.0f / w.l[r];
    for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
    if (a.rotation) paged::hadamard(o, hd, a.rotation);
    std::memcpy(a.out + (t0 + r / G) * a.out_stride + (kvh * G + r % G) * hd, o,
                hd * sizeof(float));
  }
}

template <class S, int F>
void run_items_f(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
                 int64_t num_items) {
  const int64_t G = a.nh / a.nkv;
  Workspace w(round_up(kQueryTokens * G, S::kRows), a.hd, round_up(a.hd, S::W));
  for (int64_t i; (i = next.fetch_add(1)) < num_items;) run_item<S, F>(a, order[i], w);
}

// The kernel of one ISA: the format picked once per call.
template <class S>
void run_items(const Args& a, std::atomic<int64_t>& next, const int64_t* order,
               int64_t num_items) {
  switch (a.format) {
    case paged::kF32: run_items_f<S, paged::kF32>(a, next, order, num_items); break;
    case paged::kF16: run_items_f<S, paged::kF16>(a, next, order, num_items); break;
    case paged::kBF16: run_items_f<S, paged::kBF16>(a, next, order, num_items); break;
    case paged::kInt8: run_items_f<S, paged::kInt8>(a, next, order, num_items); break;
    case paged::kInt4: run_items_f<S, paged::kInt4>(a, next, order, num_items); break;
    default: run_items_f<S, paged::kFp8>(a, next, order, num_items); break;
  }
}

}  // namespace
}  // namespace prefill
}  // namespace kvlm
