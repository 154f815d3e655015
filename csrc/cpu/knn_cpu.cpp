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
//
// The GEMM may also run in a reduced precision (bf16, or float32 for float64
// data): the "screen". Its candidates are then certified row by row in the
// re-rank (knn_block) and uncertain rows redone with the exact screen.
#include "knn_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
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

// bf16 -> float is exact (bf16 is the top half of a float).
MMH_SIMD_CLONES void widen_bf16(const uint16_t* __restrict h, float* __restrict f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t w = static_cast<uint32_t>(h[i]) << 16;
    float v;
    std::memcpy(&v, &w, sizeof(v));
    f[i] = v;
  }
}

// T: the data's dtype (originals, exact re-rank); K: the keys' dtype (the
// screen's GEMM output: float for the bf16 and float32 screens).
template <typename T, typename K>
struct KnnState {
  const T* xorig;
  const T* qorig;
  const K* xn;
  const double* qn;  // |q - mean|^2 per query row (certificate of a reduced-precision screen)
  int64_t N, D, k, kk, self_offset;
  bool squared;
};

// One block of query rows (global indices rows[0..nr)): tiles of keys from a
// GEMM (in the data dtype, or the screen's float32 / bf16), the scan, then the
// exact re-rank. With `unsure` (a reduced-precision screen), a row whose
// result could depend on the screen's rounding is reported there instead of
// being trusted.
template <typename T, typename K>
void knn_block(const KnnState<T, K>& S, const at::Tensor& qblk, const at::Tensor& xc,
               const at::Tensor& tile_mean, at::Tensor& tile_buf, const int64_t* rows,
               int64_t nr, int64_t bd, bool bf16, double lambda, T* od, int64_t* oi,
               std::vector<int64_t>* unsure, std::vector<K>& gbuf, std::vector<at::BFloat16>& hbuf,
               std::vector<Entry<K>>& bent, std::vector<K>& scratch, std::vector<RowBuffer<K>>& rbuf,
               std::vector<Cand>& cand, int64_t cap, std::vector<double>* kth_heap) {
  const K inf = std::numeric_limits<K>::infinity();
  for (int64_t r = 0; r < nr; ++r) rbuf[static_cast<size_t>(r)] = {bent.data() + r * cap, 0, inf};
  for (int64_t c0 = 0; c0 < S.N; c0 += bd) {
    const int64_t nc = std::min(bd, S.N - c0);
    if (bf16) {
      auto h = at::from_blob(hbuf.data(), {nr, nc}, xc.options());
      at::mm_out(h, qblk, xc.narrow(0, c0, nc).t());
      if constexpr (std::is_same_v<K, float>)
        widen_bf16(reinterpret_cast<const uint16_t*>(hbuf.data()), gbuf.data(), nr * nc);
    } else if (tile_mean.defined()) {
      // xc is the raw data: centre this tile only (rows redone after a
      // reduced screen are few, a centred copy of all the data is not worth it).
      auto t = tile_buf.narrow(0, 0, nc);
      at::sub_out(t, xc.narrow(0, c0, nc), tile_mean);
      auto g = at::from_blob(gbuf.data(), {nr, nc}, xc.options());
      at::mm_out(g, qblk, t.t());
    } else {
      auto g = at::from_blob(gbuf.data(), {nr, nc}, xc.options());
      at::mm_out(g, qblk, xc.narrow(0, c0, nc).t());
    }
    if (S.self_offset >= 0) {
      // A point is not its own neighbour: mask its key in this tile.
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t self = S.self_offset + rows[r];
        if (self >= c0 && self < c0 + nc) gbuf[static_cast<size_t>(r * nc + (self - c0))] = inf;
      }
    }
    scan_rows(gbuf.data(), nr, nc, S.xn + c0, c0, rbuf.data(), S.kk, cap, scratch.data());
  }
  // Re-rank the k' candidates of each row by their exact distances.
  const int64_t avail = S.N - (S.self_offset >= 0 ? 1 : 0);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = rows[r];
    const T* qrow = S.qorig + row * S.D;
    RowBuffer<K>& b = rbuf[static_cast<size_t>(r)];
    cut_exact(b, S.kk);
    int64_t n = b.n;  // == kk since kk <= the points available
    if (unsure == nullptr || n >= avail) {
      for (int64_t c = 0; c < n; ++c)
        cand[static_cast<size_t>(c)] = {exact_sq(S.xorig + b.e[c].idx * S.D, qrow, S.D), b.e[c].idx};
    } else {
      // Certified re-rank of a reduced screen. A key is |x|^2 - 2 q.x on
      // centred data, i.e. d^2 - |q - mean|^2, so key - d^2 + |q - mean|^2 is
      // that candidate's screening error. Candidates are taken in key order
      // and their exact distances computed until the next key exceeds the
      // k-th exact key so far by more than lambda times the largest error seen
      // (same rounding process, same magnitudes): a point with a larger key,
      // computed or not, kept or left out by the screen, can then only be
      // among the true k nearest through an error lambda times any measured.
      // A row whose candidates run out first is recomputed with the exact
      // screen.
      std::sort(b.e, b.e + n, [](const Entry<K>& u, const Entry<K>& v) {
        return topk::pair_less(u.key, u.idx, v.key, v.idx);
      });
      const double c_row = -S.qn[row];
      double emax = 0.0;
      std::vector<double>& heap = *kth_heap;  // max-heap of the k smallest exact d^2
      heap.clear();
      bool certified = false;
      int64_t c = 0;
      for (; c < n; ++c) {
        const double key = static_cast<double>(b.e[c].key);
        if (c >= S.k) {
          const double kth_key = heap.front() + c_row;
          // float32 rounding of the keys themselves, relative to their terms
          const double tol = 1e-6 * (std::abs(key) + std::abs(kth_key) + std::abs(c_row));
          if (key - kth_key > lambda * emax + tol) {
            certified = true;
            break;
          }
        }
        const double d2 = exact_sq(S.xorig + b.e[c].idx * S.D, qrow, S.D);
        cand[static_cast<size_t>(c)] = {d2, b.e[c].idx};
        const double err = std::abs(key - d2 - c_row);
        if (!(err <= emax)) emax = err;  // a NaN error poisons emax: the row is redone
        if (static_cast<int64_t>(heap.size()) < S.k) {
          heap.push_back(d2);
          std::push_heap(heap.begin(), heap.end());
        } else if (d2 < heap.front()) {
          std::pop_heap(heap.begin(), heap.end());
          heap.back() = d2;
          std::push_heap(heap.begin(), heap.end());
        }
      }
      if (!certified) {
        if (n < S.k) {  // keys that could not be admitted (overflow): no answer here
          unsure->push_back(row);
          continue;
        }
        // every kept candidate computed: the first key left out must pass
        const double kth_key = heap.front() + c_row;
        const double thr = static_cast<double>(b.thr);
        const double tol = 1e-6 * (std::abs(thr) + std::abs(kth_key) + std::abs(c_row));
        if (!(thr - kth_key > lambda * emax + tol)) {
          unsure->push_back(row);
          continue;
        }
      }
      n = c;
    }
    std::sort(cand.begin(), cand.begin() + n);
    T* drow = od + row * S.k;
    int64_t* irow = oi + row * S.k;
    for (int64_t c = 0; c < S.k; ++c) {
      const double d2 = cand[static_cast<size_t>(c)].d2;
      drow[c] = static_cast<T>(S.squared ? d2 : std::sqrt(d2));
      irow[c] = cand[static_cast<size_t>(c)].idx;
    }
  }
}

