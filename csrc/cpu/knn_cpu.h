#pragma once
#include <ATen/ATen.h>
#include <string>
#include <tuple>

namespace mmh {

// Exact k nearest neighbours by brute force, tiled: never more than a
// [block, tile] slice of the query x data distance matrix exists at once.
//
//   data    [N, D] float32/float64 (CPU, finite)
//   queries [M, D] same dtype
//   k       neighbours per query (1 <= k <= N, or N - 1 with self exclusion)
//   self_offset  -1: plain search; >= 0: query row i is data row
//                self_offset + i and is not its own neighbour (by index;
//                exact duplicates of it remain, at distance 0)
//   squared  return squared Euclidean distances instead of distances
//   extra    candidates kept beyond k while scanning with GEMM distances;
//            their distances are then recomputed exactly (sum of squared
//            differences, accumulated in float64) and re-ranked, so the
//            returned distances and order are exact whenever the GEMM
//            rounding error is below the gap between neighbour k and k+extra
//
// Returns (distances [M, k] in the data dtype, indices [M, k] int64), sorted
// ascending by (distance, index).
std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& data, const at::Tensor& queries,
                                           int64_t k, int64_t self_offset, bool squared,
                                           int64_t extra);

// knn_cpu with the distance GEMM of the candidate screen in a reduced
// precision: screen "bf16" (float32 or float64 data) or "float32" (float64
// data). The k + extra candidates are re-ranked exactly as in knn_cpu, in key
// order, until the next key exceeds the k-th exact key by more than lambda
// times the largest screening error measured on the row's candidates; a row
// whose candidates run out first is recomputed with the exact screen.
// Returns (distances, indices, number of rows recomputed).
std::tuple<at::Tensor, at::Tensor, int64_t> knn_screened_cpu(const at::Tensor& data,
                                                             const at::Tensor& queries, int64_t k,
                                                             int64_t self_offset, bool squared,
                                                             int64_t extra, double lambda,
                                                             const std::string& screen);

}  // namespace mmh
