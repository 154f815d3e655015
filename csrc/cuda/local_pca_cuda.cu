// Local PCA on CUDA with batched at:: ops: gather the neighbourhoods of a
// batch of rows, centre each on its mean (after a shift by its first point,
// so exact copies give exact zeros), form the covariance (n > D) or Gram
// (n <= D) matrices with one batched GEMM and take their spectra with
// at::linalg_eigvalsh. Batches are sized so that the gathered points stay
// under about 256 MiB. The FO count is read off the spectrum.
#include "local_pca_cuda.h"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "../common/knn_checks.h"

namespace mmh {
namespace {

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
  check_neighbourhoods(data, neighbors, /*cuda=*/true);
  c10::cuda::CUDAGuard guard(data.device());
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  const at::Tensor sz = check_sizes(sizes, M, K, /*cuda=*/true);
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
  check_neighbourhoods(data, neighbors, /*cuda=*/true);
  MMH_CHECK_VALUE(alpha > 0.0 && alpha < 1.0, "alpha must be in (0, 1), got ", alpha);
  check_sizes(c10::nullopt, neighbors.size(0), neighbors.size(1), /*cuda=*/true);  // K >= 2
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

at::Tensor twonn_ratios_cuda(const at::Tensor& data, const at::Tensor& neighbors) {
  check_neighbourhoods(data, neighbors, /*cuda=*/true);
  MMH_CHECK_VALUE(neighbors.size(1) >= 3, "TwoNN needs neighbourhoods of at least 3 points, got K = ",
                  neighbors.size(1));
  c10::cuda::CUDAGuard guard(data.device());
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  auto out = at::empty({M, K}, x.options().dtype(at::kDouble));
  const int64_t step = batch_rows(K, D, 8);
  for (int64_t r0 = 0; r0 < M; r0 += step) {
    const int64_t nr = std::min(step, M - r0);
    const auto idx = nb.narrow(0, r0, nr);
    auto y = x.index_select(0, idx.reshape({-1})).to(at::kDouble).view({nr, K, D});
    auto yc = y - y.mean(1, /*keepdim=*/true);
    auto g = at::bmm(yc, yc.transpose(1, 2));
    auto sq = g.diagonal(0, 1, 2);
    auto d2 = sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * g;
    d2.diagonal(0, 1, 2).fill_(std::numeric_limits<double>::infinity());
    auto two = std::get<1>(d2.topk(2, /*dim=*/2, /*largest=*/false, /*sorted=*/true));
    auto gi = idx.gather(1, two.reshape({nr, 2 * K})).reshape({nr, K, 2});
    auto r = (x.index_select(0, gi.reshape({-1})).to(at::kDouble).view({nr, K, 2, D}) - y.unsqueeze(2))
                 .pow(2).sum(3).sqrt();
    auto rs = std::get<0>(r.sort(2));
    out.narrow(0, r0, nr).copy_(rs.select(2, 1) / rs.select(2, 0));
  }
  return out;
}

}  // namespace mmh