// Screens: the distance GEMM in the data dtype (exact path), or in a reduced
// precision whose candidates are certified row by row (knn_block).
enum class Screen { kNative, kBF16, kFloat32 };

template <typename T, typename K>
void knn_kernel_impl(const at::Tensor& x, const at::Tensor& q, int64_t k, int64_t self_offset,
                     bool squared, int64_t kk, at::Tensor& out_d, at::Tensor& out_i, Screen screen,
                     double lambda, int64_t* n_unsure) {
  const int64_t N = x.size(0), D = x.size(1), M = q.size(0);
  const bool reduced = screen != Screen::kNative;
  const auto kdtype = c10::CppTypeToScalarType<K>::value;
  const auto sdtype = screen == Screen::kBF16 ? at::kBFloat16 : kdtype;
  // Centre both sides on the data mean.
  const auto mean = x.mean(0, /*keepdim=*/true);
  // -2 q: the GEMM then yields -2 q.x exactly as the key needs it (scaling by
  // 2 is exact), so a key is one addition and the same in every code path.
  auto qm2 = (q - mean).contiguous();
  qm2.mul_(-2.0);  // in place: one temporary of the queries, not two
  // The centred data in the screen's precision (bf16: about 2.5x the float32
  // GEMM throughput where the CPU has bf16 dot-product instructions; float32
  // for float64 data: 2x) and their squared norms, made a few MiB of rows at
  // a time so that no temporary of the data's size is allocated. xn_t keeps
  // the norms in the data dtype for rows redone by the exact screen.
  at::Tensor xs = at::empty({N, D}, x.options().dtype(sdtype));
  at::Tensor xn_t = at::empty({N}, x.options());
  {
    const int64_t rc = std::clamp<int64_t>((4 << 20) / (D * static_cast<int64_t>(sizeof(T))), 1, N);
    at::Tensor tmp = at::empty({reduced ? rc : 0, D}, x.options());
    at::Tensor sq = at::empty({rc, D}, x.options());
    for (int64_t r0 = 0; r0 < N; r0 += rc) {
      const int64_t nr = std::min(rc, N - r0);
      auto t = reduced ? tmp.narrow(0, 0, nr) : xs.narrow(0, r0, nr);
      at::sub_out(t, x.narrow(0, r0, nr), mean);
      auto s2 = sq.narrow(0, 0, nr);
      at::mul_out(s2, t, t);
      auto xnr = xn_t.narrow(0, r0, nr);
      at::sum_out(xnr, s2, {1});
      if (reduced) xs.narrow(0, r0, nr).copy_(t);
    }
  }
  // |q - mean|^2 in float64, row by row (no float64 copy of the queries):
  // the certificate's per-row constant and the range check below.
  constexpr bool narrow_keys = !(std::is_same_v<T, double> && std::is_same_v<K, double>);
  at::Tensor qn;
  if constexpr (narrow_keys) {  // always so when the screen is reduced
    qn = at::empty({M}, x.options().dtype(at::kDouble));
    const T* qp = qm2.data_ptr<T>();
    double* qnp = qn.data_ptr<double>();
    at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        double acc = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double v = 0.5 * static_cast<double>(qp[r * D + d]);
          acc += v * v;
        }
        qnp[r] = acc;
      }
    });
    // float32 / bf16 keys overflow once centred squared norms near 3.4e38
    // (inf / NaN keys, unfilled rows), and finite data whose float32 column
    // sums overflow have a NaN or inf mean: such inputs are searched with the
    // exact float64 screen (distances rounded back to the data dtype; every
    // row of a reduced screen counted as redone). Written as !(norm <= limit)
    // so that a NaN norm is caught.
    if (!(xn_t.max().item<double>() <= kKeyNormLimit) || !(qn.max().item<double>() <= kKeyNormLimit)) {
      auto dd = at::empty(out_d.sizes(), out_d.options().dtype(at::kDouble));
      knn_kernel_impl<double, double>(x.to(at::kDouble), q.to(at::kDouble), k, self_offset, squared, kk,
                                      dd, out_i, Screen::kNative, lambda, nullptr);
      out_d.copy_(dd);
      if (n_unsure != nullptr) *n_unsure = M;
      return;
    }
  }
  const at::Tensor xn = xn_t.scalar_type() == kdtype ? xn_t : xn_t.to(kdtype);
  const auto qs = reduced ? qm2.to(sdtype) : qm2;
  T* od = out_d.data_ptr<T>();
  int64_t* oi = out_i.data_ptr<int64_t>();

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Query block: enough blocks for every thread, at most 64 rows, or 256 at
  // large D, where the GEMM dominates and a 64-row GEMM runs ~25% below the
  // throughput of a 256-row one (MKL sgemm, D = 3072; the key tile below
  // shrinks to keep the buffer size).
  const int64_t bq_max = D >= 512 ? 256 : 64;
  const int64_t bq = std::clamp<int64_t>((M + 4 * threads - 1) / (4 * threads), 8, bq_max);
  // Candidate buffer per row: kk kept + room for 3 kk appends between cuts.
  const int64_t cap = 4 * kk + kScanBlock;

  std::vector<int64_t> all_unsure;
  std::mutex mu;
  auto run = [&]<typename KK>(const KnnState<T, KK>& S, const at::Tensor& xsrc, const at::Tensor& tile_mean,
                              const at::Tensor& qsrc, const int64_t* rows, int64_t nrows, bool use_bf16,
                              std::vector<int64_t>* unsure_out) {
    const int64_t nb = (nrows + bq - 1) / bq;
    // Data tile: a [bq, bdk] key buffer of about 256 KiB stays in L2 beside
    // the row buffers.
    const int64_t bdk = std::clamp<int64_t>((256 * 1024 / static_cast<int64_t>(sizeof(KK))) / bq, 256, 8192);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<KK> gbuf(static_cast<size_t>(bq * bdk));
      std::vector<at::BFloat16> hbuf(use_bf16 ? static_cast<size_t>(bq * bdk) : 0);
      std::vector<Entry<KK>> bent(static_cast<size_t>(bq * cap));
      std::vector<KK> scratch(static_cast<size_t>(cap));
      std::vector<RowBuffer<KK>> rbuf(static_cast<size_t>(bq));
      std::vector<Cand> cand(static_cast<size_t>(kk));
      std::vector<int64_t> local_unsure;
      std::vector<double> kth_heap;
      kth_heap.reserve(static_cast<size_t>(k));
      at::Tensor tile_buf = tile_mean.defined() ? at::empty({bdk, D}, x.options()) : at::Tensor();
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t p0 = blk * bq;
        const int64_t nr = std::min(bq, nrows - p0);
        knn_block<T, KK>(S, qsrc.narrow(0, p0, nr), xsrc, tile_mean, tile_buf, rows + p0, nr, bdk,
                         use_bf16, lambda, od, oi, unsure_out ? &local_unsure : nullptr, gbuf, hbuf,
                         bent, scratch, rbuf, cand, cap, &kth_heap);
      }
      if (unsure_out && !local_unsure.empty()) {
        std::lock_guard<std::mutex> lock(mu);
        unsure_out->insert(unsure_out->end(), local_unsure.begin(), local_unsure.end());
      }
    });
  };
  std::vector<int64_t> rows(static_cast<size_t>(M));
  for (int64_t r = 0; r < M; ++r) rows[static_cast<size_t>(r)] = r;
  const KnnState<T, K> S{x.data_ptr<T>(), q.data_ptr<T>(), xn.data_ptr<K>(),
                         reduced ? qn.data_ptr<double>() : nullptr, N, D, k, kk, self_offset, squared};
  run(S, xs, at::Tensor(), qs, rows.data(), M, screen == Screen::kBF16, reduced ? &all_unsure : nullptr);
  if (n_unsure != nullptr) *n_unsure = static_cast<int64_t>(all_unsure.size());
  if (!all_unsure.empty()) {
    // Rows the reduced screen could not certify: the screen in the data
    // dtype, exact as in the plain path (tiles centred on the fly).
    std::sort(all_unsure.begin(), all_unsure.end());
    auto idx = at::from_blob(all_unsure.data(), {static_cast<int64_t>(all_unsure.size())}, at::kLong);
    const auto qf = qm2.index_select(0, idx).contiguous();
    const KnnState<T, T> S2{x.data_ptr<T>(), q.data_ptr<T>(), xn_t.data_ptr<T>(), nullptr, N, D, k, kk,
                            self_offset, squared};
    run(S2, x, mean, qf, all_unsure.data(), static_cast<int64_t>(all_unsure.size()), false, nullptr);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& data, const at::Tensor& queries,
                                           int64_t k, int64_t self_offset, bool squared,
                                           int64_t extra) {
  auto L = prepare_knn(data, queries, k, self_offset, extra, /*cuda=*/false);
  if (L.q.size(0) == 0) return {L.out_d, L.out_i};
  AT_DISPATCH_FLOATING_TYPES(L.x.scalar_type(), "knn_cpu", [&] {
    knn_kernel_impl<scalar_t, scalar_t>(L.x, L.q, k, self_offset, squared, L.kk, L.out_d, L.out_i,
                                        Screen::kNative, 0.0, nullptr);
  });
  return {L.out_d, L.out_i};
}

