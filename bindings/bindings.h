// Each kernel family binds its CPU (and, when compiled, CUDA) entry points in
// its own file; module.cpp calls them. Only pybind11 lives in bindings/.
#pragma once
#include <torch/extension.h>

namespace mmh {
void bind_hutchinson(pybind11::module_& m);
void bind_knn(pybind11::module_& m);
void bind_svd_rank(pybind11::module_& m);
}  // namespace mmh
