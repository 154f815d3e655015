// Local PCA on CUDA with batched at:: ops: gather the neighbourhoods of a
// batch of rows, centre each on its mean (after a shift by its first point,
// so exact copies give exact zeros), form the covariance (n > D) or Gram
// (n <= D) matrices with one batched GEMM and take their spectra with
// at::linalg_eigvalsh. Batches are sized so that the gathered points stay
// under about 256 MiB. The FO count is read off the spectrum.
#include "local_pca_cuda.h"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../common/checks.h"

namespace mmh {
namespace {

void check_inputs(const at::Tensor& data, const at::Tensor& neighbors) {
  MMH_CHECK_DIM(data, 2, "data");
  MMH_CHECK_DIM(neighbors, 2, "neighbors");
  MMH_CHECK_CUDA(data, "data");
  MMH_CHECK_CUDA(neighbors, "neighbors");
  MMH_CHECK_VALUE(data.device() == neighbors.device(), "neighbors are on ", neighbors.device(),
                  " but data are on ", data.device());
  MMH_CHECK_TYPE(data.scalar_type() == at::kFloat || data.scalar_type() == at::kDouble,
                 "data must be float32 or float64, got ", data.scalar_type());
  MMH_CHECK_TYPE(neighbors.scalar_type() == at::kLong, "neighbors must be int64, got ",
                 neighbors.scalar_type());
  MMH_CHECK_VALUE(data.size(1) > 0, "data must have at least one feature");
  if (neighbors.numel() > 0) {
    const auto mn = neighbors.min().item<int64_t>();
    const auto mx = neighbors.max().item<int64_t>();
    MMH_CHECK_VALUE(mn >= 0 && mx < data.size(0), "neighbors must index rows of data in [0, ",
                    data.size(0), "), got values in [", mn, ", ", mx, "]");
  }
}

// Spectra [B, min(K, D)] (descending, >= 0) of the neighbourhoods
// nb [B, K]; sizes (optional) [B] restricts row i to its first sizes[i]
// neighbours.
at::Tensor batch_spectra(const at::Tensor& x, const at::Tensor& nb, const at::Tensor& sizes) {
  const int64_t B = nb.size(0), K = nb.size(1), D = x.size(1);
  auto y = x.index_select(0, nb.reshape({-1})).view({B, K, D});
  y = y - y.narrow(1, 0, 1);
  at::Tensor denom;
  if (sizes.defined()) {
    auto w = (at::arange(K, nb.options()).unsqueeze(0) < sizes.unsqueeze(1)).to(x.scalar_type());
    auto n = sizes.to(x.scalar_type()).clamp_min(1).view({B, 1, 1});
    y = y * w.unsqueeze(2);
    auto mean = y.sum(1, /*keepdim=*/true) / n;
    y = (y - mean) * w.unsqueeze(2);
    denom = (sizes.to(x.scalar_type()) - 1).clamp_min(1).view({B, 1, 1});
  } else {
    y = y - y.mean(1, /*keepdim=*/true);
    denom = at::full({1, 1, 1}, static_cast<double>(K - 1), x.options());
  }
  auto s = (K > D ? at::bmm(y.transpose(1, 2), y) : at::bmm(y, y.transpose(1, 2))) / denom;
  auto ev = at::linalg_eigvalsh(s).flip({1}).narrow(1, 0, std::min(K, D)).clamp_min(0);
  if (sizes.defined()) ev = ev * (sizes >= 2).to(ev.scalar_type()).unsqueeze(1);
  return ev;
}

int64_t batch_rows(int64_t K, int64_t D, int64_t elem) {
  const int64_t per_row = std::max<int64_t>(1, K * std::max(K, D) * elem * 3);
  return std::max<int64_t>(1, (int64_t(256) << 20) / per_row);
}

}  // namespace

at::Tensor local_pca_cuda(const at::Tensor& data, const at::Tensor& neighbors,
                          const c10::optional<at::Tensor>& sizes) {
  check_inputs(data, neighbors);
  c10::cuda::CUDAGuard guard(data.device());
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  at::Tensor sz;
  if (sizes.has_value()) {
    sz = sizes->contiguous();
    MMH_CHECK_DIM(sz, 1, "sizes");
    MMH_CHECK_CUDA(sz, "sizes");
    MMH_CHECK_TYPE(sz.scalar_type() == at::kLong, "sizes must be int64, got ", sz.scalar_type());
    MMH_CHECK_VALUE(sz.size(0) == M, "sizes has ", sz.size(0), " entries for ", M, " rows");
    if (M > 0) {
      MMH_CHECK_VALUE(sz.min().item<int64_t>() >= 0 && sz.max().item<int64_t>() <= K,
                      "sizes must be in [0, ", K, "]");
    }
  } else {
    MMH_CHECK_VALUE(K >= 2, "a neighbourhood needs at least 2 points, got K = ", K);
  }
  auto out = at::zeros({M, std::min(K, D)}, x.options());
  if (M == 0 || K == 0) return out;
  const int64_t step = batch_rows(K, D, static_cast<int64_t>(x.element_size()));
  for (int64_t r0 = 0; r0 < M; r0 += step) {
    const int64_t nr = std::min(step, M - r0);
    out.narrow(0, r0, nr).copy_(
        batch_spectra(x, nb.narrow(0, r0, nr), sz.defined() ? sz.narrow(0, r0, nr) : sz));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> local_pca_count_cuda(const at::Tensor& data,
                                                        const at::Tensor& neighbors,
                                                        double alpha) {
  check_inputs(data, neighbors);
  MMH_CHECK_VALUE(alpha > 0.0 && alpha < 1.0, "alpha must be in (0, 1), got ", alpha);
  MMH_CHECK_VALUE(neighbors.size(1) >= 2, "a neighbourhood needs at least 2 points, got K = ",
                  neighbors.size(1));
  c10::cuda::CUDAGuard guard(data.device());
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  auto counts = at::zeros({M}, x.options().dtype(at::kLong));
  auto lmax = at::zeros({M}, x.options());
  const int64_t step = batch_rows(K, D, static_cast<int64_t>(x.element_size()));
  for (int64_t r0 = 0; r0 < M; r0 += step) {
    const int64_t nr = std::min(step, M - r0);
    auto ev = batch_spectra(x, nb.narrow(0, r0, nr), at::Tensor());
    auto top = ev.narrow(1, 0, 1);
    counts.narrow(0, r0, nr).copy_((ev > top * alpha).sum(1));
    lmax.narrow(0, r0, nr).copy_(top.squeeze(1));
  }
  return {counts, lmax};
}

}  // namespace mmh
