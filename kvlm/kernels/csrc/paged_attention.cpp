// Torch operators of the paged attention (paged_attention.h) and the KV quantizer it reads:
//
//   kvlm::paged_attention(q, data, scales, k_off, v_off, block_size, rows_per_block,
//       block_table, query_start, num_cached, window, num_sinks, scale, softcap, format,
//       sink_q, isa, prefill=False) -> out [T, nh, hd] float32 (sink_q: q roped by place in
//       the cache [T, nh, hd], with sinks; see paged_attention.h)
//   kvlm::quantize_kv(x [N, hd] float32, format) -> (data [N, row_elements], scales [N, G] f16)
//
// Inputs are checked here so that a bad index is an error, never a read outside the store;
// kvlm/kernels/paged.py states the shapes and gives the friendlier messages.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "paged_attention.h"
#include "paged_prefill.h"

namespace kvlm {
namespace paged {
namespace {

inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// float -> float16 bits, rounded to nearest even (torch's .to(torch.float16)).
uint16_t float_to_half(float f) {
  const uint32_t w = float_bits(f), sign = w & 0x80000000u, shl1 = w + w;
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t exp_bits = shl1 & 0xFF000000u;
  if (exp_bits < 0x71000000u) exp_bits = 0x71000000u;
  base = bits_float((exp_bits >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
}

// float -> float8_e4m3fn bits, rounded to nearest even, saturating (torch's conversion).
uint8_t float_to_fp8(float f) {
  uint32_t b = float_bits(f);
  const uint32_t sign = b & 0x80000000u;
  b ^= sign;
  uint8_t result;
  if (b >= (1087u << 20)) {  // 480 and up: the largest finite value, NaN stays NaN
    result = b > 0x7F800000u ? 0x7F : 0x7E;
  } else if (b < (121u << 23)) {  // below 2^-6: subnormal, rounded by a magic add
    const uint32_t denorm = 141u << 23;
    result = (uint8_t)(float_bits(bits_float(b) + bits_float(denorm)) - denorm);
  } else {
    b += ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((b >> 20) & 1u);
    result = (uint8_t)(b >> 20);
    if (result == 0x7F) result = 0x7E;
  }
  return result | (uint8_t)(sign >> 24);
}

}  // namespace

void quantize_head(int format, const float* x, int64_t hd, int64_t num_scales, int64_t rotation,
                   void* data, uint16_t* scales) {
  const int64_t group = hd / num_scales;
  std::vector<float> rotated(x, x + hd);
  if (rotation) hadamard(rotated.data(), hd, rotation);
  const float qmax = format == kInt8 ? 127.0f : format == kInt4 ? 7.0f : 448.0f;
  uint8_t* out = static_cast<uint8_t*>(data);
  if (format == kInt4) std::memset(out, 0, hd / 2);
  for (int64_t g = 0; g < num_scales; ++g) {
    const float* v = rotated.data() + g * group;
    float absmax = 0.0f;
    for (int64_t i = 0; i < group; ++i) absmax = std::max(absmax, std::fabs(v[i]));
    uint16_t h = float_to_half(absmax / qmax);
    if (!(half_to_float(h) >= 0x1p-14f)) h = 0x0400;  // MIN_SCALE, float16's smallest normal
    scales[g] = h;
    const float s = half_to_float(h);
    for (int64_t i = 0; i < group; ++i) {
      const int64_t d = g * group + i;
      const float scaled = v[i] / s;
      if (format == kFp8) {
        out[d] = float_to_fp8(scaled);
      } else if (format == kInt8) {
        out[d] = (uint8_t)(int8_t)std::min(127.0f, std::max(-127.0f, std::nearbyint(scaled)));
      } else {
        const int nib = (int)std::min(7.0f, std::max(-8.0f, std::nearbyint(scaled))) + 8;
        out[d / 2] |= (uint8_t)(d & 1 ? nib << 4 : nib);
      }
    }
  }
}

int64_t num_scales_of(int format, int64_t hd) {
  if (format < kInt8) return 0;
  return hd % kScaleGroup == 0 ? hd / kScaleGroup : 1;
}

int64_t rotation_of(int format, int64_t hd) {
  if (format != kInt4) return 0;
  if ((hd & (hd - 1)) == 0) return hd;
  return hd % 32 == 0 ? 32 : 0;
}

std::vector<int64_t> make_tiles(const int64_t* query_start, int64_t B, int64_t group) {
  const int64_t per_tile = std::max<int64_t>(1, kMaxRows / group);
  const int64_t heads = std::min(group, kMaxRows);
  std::vector<int64_t> tiles;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = query_start[b]; t < query_start[b + 1]; t += per_tile)
      for (int64_t g = 0; g < group; g += heads)
        tiles.insert(tiles.end(), {b, t, std::min(t + per_tile, query_start[b + 1]), g,
                                   std::min(g + heads, group)});
  return tiles;
}

PagedKernel paged_kernel(int64_t isa) {
  return isa == kIsaAvx512 ? paged_attention_avx512
         : isa == kIsaAvx2 ? paged_attention_avx2
                           : paged_attention_ref;
}

namespace {

constexpr int64_t kItemsPerThread = 4;  // fewer tiles x nkv items per thread: split the keys
constexpr int64_t kMinPartKeys = 64;    // keys of a part at least
constexpr double kPartCost = 16.0;      // one more part (its writes and merge), in keys read

// Parts [num_parts, 3] of the tiles' keys (Args::parts), in tile order: one per tile unless
// the items are fewer than threads x kItemsPerThread; then tile t gets min(S, keys / kMinPartKeys)
// equal parts, S the count that minimizes the busiest thread's keys plus kPartCost per item
// (at::parallel_for hands each thread one contiguous chunk of items).
std::vector<int64_t> make_parts(const Args& a, int64_t num_tiles, int64_t threads) {
  std::vector<int64_t> keys(num_tiles);
  for (int64_t t = 0; t < num_tiles; ++t) keys[t] = key_ranges(a, a.tiles + kTileFields * t).count();
  auto parts_of = [&](int64_t t, int64_t S) {
    return std::clamp<int64_t>(keys[t] / kMinPartKeys, 1, S);
  };
  auto busiest = [&](int64_t S) {
    int64_t items = 0;
    for (int64_t t = 0; t < num_tiles; ++t) items += parts_of(t, S) * a.nkv;
    const int64_t chunk = (items + threads - 1) / threads;
    double worst = 0.0, load = 0.0;
    int64_t i = 0;
    for (int64_t t = 0; t < num_tiles; ++t)
      for (int64_t n = parts_of(t, S), j = 0; j < n * a.nkv; ++j) {
        load += (double)keys[t] / (double)n + kPartCost;
        if (++i % chunk == 0) {
          worst = std::max(worst, load);
          load = 0.0;
        }
      }
    return std::max(worst, load);
  };
  int64_t split = 1;
  if (num_tiles * a.nkv < threads * kItemsPerThread) {
    double best = busiest(1);
    for (int64_t S = 2; S <= threads * kItemsPerThread; ++S)
      if (const double c = busiest(S); c < best) {
        best = c;
        split = S;
      }
  }
  std::vector<int64_t> parts;
  for (int64_t t = 0; t < num_tiles; ++t)
    for (int64_t n = parts_of(t, split), j = 0; j < n; ++j)
      parts.insert(parts.end(), {t, keys[t] * j / n, keys[t] * (j + 1) / n});
  return parts;
}

// The items of each tile's parts (consecutive in `parts`), merged per row and written out:
// out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p, M the largest m_p.
void merge_parts(const Args& a, const std::vector<int64_t>& parts) {
  const int64_t hd = a.hd, num_parts = (int64_t)parts.size() / 3;
  std::vector<float> o(hd);
  for (int64_t p0 = 0, p1; p0 < num_parts; p0 = p1) {
    for (p1 = p0 + 1; p1 < num_parts && parts[3 * p1] == parts[3 * p0];) ++p1;
    const int64_t* tile = a.tiles + kTileFields * parts[3 * p0];
    const int64_t R = (tile[2] - tile[1]) * (tile[4] - tile[3]);
    for (int64_t kvh = 0; kvh < a.nkv; ++kvh)
      for (int64_t r = 0; r < R; ++r) {
        auto partial = [&](int64_t p) { return a.partial + (p * a.nkv + kvh) * partial_floats(hd); };
        float M = -INFINITY, L = 0.0f;
        for (int64_t p = p0; p < p1; ++p) M = std::max(M, partial(p)[kMaxRows * hd + r]);
        std::fill(o.begin(), o.end(), 0.0f);
        for (int64_t p = p0; p < p1; ++p) {
          const float* x = partial(p);
          const float m = x[kMaxRows * hd + r];
          if (m == -INFINITY) continue;  // no key of this part for this row
          const float w = std::exp(m - M);
          L += w * x[kMaxRows * (hd + 1) + r];
          for (int64_t d = 0; d < hd; ++d) o[d] += w * x[r * hd + d];
        }
        for (int64_t d = 0; d < hd; ++d) o[d] /= L;
        write_row(a, tile, kvh, r, o.data());
      }
  }
}

}  // namespace

void run(const Args& a, int64_t num_tiles, int64_t isa) {
  const PagedKernel kernel = paged_kernel(isa);
  const std::vector<int64_t> parts = make_parts(a, num_tiles, at::get_num_threads());
  const int64_t num_parts = (int64_t)parts.size() / 3;
  thread_local std::vector<float> partial;  // grown once, reused by later calls
  Args w = a;
  w.parts = parts.data();
  w.partial = nullptr;
  if (num_parts > num_tiles) {
    partial.resize(std::max<size_t>(partial.size(), num_parts * a.nkv * partial_floats(a.hd)));
    w.partial = partial.data();
  }
  at::parallel_for(0, num_parts * a.nkv, 1, [&](int64_t i0, int64_t i1) { kernel(w, i0, i1); });
  if (w.partial) merge_parts(w, parts);
}

namespace {

at::ScalarType storage_type(int64_t format) {
  switch (format) {
    case kF32: return at::kFloat;
    case kF16: return at::kHalf;
    case kBF16: return at::kBFloat16;
    case kInt8: return at::kChar;
    default: return at::kByte;
  }
}

const int64_t* int64_data(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.is_cpu(),
              "kvlm::paged_attention: ", what, " must be contiguous int64 on the CPU");
  return t.data_ptr<int64_t>();
}

at::Tensor paged_attention_op(const at::Tensor& q, const at::Tensor& data,
                              const std::optional<at::Tensor>& scales, int64_t k_off,
                              int64_t v_off, int64_t block_size, int64_t rows_per_block,
                              const at::Tensor& block_table, const at::Tensor& query_start,
                              const at::Tensor& num_cached, int64_t window, int64_t num_sinks,
                              double scale, double softcap, int64_t format,
                              const std::optional<at::Tensor>& sink_q, int64_t isa,
                              bool prefill) {
  const char* op = "kvlm::paged_attention";
  TORCH_CHECK(format >= kF32 && format <= kFp8, op, ": unknown format code ", format);
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous() && q.is_cpu(),
              op, ": q must be contiguous float32 [T, num_heads, head_dim]");
  const int64_t T = q.size(0), nh = q.size(1), hd = q.size(2);
  TORCH_CHECK(data.dim() == 3 && data.is_contiguous() && data.is_cpu() &&
                  data.scalar_type() == storage_type(format),
              op, ": data must be the store's contiguous [rows, num_kv_heads, row_elements] ",
              storage_type(format), " tensor");
  const int64_t nkv = data.size(1), re = format == kInt4 ? hd / 2 : hd;
  TORCH_CHECK(nkv > 0 && nh % nkv == 0 && data.size(2) == re && hd % 2 == 0, op, ": ", nh,
              " query heads of ", hd, " do not fit a store of ", nkv, " heads of ", data.size(2));
  const int64_t num_scales = num_scales_of((int)format, hd);
  TORCH_CHECK(num_scales == 0 || (scales && scales->scalar_type() == at::kHalf &&
                                  scales->is_contiguous() && scales->dim() == 3 &&
                                  scales->size(0) == data.size(0) && scales->size(1) == nkv &&
                                  scales->size(2) == num_scales),
              op, ": a quantized store needs its float16 scales [rows, ", nkv, ", ", num_scales,
              "]");
  TORCH_CHECK(block_size > 0 && rows_per_block > 0 && data.size(0) % rows_per_block == 0 &&
                  k_off >= 0 && v_off >= 0 && k_off + block_size <= rows_per_block &&
                  v_off + block_size <= rows_per_block,
              op, ": offsets ", k_off, "/", v_off, " and block size ", block_size,
              " do not fit blocks of ", rows_per_block, " rows");
  TORCH_CHECK(window >= 0 && num_sinks >= 0 && (num_sinks == 0 || window > 0), op,
              ": window ", window, " and ", num_sinks, " sinks (sinks need a window)");
  TORCH_CHECK(block_table.dim() == 2, op, ": block_table must be [B, max_blocks]");
  const int64_t B = block_table.size(0), max_blocks = block_table.size(1);
  const int64_t num_blocks = data.size(0) / rows_per_block;
  const int64_t* table = int64_data(block_table, "block_table");
  for (int64_t i = 0; i < B * max_blocks; ++i)
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, op, ": block id ", table[i],
                " is outside the store's [0, ", num_blocks, ")");
  const int64_t* qs = int64_data(query_start, "query_start");
  const int64_t* cached = int64_data(num_cached, "num_cached");
  TORCH_CHECK(query_start.numel() == B + 1 && num_cached.numel() == B && qs[0] == 0 &&
                  qs[B] == T,
              op, ": query_start must be [B + 1] from 0 to T=", T, " and num_cached [B]");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = cached[b] + qs[b + 1] - qs[b];
    TORCH_CHECK(qs[b + 1] >= qs[b] && cached[b] >= 0 && end <= max_blocks * block_size, op,
                ": sequence ", b, " ends at ", end, " tokens, past its ", max_blocks,
                " blocks of ", block_size, " (or its lengths are negative)");
  }
  TORCH_CHECK(num_sinks == 0 || (sink_q && sink_q->sizes() == q.sizes() &&
                                 sink_q->scalar_type() == at::kFloat &&
                                 sink_q->is_contiguous() && sink_q->is_cpu()),
              op, ": with sinks, sink_q must be contiguous float32 [", T, ", ", nh, ", ", hd,
              "] (q roped by place in the cache)");
  const int64_t best = cpu_isa();
  if (isa == 0) isa = best;
  TORCH_CHECK(isa >= kIsaRef && isa <= best, op, ": isa ", isa, " is not available (best ",
              best, ")");

