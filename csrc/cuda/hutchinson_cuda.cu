// Hutchinson probes on CUDA: one thread per Philox block of four entries.
// The reduction writes one double per (probe, sample, chunk) and sums chunks
// in a fixed order, so results are reproducible run to run.
#include "hutchinson_cuda.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cmath>

#include "../common/checks.h"
#include "../common/probe_checks.h"
#include "../kernels/philox.h"

namespace mmh {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 14;  // entries per reduction chunk

template <typename scalar_t>
__global__ void probes_kernel(scalar_t* __restrict__ out,
                              const int64_t* __restrict__ ids, int64_t B,
                              int64_t numel, int64_t blocks, int64_t rows,
                              int64_t probe_begin, uint64_t seed, int kind) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * blocks) return;
  const int64_t row = i / blocks, blk = i % blocks;
  const int64_t p = row / B, b = row % B;
  const auto w = philox::block_words(seed, static_cast<uint64_t>(ids[b]),
                                     static_cast<uint64_t>(probe_begin + p),
                                     static_cast<uint64_t>(blk));
  double v[4];
  philox::block_values(w, kind, v);
  scalar_t* dst = out + row * numel + blk * 4;
  const int64_t n = min(static_cast<int64_t>(4), numel - blk * 4);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(v[j]);
}

template <typename scalar_t>
__global__ void reduce_kernel(const scalar_t* __restrict__ av,
                              const int64_t* __restrict__ ids, int64_t B,
                              int64_t n, int64_t chunks, int64_t probe_begin,
                              uint64_t seed, int kind,
                              double* __restrict__ partial) {
  // one CUDA block per (row, chunk)
  const int64_t i = blockIdx.x;
  const int64_t row = i / chunks, c = i % chunks;
  const int64_t p = row / B, b = row % B;
  const int64_t e0 = c * kChunk;
  const int64_t e1 = min(n, e0 + kChunk);
  const scalar_t* x = av + row * n;
  double acc = 0.0;
  for (int64_t e = e0 + 4 * static_cast<int64_t>(threadIdx.x); e < e1;
       e += 4 * static_cast<int64_t>(blockDim.x)) {
    const auto w = philox::block_words(seed, static_cast<uint64_t>(ids[b]),
                                       static_cast<uint64_t>(probe_begin + p),
                                       static_cast<uint64_t>(e / 4));
    double v[4];
    philox::block_values(w, kind, v);
    const int64_t m = min(static_cast<int64_t>(4), e1 - e);
    for (int64_t j = 0; j < m; ++j) acc += v[j] * static_cast<double>(x[e + j]);
  }
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[i] = buf[0];
}

void check_common(const at::Tensor& sample_ids, int64_t probe_begin, int64_t n_probes,
                  int64_t numel, int64_t kind) {
  MMH_CHECK_DIM(sample_ids, 1, "sample_ids");
  MMH_CHECK_TYPE(sample_ids.scalar_type() == at::kLong,
                 "sample_ids must be int64, got ", sample_ids.scalar_type());
  MMH_CHECK_CUDA(sample_ids, "sample_ids");
  MMH_CHECK_VALUE(probe_begin >= 0, "probe_begin must be >= 0, got ", probe_begin);
  MMH_CHECK_VALUE(kind == 0 || kind == 1,
                  "probe kind must be 0 (rademacher) or 1 (gaussian), got ", kind);
  check_counter_range(probe_begin, n_probes, numel);
}

}  // namespace

at::Tensor hutchinson_probes_cuda(const at::Tensor& sample_ids, int64_t numel,
                                  int64_t probe_begin, int64_t n_probes,
                                  int64_t seed, int64_t kind,
                                  at::ScalarType dtype) {
  MMH_CHECK_VALUE(numel > 0, "numel must be positive, got ", numel);
  MMH_CHECK_VALUE(n_probes > 0, "n_probes must be positive, got ", n_probes);
  check_common(sample_ids, probe_begin, n_probes, numel, kind);
  c10::cuda::CUDAGuard guard(sample_ids.device());
  const auto ids = sample_ids.contiguous();
  const int64_t B = ids.size(0);
  auto out = at::empty({n_probes, B, numel}, ids.options().dtype(dtype));
  if (B == 0) return out;
  const int64_t blocks = (numel + 3) / 4;
  const int64_t rows = n_probes * B;
  const int64_t total = rows * blocks;
  const int grid = static_cast<int>((total + kThreads - 1) / kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "hutchinson_probes_cuda", [&] {
    probes_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), B, numel, blocks,
        rows, probe_begin, static_cast<uint64_t>(seed), static_cast<int>(kind));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hutchinson_reduce_cuda(
    const at::Tensor& av, const at::Tensor& sample_ids, int64_t probe_begin,
    int64_t seed, int64_t kind) {
  MMH_CHECK_DIM(av, 3, "av");
  check_common(sample_ids, probe_begin, av.size(0), av.size(2), kind);
  MMH_CHECK_FLOATING(av, "av");
  MMH_CHECK_CUDA(av, "av");
  MMH_CHECK_VALUE(av.device() == sample_ids.device(),
                  "av and sample_ids must be on the same device");
  MMH_CHECK_VALUE(av.size(1) == sample_ids.size(0), "av has ", av.size(1),
                  " samples but sample_ids has ", sample_ids.size(0));
  c10::cuda::CUDAGuard guard(av.device());
  const auto a = av.contiguous();
  const auto ids = sample_ids.contiguous();
  const int64_t P = a.size(0), B = a.size(1), n = a.size(2);
  const auto f64 = a.options().dtype(at::kDouble);
  if (P == 0 || B == 0 || n == 0) {
    auto dots = at::zeros({P, B}, f64);
    auto nan = at::full({B}, NAN, f64);
    return {P == 0 ? nan : dots.mean(0), nan, dots};
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto partial = at::empty({P, B, chunks}, f64);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "hutchinson_reduce_cuda", [&] {
    reduce_kernel<scalar_t><<<static_cast<unsigned>(P * B * chunks), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), B, n, chunks,
        probe_begin, static_cast<uint64_t>(seed), static_cast<int>(kind),
        partial.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto dots = partial.sum(2);
  auto mean = dots.mean(0);
  auto stderr_ = P > 1 ? (dots.std(0, /*unbiased=*/true) / std::sqrt(static_cast<double>(P)))
                       : at::full({B}, NAN, f64);
  return {mean, stderr_, dots};
}

}  // namespace mmh
