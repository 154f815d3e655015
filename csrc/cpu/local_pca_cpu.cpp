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

#include "../common/knn_checks.h"
#include "../common/simd.h"
#include "../kernels/symeig.h"

namespace mmh {
namespace {

// Lanczos for lambda_max in the FO count: at most this many steps, converged
// when two Ritz values 4 steps apart agree to this relative tolerance.
constexpr int kLanczosSteps = 48;
constexpr double kLanczosRtol = 1e-6;

constexpr int kPad = 16;  // S, W and the rows of Z are padded to multiples of this
inline int64_t padded(int64_t v) { return (v + kPad - 1) / kPad * kPad; }

// S[i0:i0+4, j0:j0+16] = Z^T Z summed over all rows of Z, for the blocks on
// or below the diagonal: 4 x 16 accumulators stay in registers while the
// rows of Z stream by (Z's row stride mp is a multiple of 16, padding zero).
template <typename T>
inline void syrk_lower_blocks(const T* __restrict Z, int rows, int mp, T* __restrict S) {
  for (int i0 = 0; i0 < mp; i0 += 4) {
    for (int j0 = 0; j0 < i0 + 4; j0 += kPad) {
      T acc[4][kPad] = {};
      for (int a = 0; a < rows; ++a) {
        const T* z = Z + static_cast<int64_t>(a) * mp;
        const T* zj = z + j0;
        const T z0 = z[i0], z1 = z[i0 + 1], z2 = z[i0 + 2], z3 = z[i0 + 3];
#pragma omp simd
        for (int jj = 0; jj < kPad; ++jj) {
          acc[0][jj] += z0 * zj[jj];
          acc[1][jj] += z1 * zj[jj];
          acc[2][jj] += z2 * zj[jj];
          acc[3][jj] += z3 * zj[jj];
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int jj = 0; jj < kPad; ++jj) S[static_cast<int64_t>(i0 + r) * mp + j0 + jj] = acc[r][jj];
    }
  }
}

// Z[a, j] = Y[j, a] - mean[a] for j < n, a < D (Z row stride ld): a
// transpose in column blocks of kPad, so that each row of Z receives kPad
// contiguous values per pass instead of one scattered value.
template <typename Tz, typename Ty>
inline void centred_transpose(const Ty* __restrict Y, int n, int64_t D, const double* __restrict mean,
                              Tz* __restrict Z, int64_t ld) {
  for (int j0 = 0; j0 < n; j0 += kPad) {
    const int jn = std::min(kPad, n - j0);
    for (int64_t a = 0; a < D; ++a) {
      Tz* za = Z + a * ld + j0;
      for (int jj = 0; jj < jn; ++jj)
        za[jj] = static_cast<Tz>(Y[static_cast<int64_t>(j0 + jj) * D + a] - mean[a]);
    }
  }
}

// Gather the n points of a neighbourhood, centre them on their mean and form
// S = Z^T Z / (n - 1): Z = centred points [n, D] when n > D (covariance,
// order D), Z = their transpose [D, n] otherwise (Gram, order n). Points are
// first shifted by the first neighbour, so exact copies give exact zeros and
// the mean is taken over small differences. Returns the order m of S, whose
// row stride is padded(m) (entries past m are zero).
template <typename T>
inline int neighbourhood_matrix(const T* __restrict x, int64_t D, const int64_t* __restrict idx,
                                int n, T* __restrict Y, T* __restrict Z, double* __restrict mean,
                                T* __restrict S) {
  const T* x0 = x + idx[0] * D;
  for (int64_t a = 0; a < D; ++a) mean[a] = 0.0;
  for (int j = 0; j < n; ++j) {
    const T* xj = x + idx[j] * D;
    T* yj = Y + static_cast<int64_t>(j) * D;
    for (int64_t a = 0; a < D; ++a) yj[a] = xj[a] - x0[a];
    for (int64_t a = 0; a < D; ++a) mean[a] += static_cast<double>(yj[a]);
  }
  const double inv_n = 1.0 / n;
  for (int64_t a = 0; a < D; ++a) mean[a] *= inv_n;
  const bool cov = n > D;
  const int m = cov ? static_cast<int>(D) : n;     // order of S
  const int rows = cov ? n : static_cast<int>(D);  // rows of Z
  const int mp = static_cast<int>(padded(m));
  for (int a = 0; a < rows; ++a)
    for (int i = m; i < mp; ++i) Z[static_cast<int64_t>(a) * mp + i] = T(0);
  if (cov) {
    for (int j = 0; j < n; ++j) {
      const T* yj = Y + static_cast<int64_t>(j) * D;
      T* zj = Z + static_cast<int64_t>(j) * mp;
      for (int64_t a = 0; a < D; ++a) zj[a] = static_cast<T>(yj[a] - mean[a]);
    }
  } else {
    centred_transpose(Y, n, D, mean, Z, mp);
  }
  syrk_lower_blocks(Z, rows, mp, S);
  const T scale = static_cast<T>(1.0 / (n - 1));
  for (int i = 0; i < mp; ++i) {
    T* si = S + static_cast<int64_t>(i) * mp;
    for (int j = 0; j <= i; ++j) {
      si[j] *= scale;
      S[static_cast<int64_t>(j) * mp + i] = si[j];
    }
  }
  return m;
}

struct Workspace {
  int64_t D, K, m, mp;
  Workspace(int64_t D_, int64_t K_)
      : D(D_), K(K_), m(std::min(D_, K_)), mp(padded(std::min(D_, K_))) {}
  int64_t y() const { return K * D; }
  int64_t z() const { return std::max(K * padded(D), D * padded(K)); }
  int64_t s() const { return mp * mp; }
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
    symeig::eigenvalues(S, m, static_cast<int>(padded(m)), ev, e, work);
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
  const int ld = static_cast<int>(padded(m));
  double trace = 0.0;
  for (int i = 0; i < m; ++i) trace += static_cast<double>(S[static_cast<int64_t>(i) * ld + i]);
  if (!(trace > 0.0)) {
    *lam_max = T(0);
    return 0;  // every variance is 0: none exceeds alpha * 0
  }
  double theta = 0.0;
  // ev / e double as the Lanczos tridiagonal (at most kLanczosSteps <= m).
  const bool ok = symeig::lanczos_top(S, m, ld, kLanczosSteps, kLanczosRtol, &theta, work,
                                      work + m, work + 2 * m, ev, e);
  if (ok && theta > 0.0) {
    *lam_max = static_cast<T>(theta);
    return symeig::count_above(S, m, ld, static_cast<T>(alpha * theta), W, ld, work, work + m);
  }
  // Lanczos did not settle: take the full spectrum (S is intact).
  symeig::eigenvalues(S, m, ld, ev, e, work);
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

// TwoNN ratios inside one neighbourhood: for each of its K points, mu =
// r2 / r1, its second and first nearest distances to the other K - 1. The
// two nearest come from the Gram matrix of the centred points (float64,
// register-blocked); their distances are then recomputed as sums of squared
// differences of the original values, so exact copies give exactly 0.
template <typename T>
inline void twonn_impl(const T* __restrict x, int64_t D, const int64_t* __restrict idx, int K,
                       double* __restrict Y, double* __restrict Z, double* __restrict mean,
                       double* __restrict G, double* __restrict out) {
  const T* x0 = x + idx[0] * D;
  for (int64_t a = 0; a < D; ++a) mean[a] = 0.0;
  for (int j = 0; j < K; ++j) {
    const T* xj = x + idx[j] * D;
    double* yj = Y + static_cast<int64_t>(j) * D;
    for (int64_t a = 0; a < D; ++a) yj[a] = static_cast<double>(xj[a]) - static_cast<double>(x0[a]);
    for (int64_t a = 0; a < D; ++a) mean[a] += yj[a];
  }
  for (int64_t a = 0; a < D; ++a) mean[a] /= K;
  const int kp = static_cast<int>(padded(K));
  for (int64_t a = 0; a < D; ++a) {
    double* za = Z + a * kp;
    for (int j = K; j < kp; ++j) za[j] = 0.0;
  }
  centred_transpose(Y, K, D, mean, Z, kp);
  syrk_lower_blocks(Z, static_cast<int>(D), kp, G);  // lower blocks of Yc Yc^T
  for (int i = 0; i < K; ++i) {
    const double gii = G[static_cast<int64_t>(i) * kp + i];
    double b1 = INFINITY, b2 = INFINITY;
    int j1 = -1, j2 = -1;
    for (int j = 0; j < K; ++j) {
      if (j == i) continue;
      const double gij = j < i ? G[static_cast<int64_t>(i) * kp + j] : G[static_cast<int64_t>(j) * kp + i];
      const double d2 = gii + G[static_cast<int64_t>(j) * kp + j] - 2.0 * gij;
      if (d2 < b1) {
        b2 = b1;
        j2 = j1;
        b1 = d2;
        j1 = j;
      } else if (d2 < b2) {
        b2 = d2;
        j2 = j;
      }
    }
    const T* xi = x + idx[i] * D;
    double r[2];
    const int js[2] = {j1, j2};
    for (int t = 0; t < 2; ++t) {
      const T* xj = x + idx[js[t]] * D;
      double s2 = 0.0;
#pragma omp simd reduction(+ : s2)
      for (int64_t a = 0; a < D; ++a) {
        const double u = static_cast<double>(xi[a]) - static_cast<double>(xj[a]);
        s2 += u * u;
      }
      r[t] = std::sqrt(s2);
    }
    const double r1 = std::min(r[0], r[1]), r2 = std::max(r[0], r[1]);
    out[i] = r2 / r1;  // inf or NaN when r1 == 0, as the division gives
  }
}

MMH_SIMD_CLONES void twonn_row(const float* x, int64_t D, const int64_t* idx, int K, double* Y,
                               double* Z, double* mean, double* G, double* out) {
  twonn_impl(x, D, idx, K, Y, Z, mean, G, out);
}
MMH_SIMD_CLONES void twonn_row(const double* x, int64_t D, const int64_t* idx, int K, double* Y,
                               double* Z, double* mean, double* G, double* out) {
  twonn_impl(x, D, idx, K, Y, Z, mean, G, out);
}

}  // namespace

at::Tensor local_pca_cpu(const at::Tensor& data, const at::Tensor& neighbors,
                         const c10::optional<at::Tensor>& sizes) {
  check_neighbourhoods(data, neighbors, /*cuda=*/false);
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  const at::Tensor sz = check_sizes(sizes, M, K, /*cuda=*/false);
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
      std::vector<scalar_t> Y(ws.y()), Z(ws.z()), S(ws.s()), work(2 * ws.m);
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
  check_neighbourhoods(data, neighbors, /*cuda=*/false);
  MMH_CHECK_VALUE(alpha > 0.0 && alpha < 1.0, "alpha must be in (0, 1), got ", alpha);
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  check_sizes(c10::nullopt, M, K, /*cuda=*/false);  // K >= 2
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
      std::vector<scalar_t> Y(ws.y()), Z(ws.z()), S(ws.s()), W(ws.s()), work(3 * ws.m);
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

at::Tensor twonn_ratios_cpu(const at::Tensor& data, const at::Tensor& neighbors) {
  check_neighbourhoods(data, neighbors, /*cuda=*/false);
  const auto x = data.contiguous();
  const auto nb = neighbors.contiguous();
  const int64_t M = nb.size(0), K = nb.size(1), D = x.size(1);
  MMH_CHECK_VALUE(K >= 3, "TwoNN needs neighbourhoods of at least 3 points, got K = ", K);
  auto out = at::empty({M, K}, x.options().dtype(at::kDouble));
  if (M == 0) return out;
  const int64_t kp = padded(K);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "twonn_ratios_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* ip = nb.data_ptr<int64_t>();
    double* op = out.data_ptr<double>();
    at::parallel_for(0, M, 8, [&](int64_t b, int64_t e_) {
      std::vector<double> Y(K * D), Z(D * kp), G(kp * kp), mean(D);
      for (int64_t i = b; i < e_; ++i) {
        twonn_row(xp, D, ip + i * K, static_cast<int>(K), Y.data(), Z.data(), mean.data(), G.data(),
                  op + i * K);
      }
    });
  });
  return out;
}

}  // namespace mmh
