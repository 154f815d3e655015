#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace mmh {

// Local PCA on given neighbourhoods, as scikit-dimension's lPCA.fit_pw does
// it: the neighbourhood of row i is the set of points data[neighbors[i, :n_i]]
// (n_i = K, or sizes[i] when sizes is given), centred on its own mean; its
// explained variances are the eigenvalues of the covariance with denominator
// n_i - 1, computed from the D x D covariance when n_i > D and from the
// n_i x n_i Gram matrix of the centred points otherwise (same nonzero
// eigenvalues, less work).
//
//   data       [N, D] float32/float64 (CPU)
//   neighbors  [M, K] int64, entries in [0, N)
//   sizes      optional [M] int64 in [0, K]: use only the first sizes[i]
//              neighbours of row i (a neighbourhood of fewer than 2 points
//              has all variances 0)
//
// local_pca_cpu returns the explained variances [M, min(K, D)] in the data
// dtype, descending, clamped at 0; entries past min(n_i, D) are 0.
at::Tensor local_pca_cpu(const at::Tensor& data, const at::Tensor& neighbors,
                         const c10::optional<at::Tensor>& sizes);

// The Fukunaga-Olsen count without the spectrum: for each row, the number of
// explained variances strictly greater than alpha * (largest one). The
// largest eigenvalue comes from a short Lanczos run (converged when two Ritz
// values 4 steps apart agree to 1e-6), the count from the inertia of
// C - alpha lambda_max I by a Bunch-Kaufman LDL^T (Sylvester's law; see
// csrc/kernels/symeig.h). A row whose Lanczos run does not settle within 48
// steps falls back to the full spectrum. The count equals the spectrum's
// unless an eigenvalue lies within about 1e-6 (relative) of the threshold,
// the same order as the rounding of the variances themselves in float32.
// Returns (counts [M] int64, largest explained variance [M] in the data dtype).
std::tuple<at::Tensor, at::Tensor> local_pca_count_cpu(const at::Tensor& data,
                                                       const at::Tensor& neighbors,
                                                       double alpha);

}  // namespace mmh
