// kvlm.DecodePlan: every decoder layer of a pure decode step (one new token per sequence) in
// one call, on quantized weights and a paged KV cache of float32, float16 or bfloat16 rows.
// Python builds the plan once per model (weights, norms, shapes) and calls `forward` each step
// with that step's cache rows:
//
//   x [M, H] embedded tokens -> per layer:
//     h = attn_norm(x); q, k, v = h @ Wqkv; [q_norm, k_norm per head]; rope(q, k)
//     write k, v at the token's cache row; o = attention over the sequence's cache rows
//     a = o @ Wo; [a = post_attn_norm(a)]; x += a
//     h = ffn_norm(x); g, u = h @ Wgu; f = act(g) * u @ Wdown; [f = post_ffn_norm(f)]; x += f
//   -> final_norm(x) [M, H]
//
// Each matmul quantizes its input once and splits weight tiles across threads; attention splits
// (sequence, query head) pairs. Buffers are allocated once and grow with M.
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

}  // namespace

class DecodePlan : public torch::CustomClassHolder {
 public:
  DecodePlan(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
             int64_t intermediate, double eps, double scale, int64_t act, at::Tensor final_norm,
             int64_t isa)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim),
        inter_(intermediate), eps_((float)eps), scale_((float)scale), act_((int)act),
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

  // Time each phase of `forward` from now on (false: stop; the sums are kept).
  void profile(bool on) { profiling_ = on; }

  // Seconds per phase summed over profiled calls, and the number of those calls.
  c10::Dict<std::string, double> timings() const {
    c10::Dict<std::string, double> out;
    for (int p = 0; p < kNumPhases; ++p) out.insert(kPhaseNames[p], seconds_[p]);
    out.insert("calls", (double)profiled_calls_);
    return out;
  }

  // x [M, H] float32; positions [M] int64 (rope angles: place in the text); per cache group:
  // store data [rows, nkv, hd] (float32, float16 or bfloat16), write_rows [M] base row of each
  // new token, gather [M * S] base rows each sequence reads (oldest first, S per sequence),
  // key_counts [M] keys of each sequence (1 .. S).
  at::Tensor forward(at::Tensor x, at::Tensor positions, std::vector<at::Tensor> stores, std::vector<at::Tensor> write_rows,
                     std::vector<at::Tensor> gather, std::vector<at::Tensor> key_counts) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == at::kFloat && x.is_cpu(),
                "DecodePlan.forward: x must be float32 [M, ", hidden_, "]");
    const int64_t M = x.size(0);
    const size_t num_groups = stores.size();
    TORCH_CHECK(write_rows.size() == num_groups && gather.size() == num_groups &&
                    key_counts.size() == num_groups,
                "DecodePlan.forward: one write_rows, gather and key_counts per store");
    for (size_t g = 0; g < num_groups; ++g) {
      const at::ScalarType t = stores[g].scalar_type();
      TORCH_CHECK((t == at::kFloat || t == at::kHalf || t == at::kBFloat16) &&
                      stores[g].is_contiguous() && stores[g].dim() == 3 &&
                      stores[g].size(1) == kv_heads_ && stores[g].size(2) == head_dim_,
                  "DecodePlan.forward: stores must be contiguous float32, float16 or bfloat16 "
                  "[rows, ", kv_heads_, ", ", head_dim_, "]");
      for (const at::Tensor* t : {&write_rows[g], &gather[g], &key_counts[g]})
        TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                    "DecodePlan.forward: row indices must be contiguous int64");
      TORCH_CHECK(write_rows[g].numel() == M && key_counts[g].numel() == M &&
                      gather[g].numel() % std::max<int64_t>(M, 1) == 0,
                  "DecodePlan.forward: index sizes do not match M=", M);
    }
    for (const Layer& l : layers_)
      TORCH_CHECK(l.group >= 0 && (size_t)l.group < num_groups && (size_t)l.rope < inv_freqs_.size(),
                  "DecodePlan.forward: layout not set, or a group or rope out of range");
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                    positions.numel() == M,
                "DecodePlan.forward: positions must be contiguous int64 [M]");
    int64_t max_keys = 1;
    for (size_t g = 0; g < num_groups; ++g) {
      const int64_t S = M ? gather[g].numel() / M : 1;
      max_keys = std::max(max_keys, S);
      // Every row a layer of this group touches (base row + its K/V offset) is in the store.
      int64_t max_off = 0;
      for (const Layer& l : layers_)
        if (l.group == (int64_t)g) max_off = std::max({max_off, l.k_off, l.v_off});
      const int64_t limit = stores[g].size(0) - max_off;
      check_rows(write_rows[g], limit, "write_rows");
      check_rows(gather[g], limit, "gather");
      const int64_t* counts = key_counts[g].data_ptr<int64_t>();
      for (int64_t m = 0; m < M; ++m)
        TORCH_CHECK(counts[m] >= 1 && counts[m] <= S, "DecodePlan.forward: key count ",
                    counts[m], " of sequence ", m, " is outside [1, ", S, "]");
    }
    ensure_buffers(M, max_keys);
    rope_tables(positions.data_ptr<int64_t>(), M);

    at::Tensor out = x.contiguous().clone();  // the residual stream, [M, H]
    float* xs = out.data_ptr<float>();
    if (profiling_) ++profiled_calls_;
    tick_ = Clock::now();
    for (const Layer& l : layers_) {
      const float* cos = rope_.data_ptr<float>() + (2 * l.rope) * M * head_dim_;
      attention_block(l, xs, M, cos, cos + M * head_dim_, stores[l.group], write_rows[l.group].data_ptr<int64_t>(),
                      gather[l.group].data_ptr<int64_t>(), gather[l.group].numel() / M,
                      key_counts[l.group].data_ptr<int64_t>());
      mlp_block(l, xs, M);
    }
    const float* fw = final_norm_.data_ptr<float>();
    for_rows(M, [&](int64_t m) { decode::rms_norm(xs + m * hidden_, fw, xs + m * hidden_, hidden_, eps_); });
    lap(kNorms);
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;

  // Base rows must lie in [0, limit): a bad index is an error, never a write out of bounds.
  static void check_rows(const at::Tensor& rows, int64_t limit, const char* what) {
    const int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows.numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < limit, "DecodePlan.forward: ", what, " row ", r[i],
                  " is outside the store's [0, ", limit, ")");
  }

  // Adds the time since the last lap to `phase` (when profiling).
  void lap(Phase phase) {
    if (!profiling_) return;
    const Clock::time_point now = Clock::now();
    seconds_[phase] += std::chrono::duration<double>(now - tick_).count();
    tick_ = now;
  }

  // rope_[2 r] / rope_[2 r + 1]: cos and sign-folded sin [M, hd] of rope r, as RotaryEmbedding:
  // angle i = position * inv_freq[i], cos | cos and -sin | sin over the two halves.
  void rope_tables(const int64_t* positions, int64_t M) {
    const int64_t half = head_dim_ / 2;
    float* t = rope_.data_ptr<float>();
    for (size_t r = 0; r < inv_freqs_.size(); ++r) {
      const float* inv = inv_freqs_[r].data_ptr<float>();
      float* cos = t + (2 * r) * M * head_dim_;
      float* sin = cos + M * head_dim_;
      for (int64_t m = 0; m < M; ++m) {
        const float pos = (float)positions[m];
        for (int64_t i = 0; i < half; ++i) {
          const float angle = pos * inv[i], c = std::cos(angle), s = std::sin(angle);
          cos[m * head_dim_ + i] = cos[m * head_dim_ + half + i] = c;
          sin[m * head_dim_ + i] = -s;
          sin[m * head_dim_ + half + i] = s;
        }
      }
    }
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

  void ensure_buffers(int64_t M, int64_t max_keys) {
    if (M > rows_) {
      const auto f = at::TensorOptions().dtype(at::kFloat);
      const int64_t attn = heads_ * head_dim_, qkv = (heads_ + 2 * kv_heads_) * head_dim_;
      const int64_t kmax = padded_k(std::max({hidden_, attn, inter_}));
      h_ = at::empty({M, std::max(hidden_, attn)}, f);
      qkv_ = at::empty({M, qkv}, f);
      attn_ = at::empty({M, attn}, f);
      proj_ = at::empty({M, std::max(hidden_, 2 * inter_)}, f);
      act_buf_ = at::empty({M, inter_}, f);
      qa_ = at::empty({M, kmax}, f.dtype(at::kChar));
      da_ = at::empty({M, kmax / kActBlock}, f);
      asum_ = at::empty({M, kmax / 16}, f.dtype(at::kInt));
      rope_ = at::empty({(int64_t)inv_freqs_.size() * 2, M, head_dim_}, f);
      rows_ = M;
    }
    const int64_t threads = at::get_num_threads();
    if (max_keys > keys_ || threads > score_threads_) {
      keys_ = std::max(max_keys, keys_);
      score_threads_ = std::max(threads, score_threads_);
      scores_ = at::empty({score_threads_, keys_}, at::TensorOptions().dtype(at::kFloat));
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
                       const at::Tensor& store, const int64_t* write_rows, const int64_t* gather,
                       int64_t S, const int64_t* key_counts) {
    const int64_t hd = head_dim_, nh = heads_, nkv = kv_heads_, H = hidden_;
    const int64_t qkv_w = (nh + 2 * nkv) * hd, row = nkv * hd;  // floats per cache row
    float* h = h_.data_ptr<float>();
    float* qkv = qkv_.data_ptr<float>();
    const decode::KVType type = store.scalar_type() == at::kFloat  ? decode::kKVFloat32
                                : store.scalar_type() == at::kHalf ? decode::kKVFloat16
                                                                   : decode::kKVBFloat16;
    char* data = static_cast<char*>(store.data_ptr());
    const int64_t row_bytes = row * (int64_t)store.element_size();
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
      decode::rope(q, cos + m * hd, sin + m * hd, nh, hd);
      decode::rope(k, cos + m * hd, sin + m * hd, nkv, hd);
      decode::store_row(k, data + (write_rows[m] + l.k_off) * row_bytes, row, type);
      decode::store_row(v, data + (write_rows[m] + l.v_off) * row_bytes, row, type);
    });
    lap(kCacheWrite);
    float* attn = attn_.data_ptr<float>();
    float* scores = scores_.data_ptr<float>();
    const int64_t group = nh / nkv;
    const int64_t head_bytes = hd * (int64_t)store.element_size();
    const char* kbase = data + l.k_off * row_bytes;
    const char* vbase = data + l.v_off * row_bytes;
    const int64_t max_keys = keys_;
    at::parallel_for(0, M * nh, 1, [&](int64_t i0, int64_t i1) {
      float* sc = scores + at::get_thread_num() * max_keys;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / nh, head = i % nh, kvh = head / group;
        decode::attend(qkv + m * qkv_w + head * hd, kbase + kvh * head_bytes,
                       vbase + kvh * head_bytes, gather + m * S, key_counts[m], row, hd, scale_, sc,
                       attn + m * nh * hd + head * hd, type);
      }
    });
    lap(kAttention);
    float* a = proj_.data_ptr<float>();
    matmul(l.o, attn, nh * hd, M, a, H);
    lap(kOut);
    add_residual(xs, a, l.post_attn_norm, M);
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
  float eps_, scale_;
  int act_;
  at::Tensor final_norm_;
  int64_t isa_;
  std::vector<Layer> layers_;
  std::vector<at::Tensor> inv_freqs_;
  int64_t rows_ = 0, keys_ = 0, score_threads_ = 0;
  at::Tensor h_, qkv_, attn_, proj_, act_buf_, qa_, da_, asum_, scores_, rope_;
  bool profiling_ = false;
  int64_t profiled_calls_ = 0;
  double seconds_[kNumPhases] = {};
  Clock::time_point tick_;
};

TORCH_LIBRARY_FRAGMENT(kvlm, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, int64_t,
                       at::Tensor, int64_t>())
      .def("add_layer", &DecodePlan::add_layer)
      .def("add_rope", &DecodePlan::add_rope)
      .def("set_layout", &DecodePlan::set_layout)
      .def("profile", &DecodePlan::profile)
      .def("timings", &DecodePlan::timings)
      .def("forward", &DecodePlan::forward);
}

}  // namespace kvlm
