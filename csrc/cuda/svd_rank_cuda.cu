// svd_rank on CUDA: the shared driver (at:: GEMM / QR / eigvalsh run by
// torch's CUDA libraries) with the rank rules in a kernel of one thread per
// matrix (a matrix's rule is an O(l) scan; batches are large, l is small) and
// the Gaussian sketch drawn by the counter-based Philox probe kernel, so the
// sketch is bit-identical to the CPU one.
#include "svd_rank_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/checks.h"
#include "../common/svd_rank_driver.h"
#include "../kernels/rank_rules.h"
#include "hutchinson_cuda.h"

namespace mmh {
namespace {

constexpr int kThreads = 128;

__global__ void rank_rule_kernel(const double* __restrict__ lo, const double* __restrict__ hi,
                                 const double* __restrict__ tail,
                                 const double* __restrict__ floor,
                                 const double* __restrict__ thr, int64_t B, int64_t l, int64_t k,
                                 int rule, double min_ratio, bool exact,
                                 int64_t* __restrict__ ranks, bool* __restrict__ cert) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const rank_rules::Spectrum s{lo + b * l, hi + b * l, l, k, tail[b]};
  const auto d = rank_rules::decide(s, rule, floor[b], thr[b], min_ratio, exact);
  ranks[b] = d.rank;
  cert[b] = d.certified;
}

struct CudaBackend {
  static at::Tensor gaussian(const at::Tensor& ids, int64_t n, int64_t l, int64_t seed,
                             at::ScalarType dtype) {
    return hutchinson_probes_cuda(ids, n, 0, l, seed, 1, dtype).permute({1, 2, 0});
  }
  static std::tuple<at::Tensor, at::Tensor> rule(const at::Tensor& lo, const at::Tensor& hi,
                                                 const at::Tensor& tail, const at::Tensor& floor,
                                                 const at::Tensor& thr, int64_t k, int64_t rule,
                                                 double min_ratio, bool exact) {
    return rank_rule_cuda(lo, hi, tail, floor, thr, k, rule, min_ratio, exact);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> rank_rule_cuda(const at::Tensor& lo_in, const at::Tensor& hi_in,
                                                  const at::Tensor& tail_in,
                                                  const at::Tensor& floor_in,
                                                  const at::Tensor& thr_in, int64_t k,
                                                  int64_t rule, double min_ratio, bool exact) {
  MMH_CHECK_DIM(lo_in, 2, "lo");
  MMH_CHECK_DIM(hi_in, 2, "hi");
  MMH_CHECK_VALUE(lo_in.sizes() == hi_in.sizes(), "lo and hi must have the same shape");
  const int64_t B = lo_in.size(0), l = lo_in.size(1);
  for (const auto* t : {&tail_in, &floor_in, &thr_in}) {
    MMH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, "tail, floor and threshold must be [", B,
                    "], got ", t->sizes());
  }
  for (const auto* t : {&lo_in, &hi_in, &tail_in, &floor_in, &thr_in}) {
    MMH_CHECK_CUDA(*t, "rank rule input");
    MMH_CHECK_TYPE(t->scalar_type() == at::kDouble, "rank rule inputs must be float64, got ",
                   t->scalar_type());
    MMH_CHECK_VALUE(t->device() == lo_in.device(), "rank rule inputs must share one device");
  }
  MMH_CHECK_VALUE(l >= 1 && k >= l, "need 1 <= l <= k, got l = ", l, ", k = ", k);
  MMH_CHECK_VALUE(rule >= 0 && rule <= 2, "rule code must be 0, 1 or 2, got ", rule);
  c10::cuda::CUDAGuard guard(lo_in.device());
  const auto lo = lo_in.contiguous(), hi = hi_in.contiguous(), tail = tail_in.contiguous();
  const auto floor = floor_in.contiguous(), thr = thr_in.contiguous();
  auto ranks = at::empty({B}, lo.options().dtype(at::kLong));
  auto cert = at::empty({B}, lo.options().dtype(at::kBool));
  if (B == 0) return {ranks, cert};
  const int grid = static_cast<int>((B + kThreads - 1) / kThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  rank_rule_kernel<<<grid, kThreads, 0, stream>>>(
      lo.data_ptr<double>(), hi.data_ptr<double>(), tail.data_ptr<double>(),
      floor.data_ptr<double>(), thr.data_ptr<double>(), B, l, k, static_cast<int>(rule),
      min_ratio, exact, ranks.data_ptr<int64_t>(), cert.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ranks, cert};
}

std::tuple<at::Tensor, at::Tensor> svd_rank_cuda(const at::Tensor& A, const at::Tensor& threshold,
                                                 const at::Tensor& sample_ids, int64_t rule,
                                                 int64_t method, double min_ratio, double rtol,
                                                 int64_t sketch, int64_t n_iter,
                                                 double max_sketch_fraction, int64_t seed) {
  MMH_CHECK_CUDA(A, "A");
  c10::cuda::CUDAGuard guard(A.device());
  SvdRankParams p;
  p.rule = rule;
  p.method = method;
  p.min_ratio = min_ratio;
  p.rtol = rtol;
  p.sketch = sketch;
  p.n_iter = n_iter;
  p.max_sketch_fraction = max_sketch_fraction;
  p.seed = seed;
  return svd_rank_driver<CudaBackend>(A, threshold, sample_ids, p);
}

}  // namespace mmh
