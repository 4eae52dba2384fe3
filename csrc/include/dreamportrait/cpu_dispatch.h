// DP_CPU_CLONES compiles a CPU kernel function for several x86 instruction sets and picks the
// best one the running CPU supports when the library loads (GCC/Clang function multiversioning,
// through glibc's ifunc). Builds stay portable: no -march flag is needed for wide vectors.
#pragma once

#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define DP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DP_CPU_CLONES
#endif
