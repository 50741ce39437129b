// Paged K/V storage: sequence b's keys live in pages of page_size rows, the page of key j
// being entry j / page_size of row b of the block table. Every backend takes its paging math
// from here (the CPU through KvView, each CUDA loader directly); the loaders keep only the
// copies.
//
// Key positions and page sizes are below 2^31, and the per-key arithmetic is 32-bit: in a
// CUDA kernel's main loop a 64-bit division costs a subroutine call and registers.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace jax_fmha {

struct PageTable {
  const int32_t* block_table = nullptr;  // [B, pages_per_seq]: page ids
  int64_t pages_per_seq = 0;
  int64_t page_size = 0;  // keys (rows) of a page
  int64_t num_pages = 0;  // pages of the K/V arrays

  // Keys one sequence can hold.
  FMHA_HOST_DEVICE int64_t capacity() const { return pages_per_seq * page_size; }
  // Sequence b's page ids.
  FMHA_HOST_DEVICE const int32_t* ids(int64_t b) const { return block_table + b * pages_per_seq; }
  // Index in the block table of the page id of key `key` of sequence b.
  FMHA_HOST_DEVICE int64_t entry(int64_t b, int key) const {
    return b * pages_per_seq + key / int(page_size);
  }
  FMHA_HOST_DEVICE int32_t page_id(int64_t b, int key) const { return block_table[entry(b, key)]; }
  FMHA_HOST_DEVICE bool id_valid(int32_t id) const { return id >= 0 && id < num_pages; }
  // Row of key `key` = page_start(its page id) + key_in_page(key): the first row of the page
  // with id `id` (read from the table or from a copy of it), and the key's place in its page.
  FMHA_HOST_DEVICE static int64_t page_start(int32_t id, int page_size) {
    return int64_t(id) * page_size;
  }
  FMHA_HOST_DEVICE static int key_in_page(int key, int page_size) { return key % page_size; }
  // The row of key `key` (below capacity(), page id valid) of sequence b.
  FMHA_HOST_DEVICE int64_t row(int64_t b, int key) const {
    const int size = int(page_size);
    return page_start(ids(b)[key / size], size) + key_in_page(key, size);
  }
  // Whether every run of n consecutive keys starting at a multiple of n lies in one page.
  FMHA_HOST_DEVICE bool runs_contiguous(int64_t n) const { return page_size % n == 0; }

  // Whether the page ids of sequence b's first n keys (n <= capacity()) are all valid; one
  // caller reads them all, once per sequence (so 64-bit arithmetic).
  FMHA_HOST_DEVICE bool ids_valid(int64_t b, int64_t n) const {
    for (int64_t key = 0; key < n; key += page_size)
      if (!id_valid(block_table[b * pages_per_seq + key / page_size])) return false;
    return true;
  }
  // The pages holding keys [lo, hi) of a sequence: entries [first, last) of its ids. (A
  // CTA's threads check their validity together: kv_keys_valid.)
  struct Range {
    int first, last;
  };
  FMHA_HOST_DEVICE Range pages_of(int64_t lo, int64_t hi) const {
    const int first = int(lo / page_size);
    return {first, hi <= lo ? first : int((hi + page_size - 1) / page_size)};
  }
};

}  // namespace jax_fmha
