#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace mmh {

// CUDA twins of csrc/cpu/local_pca_cpu.h: same arguments and results. The
// neighbourhood matrices are formed in batches with at:: ops (gather, bmm)
// and their spectra come from at::linalg_eigvalsh; the FO count is read off
// the spectrum.
at::Tensor local_pca_cuda(const at::Tensor& data, const at::Tensor& neighbors,
                          const c10::optional<at::Tensor>& sizes);

std::tuple<at::Tensor, at::Tensor> local_pca_count_cuda(const at::Tensor& data,
                                                        const at::Tensor& neighbors,
                                                        double alpha);

}  // namespace mmh