  at::Tensor out = at::empty({T, nh, hd}, q.options());
  const std::vector<int64_t> tiles =  // prefill: GEMM-shaped tiles of paged_prefill.h
      prefill ? prefill::make_tiles(qs, B, nh / nkv) : make_tiles(qs, B, nh / nkv);
  const int64_t row_bytes = nkv * re * (int64_t)data.element_size();
  const uint8_t* base = static_cast<const uint8_t*>(data.data_ptr());
  const uint16_t* sc = num_scales ? reinterpret_cast<const uint16_t*>(scales->data_ptr()) : nullptr;
  Args a{};
  a.q = q.data_ptr<float>();
  a.q_stride = nh * hd;
  a.out = out.data_ptr<float>();
  a.out_stride = nh * hd;
  a.k = base + k_off * row_bytes;
  a.v = base + v_off * row_bytes;
  a.k_scales = sc ? sc + k_off * nkv * num_scales : nullptr;
  a.v_scales = sc ? sc + v_off * nkv * num_scales : nullptr;
  a.row_bytes = row_bytes;
  a.head_bytes = row_bytes / nkv;
  a.scale_row = nkv * num_scales;
  a.num_scales = num_scales;
  a.rows_per_block = rows_per_block;
  a.block_size = block_size;
  a.block_table = table;
  a.max_blocks = max_blocks;
  a.query_start = qs;
  a.num_cached = cached;
  a.tiles = tiles.data();
  a.nh = nh;
  a.nkv = nkv;
  a.hd = hd;
  a.window = window;
  a.num_sinks = num_sinks;
  a.scale = (float)scale;
  a.softcap = (float)softcap;
  a.format = (int)format;
  a.rotation = rotation_of((int)format, hd);
  if (num_sinks > 0) {
    a.sink_q = sink_q->data_ptr<float>();
    a.sink_q_stride = nh * hd;
  }
  (prefill ? prefill::run : run)(a, (int64_t)tiles.size() / kTileFields, isa);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_kv_op(const at::Tensor& x, int64_t format) {
  TORCH_CHECK(format >= kInt8 && format <= kFp8, "kvlm::quantize_kv: format ", format,
              " is not a quantized one");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu() && x.size(1) % 2 == 0,
              "kvlm::quantize_kv: x must be float32 [N, head_dim], head_dim even");
  const at::Tensor xc = x.contiguous();
  const int64_t N = xc.size(0), hd = xc.size(1), G = num_scales_of((int)format, hd);
  const int64_t re = format == kInt4 ? hd / 2 : hd;
  at::Tensor data = at::empty({N, re}, x.options().dtype(storage_type(format)));
  at::Tensor scales = at::empty({N, G}, x.options().dtype(at::kHalf));
  const float* xp = xc.data_ptr<float>();
  uint8_t* dp = static_cast<uint8_t*>(data.data_ptr());
  uint16_t* sp = reinterpret_cast<uint16_t*>(scales.data_ptr());
  for (int64_t i = 0; i < N; ++i)
    quantize_head((int)format, xp + i * hd, hd, G, rotation_of((int)format, hd), dp + i * re,
                  sp + i * G);
  return {data, scales};
}

}  // namespace
}  // namespace paged

TORCH_LIBRARY_FRAGMENT(kvlm, m) {
  m.def(
      "paged_attention(Tensor q, Tensor data, Tensor? scales, int k_off, int v_off, "
      "int block_size, int rows_per_block, Tensor block_table, Tensor query_start, "
      "Tensor num_cached, int window, int num_sinks, float scale, float softcap, int format, "
      "Tensor? sink_q, int isa, bool prefill=False) -> Tensor");
  m.def("quantize_kv(Tensor x, int format) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvlm, CPU, m) {
  m.impl("paged_attention", &paged::paged_attention_op);
  m.impl("quantize_kv", &paged::quantize_kv_op);
}

}  // namespace kvlm
