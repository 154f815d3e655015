// Portable SIMD for hot CPU loops: the loops are written plainly for the
// compiler to vectorise, and the functions that hold them are compiled in
// several versions picked at load time by the CPU (GCC function
// multiversioning, glibc ifunc). The build itself stays generic (no
// -march=native), so one binary runs on any x86-64 and uses AVX-512/AVX2+FMA
// where present. Elsewhere the macro is empty and the generic build is used.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    defined(__x86_64__) && defined(__linux__) && (__GNUC__ >= 11)
#define MMH_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MMH_SIMD_CLONES
#endif
