#include "bindings.h"

#include "../csrc/cpu/hutchinson_cpu.h"
#ifdef WITH_CUDA
#include "../csrc/cuda/hutchinson_cuda.h"
#endif

namespace mmh {

void bind_hutchinson(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("hutchinson_probes_cpu", &hutchinson_probes_cpu, py::arg("sample_ids"),
        py::arg("numel"), py::arg("probe_begin"), py::arg("n_probes"),
        py::arg("seed"), py::arg("kind"), py::arg("dtype"),
        "Counter-based probes [n_probes, B, numel] (kind 0 Rademacher, 1 Gaussian).");
  m.def("hutchinson_reduce_cpu", &hutchinson_reduce_cpu, py::arg("av"),
        py::arg("sample_ids"), py::arg("probe_begin"), py::arg("seed"),
        py::arg("kind"),
        "Regenerate probes and reduce v.(Av): (mean [B], stderr [B], dots [P, B]).");
#ifdef WITH_CUDA
  m.def("hutchinson_probes_cuda", &hutchinson_probes_cuda, py::arg("sample_ids"),
        py::arg("numel"), py::arg("probe_begin"), py::arg("n_probes"),
        py::arg("seed"), py::arg("kind"), py::arg("dtype"));
  m.def("hutchinson_reduce_cuda", &hutchinson_reduce_cuda, py::arg("av"),
        py::arg("sample_ids"), py::arg("probe_begin"), py::arg("seed"),
        py::arg("kind"));
#endif
}

}  // namespace mmh
