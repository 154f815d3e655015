// The one place where Python meets C++: mmh_fast._C.
#include "bindings.h"

#include <ATen/Parallel.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmh_fast native kernels (CPU, and CUDA when compiled in)";
  m.def("cuda_compiled", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("parallel_info", []() { return at::get_parallel_info(); });
  mmh::bind_hutchinson(m);
  mmh::bind_knn(m);
  mmh::bind_svd_rank(m);
}
