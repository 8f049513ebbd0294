// Paged attention that reads K/V through the block table, from the block-major store in place
// (kvlm/kv/store.py), in every KV format (kvlm/kv/quant.py), dequantizing in registers as it
// reads, prefetching the next tile.
//
// Keys are visited in tiles of up to kKeyTile consecutive keys whatever the block size: a tile
// may span several blocks, its rows found once per tile (KeyTile: each key's byte offset), so
// small blocks cost no more tiles than large ones.
//
// Work item = (part of a query tile's keys, kv head): up to kMaxRows query rows (queries x the
// kv head's query heads, GQA/MQA) read each K/V tile once. Per sequence b with `cached` tokens
// before the step, query t of the step sits at text position p = cached + (t - query_start[b])
// and sees key kp iff
//   kp <= p  and  (no window  or  kp > p - window  or  kp < num_sinks)
// (causal chunks, sliding windows, StreamingLLM sinks), as the runner's mask. Only the key ranges
// some query of the tile sees are read, so blocks a window released (the null block) never are.
// Where items are fewer than threads, a tile's keys are split in parts (flash-decoding): each
// part keeps its unnormalized output, max and sum per row, merged once after all parts ran.
// Softmax is online over key tiles (flash-attention style). Keys are stored roped by their text
// position in every group, and q comes roped by its own. With sinks, attention goes by place in
// the cache: with ws = max(cached - window + 1, 0) and ns = min(num_sinks, ws), key kp < ns sits
// at place kp, a later key at ns + kp - ws, and the query at ns + p - ws (runner._view). Rope is
// relative, so a later key's score is q.k as stored (distance p - kp either way); only the sink
// keys kp < ns score against sink_q, the query roped by its place ns + p - ws (the caller's). No
// key is roped here. int4 keys and values are stored times a Hadamard matrix H (symmetric,
// orthonormal): q.(k H) = (q H).k, so q (and sink_q) is rotated once instead of every key;
// values are summed rotated and the output rotated once.
//
// No torch headers: the ISA files include this and <immintrin.h> only. Everything defined here
// has internal linkage, so each ISA file gets its own copy compiled for its instructions.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "qgemm.h"  // half_to_float, kIsa*

