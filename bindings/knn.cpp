#include "bindings.h"

#include "../csrc/cpu/knn_cpu.h"
#include "../csrc/cpu/local_pca_cpu.h"
#ifdef WITH_CUDA
#include "../csrc/cuda/knn_cuda.h"
#include "../csrc/cuda/local_pca_cuda.h"
#endif

namespace mmh {

// Kernel family 3: k nearest neighbours and local PCA.
void bind_knn(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("knn_cpu", &knn_cpu, py::arg("data"), py::arg("queries"), py::arg("k"),
        py::arg("self_offset"), py::arg("squared"), py::arg("extra"),
        "Exact brute-force kNN: (distances [M, k], indices [M, k] int64), ascending.");
  m.def("knn_screened_cpu", &knn_screened_cpu, py::arg("data"), py::arg("queries"), py::arg("k"),
        py::arg("self_offset"), py::arg("squared"), py::arg("extra"), py::arg("lambda_"),
        py::arg("screen"),
        "knn_cpu screened by a bf16 / float32 GEMM, certified per row: (distances, indices, rows redone).");
  m.def("local_pca_cpu", &local_pca_cpu, py::arg("data"), py::arg("neighbors"),
        py::arg("sizes") = py::none(),
        "Explained variances [M, min(K, D)] of each neighbourhood, descending.");
  m.def("local_pca_count_cpu", &local_pca_count_cpu, py::arg("data"), py::arg("neighbors"),
        py::arg("alpha"),
        "FO count: (#variances > alpha * largest [M] int64, largest variance [M]).");
  m.def("twonn_ratios_cpu", &twonn_ratios_cpu, py::arg("data"), py::arg("neighbors"),
        "TwoNN ratios r2 / r1 inside each neighbourhood [M, K] float64.");
#ifdef WITH_CUDA
  m.def("knn_cuda", &knn_cuda, py::arg("data"), py::arg("queries"), py::arg("k"),
        py::arg("self_offset"), py::arg("squared"), py::arg("extra"));
  m.def("local_pca_cuda", &local_pca_cuda, py::arg("data"), py::arg("neighbors"),
        py::arg("sizes") = py::none());
  m.def("local_pca_count_cuda", &local_pca_count_cuda, py::arg("data"), py::arg("neighbors"),
        py::arg("alpha"));
  m.def("twonn_ratios_cuda", &twonn_ratios_cuda, py::arg("data"), py::arg("neighbors"));
#endif
}

}  // namespace mmh
