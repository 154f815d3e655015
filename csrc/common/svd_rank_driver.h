// The svd_rank algorithm, written once with at:: ops and shared by the CPU
// and CUDA launchers. A Backend supplies the two device-specific pieces:
//   Backend::gaussian(ids, n, l, seed, dtype) -> [B, n, l] counter-based
//       Gaussian test matrix (column j of matrix b depends only on
//       (seed, ids[b], j), so a matrix's sketch does not depend on its batch);
//   Backend::rule(lo, hi, tail, floor, thr, k, rule, min_ratio, exact)
//       -> (ranks [B] int64, certified [B] bool), the kernel of
//       csrc/kernels/rank_rules.h applied to every matrix.
//
// Error bounds (why a rank from the fast paths can be trusted):
//  * Exact path: the Gram matrix G (k x k, k = min(m, n)) is formed and
//    diagonalised in float64. Its eigenvalues are within
//        eps_G = 2 eps64 (max(m, n) + k) ||A||_F^2
//    of s_i^2 (rounding of the product, |E| <= max(m,n) eps ||A||_F^2, plus
//    the backward error of the symmetric eigensolver, <= k eps ||G||), so
//    s_i lies in [sqrt(lam_i - eps_G), sqrt(lam_i + eps_G)]. Singular values
//    below about sqrt(eps_G) (~1e-7 s_max) are not resolved, but the rank
//    rarely depends on them: the rule is evaluated on the intervals and the
//    Gram answer is kept only when every spectrum inside them gives the same
//    rank (e.g. the threshold or the decisive gap is well above sqrt(eps_G)).
//    The other matrices get a float64 SVD.
//  * Randomized path: Q (m x l, orthonormal) from a Gaussian sketch with
//    n_iter power iterations (re-orthonormalised after every product by a
//    shifted Cholesky QR, see shifted_cholesky_qr),
//    then Bm = Q^T A in float64 (Q from a final Householder QR in float64).
//    With Res = (I - Q Q^T) A,
//        A^T A = Bm^T Bm + Res^T Res,   ||Res||_F^2 = ||A||_F^2 - ||Bm||_F^2,
//    so by Weyl's inequalities s_i(A)^2 lies in [lam_i, lam_i + ||Res||^2]
//    (lam_i the eigenvalues of Bm Bm^T) for i < l, and s_i(A) <= ||Res||_F
//    for i >= l. These are rigorous whatever the quality of Q; a good Q only
//    makes them tight. When the rule is not certified on them (the gap sits
//    at the sketch edge, or the tail bound is above the threshold) the
//    sketch doubles; past max_sketch_fraction * k the exact path takes over.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace mmh {

struct SvdRankParams {
  int64_t rule = 0;       // 0 gap, 1 threshold, 2 ratio
  int64_t method = 0;     // 0 exact, 1 randomized
  double min_ratio = 3.0;
  double rtol = 0.0;      // noise floor of the gap / ratio rules: rtol * s_max
  int64_t sketch = 32;    // initial sketch columns (randomized)
  int64_t n_iter = 2;     // power iterations (randomized)
  double max_sketch_fraction = 0.5;
  int64_t seed = 0;
};

inline void svd_rank_check_params(const SvdRankParams& p) {
  MMH_CHECK_VALUE(p.rule >= 0 && p.rule <= 2, "rule code must be 0 (gap), 1 (threshold) or 2 (ratio), got ", p.rule);
  MMH_CHECK_VALUE(p.method == 0 || p.method == 1, "method code must be 0 (exact) or 1 (randomized), got ", p.method);
  MMH_CHECK_VALUE(std::isfinite(p.min_ratio) && p.min_ratio >= 1.0,
                  "min_ratio must be a finite number >= 1, got ", p.min_ratio);
  MMH_CHECK_VALUE(std::isfinite(p.rtol) && p.rtol >= 0.0 && p.rtol < 1.0,
                  "rtol must be in [0, 1), got ", p.rtol);
  MMH_CHECK_VALUE(p.sketch >= 1, "sketch size must be >= 1, got ", p.sketch);
  MMH_CHECK_VALUE(p.n_iter >= 0, "n_iter must be >= 0, got ", p.n_iter);
  MMH_CHECK_VALUE(p.max_sketch_fraction > 0.0 && p.max_sketch_fraction <= 1.0,
                  "max_sketch_fraction must be in (0, 1], got ", p.max_sketch_fraction);
}

