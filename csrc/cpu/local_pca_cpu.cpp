// Local PCA on the CPU: one neighbourhood per task item, all work in
// per-thread buffers that fit in L2 (gather, centring, covariance or Gram,
// eigenvalues or the FO count), parallel over rows with at::parallel_for.
#include "local_pca_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "../common/simd.h"
#include "../kernels/symeig.h"

namespace mmh {
namespace {

// Lanczos for lambda_max in the FO count: at most this many steps, converged
// when two Ritz values 4 steps apart agree to this relative tolerance.
constexpr int kLanczosSteps = 48;
constexpr double kLanczosRtol = 1e-6;

// Gather the n points of a neighbourhood, centre them on their mean and form
// S = Z^T Z / (n - 1): Z = centred points [n, D] when n > D (covariance,
// order D), Z = their transpose [D, n] otherwise (Gram, order n). Points are
// first shifted by the first neighbour, so exact copies give exact zeros and
// the mean is taken over small differences. Returns the order of S.
template <typename T>
inline int neighbourhood_matrix(const T* __restrict x, int64_t D, const int64_t* __restrict idx,
                                int n, T* __restrict Y, T* __restrict Z, double* __restrict mean,
                                T* __restrict S) {
  const T* x0 = x + idx[0] * D;
  for (int64_t a = 0; a < D; ++a) mean[a] = 0.0;
  for (int j = 0; j < n; ++j) {
    const T* xj = x + idx[j] * D;
    T* yj = Y + static_cast<int64_t>(j) * D;
    for (int64_t a = 0; a < D; ++a) {
      yj[a] = xj[a] - x0[a];
      mean[a] += static_cast<double>(yj[a]);
    }
  }
  const double inv_n = 1.0 / n;
  for (int64_t a = 0; a < D; ++a) mean[a] *= inv_n;
  const bool cov = n > D;
  const int m = cov ? static_cast<int>(D) : n;     // order of S
  const int rows = cov ? n : static_cast<int>(D);  // rows of Z
  if (cov) {
    for (int j = 0; j < n; ++j) {
      T* yj = Y + static_cast<int64_t>(j) * D;
      for (int64_t a = 0; a < D; ++a) yj[a] = static_cast<T>(yj[a] - mean[a]);
    }
    Z = Y;
  } else {
    for (int j = 0; j < n; ++j) {
      const T* yj = Y + static_cast<int64_t>(j) * D;
      for (int64_t a = 0; a < D; ++a) Z[a * n + j] = static_cast<T>(yj[a] - mean[a]);
    }
  }
  // Lower triangle of Z^T Z, four rows of Z per pass over S.
  for (int i = 0; i < m; ++i)
    for (int j = 0; j <= i; ++j) S[static_cast<int64_t>(i) * m + j] = 0;
  int a = 0;
  for (; a + 4 <= rows; a += 4) {
    const T* z0 = Z + static_cast<int64_t>(a) * m;
    const T* z1 = z0 + m;
    const T* z2 = z1 + m;
    const T* z3 = z2 + m;
    for (int i = 0; i < m; ++i) {
      const T a0 = z0[i], a1 = z1[i], a2 = z2[i], a3 = z3[i];
      T* si = S + static_cast<int64_t>(i) * m;
      for (int j = 0; j <= i; ++j) si[j] += a0 * z0[j] + a1 * z1[j] + a2 * z2[j] + a3 * z3[j];
    }
  }
  for (; a < rows; ++a) {
    const T* z0 = Z + static_cast<int64_t>(a) * m;
    for (int i = 0; i < m; ++i) {
      const T a0 = z0[i];
      T* si = S + static_cast<int64_t>(i) * m;
      for (int j = 0; j <= i; ++j) si[j] += a0 * z0[j];
    }
  }
  const T scale = static_cast<T>(1.0 / (n - 1));
  for (int i = 0; i < m; ++i) {
    T* si = S + static_cast<int64_t>(i) * m;
    for (int j = 0; j <= i; ++j) {
      si[j] *= scale;
      S[static_cast<int64_t>(j) * m + i] = si[j];
    }
  }
  return m;
}

struct Workspace {
  int64_t D, K, m;
  Workspace(int64_t D_, int64_t K_) : D(D_), K(K_), m(std::min(D_, K_)) {}
  int64_t y() const { return K * D; }
  int64_t s() const { return m * m; }
};

// Spectrum of one neighbourhood into out[0..m_out) (descending, >= 0, padded
// with zeros up to m_out).
template <typename T>
inline void spectrum_impl(const T* x, int64_t D, const int64_t* idx, int n, int64_t m_out,
                          T* Y, T* Z, double* mean, T* S, double* ev, double* e, T* work,
                          T* out) {
  int64_t filled = 0;
  if (n >= 2) {
    const int m = neighbourhood_matrix(x, D, idx, n, Y, Z, mean, S);
    symeig::eigenvalues(S, m, m, ev, e, work);
    const int64_t keep = std::min<int64_t>(m, m_out);
    for (int64_t i = 0; i < keep; ++i) out[i] = static_cast<T>(ev[i] > 0.0 ? ev[i] : 0.0);
    filled = keep;
  }
  for (int64_t i = filled; i < m_out; ++i) out[i] = T(0);
}

MMH_SIMD_CLONES void spectrum(const float* x, int64_t D, const int64_t* idx, int n, int64_t m_out,
                              float* Y, float* Z, double* mean, float* S, double* ev, double* e,
                              float* work, float* out) {
  spectrum_impl(x, D, idx, n, m_out, Y, Z, mean, S, ev, e, work, out);
}
MMH_SIMD_CLONES void spectrum(const double* x, int64_t D, const int64_t* idx, int n,
                              int64_t m_out, double* Y, double* Z, double* mean, double* S,
                              double* ev, double* e, double* work, double* out) {
  spectrum_impl(x, D, idx, n, m_out, Y, Z, mean, S, ev, e, work, out);
}

// FO count of one neighbourhood (see local_pca_cpu.h). Returns the count and
// writes the largest eigenvalue.
template <typename T>
inline int64_t count_impl(const T* x, int64_t D, const int64_t* idx, int n, double alpha, T* Y,
                          T* Z, double* mean, T* S, T* W, double* ev, double* e, T* work,
                          T* lam_max) {
  const int m = neighbourhood_matrix(x, D, idx, n, Y, Z, mean, S);
  double trace = 0.0;
  for (int i = 0; i < m; ++i) trace += static_cast<double>(S[static_cast<int64_t>(i) * m + i]);
  if (!(trace > 0.0)) {
    *lam_max = T(0);
    return 0;  // every variance is 0: none exceeds alpha * 0
  }
  double theta = 0.0;
  // ev / e double as the Lanczos tridiagonal (at most kLanczosSteps <= m).
  const bool ok = symeig::lanczos_top(S, m, m, kLanczosSteps, kLanczosRtol, &theta, work,
                                      work + m, work + 2 * m, ev, e);
  if (ok && theta > 0.0) {
    *lam_max = static_cast<T>(theta);
    return symeig::count_above(S, m, m, static_cast<T>(alpha * theta), W, m, work, work + m);
  }
  // Lanczos did not settle: take the full spectrum (S is intact).
  symeig::eigenvalues(S, m, m, ev, e, work);
  const double top = ev[0] > 0.0 ? ev[0] : 0.0;
  const T thr = static_cast<T>(alpha) * static_cast<T>(top);
  int64_t c = 0;
  for (int i = 0; i < m; ++i) c += static_cast<T>(ev[i] > 0.0 ? ev[i] : 0.0) > thr;
  *lam_max = static_cast<T>(top);
  return c;
}

MMH_SIMD_CLONES int64_t count_fo(const float* x, int64_t D, const int64_t* idx, int n,
                                 double alpha, float* Y, float* Z, double* mean, float* S,
                                 float* W, double* ev, double* e, float* work, float* lam_max) {
  return count_impl(x, D, idx, n, alpha, Y, Z, mean, S, W, ev, e, work, lam_max);
}
MMH_SIMD_CLONES int64_t count_fo(const double* x, int64_t D, const int64_t* idx, int n,
                                 double alpha, double* Y, double* Z, double* mean, double* S,
                                 double* W, double* ev, double* e, double* work, double* lam_max) {
  return count_impl(x, D, idx, n, alpha, Y, Z, mean, S, W, ev, e, work, lam_max);
}

void check_inputs(const at::Tensor& data, const at::Tensor& neighbors) {
  MMH_CHECK_DIM(data, 2, "data");
  MMH_CHECK_DIM(neighbors, 2, "neighbors");
  MMH_CHECK_CPU(data, "data");
  MMH_CHECK_CPU(neighbors, "neighbors");
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

}  // namespace

at::Tensor local_pca_cpu(const at::Tensor& data, const at::Tensor& neighbors,
                         const c10::optional<at::Tensor>& sizes) {
  check_inputs(data, neighbors);
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  at::Tensor sz;
  if (sizes.has_value()) {
    sz = sizes->contiguous();
    MMH_CHECK_DIM(sz, 1, "sizes");
    MMH_CHECK_CPU(sz, "sizes");
    MMH_CHECK_TYPE(sz.scalar_type() == at::kLong, "sizes must be int64, got ", sz.scalar_type());
    MMH_CHECK_VALUE(sz.size(0) == M, "sizes has ", sz.size(0), " entries for ", M, " rows");
    if (M > 0) {
      MMH_CHECK_VALUE(sz.min().item<int64_t>() >= 0 && sz.max().item<int64_t>() <= K,
                      "sizes must be in [0, ", K, "]");
    }
  } else {
    MMH_CHECK_VALUE(K >= 2, "a neighbourhood needs at least 2 points, got K = ", K);
  }
  const int64_t m_out = std::min(K, D);
  auto out = at::zeros({M, m_out}, x.options());
  if (M == 0 || m_out == 0) return out;
  const int64_t* size_p = sz.defined() ? sz.data_ptr<int64_t>() : nullptr;
  const Workspace ws(D, K);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "local_pca_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ip = nb.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 8, [&](int64_t b, int64_t e_) {
      std::vector<scalar_t> Y(ws.y()), Z(ws.y()), S(ws.s()), work(2 * ws.m);
      std::vector<double> mean(D), ev(ws.m), e(ws.m);
      for (int64_t i = b; i < e_; ++i) {
        const int n = static_cast<int>(size_p ? size_p[i] : K);
        spectrum(xp, D, ip + i * K, n, m_out, Y.data(), Z.data(), mean.data(), S.data(),
                 ev.data(), e.data(), work.data(), op + i * m_out);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> local_pca_count_cpu(const at::Tensor& data,
                                                       const at::Tensor& neighbors,
                                                       double alpha) {
  check_inputs(data, neighbors);
  MMH_CHECK_VALUE(alpha > 0.0 && alpha < 1.0, "alpha must be in (0, 1), got ", alpha);
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  MMH_CHECK_VALUE(K >= 2, "a neighbourhood needs at least 2 points, got K = ", K);
  auto counts = at::zeros({M}, x.options().dtype(at::kLong));
  auto lmax = at::zeros({M}, x.options());
  if (M == 0) return {counts, lmax};
  const Workspace ws(D, K);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "local_pca_count_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ip = nb.data_ptr<int64_t>();
    int64_t* cp = counts.data_ptr<int64_t>();
    scalar_t* lp = lmax.data_ptr<scalar_t>();
    at::parallel_for(0, M, 8, [&](int64_t b, int64_t e_) {
      std::vector<scalar_t> Y(ws.y()), Z(ws.y()), S(ws.s()), W(ws.s()), work(3 * ws.m);
      std::vector<double> mean(D), ev(ws.m + kLanczosSteps), e(ws.m + kLanczosSteps);
      for (int64_t i = b; i < e_; ++i) {
        cp[i] = count_fo(xp, D, ip + i * K, static_cast<int>(K), alpha, Y.data(), Z.data(),
                         mean.data(), S.data(), W.data(), ev.data(), e.data(), work.data(),
                         lp + i);
      }
    });
  });
  return {counts, lmax};
}

}  // namespace mmh
