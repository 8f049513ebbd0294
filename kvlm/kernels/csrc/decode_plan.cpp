// kvlm.DecodePlan: every decoder layer of a step in one call, on quantized weights and a paged
// KV cache in any KV format (float32, float16, bfloat16, int8, int4, fp8). Named for the pure
// decode step (one new token per sequence) it was built for; it serves any step whose
// sequences all read a paged cache: several new tokens per sequence (a speculative
// verification, a prompt chunk beside decode rows) go through the same layers, each token
// attending causally to its sequence's cache and the new tokens before it. Python builds the
// plan once per model (weights, norms, shapes), tells it the cache layout (set_layout,
// set_groups) and calls `forward` each step with that step's positions, query starts, cache
// counts, write rows and block tables:
//
//   x [T, H] embedded tokens -> per layer:
//     h = attn_norm(x); q, k, v = h @ Wqkv; [q_norm, k_norm per head]; rope(q, k) by place in
//     the text, in every group (a group with sinks also ropes q by its place in the cache:
//     sink_q, the query its sink keys score against, paged_attention.h)
//     write k, v at the token's cache row, quantized as KVStore.write does (every token of the
//       step before any attention reads);
//     o = paged attention through the sequence's block table over the keys before the token
//       and its own: the decode kernel (paged_attention.h), or for long chunks the GEMM-shaped
//       prefill kernel (paged_prefill.h)
//     a = o @ Wo; [a = post_attn_norm(a)]; x += a
//     h = ffn_norm(x); g, u = h @ Wgu; f = act(g) * u @ Wdown; [f = post_ffn_norm(f)]; x += f
//   -> final_norm(x) [T, H]
//
// A token's place in the text (`positions`, the rope angle) and in a group's cache (the group's
// num_cached of its sequence plus its index in the step) are the same unless a KV press dropped
// tokens from the sequence in that group (engine/press.py presses the groups without a window
// only): then the kept keys sit compacted in rows 0 .. kept - 1, still roped by their text
// places, and key counts, block-table bounds and window arithmetic go by the group's cache.
//
// Each matmul quantizes its input once and splits weight tiles across threads; attention splits
// work items (query tile, kv head) and, where they are few, keys. Buffers are allocated once and
// grow with T.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <string>
#include <vector>

#include "decode_math.h"
#include "paged_attention.h"
#include "paged_prefill.h"
#include "qgemm.h"

namespace kvlm {
namespace {

// One packed weight part of a projection (a fused q/k/v keeps one part per storage format).
struct Part {
  at::Tensor w;  // [tiles, n_groups, block_bytes] uint8
  int bits, group, scale_bytes;
  bool symmetric;  // no stored minimums (see qgemm.h)
  int64_t n;    // output columns
  int64_t col;  // first output column in the projection
  int64_t tile0;  // first tile in the projection's tile range
};

struct Proj {
  std::vector<Part> parts;
  int64_t k = 0;  // input columns
  int64_t n = 0;  // output columns, all parts
  int64_t tiles = 0;
};

Proj make_proj(const std::vector<at::Tensor>& weights, const std::vector<int64_t>& meta, int64_t k) {
  TORCH_CHECK(meta.size() == 4 * weights.size(), "DecodePlan: 4 ints (bits, group, scale_bytes, n) per weight part");
  Proj p;
  p.k = k;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() && w.is_cpu(),
                "DecodePlan: packed weights are contiguous uint8 [tiles, groups, block_bytes]");
    TORCH_CHECK(w.size(1) * meta[4 * i + 1] == padded_k(k), "DecodePlan: weight has ",
                w.size(1) * meta[4 * i + 1], " input columns, expected ", padded_k(k));
    const int symmetric = symmetric_blocks(meta[4 * i], meta[4 * i + 1], meta[4 * i + 2], w.size(2));
    TORCH_CHECK(symmetric >= 0, "DecodePlan: a weight's blocks do not match its format");
    Part part{w, (int)meta[4 * i], (int)meta[4 * i + 1], (int)meta[4 * i + 2], symmetric == 1,
              meta[4 * i + 3], p.n, p.tiles};
    p.n += part.n;
    p.tiles += w.size(0);
    p.parts.push_back(part);
  }
  return p;
}

