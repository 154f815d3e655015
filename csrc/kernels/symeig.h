// Small dense symmetric eigenproblems, one matrix at a time, torch-free and
// usable from host and device code. Matrices are full (both triangles), row
// major, n x n with row stride lda, and are overwritten.
//
//  * eigenvalues(): Householder reduction to tridiagonal form (working
//    precision) followed by implicit symmetric QR steps with Wilkinson
//    shifts on the tridiagonal matrix (float64). All eigenvalues, descending.
//  * count_above(): Sylvester's law of inertia. An LDL^T factorisation of
//    A - s I with Bunch-Kaufman pivoting (1x1 and 2x2 blocks) is congruent to
//    A - s I, so the number of positive eigenvalues of the block diagonal D,
//    i.e. the number of eigenvalues of A above s, is read off its blocks: a
//    1x1 block by its sign, a 2x2 block by its determinant and trace. About
//    n^3/6 multiply-adds (lower triangle) against about n^3 for the reduction
//    to tridiagonal form as done here.
//  * lanczos_top(): the largest eigenvalue by a short Lanczos run (Ritz
//    values converge much faster than power iterations when the top
//    eigenvalues are close, as on a curved d-dimensional neighbourhood).
//
// The loops are plain so that a caller compiled with SIMD clones vectorises
// them (updates are row-wise axpys on contiguous memory).
#pragma once

#include <cmath>
#include <cstdint>

#ifndef MMH_HD
#if defined(__CUDACC__)
#define MMH_HD __host__ __device__ __forceinline__
#else
#define MMH_HD inline
#endif
#endif

