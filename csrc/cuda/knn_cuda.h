#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace mmh {

// CUDA twin of csrc/cpu/knn_cpu.h: same arguments and results.
std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& data, const at::Tensor& queries,
                                            int64_t k, int64_t self_offset, bool squared,
                                            int64_t extra);

}  // namespace mmh
