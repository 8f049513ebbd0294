// A grammar's packed token bitmask applied to some rows of a step's logits, in place.
//
//   kvlm::apply_token_bitmask_(logits [M, V] fp32, bitmask [R, W] int32, rows int[R]) -> ()
//     logits[rows[i], t] = -inf for each token t < V whose bit is 0 (bit t % 32 of word
//     bitmask[i, t / 32]: llguidance's and xgrammar's layout); other rows are never read.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace kvlm {
namespace {

void apply_token_bitmask_(at::Tensor logits, const at::Tensor& bitmask, at::IntArrayRef rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_cpu() &&
                  logits.stride(1) == 1,
              "kvlm::apply_token_bitmask_: logits must be a 2-D float32 CPU tensor with "
              "contiguous rows, got ",
              logits.sizes(), " ", logits.scalar_type());
  const int64_t num_rows = logits.size(0), vocab = logits.size(1);
  const int64_t words = (vocab + 31) / 32;
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_cpu() &&
                  bitmask.is_contiguous() && bitmask.size(0) == (int64_t)rows.size() &&
                  bitmask.size(1) == words,
              "kvlm::apply_token_bitmask_: bitmask must be a contiguous int32 CPU tensor [",
              rows.size(), ", ", words, "] (one row per masked logits row, ", vocab,
              " tokens), got ", bitmask.sizes(), " ", bitmask.scalar_type());
  for (int64_t row : rows)
    TORCH_CHECK(row >= 0 && row < num_rows, "kvlm::apply_token_bitmask_: row ", row,
                " is outside the logits' ", num_rows, " rows");
  float* lp = logits.data_ptr<float>();
  const int64_t ls = logits.stride(0);
  const uint32_t* bp = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, (int64_t)rows.size(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float* out = lp + rows[i] * ls;
      const uint32_t* bits = bp + i * words;
      for (int64_t w = 0; w < words; ++w) {
        const uint32_t m = bits[w];
        if (m == 0xFFFFFFFFu) continue;  // every token of the word allowed
        const int64_t base = w * 32, n = std::min<int64_t>(32, vocab - base);
        if (m == 0) {
          std::fill(out + base, out + base + n, ninf);
          continue;
        }
        for (int64_t j = 0; j < n; ++j)
          if (!((m >> j) & 1u)) out[base + j] = ninf;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlm, m) {
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, int[] rows) -> ()");
}

TORCH_LIBRARY_IMPL(kvlm, CPU, m) { m.impl("apply_token_bitmask_", &apply_token_bitmask_); }

}  // namespace kvlm
