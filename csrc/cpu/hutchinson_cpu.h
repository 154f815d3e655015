#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace mmh {

// Probes v[p, b, :] for probe indices probe_begin + p (p < n_probes) of the
// samples sample_ids[b], each of numel entries. kind 0: Rademacher, 1: Gaussian.
// Returns [n_probes, B, numel] of dtype `dtype`.
at::Tensor hutchinson_probes_cpu(const at::Tensor& sample_ids, int64_t numel,
                                 int64_t probe_begin, int64_t n_probes,
                                 int64_t seed, int64_t kind,
                                 at::ScalarType dtype);

// Fused probe regeneration and reduction: given av[p, b, :] = A v[p, b, :],
// returns (mean over p of v.av [B], standard error of that mean [B] (NaN when
// P < 2), the dots themselves [P, B]), all float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> hutchinson_reduce_cpu(
    const at::Tensor& av, const at::Tensor& sample_ids, int64_t probe_begin,
    int64_t seed, int64_t kind);

}  // namespace mmh
