// Parallel loops over XLA's intra-op thread pool (the FFI ThreadPool context).
//
// The calling thread takes part, so the loop completes even if the pool runs none of the
// helper tasks (or has no threads). Work items are claimed through an atomic counter; the
// caller returns once every item has finished. Helper tasks that start late find no work
// and only touch the shared state, which they keep alive themselves.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jax_fmha::cpu {

template <typename Body>  // Body: void(int64_t item)
void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, const Body& body) {
  if (items <= 0) return;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t items;
    std::function<void(int64_t)> body;
    std::mutex mutex;
    std::condition_variable finished;
    void work() {
      int64_t finished_here = 0;
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        body(i);
        ++finished_here;
      }
      if (finished_here && done.fetch_add(finished_here) + finished_here == items) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  };
  auto state = std::make_shared<State>();
  state->items = items;
  state->body = [&body](int64_t i) { body(i); };  // only called while items remain
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->work(); });
  state->work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == items; });
}

}  // namespace jax_fmha::cpu