namespace mmh {
namespace symeig {

template <typename T>
MMH_HD T abs_(T v) {
  return v < T(0) ? -v : v;
}

// Householder tridiagonalisation: on return d[0..n) is the diagonal and
// e[0..n-1) the off-diagonal of a tridiagonal matrix with the eigenvalues of
// A. v and w are workspaces of n entries each.
template <typename T>
MMH_HD void tridiagonalize(T* A, int n, int lda, double* d, double* e, T* v, T* w) {
  for (int j = 0; j + 2 < n; ++j) {
    T* row = A + static_cast<int64_t>(j) * lda;
    const int m = n - j - 1;        // entries below the diagonal in column j
    const T* x = row + j + 1;       // = column j below the diagonal (symmetry)
    d[j] = static_cast<double>(row[j]);
    T sigma = 0;
    for (int i = 1; i < m; ++i) sigma += x[i] * x[i];
    const T x0 = x[0];
    if (sigma == T(0)) {  // column already reduced: no reflection needed
      e[j] = static_cast<double>(x0);
      continue;
    }
    const T norm = std::sqrt(x0 * x0 + sigma);
    const T alpha = x0 >= T(0) ? -norm : norm;  // H x = alpha e_1
    v[0] = x0 - alpha;                           // no cancellation: opposite signs
    for (int i = 1; i < m; ++i) v[i] = x[i];
    const T beta = T(2) / (v[0] * v[0] + sigma);  // H = I - beta v v^T
    e[j] = static_cast<double>(alpha);
    // Trailing block B = A[j+1:, j+1:]; p = beta B v (axpy form over rows,
    // which equal columns by symmetry).
    T* B = A + static_cast<int64_t>(j + 1) * lda + (j + 1);
    for (int c = 0; c < m; ++c) w[c] = 0;
    for (int r = 0; r < m; ++r) {
      const T vr = beta * v[r];
      const T* br = B + static_cast<int64_t>(r) * lda;
      for (int c = 0; c < m; ++c) w[c] += vr * br[c];
    }
    T vp = 0;
    for (int c = 0; c < m; ++c) vp += v[c] * w[c];
    const T K = T(0.5) * beta * vp;
    for (int c = 0; c < m; ++c) w[c] -= K * v[c];
    // B <- H B H = B - v w^T - w v^T
    for (int r = 0; r < m; ++r) {
      T* br = B + static_cast<int64_t>(r) * lda;
      const T vr = v[r], wr = w[r];
      for (int c = 0; c < m; ++c) br[c] -= vr * w[c] + wr * v[c];
    }
  }
  if (n >= 2) {
    d[n - 2] = static_cast<double>(A[static_cast<int64_t>(n - 2) * lda + (n - 2)]);
    d[n - 1] = static_cast<double>(A[static_cast<int64_t>(n - 1) * lda + (n - 1)]);
    e[n - 2] = static_cast<double>(A[static_cast<int64_t>(n - 2) * lda + (n - 1)]);
  } else if (n == 1) {
    d[0] = static_cast<double>(A[0]);
  }
}

// Eigenvalues of the symmetric tridiagonal (d, e) by implicit QR steps with
// Wilkinson shifts, eigenvalues only. d is overwritten by the eigenvalues
// (unsorted), e is destroyed. Returns false if some block failed to converge
// within 60 steps per eigenvalue (the values are then approximate).
MMH_HD bool tridiagonal_eigenvalues(double* d, double* e, int n) {
  const double eps = 2.220446049250313e-16;
  bool ok = true;
  int hi = n - 1;
  int steps = 0;
  while (hi > 0) {
    if (abs_(e[hi - 1]) <= eps * (abs_(d[hi - 1]) + abs_(d[hi]))) {
      e[hi - 1] = 0.0;
      --hi;
      steps = 0;
      continue;
    }
    if (++steps > 60) {  // give up on this eigenvalue, keep going
      ok = false;
      e[hi - 1] = 0.0;
      --hi;
      steps = 0;
      continue;
    }
    int lo = hi - 1;
    while (lo > 0 && abs_(e[lo - 1]) > eps * (abs_(d[lo - 1]) + abs_(d[lo]))) --lo;
    // Wilkinson shift: the eigenvalue of the trailing 2x2 block nearer d[hi].
    const double t = 0.5 * (d[hi - 1] - d[hi]);
    const double b2 = e[hi - 1] * e[hi - 1];
    const double den = t + (t >= 0.0 ? 1.0 : -1.0) * std::sqrt(t * t + b2);
    const double mu = d[hi] - b2 / den;
    // Chase the bulge down the block with Givens rotations M = [c -s; s c]
    // applied as T <- M T M^T on rows/columns (i, i+1).
    double x = d[lo] - mu, z = e[lo];
    for (int i = lo; i < hi; ++i) {
      const double r = std::sqrt(x * x + z * z);
      double c = 1.0, s = 0.0;
      if (r > 0.0) {
        const double inv = 1.0 / r;
        c = x * inv;
        s = -z * inv;
      }
      if (i > lo) e[i - 1] = r;
      const double a = d[i], b = e[i], cc = d[i + 1];
      const double cs = c * s, c2 = c * c, s2 = s * s;
      d[i] = c2 * a - 2.0 * cs * b + s2 * cc;
      d[i + 1] = s2 * a + 2.0 * cs * b + c2 * cc;
      e[i] = cs * a + (c2 - s2) * b - cs * cc;
      if (i + 1 < hi) {
        x = e[i];
        z = -s * e[i + 1];  // the bulge at (i, i+2)
        e[i + 1] *= c;
      }
    }
  }
  return ok;
}

// Sort descending (insertion sort; n is small).
MMH_HD void sort_descending(double* d, int n) {
  for (int a = 1; a < n; ++a) {
    const double v = d[a];
    int b = a - 1;
    while (b >= 0 && d[b] < v) {
      d[b + 1] = d[b];
      --b;
    }
    d[b + 1] = v;
  }
}

// All eigenvalues of A (destroyed), descending, into ev[0..n). work: 2n of T
// and 2n doubles (d, e). Returns false on non-convergence (see above).
template <typename T>
MMH_HD bool eigenvalues(T* A, int n, int lda, double* ev, double* e, T* work) {
  tridiagonalize(A, n, lda, ev, e, work, work + n);
  const bool ok = n > 1 ? tridiagonal_eigenvalues(ev, e, n) : true;
  sort_descending(ev, n);
  return ok;
}

// Number of eigenvalues of A strictly greater than s, by the inertia of an
// LDL^T factorisation of A - s I with Bunch-Kaufman pivoting (alpha =
// (1 + sqrt 17) / 8). Only the lower triangle of W (n x n, row stride ldw)
// is used; it receives A - s I and is destroyed, A is left intact. c0, c1:
// workspaces of n entries (copies of the pivot columns, so that the trailing
// updates are contiguous row-wise axpys). About n^3 / 6 multiply-adds.
template <typename T>
MMH_HD int count_above(const T* A, int n, int lda, T s, T* W, int ldw, T* c0, T* c1) {
  for (int i = 0; i < n; ++i) {
    const T* ar = A + static_cast<int64_t>(i) * lda;
    T* wr = W + static_cast<int64_t>(i) * ldw;
    for (int j = 0; j <= i; ++j) wr[j] = ar[j];
    wr[i] -= s;
  }
  const T bk = T(0.6403882032022076);
  int positive = 0;
  int k = 0;
  // Lower-triangle element (i, j), i >= j.
#define MMH_W(i, j) W[static_cast<int64_t>(i) * ldw + (j)]
  while (k < n) {
    const T akk = abs_(MMH_W(k, k));
    T lam = 0;
    int r = k;
    for (int i = k + 1; i < n; ++i) {
      const T v = abs_(MMH_W(i, k));
      if (v > lam) {
        lam = v;
        r = i;
      }
    }
    if (akk == T(0) && lam == T(0)) {  // zero column: an eigenvalue equal to s
      ++k;
      continue;
    }
    int swap_to = -1;  // index swapped with r (k: 1x1 pivot, k+1: 2x2 pivot)
    bool two = false;
    if (akk < bk * lam) {
      T sigma = 0;  // largest off-diagonal of row/column r within the trailing block
      for (int j = k; j < r; ++j) sigma = abs_(MMH_W(r, j)) > sigma ? abs_(MMH_W(r, j)) : sigma;
      for (int i = r + 1; i < n; ++i) sigma = abs_(MMH_W(i, r)) > sigma ? abs_(MMH_W(i, r)) : sigma;
      if (akk * sigma >= bk * lam * lam) {
        // 1x1 pivot at k
      } else if (abs_(MMH_W(r, r)) >= bk * sigma) {
        swap_to = k;
      } else {
        swap_to = k + 1;
        two = true;
      }
    }
    if (swap_to >= 0 && swap_to != r) {
      // Symmetric swap of indices a < b in lower storage (rows/cols >= k).
      const int a = swap_to, b = r;
      T t = MMH_W(a, a);
      MMH_W(a, a) = MMH_W(b, b);
      MMH_W(b, b) = t;
      for (int j = k; j < a; ++j) {
        t = MMH_W(a, j);
        MMH_W(a, j) = MMH_W(b, j);
        MMH_W(b, j) = t;
      }
      for (int i = a + 1; i < b; ++i) {
        t = MMH_W(i, a);
        MMH_W(i, a) = MMH_W(b, i);
        MMH_W(b, i) = t;
      }
      for (int i = b + 1; i < n; ++i) {
        t = MMH_W(i, a);
        MMH_W(i, a) = MMH_W(i, b);
        MMH_W(i, b) = t;
      }
    }
    if (!two) {
      const T p = MMH_W(k, k);
      if (p > T(0)) ++positive;
      for (int i = k + 1; i < n; ++i) c0[i] = MMH_W(i, k);
      for (int i = k + 1; i < n; ++i) {
        const T f = c0[i] / p;
        T* wi = W + static_cast<int64_t>(i) * ldw;
        for (int j = k + 1; j <= i; ++j) wi[j] -= f * c0[j];
      }
      k += 1;
    } else {
      const T a = MMH_W(k, k), b = MMH_W(k + 1, k), c = MMH_W(k + 1, k + 1);
      const T det = a * c - b * b;
      if (det < T(0)) {
        ++positive;  // one positive, one negative eigenvalue
      } else if (det > T(0)) {
        if (a + c > T(0)) positive += 2;
      } else if (a + c > T(0)) {
        ++positive;  // one zero eigenvalue, the other of the trace's sign
      }
      if (det != T(0)) {
        for (int i = k + 2; i < n; ++i) {
          c0[i] = MMH_W(i, k);
          c1[i] = MMH_W(i, k + 1);
        }
        for (int i = k + 2; i < n; ++i) {
          const T u = c0[i], v = c1[i];
          const T f1 = (c * u - b * v) / det;
          const T f2 = (a * v - b * u) / det;
          T* wi = W + static_cast<int64_t>(i) * ldw;
          for (int j = k + 2; j <= i; ++j) wi[j] -= f1 * c0[j] + f2 * c1[j];
        }
      }
      k += 2;
    }
  }
#undef MMH_W
  return positive;
}

// Largest eigenvalue of the symmetric tridiagonal (a[0..m), b[0..m-1)) to
// relative accuracy rtol, by bisection on Sturm counts between lo (a lower
// bound) and a Gershgorin upper bound.
MMH_HD double tridiagonal_top(const double* a, const double* b, int m, double lo, double rtol) {
  double hi = -1e308;
  for (int i = 0; i < m; ++i) {
    const double r = a[i] + (i > 0 ? abs_(b[i - 1]) : 0.0) + (i + 1 < m ? abs_(b[i]) : 0.0);
    hi = r > hi ? r : hi;
  }
  if (!(lo < hi)) return hi;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (hi - lo <= rtol * abs_(hi) || mid <= lo || mid >= hi) break;
    // Count eigenvalues below mid: negative pivots of T - mid I.
    int below = 0;
    double q = a[0] - mid;
    below += q < 0.0;
    for (int i = 1; i < m; ++i) {
      const double qq = q != 0.0 ? q : 1e-300;
      q = a[i] - mid - b[i - 1] * b[i - 1] / qq;
      below += q < 0.0;
    }
    if (below == m) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return hi;
}

// Largest eigenvalue of a symmetric positive semi-definite A by the Lanczos
// process (no reorthogonalisation: the largest Ritz value converges first
// and is not disturbed by the later loss of orthogonality). The start vector
// is a fixed irregular positive vector, so it is not orthogonal to the top
// eigenvector by some symmetry of the data. Ritz values are checked every 4
// steps from step 8; returns true when two checks agree to rtol (*theta = the
// last, a lower bound of lambda_max up to rounding) or the Krylov space is
// exhausted, false when max_steps is reached first. q0, q1, w: n entries;
// ta, tb: max_steps entries.
template <typename T>
MMH_HD bool lanczos_top(const T* A, int n, int lda, int max_steps, double rtol, double* theta,
                        T* q0, T* q1, T* w, double* ta, double* tb) {
  double nrm = 0.0;
  for (int i = 0; i < n; ++i) {
    const double g = 0.6180339887498949 * (i + 1);
    const double r = 0.5 + (g - static_cast<double>(static_cast<int64_t>(g)));  // in [0.5, 1.5)
    q1[i] = static_cast<T>(r);
    q0[i] = T(0);
    nrm += r * r;
  }
  const T inv0 = static_cast<T>(1.0 / std::sqrt(nrm));
  for (int i = 0; i < n; ++i) q1[i] *= inv0;
  const int steps_max = max_steps < n ? max_steps : n;
  double beta_prev = 0.0, last = -1.0;
  for (int j = 0; j < steps_max; ++j) {
    for (int i = 0; i < n; ++i) w[i] = static_cast<T>(-beta_prev) * q0[i];
    for (int r = 0; r < n; ++r) {  // w += A q1 as a sum of rows (= columns)
      const T qr = q1[r];
      const T* ar = A + static_cast<int64_t>(r) * lda;
      for (int i = 0; i < n; ++i) w[i] += qr * ar[i];
    }
    double al = 0.0;
    for (int i = 0; i < n; ++i) al += static_cast<double>(w[i]) * q1[i];
    ta[j] = al;
    double bb = 0.0;
    for (int i = 0; i < n; ++i) {
      w[i] -= static_cast<T>(al) * q1[i];
      bb += static_cast<double>(w[i]) * w[i];
    }
    const double be = std::sqrt(bb);
    const int m = j + 1;
    const bool exhausted = be <= 1e-12 * (abs_(al) + beta_prev) || m == n;
    if (exhausted || (m >= 8 && m % 4 == 0) || m == steps_max) {
      const double th = tridiagonal_top(ta, tb, m, last > 0.0 ? last : 0.0, 1e-3 * rtol);
      if (exhausted || (last > 0.0 && th - last <= rtol * th)) {
        *theta = th;
        return true;
      }
      last = th;
    }
    tb[j] = be;
    beta_prev = be;
    const T inv = static_cast<T>(1.0 / be);
    for (int i = 0; i < n; ++i) {
      q0[i] = q1[i];
      q1[i] = w[i] * inv;
    }
  }
  *theta = last;
  return false;
}

}  // namespace symeig
}  // namespace mmh
