// Argument checks shared by the CPU and CUDA launchers. They raise
// ValueError / TypeError in Python (c10::ValueError, c10::TypeError), naming
// the argument; the Python layer validates first, these are the last line.
#pragma once

#include <c10/util/Exception.h>

#define MMH_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define MMH_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)

#define MMH_CHECK_DIM(t, d, name)                                              \
  MMH_CHECK_VALUE((t).dim() == (d), name, " must be a ", d,                    \
                  "-D tensor, got shape ", (t).sizes())

#define MMH_CHECK_FLOATING(t, name)                                            \
  MMH_CHECK_TYPE(at::isFloatingType((t).scalar_type()), name,                  \
                 " must be a floating-point tensor, got ", (t).scalar_type())

#define MMH_CHECK_CPU(t, name)                                                 \
  MMH_CHECK_VALUE((t).device().is_cpu(), name, " must be on the CPU, got ",    \
                  (t).device())

#define MMH_CHECK_CUDA(t, name)                                                \
  MMH_CHECK_VALUE((t).device().is_cuda(), name, " must be a CUDA tensor, got ",\
                  (t).device())
