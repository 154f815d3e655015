#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace mmh {

// CUDA twins of csrc/cpu/hutchinson_cpu.h: same arguments, same bits.
at::Tensor hutchinson_probes_cuda(const at::Tensor& sample_ids, int64_t numel,
                                  int64_t probe_begin, int64_t n_probes,
                                  int64_t seed, int64_t kind,
                                  at::ScalarType dtype);

std::tuple<at::Tensor, at::Tensor, at::Tensor> hutchinson_reduce_cuda(
    const at::Tensor& av, const at::Tensor& sample_ids, int64_t probe_begin,
    int64_t seed, int64_t kind);

}  // namespace mmh