namespace kvlm {
namespace paged {

// Storage formats, the codes kvlm/kernels/paged.py passes (KVFormat names).
enum Format : int { kF32 = 0, kF16 = 1, kBF16 = 2, kInt8 = 3, kInt4 = 4, kFp8 = 5 };

constexpr int64_t kKeyTile = 32;  // keys per tile (fewer at range edges), across blocks
constexpr int64_t kMaxRows = 16;  // query rows per work item
constexpr int64_t kTileFields = 5;  // sequence, first and end row in T, first and end query head

struct Args {
  const float* q;  // [T, nh, hd] (row stride q_stride floats per token)
  int64_t q_stride;
  float* out;  // [T, nh, hd] (row stride out_stride)
  int64_t out_stride;
  const uint8_t* k;  // first K row of the layer: store data + k_off rows
  const uint8_t* v;
  const uint16_t* k_scales;  // float16 scales, same rows (quantized formats; else null)
  const uint16_t* v_scales;
  int64_t row_bytes;   // bytes of one store row (nkv heads)
  int64_t head_bytes;  // bytes of one head of a row
  int64_t scale_row;   // scales per store row (nkv * num_scales)
  int64_t num_scales;  // per head; group = hd / num_scales
  int64_t rows_per_block, block_size;
  const int64_t* block_table;  // [B, max_blocks]
  int64_t max_blocks;
  const int64_t* query_start;  // [B + 1] first row of each sequence in T
  const int64_t* num_cached;   // [B] tokens cached before the step
  const int64_t* tiles;  // [num_tiles, kTileFields] from make_tiles
  int64_t nh, nkv, hd;
  int64_t window;  // 0: none
  int64_t num_sinks;
  float scale, softcap;  // softcap 0: none
  int format;
  int64_t rotation;  // int4 Hadamard width (0: none)
  // With sinks: q roped by its place in the cache, the query of the sink keys kp < ns
  // [T, nh, hd] (row stride sink_q_stride); null without sinks.
  const float* sink_q;
  int64_t sink_q_stride;
  // Set by run(): parts [num_parts, 3] (query tile, first and end of its keys in visit order,
  // KeyRanges), item i = part i / nkv, kv head i % nkv; and where some tile has several parts,
  // each item's partial result [items, partial_floats(hd)] (else null: items write out).
  const int64_t* parts;
  float* partial;
};

// Each computes work items [i0, i1): item i is part i / nkv, kv head i % nkv.
void paged_attention_ref(const Args& a, int64_t i0, int64_t i1);
void paged_attention_avx2(const Args& a, int64_t i0, int64_t i1);
void paged_attention_avx512(const Args& a, int64_t i0, int64_t i1);
using PagedKernel = void (*)(const Args&, int64_t, int64_t);
PagedKernel paged_kernel(int64_t isa);  // kIsa* -> its kernel

constexpr int64_t kScaleGroup = 32;  // elements per scale where a head has several

// Scales per head (0 for float formats: one, of the whole head, where hd % kScaleGroup != 0)
// and the int4 rotation width (0: none) of a format.
int64_t num_scales_of(int format, int64_t hd);
int64_t rotation_of(int format, int64_t hd);

// [num_tiles * kTileFields] tiles (sequence, first row, end row, first head, end head) of at
// most kMaxRows rows: kMaxRows / group queries of all `group` query heads of a kv head, or one
// query of up to kMaxRows of them where group is larger.
std::vector<int64_t> make_tiles(const int64_t* query_start, int64_t B, int64_t group);

// Every work item of `a` (a.tiles: num_tiles tiles from make_tiles) across threads, with the
// kernel of isa; a.parts and a.partial are set here.
void run(const Args& a, int64_t num_tiles, int64_t isa);

// Quantize one head row x[hd] exactly as KVFormat.quantize (int4: up to float rounding of the
// rotation): data gets row_elements storage elements, scales num_scales float16 (if quantized).
void quantize_head(int format, const float* x, int64_t hd, int64_t num_scales, int64_t rotation,
                   void* data, uint16_t* scales);

namespace {

inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// float8_e4m3fn -> float, exact: the 7 low bits as a float's exponent|mantissa, times 2^120.
inline float fp8_to_float(uint8_t x) {
  const float mag = bits_float((uint32_t)(x & 0x7F) << 20) * 0x1p120f;
  return (x & 0x80) ? -mag : mag;
}

// Element i of one stored head row (without its scale).
inline float stored_value(int format, const uint8_t* src, int64_t i) {
  switch (format) {
    case kF32: {
      float f;
      std::memcpy(&f, src + 4 * i, 4);
      return f;
    }
    case kF16: {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      return half_to_float(h);
    }
    case kBF16: {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      return bits_float((uint32_t)h << 16);
    }
    case kInt8: return (float)(int8_t)src[i];
    case kInt4: return (float)((i & 1 ? src[i / 2] >> 4 : src[i / 2] & 0x0F) - 8);
    default: return fp8_to_float(src[i]);
  }
}

// The scale of element d of a head row with nsc scales (num_scales_of): d / group without a
// division in the SIMD loops (the group is kScaleGroup, or the whole row).
inline int64_t scale_index(int64_t nsc, int64_t d) { return nsc > 1 ? d / kScaleGroup : 0; }

// Element d of one stored head row, dequantized with its row's float scales sc (if quantized).
inline float element(int format, const uint8_t* row, const float* sc, int64_t group, int64_t d) {
  const float x = stored_value(format, row, d);
  return format >= kInt8 ? x * sc[d / group] : x;
}

// s[r * kKeyTile + j] += columns [hv, hd) of q[r] . key j: the head dims past the last whole
// vector of an ISA's micro-kernel (k, off, ks as Ops::scores takes them).
inline void scores_tail(int format, const float* q, int64_t R, const uint8_t* k,
                        const int64_t* off, const float* ks, int64_t nsc, int64_t group,
                        int64_t n, int64_t hv, int64_t hd, float* s) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = hv; d < hd; ++d)
        s[r * kKeyTile + j] += q[r * hd + d] * element(format, k + off[j], ks + j * nsc, group, d);
}

// x @ H in place, H the orthonormal Sylvester Hadamard matrix of width n, block by block.
inline void hadamard(float* x, int64_t hd, int64_t n) {
  const float norm = 1.0f / std::sqrt((float)n);
  for (int64_t b = 0; b < hd; b += n) {
    float* y = x + b;
    for (int64_t len = 1; len < n; len <<= 1)
      for (int64_t i = 0; i < n; i += 2 * len)
        for (int64_t j = i; j < i + len; ++j) {
          const float u = y[j], w = y[j + len];
          y[j] = u + w;
          y[j + len] = u - w;
        }
    for (int64_t j = 0; j < n; ++j) y[j] *= norm;
  }
}

// q[hd] = one query head row src as the kernels score it: rotated by H for int4 (the keys are
// stored times H), times the softmax scale. Both drivers load q and sink_q rows this way.
inline void load_query(const Args& a, const float* src, float* q) {
  std::memcpy(q, src, a.hd * sizeof(float));
  if (a.rotation) hadamard(q, a.hd, a.rotation);
  for (int64_t d = 0; d < a.hd; ++d) q[d] *= a.scale;
}

// A work item's partial result: its output rows before dividing by their sum [kMaxRows, hd],
// then the running max m [kMaxRows] and sum l [kMaxRows] of the online softmax.
inline int64_t partial_floats(int64_t hd) { return kMaxRows * (hd + 2); }

// The keys some query of a tile sees, in visit order: the sinks [0, sinks) before the first
// row's window, then [lo, end); a part's keys [first, end) count in this order.
struct KeyRanges {
  int64_t sinks, lo, end;
  int64_t count() const { return sinks + end - lo; }
};

inline KeyRanges key_ranges(const Args& a, const int64_t* tile) {
  const int64_t b = tile[0], p_first = a.num_cached[b] + tile[1] - a.query_start[b];
  const int64_t p_last = p_first + tile[2] - tile[1] - 1;
  const int64_t lo = a.window ? std::max<int64_t>(p_first - a.window + 1, 0) : 0;
  return {a.window ? std::min(a.num_sinks, lo) : 0, lo, p_last + 1};
}

// Token and query head of row r of a tile for kv head kvh.
inline void row_place(const Args& a, const int64_t* tile, int64_t kvh, int64_t r, int64_t* t,
                      int64_t* head) {
  const int64_t gw = tile[4] - tile[3];
  *t = tile[1] + r / gw;
  *head = kvh * (a.nh / a.nkv) + tile[3] + r % gw;
}

// Row r's finished output o[hd] (divided by its sum) to out, rotated back if int4.
inline void write_row(const Args& a, const int64_t* tile, int64_t kvh, int64_t r, float* o) {
  if (a.rotation) hadamard(o, a.hd, a.rotation);
  int64_t t, head;
  row_place(a, tile, kvh, r, &t, &head);
  std::memcpy(a.out + t * a.out_stride + head * a.hd, o, a.hd * sizeof(float));
}

// fn(rows, r) over query rows [0, R) in blocks of 4 and one of the rest, `rows` a
// std::integral_constant with the block's row count (for register-blocked micro-kernels).
template <class Fn>
inline void row_blocks(int64_t R, Fn fn) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) fn(std::integral_constant<int, 4>{}, r);
  if (R - r == 3) fn(std::integral_constant<int, 3>{}, r);
  if (R - r == 2) fn(std::integral_constant<int, 2>{}, r);
  if (R - r == 1) fn(std::integral_constant<int, 1>{}, r);
}

