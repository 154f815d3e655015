#pragma once
#include <ATen/ATen.h>
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

// knn_cpu with the distance GEMM of the screen in bf16 (float32 data only).
// The k + extra candidates are re-ranked exactly as in knn_cpu; a row is
// trusted only when the gap between its k-th exact key and the first key
// left out exceeds lambda times the largest bf16 screening error seen among
// its candidates, and is otherwise recomputed with the float32 screen.
// Returns (distances, indices, number of rows recomputed in float32).
std::tuple<at::Tensor, at::Tensor, int64_t> knn_bf16_cpu(const at::Tensor& data,
                                                         const at::Tensor& queries, int64_t k,
                                                         int64_t self_offset, bool squared,
                                                         int64_t extra, double lambda);

}  // namespace mmh
