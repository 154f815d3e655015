// Exact brute-force kNN on the CPU.
//
// Work is split in blocks of query rows, one block per task of
// at::parallel_for. For each block the data are visited in tiles: a GEMM
// (at::mm, single-threaded inside the parallel region) gives -2 q.x for the
// tile, and each query row is scanned against its current threshold (the
// k'-th smallest key kept, k' = k + extra). Once a row has seen a few tiles
// almost no key beats the threshold, so the scan is a vectorised "any key
// below the threshold?" test over blocks of 32 keys; only blocks that hold a
// candidate are appended (branch-free) to the row's candidate buffer, which
// is cut back to the k' best by nth_element when it fills. Memory: one
// [block, tile] key buffer and the row buffers per thread.
//
// Keys are |x|^2 - 2 q.x on data and queries centred on the data mean (the
// |q|^2 term is constant per row and the centring removes most of the
// cancellation of the GEMM form). The k' winners are then re-ranked by their
// exact squared distances, accumulated in float64 from the original values.
#include "knn_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/knn_checks.h"
#include "../common/simd.h"
#include "../kernels/topk.h"

namespace mmh {
namespace {

constexpr int64_t kScanBlock = 32;

// Per-row candidate buffer. Keys below the row's threshold are appended
// without branches; when the buffer is nearly full it is cut back to the kk
// smallest (nth_element, linear time) and the threshold drops to the largest
// key kept. Appending costs a store per key and the cut is amortised over the
// 3 kk appends between cuts, which is cheaper than sifting a heap per
// admitted key (k ln(N/k) admissions per row).
template <typename T>
struct Entry {
  T key;
  int64_t idx;
};

template <typename T>
struct RowBuffer {
  Entry<T>* e;
  int64_t n;
  T thr;
};

// Exact cut to the kk smallest (key, index) pairs.
template <typename T>
inline void cut_exact(RowBuffer<T>& b, int64_t kk) {
  if (b.n <= kk) return;
  auto less = [](const Entry<T>& x, const Entry<T>& y) {
    return topk::pair_less(x.key, x.idx, y.key, y.idx);
  };
  std::nth_element(b.e, b.e + (kk - 1), b.e + b.n, less);
  b.n = kk;
  b.thr = b.e[kk - 1].key;
}

// Cheap cut while scanning: the kk-th smallest key t by nth_element on the
// keys alone, then keep every entry with key <= t (ties at t included, so
// the final exact cut still sees all of them); later keys must beat t
// strictly. Falls back to the exact cut when ties leave the buffer full.
template <typename T>
inline void cut(RowBuffer<T>& b, int64_t kk, int64_t room, T* scratch) {
  if (b.n <= kk) return;
  for (int64_t a = 0; a < b.n; ++a) scratch[a] = b.e[a].key;
  std::nth_element(scratch, scratch + (kk - 1), scratch + b.n);
  const T t = scratch[kk - 1];
  int64_t m = 0;
  for (int64_t a = 0; a < b.n; ++a) {
    b.e[m] = b.e[a];
    m += b.e[a].key <= t;
  }
  b.n = m;
  b.thr = t;
  if (b.n > room) cut_exact(b, kk);
}

template <typename T>
inline void scan_row(const T* __restrict g, const T* __restrict xn, int64_t nc, int64_t c0,
                     RowBuffer<T>& b, int64_t kk, int64_t cap, T* scratch) {
  int64_t j0 = 0;
  for (; j0 + kScanBlock <= nc; j0 += kScanBlock) {
    const T thr = b.thr;
    int hit = 0;
    for (int64_t j = 0; j < kScanBlock; ++j) hit |= (g[j0 + j] + xn[j0 + j] < thr);
    if (!hit) continue;
    if (b.n + kScanBlock > cap) cut(b, kk, cap - kScanBlock, scratch);
    const T t2 = b.thr;
    Entry<T>* e = b.e;
    int64_t n = b.n;
    for (int64_t j = 0; j < kScanBlock; ++j) {
      const T v = g[j0 + j] + xn[j0 + j];
      e[n] = {v, c0 + j0 + j};
      n += (v < t2);
    }
    b.n = n;
  }
  if (j0 < nc) {
    if (b.n + kScanBlock > cap) cut(b, kk, cap - kScanBlock, scratch);
    const T t2 = b.thr;
    Entry<T>* e = b.e;
    int64_t n = b.n;
    for (int64_t j = j0; j < nc; ++j) {
      const T v = g[j] + xn[j];
      e[n] = {v, c0 + j};
      n += (v < t2);
    }
    b.n = n;
  }
}

// Non-template entry points so that each can carry its own SIMD clones.
MMH_SIMD_CLONES void scan_rows(const float* g, int64_t nr, int64_t nc, const float* xn,
                               int64_t c0, RowBuffer<float>* rows, int64_t kk, int64_t cap,
                               float* scratch) {
  for (int64_t r = 0; r < nr; ++r) scan_row(g + r * nc, xn, nc, c0, rows[r], kk, cap, scratch);
}
MMH_SIMD_CLONES void scan_rows(const double* g, int64_t nr, int64_t nc, const double* xn,
                               int64_t c0, RowBuffer<double>* rows, int64_t kk, int64_t cap,
                               double* scratch) {
  for (int64_t r = 0; r < nr; ++r) scan_row(g + r * nc, xn, nc, c0, rows[r], kk, cap, scratch);
}

template <typename T>
inline double exact_sq_impl(const T* __restrict a, const T* __restrict b, int64_t D) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) {
    const double t = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s += t * t;
  }
  return s;
}
MMH_SIMD_CLONES double exact_sq(const float* a, const float* b, int64_t D) {
  return exact_sq_impl(a, b, D);
}
MMH_SIMD_CLONES double exact_sq(const double* a, const double* b, int64_t D) {
  return exact_sq_impl(a, b, D);
}

