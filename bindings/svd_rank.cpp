#include "bindings.h"

#include "../csrc/cpu/svd_rank_cpu.h"
#ifdef WITH_CUDA
#include "../csrc/cuda/svd_rank_cuda.h"
#endif

namespace mmh {

void bind_svd_rank(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("svd_rank_cpu", &svd_rank_cpu, py::arg("A"), py::arg("threshold"), py::arg("sample_ids"),
        py::arg("rule"), py::arg("method"), py::arg("min_ratio"), py::arg("rtol"),
        py::arg("sketch"), py::arg("n_iter"), py::arg("max_sketch_fraction"), py::arg("seed"),
        "Numerical ranks [B] and singular values [B, r] of A [B, m, n] (see svd_rank_cpu.h).");
  m.def("rank_rule_cpu", &rank_rule_cpu, py::arg("lo"), py::arg("hi"), py::arg("tail"),
        py::arg("floor"), py::arg("threshold"), py::arg("k"), py::arg("rule"),
        py::arg("min_ratio"), py::arg("exact"),
        "Rank rule on singular-value intervals: (ranks [B], certified [B]).");
#ifdef WITH_CUDA
  m.def("svd_rank_cuda", &svd_rank_cuda, py::arg("A"), py::arg("threshold"), py::arg("sample_ids"),
        py::arg("rule"), py::arg("method"), py::arg("min_ratio"), py::arg("rtol"),
        py::arg("sketch"), py::arg("n_iter"), py::arg("max_sketch_fraction"), py::arg("seed"));
  m.def("rank_rule_cuda", &rank_rule_cuda, py::arg("lo"), py::arg("hi"), py::arg("tail"),
        py::arg("floor"), py::arg("threshold"), py::arg("k"), py::arg("rule"),
        py::arg("min_ratio"), py::arg("exact"));
#endif
}

}  // namespace mmh
