// Portability macros shared by the CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DP_HOST_DEVICE __host__ __device__
#else
#define DP_HOST_DEVICE
#endif

#define DP_INLINE DP_HOST_DEVICE inline

// Vectorise the next loop's sums into the named variables on the CPU (an FP reduction is only
// vectorised when reordering is allowed; needs -fopenmp or -fopenmp-simd). Nothing on the GPU.
#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define DP_SIMD_SUM(...)
#else
#define DP_PRAGMA(...) _Pragma(#__VA_ARGS__)
#define DP_SIMD_SUM(...) DP_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#endif

namespace dreamportrait {

// Sizes' arithmetic for tile schedules: a / b rounded up, and x rounded up to a multiple of m.
DP_INLINE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
DP_INLINE constexpr int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

}  // namespace dreamportrait