// fn<F>(args...) with F the Format code `format` names (for the ISA files' templates).
#define KVLM_BY_FORMAT(format, fn, ...)      \
  switch (format) {                          \
    case kF32: fn<kF32>(__VA_ARGS__); break;   \
    case kF16: fn<kF16>(__VA_ARGS__); break;   \
    case kBF16: fn<kBF16>(__VA_ARGS__); break; \
    case kInt8: fn<kInt8>(__VA_ARGS__); break; \
    case kInt4: fn<kInt4>(__VA_ARGS__); break; \
    default: fn<kFp8>(__VA_ARGS__); break;     \
  }

// Where the n keys of one tile are stored: key j's head row at byte off[j] from the layer's
// first K row (a.k) and from its first V row (a.v) alike, its scales at soff[j] from a.k_scales
// and a.v_scales (quantized formats). Consecutive keys of a block are consecutive rows; a tile
// may span blocks, so the ISA loops read every key's place from here.
struct KeyTile {
  int64_t n;
  int64_t off[kKeyTile];
  int64_t soff[kKeyTile];
};

// The driver. Ops supplies the inner loops of one ISA; K/V rows are read in their stored format
// (`format`) and dequantized in registers, each
// stored vector once per block of up to 4 query rows (row_blocks), its scale multiplied in:
//   scales(sc, soff, n, nsc, out): out[j * nsc + g] = float of sc[soff[j] + g] (n keys)
//   scores(f, q, R, k, off, ks, nsc, group, n, hd, s): s[r * kKeyTile + j] = q[r] . key j
//       (q [R, hd]; key j at k + off[j] bytes, times ks[j * nsc + d / group] if quantized)
//   exp_sum(s, n, m): s[j] = exp(s[j] - m), returns the sum
//   accumulate(f, p, R, v, off, vs, nsc, group, n, hd, acc): acc[r] += sum_j p[r * kKeyTile + j]
//       value j (v, off and vs as k, off and ks)
//   scale_rows(x, n, c): x[0 .. n) *= c
template <class Ops>
void run_items(const Args& a, int64_t i0, int64_t i1) {
  const int64_t hd = a.hd;
  const int64_t group = a.num_scales ? hd / a.num_scales : hd;
  const bool sinks = a.num_sinks > 0;  // the sink keys score against sink_q
  const bool quantized = a.num_scales > 0;
  const int64_t nsc = a.num_scales;
  // This thread's buffers, grown once (no allocation or zeroing per call): q rows, sink_q rows
  // (with sinks), output rows, scores, running max and sum, K and V tile scales.
  thread_local std::vector<float> scratch;
  const size_t need = (sinks ? 3 : 2) * kMaxRows * hd + kMaxRows * (kKeyTile + 2) +
                      2 * kKeyTile * nsc;
  if (scratch.size() < need) scratch.resize(need);
  float* qbuf = scratch.data();
  float* sqbuf = qbuf + kMaxRows * hd;  // == acc without sinks, never read then
  float* acc = sqbuf + (sinks ? kMaxRows * hd : 0);
  float* s = acc + kMaxRows * hd;
  float* m = s + kMaxRows * kKeyTile;
  float* l = m + kMaxRows;
  float* ks = l + kMaxRows;
  float* vs = ks + kKeyTile * nsc;
  int64_t pos[kMaxRows];
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t* part = a.parts + 3 * (item / a.nkv);
    const int64_t* tile = a.tiles + kTileFields * part[0];
    const int64_t kvh = item % a.nkv, b = tile[0];
    const int64_t cached = a.num_cached[b];
    const int64_t ws = a.window ? std::max<int64_t>(cached - a.window + 1, 0) : 0;
    const int64_t ns = std::min(a.num_sinks, ws);  // keys [0, ns) are sinks by place
    const int64_t R = (tile[2] - tile[1]) * (tile[4] - tile[3]);
    for (int64_t r = 0; r < R; ++r) {
      int64_t t, head;
      row_place(a, tile, kvh, r, &t, &head);
      load_query(a, a.q + t * a.q_stride + head * hd, qbuf + r * hd);
      if (sinks) load_query(a, a.sink_q + t * a.sink_q_stride + head * hd, sqbuf + r * hd);
      pos[r] = cached + t - a.query_start[b];
      m[r] = -INFINITY;
      l[r] = 0.0f;
    }
    std::fill(acc, acc + R * hd, 0.0f);
    const int64_t* table = a.block_table + b * a.max_blocks;
    // The places of keys kp .. kp + n - 1: one division, then the next row, or the first row
    // of the next block (looked up only when a key of the tile is in it).
    auto locate = [&](int64_t kp, int64_t n, KeyTile* t) {
      t->n = n;
      int64_t block = kp / a.block_size, in_block = kp % a.block_size;
      int64_t row = table[block] * a.rows_per_block + in_block;
      for (int64_t j = 0; j < n; ++j, ++row, ++in_block) {
        if (in_block == a.block_size) {
          in_block = 0;
          row = table[++block] * a.rows_per_block;
        }
        t->off[j] = row * a.row_bytes + kvh * a.head_bytes;
        t->soff[j] = row * a.scale_row + kvh * nsc;
      }
    };
    auto prefetch = [&](const KeyTile& t) {  // its K/V head rows
      for (int64_t j = 0; j < t.n; ++j)
        for (int64_t c = 0; c < a.head_bytes; c += 64) {
          __builtin_prefetch(a.k + t.off[j] + c);
          __builtin_prefetch(a.v + t.off[j] + c);
        }
    };
    KeyTile places[2];  // this tile's and the next one's (prefetched while this one computes)
    auto visit = [&](int64_t k0, int64_t k1, const float* qrows) {  // keys [k0, k1) against
      // qrows [R, hd] (qbuf, or sqbuf for the sink keys)
      if (k0 >= k1) return;
      KeyTile *cur = &places[0], *next = &places[1];
      locate(k0, std::min(k1 - k0, kKeyTile), cur);
      for (int64_t kp = k0; kp < k1;) {
        const int64_t n = cur->n;
        if (kp + n < k1) {  // the next tile, while this one computes
          locate(kp + n, std::min(k1 - kp - n, kKeyTile), next);
          prefetch(*next);
        }
        if (quantized) {
          Ops::scales(a.k_scales, cur->soff, n, nsc, ks);
          Ops::scales(a.v_scales, cur->soff, n, nsc, vs);
        }
        Ops::scores(a.format, qrows, R, a.k, cur->off, ks, nsc, group, n, hd, s);
        for (int64_t r = 0; r < R; ++r) {
          float* sr = s + r * kKeyTile;
          if (a.softcap > 0.0f)
            for (int64_t j = 0; j < n; ++j) sr[j] = std::tanh(sr[j] / a.softcap) * a.softcap;
          const int64_t p = pos[r], last = kp + n - 1;
          auto unseen = [&](int64_t key) {
            return key > p || (a.window && key <= p - a.window && key >= a.num_sinks);
          };
          const bool all_seen = !unseen(kp) && !unseen(last) && !(a.window && kp < a.num_sinks);
          if (!all_seen)
            for (int64_t j = 0; j < n; ++j)
              if (unseen(kp + j)) sr[j] = -INFINITY;
          float mx = -INFINITY;
          for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j]);
          if (mx == -INFINITY) {  // nothing of this tile for this query
            std::fill(sr, sr + n, 0.0f);
            continue;
          }
          const float m_new = std::max(m[r], mx);
          const float corr = std::exp(m[r] - m_new);
          l[r] = l[r] * corr + Ops::exp_sum(sr, n, m_new);
          if (!all_seen)  // exp(-inf) may be a tiny positive number in the SIMD exp
            for (int64_t j = 0; j < n; ++j)
              if (unseen(kp + j)) sr[j] = 0.0f;
          if (corr != 1.0f) Ops::scale_rows(acc + r * hd, hd, corr);
          m[r] = m_new;
        }
        Ops::accumulate(a.format, s, R, a.v, cur->off, vs, nsc, group, n, hd, acc);
        kp += n;
        std::swap(cur, next);
      }
    };
    const KeyRanges keys = key_ranges(a, tile);  // this part's: [part[1], part[2]) of them
    const int64_t sinks_end = std::min(part[2], keys.sinks);
    visit(part[1], std::min(sinks_end, ns), sqbuf);  // sinks by place
    visit(std::max(part[1], ns), sinks_end, qbuf);  // before the window, not yet sinks by place
    visit(keys.lo + std::max<int64_t>(part[1] - keys.sinks, 0), keys.lo + part[2] - keys.sinks,
          qbuf);
    if (a.partial) {  // unnormalized, merged by run()
      float* dst = a.partial + item * partial_floats(hd);
      std::memcpy(dst, acc, R * hd * sizeof(float));
      std::memcpy(dst + kMaxRows * hd, m, R * sizeof(float));
      std::memcpy(dst + kMaxRows * (hd + 1), l, R * sizeof(float));
      continue;
    }
    for (int64_t r = 0; r < R; ++r) {
      float* o = acc + r * hd;
      Ops::scale_rows(o, hd, 1.0f / l[r]);
      write_row(a, tile, kvh, r, o);
    }
  }
}

}  // namespace
}  // namespace paged
}  // namespace kvlm
