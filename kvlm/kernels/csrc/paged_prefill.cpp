// Tiles and threads of the paged prefill (paged_prefill.h); the operator is paged_attention's
// (paged_attention.cpp, prefill = true): the same inputs and checks.
#include <ATen/Parallel.h>

#include <numeric>

#include "paged_prefill.h"

namespace kvlm {
namespace prefill {

std::vector<int64_t> make_tiles(const int64_t* query_start, int64_t B, int64_t group) {
  std::vector<int64_t> tiles;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = query_start[b]; t < query_start[b + 1]; t += kQueryTokens)
      tiles.insert(tiles.end(), {b, t, std::min(t + kQueryTokens, query_start[b + 1]), 0, group});
  return tiles;
}

void run(const Args& a, int64_t num_tiles, int64_t isa) {
  const auto kernel = isa == kIsaAvx512 ? paged_prefill_avx512
                      : isa == kIsaAvx2 ? paged_prefill_avx2
                                        : paged_prefill_ref;
  // Work per tile ~ rows x keys read; items taken from a shared counter, the most work first,
  // so that the long tiles at the end of a causal prompt do not all fall to one thread.
  std::vector<int64_t> work(num_tiles);
  for (int64_t i = 0; i < num_tiles; ++i) {
    const int64_t* tile = a.tiles + 5 * i;
    const int64_t first = a.num_cached[tile[0]] + tile[1] - a.query_start[tile[0]];
    const int64_t last = first + tile[2] - tile[1] - 1;
    const int64_t lo = a.window ? std::max<int64_t>(first - a.window + 1, 0) : 0;
    work[i] = (tile[2] - tile[1]) * (last + 1 - lo + (a.window ? std::min(a.num_sinks, lo) : 0));
  }
  const int64_t num_items = num_tiles * a.nkv;
  std::vector<int64_t> order(num_items);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return work[x / a.nkv] > work[y / a.nkv];
  });
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    kernel(a, next, order.data(), num_items);
  });
}

}  // namespace prefill
}  // namespace kvlm
