#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace mmh {

// CUDA twins of csrc/cpu/svd_rank_cpu.h: same arguments, same results (up to
// the rounding of the at:: linear algebra on the device).
std::tuple<at::Tensor, at::Tensor> svd_rank_cuda(const at::Tensor& A, const at::Tensor& threshold,
                                                 const at::Tensor& sample_ids, int64_t rule,
                                                 int64_t method, double min_ratio, double rtol,
                                                 int64_t sketch, int64_t n_iter,
                                                 double max_sketch_fraction, int64_t seed);

std::tuple<at::Tensor, at::Tensor> rank_rule_cuda(const at::Tensor& lo, const at::Tensor& hi,
                                                  const at::Tensor& tail, const at::Tensor& floor,
                                                  const at::Tensor& threshold, int64_t k,
                                                  int64_t rule, double min_ratio, bool exact);

}  // namespace mmh
