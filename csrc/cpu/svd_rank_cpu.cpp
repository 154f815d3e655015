// svd_rank on the CPU: the shared driver (at:: GEMM / QR / eigvalsh) with
// the rank rules run per matrix under at::parallel_for and the Gaussian
// sketch drawn by the counter-based Philox probe kernel.
#include "svd_rank_cpu.h"

#include <ATen/Parallel.h>

#include "../common/checks.h"
#include "../common/svd_rank_driver.h"
#include "../kernels/rank_rules.h"
#include "hutchinson_cpu.h"

namespace mmh {
namespace {

void check_rule_inputs(const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& tail,
                       const at::Tensor& floor, const at::Tensor& threshold, int64_t k,
                       int64_t rule) {
  MMH_CHECK_DIM(lo, 2, "lo");
  MMH_CHECK_DIM(hi, 2, "hi");
  MMH_CHECK_VALUE(lo.sizes() == hi.sizes(), "lo and hi must have the same shape, got ",
                  lo.sizes(), " and ", hi.sizes());
  const int64_t B = lo.size(0);
  for (const auto* t : {&tail, &floor, &threshold}) {
    MMH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, "tail, floor and threshold must be [",
                    B, "], got ", t->sizes());
  }
  for (const auto* t : {&lo, &hi, &tail, &floor, &threshold}) {
    MMH_CHECK_TYPE(t->scalar_type() == at::kDouble, "rank rule inputs must be float64, got ",
                   t->scalar_type());
  }
  MMH_CHECK_VALUE(lo.size(1) >= 1 && k >= lo.size(1), "need 1 <= l <= k, got l = ", lo.size(1),
                  ", k = ", k);
  MMH_CHECK_VALUE(rule >= 0 && rule <= 2, "rule code must be 0, 1 or 2, got ", rule);
}

struct CpuBackend {
  static at::Tensor gaussian(const at::Tensor& ids, int64_t n, int64_t l, int64_t seed,
                             at::ScalarType dtype) {
    // probes [l, B, n]: column j of matrix b is probe j of sample ids[b]
    return hutchinson_probes_cpu(ids, n, 0, l, seed, 1, dtype).permute({1, 2, 0});
  }
  static std::tuple<at::Tensor, at::Tensor> rule(const at::Tensor& lo, const at::Tensor& hi,
                                                 const at::Tensor& tail, const at::Tensor& floor,
                                                 const at::Tensor& thr, int64_t k, int64_t rule,
                                                 double min_ratio, bool exact) {
    return rank_rule_cpu(lo, hi, tail, floor, thr, k, rule, min_ratio, exact);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> rank_rule_cpu(const at::Tensor& lo_in, const at::Tensor& hi_in,
                                                 const at::Tensor& tail_in,
                                                 const at::Tensor& floor_in,
                                                 const at::Tensor& thr_in, int64_t k,
                                                 int64_t rule, double min_ratio, bool exact) {
  check_rule_inputs(lo_in, hi_in, tail_in, floor_in, thr_in, k, rule);
  for (const auto* t : {&lo_in, &hi_in, &tail_in, &floor_in, &thr_in}) MMH_CHECK_CPU(*t, "rank rule input");
  const auto lo = lo_in.contiguous(), hi = hi_in.contiguous(), tail = tail_in.contiguous();
  const auto floor = floor_in.contiguous(), thr = thr_in.contiguous();
  const int64_t B = lo.size(0), l = lo.size(1);
  auto ranks = at::empty({B}, lo.options().dtype(at::kLong));
  auto cert = at::empty({B}, lo.options().dtype(at::kBool));
  const double *plo = lo.data_ptr<double>(), *phi = hi.data_ptr<double>();
  const double *ptail = tail.data_ptr<double>(), *pfloor = floor.data_ptr<double>();
  const double* pthr = thr.data_ptr<double>();
  int64_t* pr = ranks.data_ptr<int64_t>();
  bool* pc = cert.data_ptr<bool>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const rank_rules::Spectrum s{plo + b * l, phi + b * l, l, k, ptail[b]};
      const auto d = rank_rules::decide(s, static_cast<int>(rule), pfloor[b], pthr[b], min_ratio, exact);
      pr[b] = d.rank;
      pc[b] = d.certified;
    }
  });
  return {ranks, cert};
}

std::tuple<at::Tensor, at::Tensor> svd_rank_cpu(const at::Tensor& A, const at::Tensor& threshold,
                                                const at::Tensor& sample_ids, int64_t rule,
                                                int64_t method, double min_ratio, double rtol,
                                                int64_t sketch, int64_t n_iter,
                                                double max_sketch_fraction, int64_t seed) {
  MMH_CHECK_CPU(A, "A");
  SvdRankParams p;
  p.rule = rule;
  p.method = method;
  p.min_ratio = min_ratio;
  p.rtol = rtol;
  p.sketch = sketch;
  p.n_iter = n_iter;
  p.max_sketch_fraction = max_sketch_fraction;
  p.seed = seed;
  return svd_rank_driver<CpuBackend>(A, threshold, sample_ids, p);
}

}  // namespace mmh
