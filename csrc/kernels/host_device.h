// MMH_HD marks small functions usable from host and device code (inline on
// the host compiler, __host__ __device__ under nvcc).
#pragma once

#ifndef MMH_HD
#if defined(__CUDACC__)
#define MMH_HD __host__ __device__ __forceinline__
#else
#define MMH_HD inline
#endif
#endif