struct Cand {
  double d2;
  int64_t idx;
  bool operator<(const Cand& o) const { return d2 < o.d2 || (d2 == o.d2 && idx < o.idx); }
};

template <typename T>
void knn_kernel(const at::Tensor& x, const at::Tensor& q, int64_t k, int64_t self_offset,
                bool squared, int64_t kk, at::Tensor& out_d, at::Tensor& out_i) {
  const int64_t N = x.size(0), D = x.size(1), M = q.size(0);
  // Centre both sides on the data mean.
  const auto mean = x.mean(0, /*keepdim=*/true);
  const auto xc = (x - mean).contiguous();
  // -2 q: the GEMM then yields -2 q.x exactly as the key needs it (scaling by
  // 2 is exact), so a key is one addition and the same in every code path.
  const auto qm2 = ((q - mean) * -2.0).contiguous();
  const auto xn = xc.pow(2).sum(1).contiguous();

  const T* xorig = x.data_ptr<T>();
  const T* qorig = q.data_ptr<T>();
  const T* xn_p = xn.data_ptr<T>();
  T* od = out_d.data_ptr<T>();
  int64_t* oi = out_i.data_ptr<int64_t>();

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Query block: enough blocks for every thread, at most 64 rows, or 256 at
  // large D, where the GEMM dominates and a 64-row GEMM runs ~25% below the
  // throughput of a 256-row one (MKL sgemm, D = 3072; the key tile below
  // shrinks to keep the buffer size).
  const int64_t bq_max = D >= 512 ? 256 : 64;
  const int64_t bq = std::clamp<int64_t>((M + 4 * threads - 1) / (4 * threads), 8, bq_max);
  // Data tile: a [bq, bd] key buffer of about 256 KiB stays in L2 beside the
  // row buffers.
  const int64_t bd = std::clamp<int64_t>((256 * 1024 / static_cast<int64_t>(sizeof(T))) / bq, 256, 8192);
  const int64_t nblocks = (M + bq - 1) / bq;
  const T inf = std::numeric_limits<T>::infinity();
  // Candidate buffer per row: kk kept + room for 3 kk appends between cuts.
  const int64_t cap = 4 * kk + kScanBlock;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> gbuf(static_cast<size_t>(bq * bd));
    std::vector<Entry<T>> bent(static_cast<size_t>(bq * cap));
    std::vector<T> scratch(static_cast<size_t>(cap));
    std::vector<RowBuffer<T>> rows(static_cast<size_t>(bq));
    std::vector<Cand> cand(static_cast<size_t>(kk));
    const auto opts = x.options();
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * bq;
      const int64_t nr = std::min(bq, M - r0);
      for (int64_t r = 0; r < nr; ++r)
        rows[static_cast<size_t>(r)] = {bent.data() + r * cap, 0, inf};
      const auto qblk = qm2.narrow(0, r0, nr);
      for (int64_t c0 = 0; c0 < N; c0 += bd) {
        const int64_t nc = std::min(bd, N - c0);
        auto g = at::from_blob(gbuf.data(), {nr, nc}, opts);
        at::mm_out(g, qblk, xc.narrow(0, c0, nc).t());
        if (self_offset >= 0) {
          // A point is not its own neighbour: mask its key in this tile.
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t self = self_offset + r0 + r;
            if (self >= c0 && self < c0 + nc) gbuf[static_cast<size_t>(r * nc + (self - c0))] = inf;
          }
        }
        scan_rows(gbuf.data(), nr, nc, xn_p + c0, c0, rows.data(), kk, cap, scratch.data());
      }
      // Re-rank the k' candidates of each row by their exact distances.
      for (int64_t r = 0; r < nr; ++r) {
        const T* qrow = qorig + (r0 + r) * D;
        RowBuffer<T>& b = rows[static_cast<size_t>(r)];
        cut_exact(b, kk);
        const int64_t n = b.n;  // == kk since kk <= the points available
        for (int64_t c = 0; c < n; ++c)
          cand[static_cast<size_t>(c)] = {exact_sq(xorig + b.e[c].idx * D, qrow, D), b.e[c].idx};
        std::sort(cand.begin(), cand.begin() + n);
        T* drow = od + (r0 + r) * k;
        int64_t* irow = oi + (r0 + r) * k;
        for (int64_t c = 0; c < k; ++c) {
          const double d2 = cand[static_cast<size_t>(c)].d2;
          drow[c] = static_cast<T>(squared ? d2 : std::sqrt(d2));
          irow[c] = cand[static_cast<size_t>(c)].idx;
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& data, const at::Tensor& queries,
                                           int64_t k, int64_t self_offset, bool squared,
                                           int64_t extra) {
  auto L = prepare_knn(data, queries, k, self_offset, extra, /*cuda=*/false);
  if (L.q.size(0) == 0) return {L.out_d, L.out_i};
  AT_DISPATCH_FLOATING_TYPES(L.x.scalar_type(), "knn_cpu", [&] {
    knn_kernel<scalar_t>(L.x, L.q, k, self_offset, squared, L.kk, L.out_d, L.out_i);
  });
  return {L.out_d, L.out_i};
}

}  // namespace mmh