// Seconds spent per phase of `forward`, summed over calls while profiling is on.
enum Phase { kNorms, kQkv, kCacheWrite, kAttention, kOut, kGateUp, kAct, kDown, kNumPhases };
const char* const kPhaseNames[kNumPhases] = {"norms and residuals", "qkv matmul", "rope and cache write", "attention", "o matmul", "gate/up matmul", "activation", "down matmul"};

const float* opt_ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

struct Layer {
  at::Tensor attn_norm, q_norm, k_norm, post_attn_norm, ffn_norm, post_ffn_norm;  // numel 0: none
  Proj qkv, o, gate_up, down;
  int64_t rope = 0;  // which rope (add_rope order) rotates its q and k
  int64_t group = -1, k_off = 0, v_off = 0;  // cache group, K and V row offsets (set_layout)
};

static_assert(decode::kKVFloat32 == paged::kF32 && decode::kKVFloat16 == paged::kF16 &&
                  decode::kKVBFloat16 == paged::kBF16,
              "float KV formats share their codes");

// What one cache group's store holds (set_groups).
struct Group {
  int format;  // paged::Format
  int64_t block_size, rows_per_block, window, num_sinks;  // window 0: none
};

// Storage element type of a format.
at::ScalarType storage_type(int format) {
  switch (format) {
    case paged::kF32: return at::kFloat;
    case paged::kF16: return at::kHalf;
    case paged::kBF16: return at::kBFloat16;
    case paged::kInt8: return at::kChar;
    default: return at::kByte;
  }
}

}  // namespace

