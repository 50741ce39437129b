// The split-KV heuristic: how many splits of the keys a problem gets when the caller leaves
// num_splits unset. It sees static shapes only (never device data, so CUDA graphs stay
// valid) and each backend's SplitPolicy: the CPU's in cpu/attention_kernel.h, CUDA's in
// cuda/split_policy.h. The measurements behind the numbers: docs/design/split_kv.md.
#pragma once

#include <algorithm>
#include <cstdint>

namespace jax_fmha {

// The most splits a call may ask for (the merge kernels' bound).
inline constexpr int64_t kMaxSplits = 256;

// How a backend's kernels fill a device.
struct SplitPolicy {
  int64_t rows_per_unit;  // packed query rows (of the heads sharing a KV head) of one unit
  int64_t slots;          // work units the device runs at once (one wave)
  int64_t waves;          // waves to aim for when splitting
  int64_t min_keys;       // fewest keys a split may get
};

// Work units are (sequence, KV head, tile of the packed query rows of the heads sharing the
// KV head). When they fill less than one and a half waves of the device, the keys are split
// so that about `policy.waves` waves run, keeping at least `policy.min_keys` keys per split.
// Of the split counts just below and just above that aim, the one whose last wave is fuller
// wins (a wave that is one fifth full costs as long as a full one): 64 units on 264 slots get
// 4 splits (256 CTAs), not 5 (320 CTAs, two waves). A tie keeps the fewer, longer splits.
inline int64_t choose_num_splits(int64_t batch, int64_t num_kv_heads, int64_t group,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 const SplitPolicy& policy) {
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t rows = max_seqlen_q * group;
  const int64_t units =
      batch * num_kv_heads * std::max<int64_t>(1, ceil_div(rows, policy.rows_per_unit));
  if (units == 0 || 2 * units >= 3 * policy.slots) return 1;  // no work, or the device is full
  const int64_t most = std::max<int64_t>(1, std::min(max_seqlen_k / policy.min_keys, kMaxSplits));
  const int64_t target = policy.waves * policy.slots;
  // The share of the launched waves' slots that have work.
  const auto filled = [&](int64_t splits) {
    const int64_t ctas = units * splits;
    return double(ctas) / double(ceil_div(ctas, policy.slots) * policy.slots);
  };
  const int64_t below = std::min(most, std::max<int64_t>(1, target / units));
  const int64_t above = std::min(most, ceil_div(target, units));
  return filled(above) > filled(below) ? above : below;
}

}  // namespace jax_fmha
