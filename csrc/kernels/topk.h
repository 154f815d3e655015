// k-smallest selection with a bounded max-heap, torch-free and usable from
// host and device code.
//
// Entries are (key, index) pairs ordered lexicographically, so that among
// equal keys the smaller index wins and the result does not depend on the
// order in which candidates arrive. The heap keeps the k best seen so far with
// the worst of them at the root: a candidate is admitted only when it beats
// the root, which after the first few thousand candidates almost never
// happens, so the cost of a scan is dominated by the comparison with the root
// (the caller vectorises that test over blocks of keys).
#pragma once

#include <cstdint>

#ifndef MMH_HD
#if defined(__CUDACC__)
#define MMH_HD __host__ __device__ __forceinline__
#else
#define MMH_HD inline
#endif
#endif

namespace mmh {
namespace topk {

// (ka, ia) < (kb, ib) lexicographically.
template <typename K>
MMH_HD bool pair_less(K ka, int64_t ia, K kb, int64_t ib) {
  return ka < kb || (ka == kb && ia < ib);
}

// Restore the max-heap property below position `pos` (children 2p+1, 2p+2).
template <typename K>
MMH_HD void sift_down(K* key, int64_t* idx, int n, int pos) {
  const K k0 = key[pos];
  const int64_t i0 = idx[pos];
  for (;;) {
    int child = 2 * pos + 1;
    if (child >= n) break;
    if (child + 1 < n && pair_less(key[child], idx[child], key[child + 1], idx[child + 1]))
      ++child;  // the larger child
    if (!pair_less(k0, i0, key[child], idx[child])) break;
    key[pos] = key[child];
    idx[pos] = idx[child];
    pos = child;
  }
  key[pos] = k0;
  idx[pos] = i0;
}

// Fill a heap of n entries with +inf-like sentinels (key `worst`, index -1
// is treated as larger than any real index by storing INT64_MAX).
template <typename K>
MMH_HD void init(K* key, int64_t* idx, int n, K worst) {
  for (int i = 0; i < n; ++i) {
    key[i] = worst;
    idx[i] = INT64_MAX;
  }
}

// Offer (k, i): replaces the root when it is smaller. Returns true if admitted.
template <typename K>
MMH_HD bool push(K* key, int64_t* idx, int n, K k, int64_t i) {
  if (!pair_less(k, i, key[0], idx[0])) return false;
  key[0] = k;
  idx[0] = i;
  sift_down(key, idx, n, 0);
  return true;
}

// Heap -> ascending order in place (heapsort's second phase).
template <typename K>
MMH_HD void sort_ascending(K* key, int64_t* idx, int n) {
  for (int end = n - 1; end > 0; --end) {
    const K tk = key[0];
    const int64_t ti = idx[0];
    key[0] = key[end];
    idx[0] = idx[end];
    key[end] = tk;
    idx[end] = ti;
    sift_down(key, idx, end, 0);
  }
}

// Insertion sort of n pairs ascending (small n: the final re-ranking of the
// candidates after their distances have been recomputed exactly).
template <typename K>
MMH_HD void insertion_sort(K* key, int64_t* idx, int n) {
  for (int a = 1; a < n; ++a) {
    const K k = key[a];
    const int64_t i = idx[a];
    int b = a - 1;
    while (b >= 0 && pair_less(k, i, key[b], idx[b])) {
      key[b + 1] = key[b];
      idx[b + 1] = idx[b];
      --b;
    }
    key[b + 1] = k;
    idx[b + 1] = i;
  }
}

#if defined(__CUDACC__)
// Ascending bitonic sort of n (a power of two) (key, index) pairs in shared
// memory by all threads of a block. Every thread must call it; it ends with
// a barrier.
template <typename K>
__device__ void block_bitonic_sort(K* key, int64_t* idx, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
        const int lo = 2 * stride * (t / stride) + (t % stride);
        const int hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const bool hi_smaller = pair_less(key[hi], idx[hi], key[lo], idx[lo]);
        if (hi_smaller == ascending) {
          const K tk = key[lo];
          key[lo] = key[hi];
          key[hi] = tk;
          const int64_t ti = idx[lo];
          idx[lo] = idx[hi];
          idx[hi] = ti;
        }
      }
      __syncthreads();
    }
  }
}
#endif

}  // namespace topk
}  // namespace mmh