std::tuple<at::Tensor, at::Tensor, int64_t> knn_screened_cpu(const at::Tensor& data,
                                                             const at::Tensor& queries, int64_t k,
                                                             int64_t self_offset, bool squared,
                                                             int64_t extra, double lambda,
                                                             const std::string& screen) {
  auto L = prepare_knn(data, queries, k, self_offset, extra, /*cuda=*/false);
  MMH_CHECK_VALUE(screen == "bf16" || screen == "float32", "screen must be 'bf16' or 'float32', got '",
                  screen, "'");
  MMH_CHECK_VALUE(screen == "bf16" || L.x.scalar_type() == at::kDouble,
                  "a float32 screen is for float64 data, got ", L.x.scalar_type());
  MMH_CHECK_VALUE(lambda >= 1.0, "lambda must be >= 1, got ", lambda);
  int64_t n_unsure = 0;
  if (L.q.size(0) == 0) return {L.out_d, L.out_i, n_unsure};
  const Screen sc = screen == "bf16" ? Screen::kBF16 : Screen::kFloat32;
  AT_DISPATCH_FLOATING_TYPES(L.x.scalar_type(), "knn_screened_cpu", [&] {
    knn_kernel_impl<scalar_t, float>(L.x, L.q, k, self_offset, squared, L.kk, L.out_d, L.out_i, sc,
                                     lambda, &n_unsure);
  });
  return {L.out_d, L.out_i, n_unsure};
}

}  // namespace mmh