// Re-orthonormalisation between power iterations: Y R^{-1} with R the
// Cholesky factor of Y^T Y + shift I in float64 (shift = 1e-12 tr(Y^T Y), so
// the factorisation exists for rank-deficient Y). The result is orthonormal
// on the directions of Y above ~1e-6 of its norm and shrinks the others,
// which is all a power iteration needs; it uses only GEMM, an l x l Cholesky
// and a triangular solve, whose timing stays steady on oversubscribed cores
// where Householder QR's many small parallel steps stall. The final basis,
// which the error bounds rely on, is a Householder QR.
inline at::Tensor shifted_cholesky_qr(const at::Tensor& Y) {
  const auto Y64 = Y.to(at::kDouble);
  const int64_t l = Y64.size(-1);
  auto G = at::matmul(Y64.transpose(-2, -1), Y64);
  const auto tr = G.diagonal(0, -2, -1).sum(-1, /*keepdim=*/true).unsqueeze(-1);
  const auto shift = tr * 1e-12 + std::numeric_limits<double>::min();
  G = G + shift * at::eye(l, G.options());
  const auto R = std::get<0>(at::linalg_cholesky_ex(G, /*upper=*/true, /*check_errors=*/false));
  return at::linalg_solve_triangular(R, Y64, /*upper=*/true, /*left=*/false).to(Y.scalar_type());
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> svd_rank_driver(const at::Tensor& A_in,
                                                   const at::Tensor& threshold,
                                                   const at::Tensor& sample_ids,
                                                   const SvdRankParams& p) {
  svd_rank_check_params(p);
  MMH_CHECK_DIM(A_in, 3, "A");
  MMH_CHECK_FLOATING(A_in, "A");
  MMH_CHECK_DIM(threshold, 1, "threshold");
  MMH_CHECK_DIM(sample_ids, 1, "sample_ids");
  MMH_CHECK_TYPE(sample_ids.scalar_type() == at::kLong, "sample_ids must be int64, got ",
                 sample_ids.scalar_type());
  const int64_t B = A_in.size(0), m = A_in.size(1), n = A_in.size(2);
  MMH_CHECK_VALUE(B > 0 && m > 0 && n > 0, "A must be non-empty, got shape ", A_in.sizes());
  MMH_CHECK_VALUE(threshold.size(0) == B, "threshold has ", threshold.size(0),
                  " entries but A has ", B, " matrices");
  MMH_CHECK_VALUE(sample_ids.size(0) == B, "sample_ids has ", sample_ids.size(0),
                  " entries but A has ", B, " matrices");
  MMH_CHECK_VALUE(threshold.device() == A_in.device() && sample_ids.device() == A_in.device(),
                  "A, threshold and sample_ids must be on the same device");
  const auto work = A_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto A = A_in.to(work).contiguous();
  const auto A64 = A.to(at::kDouble);
  const auto thr = threshold.to(at::kDouble).contiguous();
  const int64_t k = std::min(m, n);
  const double eps64 = std::numeric_limits<double>::epsilon();
  // ||A||_F^2 in float64; also the finiteness check (a NaN or inf entry makes
  // it non-finite; finite float32 data cannot overflow it)
  const auto fro2 = at::linalg_vector_norm(A64, 2, at::IntArrayRef{1, 2}, false).square();
  MMH_CHECK_VALUE(at::isfinite(fro2).all().item<bool>(),
                  "A contains NaN or inf values (or float64 values too large to square)");

  // rows idx of a batch tensor; no copy while idx is still the whole batch
  auto take = [&](const at::Tensor& t, const at::Tensor& idx) {
    return idx.numel() == t.size(0) ? t : t.index_select(0, idx);
  };
  const auto long_opts = A.options().dtype(at::kLong);
  auto ranks = at::zeros({B}, long_opts);
  std::vector<std::pair<at::Tensor, at::Tensor>> pieces;  // (matrix ids, values [B', r] desc)

  auto store = [&](const at::Tensor& idx, const at::Tensor& r, const at::Tensor& s) {
    if (idx.numel() == 0) return;
    ranks.index_copy_(0, idx, r);
    pieces.emplace_back(idx, s);
  };

  // Evaluate the rule on intervals; returns the certified mask.
  auto certify = [&](const at::Tensor& idx, const at::Tensor& lo, const at::Tensor& hi,
                     const at::Tensor& tail, const at::Tensor& s) {
    const auto floor = s.select(1, 0) * p.rtol;
    auto out = Backend::rule(lo.contiguous(), hi.contiguous(), tail.contiguous(),
                             floor.contiguous(), thr.index_select(0, idx), k, p.rule,
                             p.min_ratio, false);
    const auto& r = std::get<0>(out);
    const auto& cert = std::get<1>(out);
    const auto good = idx.masked_select(cert);
    store(good, r.masked_select(cert), s.index_select(0, cert.nonzero().squeeze(1)));
    return cert;
  };

  // Float64 SVD for matrices the fast bounds could not decide.
  auto svd_exact = [&](const at::Tensor& idx) {
    if (idx.numel() == 0) return;
    const auto s = at::linalg_svdvals(take(A64, idx)).contiguous();
    const auto floor = s.select(1, 0) * p.rtol;
    auto out = Backend::rule(s, s, at::zeros({idx.numel()}, s.options()), floor.contiguous(),
                             thr.index_select(0, idx), k, p.rule, p.min_ratio, true);
    store(idx, std::get<0>(out), s);
  };

  auto gram_exact = [&](const at::Tensor& idx) {
    if (idx.numel() == 0) return;
    const auto a = take(A64, idx);
    const auto G = m >= n ? at::matmul(a.transpose(1, 2), a) : at::matmul(a, a.transpose(1, 2));
    const auto lam = at::linalg_eigvalsh(G).flip({-1}).clamp_min(0.0);
    const auto e = (fro2.index_select(0, idx) *
                    (2.0 * eps64 * static_cast<double>(std::max(m, n) + k))).unsqueeze(1);
    const auto lo = (lam - e).clamp_min(0.0).sqrt();
    const auto hi = (lam + e).sqrt();
    const auto cert = certify(idx, lo, hi, at::zeros({idx.numel()}, lam.options()), lam.sqrt());
    svd_exact(idx.masked_select(cert.logical_not()));
  };

  auto randomized = [&](at::Tensor idx) {
    int64_t l = std::min(k, p.sketch);
    while (idx.numel() > 0) {
      if (l >= k || static_cast<double>(l) > p.max_sketch_fraction * static_cast<double>(k)) {
        gram_exact(idx);  // a sketch this large costs as much as the exact path
        return;
      }
      const auto a = take(A, idx);
      const auto omega = Backend::gaussian(sample_ids.index_select(0, idx), n, l, p.seed, work);
      auto Q = shifted_cholesky_qr(at::matmul(a, omega));
      const auto at_ = a.transpose(1, 2);
      for (int64_t it = 0; it < p.n_iter; ++it) {
        const auto Z = shifted_cholesky_qr(at::matmul(at_, Q));
        Q = shifted_cholesky_qr(at::matmul(a, Z));
      }
      // the bounds need an exactly orthonormal basis: Householder QR in float64
      const auto Q64 = std::get<0>(at::linalg_qr(Q.to(at::kDouble)));
      const auto Bm = at::matmul(Q64.transpose(1, 2), take(A64, idx));  // [B', l, n]
      const auto lam = at::linalg_eigvalsh(at::matmul(Bm, Bm.transpose(1, 2))).flip({-1}).clamp_min(0.0);
      const auto f2 = fro2.index_select(0, idx);
      const auto slack = f2 * (2.0 * eps64 * static_cast<double>(m + n + l));
      const auto res2 = (f2 - Bm.square().sum({1, 2})).clamp_min(0.0) + slack;  // >= ||Res||_2^2
      const auto lo = (lam - slack.unsqueeze(1)).clamp_min(0.0).sqrt();
      const auto hi = (lam + (slack + res2).unsqueeze(1)).sqrt();
      const auto tail = at::minimum(res2.sqrt(), hi.select(1, l - 1));
      const auto cert = certify(idx, lo, hi, tail, lam.sqrt());
      idx = idx.masked_select(cert.logical_not());
      l = std::min(k, 2 * l);
    }
  };

  const auto all = at::arange(B, long_opts);
  if (p.method == 0) {
    gram_exact(all);
  } else {
    randomized(all);
  }

  int64_t r = 0;
  for (const auto& pc : pieces) r = std::max(r, pc.second.size(1));
  auto values = at::full({B, r}, std::numeric_limits<double>::quiet_NaN(), A64.options());
  for (const auto& pc : pieces) values.narrow(1, 0, pc.second.size(1)).index_copy_(0, pc.first, pc.second);
  return {ranks, values.to(work)};
}

}  // namespace mmh
