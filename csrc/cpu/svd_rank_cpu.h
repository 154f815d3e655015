#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace mmh {

// Numerical rank and singular values of a batch of matrices A [B, m, n]
// (float32 or float64; float16/bfloat16 are computed in float32).
// threshold [B] float64 (used by rule 1), sample_ids [B] int64 (keys of the
// randomized sketch). rule: 0 gap, 1 threshold, 2 ratio; method: 0 exact
// (float64 Gram + eigvalsh, certified, else float64 SVD), 1 randomized
// (sketch with power iterations, grown until the rule is certified).
// Returns (ranks [B] int64, singular values [B, r] descending, in the work
// dtype; entries a matrix did not compute are NaN). See
// csrc/common/svd_rank_driver.h for the algorithm and its error bounds.
std::tuple<at::Tensor, at::Tensor> svd_rank_cpu(const at::Tensor& A, const at::Tensor& threshold,
                                                const at::Tensor& sample_ids, int64_t rule,
                                                int64_t method, double min_ratio, double rtol,
                                                int64_t sketch, int64_t n_iter,
                                                double max_sketch_fraction, int64_t seed);

// The rank rule of csrc/kernels/rank_rules.h on every matrix: singular values
// in [lo, hi] ([B, l] float64, descending) and in [0, tail[b]] past l, k values
// in all; floor [B] (gap/ratio noise floor), threshold [B]. exact: lo == hi are
// the values themselves (no certification). Returns (ranks [B] int64,
// certified [B] bool).
std::tuple<at::Tensor, at::Tensor> rank_rule_cpu(const at::Tensor& lo, const at::Tensor& hi,
                                                 const at::Tensor& tail, const at::Tensor& floor,
                                                 const at::Tensor& threshold, int64_t k,
                                                 int64_t rule, double min_ratio, bool exact);

}  // namespace mmh