class DecodePlan : public torch::CustomClassHolder {
 public:
  DecodePlan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
             int64_t intermediate, double eps, double scale, double softcap, int64_t act,
             at::Tensor final_norm, int64_t isa)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim),
        inter_(intermediate), eps_((float)eps), scale_((float)scale), softcap_((float)softcap),
        act_((int)act),
        final_norm_(final_norm.contiguous()), isa_(isa) {
    TORCH_CHECK(isa >= kIsaAvx2 && isa <= cpu_isa(), "DecodePlan needs AVX2 kernels; isa ", isa,
                " (this CPU: ", cpu_isa(), ")");
    TORCH_CHECK(head_dim % 8 == 0 && heads % kv_heads == 0, "DecodePlan: head_dim ", head_dim,
                " must be a multiple of 8 and heads a multiple of kv_heads");
    TORCH_CHECK(act == 0 || act == 1, "DecodePlan: act is 0 (SiLU) or 1 (GELU tanh)");
  }

  void add_layer(at::Tensor attn_norm, at::Tensor q_norm, at::Tensor k_norm,
                 at::Tensor post_attn_norm, at::Tensor ffn_norm, at::Tensor post_ffn_norm,
                 std::vector<at::Tensor> qkv, std::vector<int64_t> qkv_meta,
                 std::vector<at::Tensor> o, std::vector<int64_t> o_meta,
                 std::vector<at::Tensor> gate_up, std::vector<int64_t> gate_up_meta,
                 std::vector<at::Tensor> down, std::vector<int64_t> down_meta, int64_t rope) {
    Layer l;
    l.attn_norm = attn_norm.contiguous();
    l.q_norm = q_norm.contiguous();
    l.k_norm = k_norm.contiguous();
    l.post_attn_norm = post_attn_norm.contiguous();
    l.ffn_norm = ffn_norm.contiguous();
    l.post_ffn_norm = post_ffn_norm.contiguous();
    l.qkv = make_proj(qkv, qkv_meta, hidden_);
    l.o = make_proj(o, o_meta, heads_ * head_dim_);
    l.gate_up = make_proj(gate_up, gate_up_meta, hidden_);
    l.down = make_proj(down, down_meta, inter_);
    TORCH_CHECK(l.qkv.n == (heads_ + 2 * kv_heads_) * head_dim_ && l.o.n == hidden_ &&
                    l.gate_up.n == 2 * inter_ && l.down.n == hidden_,
                "DecodePlan: projection shapes do not match the model's");
    l.rope = rope;
    layers_.push_back(std::move(l));
  }

  // Appends a rope (its inverse frequencies, [hd / 2] float32); layers name ropes by order.
  void add_rope(at::Tensor inv_freq) {
    TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == head_dim_ / 2,
                "DecodePlan.add_rope: inv_freq must be float32 [head_dim / 2]");
    inv_freqs_.push_back(inv_freq.contiguous());
  }

  // Per layer: its cache group and the row offsets of its K and V from a token's base row.
  void set_layout(std::vector<int64_t> groups, std::vector<int64_t> k_offs,
                  std::vector<int64_t> v_offs) {
    TORCH_CHECK(groups.size() == layers_.size() && k_offs.size() == layers_.size() &&
                    v_offs.size() == layers_.size(),
                "DecodePlan.set_layout: one entry per layer");
    for (size_t i = 0; i < layers_.size(); ++i) {
      TORCH_CHECK(groups[i] >= 0 && k_offs[i] >= 0 && v_offs[i] >= 0,
                  "DecodePlan.set_layout: groups and offsets are >= 0");
      layers_[i].group = groups[i];
      layers_[i].k_off = k_offs[i];
      layers_[i].v_off = v_offs[i];
    }
  }

  // Per cache group: its format (paged::Format code), block size, rows per block, window (0:
  // none) and sinks.
  void set_groups(std::vector<int64_t> formats, std::vector<int64_t> block_sizes,
                  std::vector<int64_t> rows_per_block, std::vector<int64_t> windows,
                  std::vector<int64_t> num_sinks) {
    const size_t n = formats.size();
    TORCH_CHECK(block_sizes.size() == n && rows_per_block.size() == n && windows.size() == n &&
                    num_sinks.size() == n,
                "DecodePlan.set_groups: one entry per group in each list");
    groups_.clear();
    for (size_t g = 0; g < n; ++g) {
      TORCH_CHECK(formats[g] >= paged::kF32 && formats[g] <= paged::kFp8 && block_sizes[g] > 0 &&
                      rows_per_block[g] >= 2 * block_sizes[g] && windows[g] >= 0 &&
                      num_sinks[g] >= 0 && (num_sinks[g] == 0 || windows[g] > 0),
                  "DecodePlan.set_groups: group ", g, " has format ", formats[g], ", blocks of ",
                  block_sizes[g], " tokens in ", rows_per_block[g], " rows, window ", windows[g],
                  " and ", num_sinks[g], " sinks");
      groups_.push_back({(int)formats[g], block_sizes[g], rows_per_block[g], windows[g],
                         num_sinks[g]});
    }
  }

  // Time each phase of `forward` from now on (false: stop; the sums are kept).
  void profile(bool on) { profiling_ = on; }

  // Seconds per phase summed over profiled calls, and the number of those calls.
  c10::Dict<std::string, double> timings() const {
    c10::Dict<std::string, double> out;
    for (int p = 0; p < kNumPhases; ++p) out.insert(kPhaseNames[p], seconds_[p]);
    out.insert("calls", (double)profiled_calls_);
    return out;
  }

  // x [T, H] float32: the new tokens of B sequences, sequence b's in rows query_start[b] ..
  // query_start[b + 1] - 1 (one token each in a decode step; a few in a speculative
  // verification or a mixed step; a prompt chunk); positions [T] int64, each token's place in
  // the text (its rope angle); query_start [B + 1] int64. Per cache group (set_groups order):
  // num_cached [B] int64, the keys sequence b has cached there before its first new token, so
  // token t sits at cache index num_cached[b] + t - query_start[b] (<= its text position; equal
  // unless a press dropped tokens from the group); store data [rows, nkv, row_elements] in its
  // format, scales [rows, nkv, num_scales] float16 (numel 0 for float formats), write_rows [T]
  // base row of each new token, block_tables [B, max_blocks] int64 block ids (null-padded).
  // `prefill`: attention takes the GEMM-shaped prefill kernel (paged_prefill.h, for long
  // chunks) instead of the decode kernel; both read the same Args and give the same answer.
  at::Tensor forward(at::Tensor x, at::Tensor positions, at::Tensor query_start,
                     std::vector<at::Tensor> num_cached, std::vector<at::Tensor> stores,
                     std::vector<at::Tensor> scales, std::vector<at::Tensor> write_rows,
                     std::vector<at::Tensor> block_tables, bool prefill) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == at::kFloat && x.is_cpu(),
                "DecodePlan.forward: x must be float32 [T, ", hidden_, "]");
    const int64_t T = x.size(0);
    const size_t num_groups = stores.size();
    for (const Layer& l : layers_)
      TORCH_CHECK(l.group >= 0 && (size_t)l.group < num_groups && (size_t)l.rope < inv_freqs_.size(),
                  "DecodePlan.forward: layout not set, or a group or rope out of range");
    TORCH_CHECK(num_groups == groups_.size() && num_cached.size() == num_groups &&
                    scales.size() == num_groups && write_rows.size() == num_groups &&
                    block_tables.size() == num_groups,
                "DecodePlan.forward: one num_cached, store, scales, write_rows and block_tables "
                "per group (set_groups named ", groups_.size(), ")");
    const int64_t B = query_start.numel() - 1;
    for (const at::Tensor* t : {&positions, &query_start})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1,
                  "DecodePlan.forward: positions, query_start and num_cached must be contiguous "
                  "int64 vectors");
    for (const at::Tensor& t : num_cached)
      TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() == 1,
                  "DecodePlan.forward: positions, query_start and num_cached must be contiguous "
                  "int64 vectors");
    TORCH_CHECK(positions.numel() == T && B >= 0,
                "DecodePlan.forward: positions [T] and query_start [B + 1], T=", T);
    for (const at::Tensor& t : num_cached)
      TORCH_CHECK(t.numel() == B, "DecodePlan.forward: positions [T] and query_start [B + 1], T=",
                  T, ", B=", t.numel(), " (num_cached [B] per group)");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* qs = query_start.data_ptr<int64_t>();
    TORCH_CHECK(qs[0] == 0 && qs[B] == T, "DecodePlan.forward: query_start runs from 0 to T=", T);
    token_seq_.resize(T);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(qs[b + 1] > qs[b], "DecodePlan.forward: sequence ", b,
                  " has no new token or a negative cache position");
      for (int64_t t = qs[b]; t < qs[b + 1]; ++t) token_seq_[t] = b;
    }
    cached_.resize(num_groups);
    int64_t max_place = 0;  // rope tables by the queries' places in the cache (groups with sinks)
    for (size_t g = 0; g < num_groups; ++g) {
      const int64_t* cached = cached_[g] = num_cached[g].data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(cached[b] >= 0, "DecodePlan.forward: sequence ", b,
                    " has no new token or a negative cache position");
        for (int64_t t = qs[b]; t < qs[b + 1]; ++t)
          TORCH_CHECK(cached[b] + t - qs[b] <= pos[t], "DecodePlan.forward: token ", t,
                      " has cache position ", cached[b] + t - qs[b], " and text position ",
                      pos[t], " in group ", g, "; a cache position is at most the text position "
                      "(less the tokens a press dropped)");
      }
      check_group(g, stores[g], scales[g], write_rows[g], block_tables[g], qs, cached, B, T);
      const Group& G = groups_[g];
      for (int64_t t = 0; G.num_sinks && t < T; ++t)
        max_place = std::max(max_place, sink_place(G, cached, qs, t));
    }
    ensure_buffers(T);
    rope_tables(pos, T);
    cache_rope_tables(max_place + 1);
    const int64_t group = heads_ / kv_heads_;
    const std::vector<int64_t> tiles =
        prefill ? prefill::make_tiles(qs, B, group) : paged::make_tiles(qs, B, group);

    at::Tensor out = x.contiguous().clone();  // the residual stream, [T, H]
    float* xs = out.data_ptr<float>();
    if (profiling_) ++profiled_calls_;
    tick_ = Clock::now();
    for (const Layer& l : layers_) {
      const float* cos = rope_.data_ptr<float>() + (2 * l.rope) * T * head_dim_;
      const Cache cache{groups_[l.group], stores[l.group], scales[l.group],
                        write_rows[l.group].data_ptr<int64_t>(), block_tables[l.group], qs,
                        cached_[l.group], tiles, prefill};
      attention_block(l, xs, T, cos, cos + T * head_dim_, cache);
      mlp_block(l, xs, T);
    }
    const float* fw = final_norm_.data_ptr<float>();
    for_rows(T, [&](int64_t m) { decode::rms_norm(xs + m * hidden_, fw, xs + m * hidden_, hidden_, eps_); });
    lap(kNorms);
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;

  // One group's step inputs, as forward hands them to a layer.
  struct Cache {
    const Group& group;
    const at::Tensor& store;
    const at::Tensor& scales;
    const int64_t* write_rows;  // [T]
    const at::Tensor& block_table;  // [B, max_blocks]
    const int64_t* query_start;  // [B + 1]
    const int64_t* num_cached;  // [B] keys each sequence has cached in the group before its first
                                // new one
    const std::vector<int64_t>& tiles;
    bool prefill;  // the prefill kernel's tiles
  };

  // Token t's place in the group's cache as the sink keys see it, ns + c - ws (c its cache
  // index; ws and ns from its sequence's first new token: paged_attention.h,
  // runner._query_places). `cached` [B] is the group's num_cached, qs [B + 1] query_start.
  int64_t sink_place(const Group& G, const int64_t* cached, const int64_t* qs, int64_t t) const {
    const int64_t b = token_seq_[t];
    const int64_t ws = std::max<int64_t>(cached[b] - G.window + 1, 0);
    return std::min(G.num_sinks, ws) + cached[b] + t - qs[b] - ws;
  }

  // Group g's inputs: a bad shape, row or block id is an error, never a read or write out of
  // bounds. qs [B + 1] and cached [B] as forward takes them.
  void check_group(size_t g, const at::Tensor& store, const at::Tensor& scales,
                   const at::Tensor& write_rows, const at::Tensor& table, const int64_t* qs,
                   const int64_t* cached, int64_t B, int64_t T) const {
    const Group& G = groups_[g];
    const int64_t re = G.format == paged::kInt4 ? head_dim_ / 2 : head_dim_;
    TORCH_CHECK(store.scalar_type() == storage_type(G.format) && store.is_contiguous() &&
                    store.dim() == 3 && store.size(1) == kv_heads_ && store.size(2) == re &&
                    store.size(0) % G.rows_per_block == 0,
                "DecodePlan.forward: store ", g, " must be contiguous ",
                storage_type(G.format), " [blocks * ", G.rows_per_block, ", ", kv_heads_, ", ",
                re, "]");
    const int64_t num_scales = paged::num_scales_of(G.format, head_dim_);
    TORCH_CHECK(num_scales == 0 ? scales.numel() == 0
                                : scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                                      scales.dim() == 3 && scales.size(0) == store.size(0) &&
                                      scales.size(1) == kv_heads_ && scales.size(2) == num_scales,
                "DecodePlan.forward: scales ", g, " must be float16 [rows, ", kv_heads_, ", ",
                num_scales, "] (empty for a float format)");
    for (const at::Tensor* t : {&write_rows, &table})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                  "DecodePlan.forward: write rows and block tables must be contiguous int64");
    TORCH_CHECK(write_rows.numel() == T && table.dim() == 2 && table.size(0) == B,
                "DecodePlan.forward: write_rows [T] and block_tables [B, max_blocks], T=", T,
                ", B=", B);
    int64_t max_off = 0;  // every row a layer of this group touches is in the store
    for (const Layer& l : layers_)
      if (l.group == (int64_t)g) max_off = std::max({max_off, l.k_off, l.v_off});
    TORCH_CHECK(max_off + G.block_size <= G.rows_per_block,
                "DecodePlan.forward: K/V offsets past the group's blocks of ", G.rows_per_block,
                " rows");
    const int64_t limit = store.size(0) - max_off, num_blocks = store.size(0) / G.rows_per_block;
    const int64_t* rows = write_rows.data_ptr<int64_t>();
    const int64_t* ids = table.data_ptr<int64_t>();
    const int64_t max_blocks = table.size(1);
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(rows[t] >= 0 && rows[t] < limit, "DecodePlan.forward: write_rows row ", rows[t],
                  " is outside the store's [0, ", limit, ")");
    for (int64_t b = 0; b < B; ++b) {
      const int64_t end = cached[b] + qs[b + 1] - qs[b];
      TORCH_CHECK(end <= max_blocks * G.block_size, "DecodePlan.forward: sequence ", b,
                  " ends at cache position ", end, ", past its ", max_blocks, " blocks of ",
                  G.block_size);
    }
    for (int64_t i = 0; i < B * max_blocks; ++i)
      TORCH_CHECK(ids[i] >= 0 && ids[i] < num_blocks, "DecodePlan.forward: block id ", ids[i],
                  " is outside the store's [0, ", num_blocks, ")");
  }

  // Adds the time since the last lap to `phase` (when profiling).
  void lap(Phase phase) {
    if (!profiling_) return;
    const Clock::time_point now = Clock::now();
    seconds_[phase] += std::chrono::duration<double>(now - tick_).count();
    tick_ = now;
  }

  // cos and sign-folded sin [hd] of one position, as RotaryEmbedding: angle i = position *
  // inv_freq[i], cos | cos and -sin | sin over the two halves.
  void rope_row(const float* inv, int64_t position, float* cos, float* sin) const {
    const int64_t half = head_dim_ / 2;
    const float pos = (float)position;
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv[i], c = std::cos(angle), s = std::sin(angle);
      cos[i] = cos[half + i] = c;
      sin[i] = -s;
      sin[half + i] = s;
    }
  }

  // rope_[2 r] / rope_[2 r + 1]: cos and sin [M, hd] of rope r at each row's position.
  void rope_tables(const int64_t* positions, int64_t M) {
    float* t = rope_.data_ptr<float>();
    for (size_t r = 0; r < inv_freqs_.size(); ++r) {
      float* cos = t + (2 * r) * M * head_dim_;
      for (int64_t m = 0; m < M; ++m)
        rope_row(inv_freqs_[r].data_ptr<float>(), positions[m], cos + m * head_dim_,
                 cos + (M + m) * head_dim_);
    }
  }

  // cache_cos_[r] / cache_sin_[r]: [places, hd] of rope r by place in the cache (a sink
  // group's queries: places < num_sinks + window), grown to at least `places` rows, doubling;
  // places never move, so rows are computed once.
  void cache_rope_tables(int64_t needed) {
    if (needed <= cache_places_) return;
    const int64_t places = std::max(needed, 2 * cache_places_);
    const auto f = at::TensorOptions().dtype(at::kFloat);
    cache_cos_.resize(inv_freqs_.size());
    cache_sin_.resize(inv_freqs_.size());
    for (size_t r = 0; r < inv_freqs_.size(); ++r) {
      at::Tensor cos = at::empty({places, head_dim_}, f), sin = at::empty({places, head_dim_}, f);
      if (cache_places_) {
        cos.narrow(0, 0, cache_places_).copy_(cache_cos_[r]);
        sin.narrow(0, 0, cache_places_).copy_(cache_sin_[r]);
      }
      for (int64_t p = cache_places_; p < places; ++p)
        rope_row(inv_freqs_[r].data_ptr<float>(), p, cos.data_ptr<float>() + p * head_dim_,
                 sin.data_ptr<float>() + p * head_dim_);
      cache_cos_[r] = cos;
      cache_sin_[r] = sin;
    }
    cache_places_ = places;
  }

  // fn(m) for every row m < M; rows split across threads only past kParallelRows rows (below
  // that, waking a thread costs more than the row work: a norm of 640 floats is ~0.1 us).
  template <typename F>
  static void for_rows(int64_t M, const F& fn) {
    constexpr int64_t kParallelRows = 8;
    at::parallel_for(0, M, kParallelRows, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) fn(m);
    });
  }

  void ensure_buffers(int64_t M) {
    if (M > rows_) {
      const auto f = at::TensorOptions().dtype(at::kFloat);
      const int64_t attn = heads_ * head_dim_, qkv = (heads_ + 2 * kv_heads_) * head_dim_;
      const int64_t kmax = padded_k(std::max({hidden_, attn, inter_}));
      h_ = at::empty({M, std::max(hidden_, attn)}, f);
      qkv_ = at::empty({M, qkv}, f);
      attn_ = at::empty({M, attn}, f);
      sink_q_ = at::empty({M, attn}, f);
      proj_ = at::empty({M, std::max(hidden_, 2 * inter_)}, f);
      act_buf_ = at::empty({M, inter_}, f);
      qa_ = at::empty({M, kmax}, f.dtype(at::kChar));
      da_ = at::empty({M, kmax / kActBlock}, f);
      asum_ = at::empty({M, kmax / 16}, f.dtype(at::kInt));
      rope_ = at::empty({(int64_t)inv_freqs_.size() * 2, M, head_dim_}, f);
      rows_ = M;
    }
  }

  // out[M, p.n] (row stride ldo) = x[M, p.k] (row stride ldx) @ W.T
  void matmul(const Proj& p, const float* x, int64_t ldx, int64_t M, float* out, int64_t ldo) {
    const int64_t kp = padded_k(p.k);
    int8_t* qa = qa_.data_ptr<int8_t>();
    float* da = da_.data_ptr<float>();
    int32_t* asum = asum_.data_ptr<int32_t>();
    const QuantizeRows quantize = quantize_rows_for(isa_);
    at::parallel_for(0, M, quantize_grain(kp), [&](int64_t m0, int64_t m1) {
      quantize(x, ldx, p.k, kp, qa, da, asum, m0, m1);
    });
    const QGemmKernel kernel = qgemm_kernel(isa_);
    at::parallel_for(0, p.tiles, tile_grain(M, kp), [&](int64_t t0, int64_t t1) {
      for (const Part& part : p.parts) {
        const int64_t n_tiles = part.w.size(0);
        const int64_t lo = std::max(t0, part.tile0), hi = std::min(t1, part.tile0 + n_tiles);
        if (lo >= hi) continue;
        QGemmArgs a = weight_args(part.w.data_ptr<uint8_t>(), part.w.size(1), part.w.size(2),
                                  part.bits, part.group, part.scale_bytes, part.symmetric);
        a.qa = qa;
        a.lda = kp;
        a.da = da;
        a.ldd = kp / kActBlock;
        a.asum = asum;
        a.lds = kp / 16;
        a.out = out + part.col;
        a.ldo = ldo;
        a.M = M;
        a.N = part.n;
        kernel(a, lo - part.tile0, hi - part.tile0);
      }
    });
  }

  void attention_block(const Layer& l, float* xs, int64_t M, const float* cos, const float* sin,
                       const Cache& c) {
    const int64_t hd = head_dim_, nh = heads_, nkv = kv_heads_, H = hidden_;
    const int64_t qkv_w = (nh + 2 * nkv) * hd;
    const Group& G = c.group;
    const int64_t re = G.format == paged::kInt4 ? hd / 2 : hd;
    const int64_t num_scales = paged::num_scales_of(G.format, hd);
    const int64_t rotation = paged::rotation_of(G.format, hd);
    const int64_t elem = (int64_t)c.store.element_size();
    const int64_t row_bytes = nkv * re * elem, head_bytes = re * elem;
    float* h = h_.data_ptr<float>();
    float* qkv = qkv_.data_ptr<float>();
    float* sink_q = sink_q_.data_ptr<float>();  // [M, nh * hd], groups with sinks
    uint8_t* data = static_cast<uint8_t*>(c.store.data_ptr());
    uint16_t* scales = num_scales ? reinterpret_cast<uint16_t*>(c.scales.data_ptr()) : nullptr;
    const float* an = l.attn_norm.data_ptr<float>();
    for_rows(M, [&](int64_t m) { decode::rms_norm(xs + m * H, an, h + m * H, H, eps_); });
    lap(kNorms);
    matmul(l.qkv, h, H, M, qkv, qkv_w);
    lap(kQkv);
    const float* qn = opt_ptr(l.q_norm);
    const float* kn = opt_ptr(l.k_norm);
    for_rows(M, [&](int64_t m) {  // [q nh*hd | k nkv*hd | v nkv*hd]
      float* q = qkv + m * qkv_w;
      float* k = q + nh * hd;
      const float* v = k + nkv * hd;
      if (qn != nullptr) {
        for (int64_t i = 0; i < nh; ++i) decode::rms_norm(q + i * hd, qn, q + i * hd, hd, eps_);
        for (int64_t i = 0; i < nkv; ++i) decode::rms_norm(k + i * hd, kn, k + i * hd, hd, eps_);
      }
      if (G.num_sinks) {  // q by its place in the cache, for the sink keys (before rope)
        const int64_t place = sink_place(G, c.num_cached, c.query_start, m);
        float* sq = sink_q + m * nh * hd;
        std::memcpy(sq, q, nh * hd * sizeof(float));
        decode::rope(sq, cache_cos_[l.rope].data_ptr<float>() + place * hd,
                     cache_sin_[l.rope].data_ptr<float>() + place * hd, nh, hd);
      }
      decode::rope(q, cos + m * hd, sin + m * hd, nh, hd);  // keys stored roped by text position
      decode::rope(k, cos + m * hd, sin + m * hd, nkv, hd);
      for (const auto& [off, src] : {std::pair<int64_t, const float*>{l.k_off, k}, {l.v_off, v}}) {
        const int64_t row = c.write_rows[m] + off;
        if (num_scales == 0) {
          decode::store_row(src, data + row * row_bytes, nkv * hd, (decode::KVType)G.format);
          continue;
        }
        for (int64_t i = 0; i < nkv; ++i)
          paged::quantize_head(G.format, src + i * hd, hd, num_scales, rotation,
                               data + row * row_bytes + i * head_bytes,
                               scales + (row * nkv + i) * num_scales);
      }
    });
    lap(kCacheWrite);
    paged::Args a{};
    a.q = qkv;
    a.q_stride = qkv_w;
    a.out = attn_.data_ptr<float>();
    a.out_stride = nh * hd;
    a.k = data + l.k_off * row_bytes;
    a.v = data + l.v_off * row_bytes;
    a.k_scales = scales ? scales + l.k_off * nkv * num_scales : nullptr;
    a.v_scales = scales ? scales + l.v_off * nkv * num_scales : nullptr;
    a.row_bytes = row_bytes;
    a.head_bytes = head_bytes;
    a.scale_row = nkv * num_scales;
    a.num_scales = num_scales;
    a.rows_per_block = G.rows_per_block;
    a.block_size = G.block_size;
    a.block_table = c.block_table.data_ptr<int64_t>();
    a.max_blocks = c.block_table.size(1);
    a.query_start = c.query_start;
    a.num_cached = c.num_cached;
    a.tiles = c.tiles.data();
    a.nh = nh;
    a.nkv = nkv;
    a.hd = hd;
    a.window = G.window;
    a.num_sinks = G.num_sinks;
    a.scale = scale_;
    a.softcap = softcap_;
    a.format = G.format;
    a.rotation = rotation;
    if (G.num_sinks) {
      a.sink_q = sink_q;
      a.sink_q_stride = nh * hd;
    }
    (c.prefill ? prefill::run : paged::run)(a, (int64_t)c.tiles.size() / paged::kTileFields, isa_);
    lap(kAttention);
    float* o = proj_.data_ptr<float>();
    matmul(l.o, attn_.data_ptr<float>(), nh * hd, M, o, H);
    lap(kOut);
    add_residual(xs, o, l.post_attn_norm, M);
  }

  void mlp_block(const Layer& l, float* xs, int64_t M) {
    const int64_t H = hidden_, I = inter_;
    float* h = h_.data_ptr<float>();
    float* gu = proj_.data_ptr<float>();
    float* act = act_buf_.data_ptr<float>();
    const float* fn = l.ffn_norm.data_ptr<float>();
    for_rows(M, [&](int64_t m) { decode::rms_norm(xs + m * H, fn, h + m * H, H, eps_); });
    lap(kNorms);
    matmul(l.gate_up, h, H, M, gu, 2 * I);
    lap(kGateUp);
    for_rows(M, [&](int64_t m) { decode::gated_act(gu + m * 2 * I, gu + m * 2 * I + I, act + m * I, I, act_); });
    lap(kAct);
    matmul(l.down, act, I, M, h, H);
    lap(kDown);
    add_residual(xs, h, l.post_ffn_norm, M);
  }

  // xs += y, row by row, after y's own norm where the model has one (Gemma's sandwich norms).
  void add_residual(float* xs, float* y, const at::Tensor& post_norm, int64_t M) {
    const int64_t H = hidden_;
    const float* pn = opt_ptr(post_norm);
    for_rows(M, [&](int64_t m) {
      if (pn != nullptr) decode::rms_norm(y + m * H, pn, y + m * H, H, eps_);
      decode::add(xs + m * H, y + m * H, H);
    });
    lap(kNorms);
  }

  int64_t hidden_, heads_, kv_heads_, head_dim_, inter_;
  float eps_, scale_, softcap_;  // softcap 0: none
  int act_;
  at::Tensor final_norm_;
  int64_t isa_;
  std::vector<Layer> layers_;
  std::vector<Group> groups_;
  std::vector<at::Tensor> inv_freqs_;
  int64_t rows_ = 0, cache_places_ = 0;
  at::Tensor h_, qkv_, attn_, sink_q_, proj_, act_buf_, qa_, da_, asum_, rope_;
  std::vector<at::Tensor> cache_cos_, cache_sin_;  // per rope, [cache_places_, hd]
  std::vector<int64_t> token_seq_;  // [T] each token's sequence
  std::vector<const int64_t*> cached_;  // [G] the step's num_cached [B] of each group
  bool profiling_ = false;
  int64_t profiled_calls_ = 0;
  double seconds_[kNumPhases] = {};
  Clock::time_point tick_;
};

TORCH_LIBRARY_FRAGMENT(kvlm, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, double,
                       int64_t, at::Tensor, int64_t>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("add_rope", &DecodePlan::add_rope)
      .def("set_layout", &DecodePlan::set_layout)
      .def("set_groups", &DecodePlan::set_groups)
      .def("profile", &DecodePlan::profile)
      .def("timings", &DecodePlan::timings)
      .def("forward", &DecodePlan::forward);
}

}  // namespace kvlm
