// Argument checks of kernel family 3 (kNN, local PCA), shared by the CPU and
// CUDA launchers; `cuda` says which device the tensors must be on.
#pragma once

#include <ATen/ATen.h>
#include <algorithm>
#include <c10/util/Optional.h>

#include "checks.h"

namespace mmh {

inline void check_device(const at::Tensor& t, const char* name, bool cuda) {
  if (cuda) {
    MMH_CHECK_CUDA(t, name);
  } else {
    MMH_CHECK_CPU(t, name);
  }
}

inline void check_points(const at::Tensor& data, bool cuda) {
  MMH_CHECK_DIM(data, 2, "data");
  check_device(data, "data", cuda);
  MMH_CHECK_TYPE(data.scalar_type() == at::kFloat || data.scalar_type() == at::kDouble,
                 "data must be float32 or float64, got ", data.scalar_type());
  MMH_CHECK_VALUE(data.size(1) > 0, "data must have at least one feature");
}

// knn_cpu / knn_cuda arguments; returns the number of candidate points.
inline int64_t check_knn_args(const at::Tensor& data, const at::Tensor& queries, int64_t k,
                              int64_t self_offset, int64_t extra, bool cuda) {
  check_points(data, cuda);
  MMH_CHECK_DIM(queries, 2, "queries");
  check_device(queries, "queries", cuda);
  MMH_CHECK_VALUE(data.device() == queries.device(), "queries are on ", queries.device(),
                  " but data are on ", data.device());
  MMH_CHECK_TYPE(queries.scalar_type() == data.scalar_type(), "queries dtype ",
                 queries.scalar_type(), " differs from data dtype ", data.scalar_type());
  MMH_CHECK_VALUE(queries.size(1) == data.size(1), "queries have ", queries.size(1),
                  " features but data have ", data.size(1));
  MMH_CHECK_VALUE(extra >= 0, "extra must be >= 0, got ", extra);
  const int64_t N = data.size(0), M = queries.size(0);
  const int64_t avail = N - (self_offset >= 0 ? 1 : 0);
  MMH_CHECK_VALUE(k >= 1 && k <= avail, "k must be in [1, ", avail, "] for ", N,
                  " data points", (self_offset >= 0 ? " (self excluded)" : ""), ", got ", k);
  if (self_offset >= 0) {
    MMH_CHECK_VALUE(self_offset + M <= N, "self_offset + number of queries exceeds N");
  }
  return avail;
}

// Largest centred squared norm (of data or queries) searched with float32 or
// bf16 keys |x|^2 - 2 q.x: beyond it a key may overflow float32 (3.4e38).
constexpr double kKeyNormLimit = 1e36;

// What knn_cpu and knn_cuda both start from: checked arguments, contiguous
// inputs, the [M, k] outputs and kk = min(k + extra, candidates).
struct KnnLaunch {
  at::Tensor x, q, out_d, out_i;
  int64_t kk;
};

inline KnnLaunch prepare_knn(const at::Tensor& data, const at::Tensor& queries, int64_t k,
                             int64_t self_offset, int64_t extra, bool cuda) {
  const int64_t avail = check_knn_args(data, queries, k, self_offset, extra, cuda);
  KnnLaunch L;
  L.x = data.contiguous();
  L.q = queries.contiguous();
  L.out_d = at::empty({queries.size(0), k}, L.x.options());
  L.out_i = at::empty({queries.size(0), k}, L.x.options().dtype(at::kLong));
  L.kk = std::min(k + extra, avail);
  return L;
}

// local_pca_* arguments: data [N, D] and neighbours [M, K] int64 indexing it.
inline void check_neighbourhoods(const at::Tensor& data, const at::Tensor& neighbors, bool cuda) {
  check_points(data, cuda);
  MMH_CHECK_DIM(neighbors, 2, "neighbors");
  check_device(neighbors, "neighbors", cuda);
  MMH_CHECK_VALUE(data.device() == neighbors.device(), "neighbors are on ", neighbors.device(),
                  " but data are on ", data.device());
  MMH_CHECK_TYPE(neighbors.scalar_type() == at::kLong, "neighbors must be int64, got ",
                 neighbors.scalar_type());
  if (neighbors.numel() > 0) {
    const auto mn = neighbors.min().item<int64_t>();
    const auto mx = neighbors.max().item<int64_t>();
    MMH_CHECK_VALUE(mn >= 0 && mx < data.size(0), "neighbors must index rows of data in [0, ",
                    data.size(0), "), got values in [", mn, ", ", mx, "]");
  }
}

// Optional per-row neighbourhood sizes in [0, K]; without them K >= 2.
// Returns the contiguous sizes (undefined when not given).
inline at::Tensor check_sizes(const c10::optional<at::Tensor>& sizes, int64_t M, int64_t K,
                              bool cuda) {
  if (!sizes.has_value()) {
    MMH_CHECK_VALUE(K >= 2, "a neighbourhood needs at least 2 points, got K = ", K);
    return at::Tensor();
  }
  auto sz = sizes->contiguous();
  MMH_CHECK_DIM(sz, 1, "sizes");
  check_device(sz, "sizes", cuda);
  MMH_CHECK_TYPE(sz.scalar_type() == at::kLong, "sizes must be int64, got ", sz.scalar_type());
  MMH_CHECK_VALUE(sz.size(0) == M, "sizes has ", sz.size(0), " entries for ", M, " rows");
  if (M > 0) {
    MMH_CHECK_VALUE(sz.min().item<int64_t>() >= 0 && sz.max().item<int64_t>() <= K,
                    "sizes must be in [0, ", K, "]");
  }
  return sz;
}

}  // namespace mmh
