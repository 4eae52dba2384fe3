// DP_CPU_CLONES compiles a CPU kernel function for several x86 instruction sets and picks the
// best one the running CPU supports when the library loads (GCC/Clang function multiversioning,
// through glibc's ifunc). Builds stay portable: no -march flag is needed for wide vectors.
//
// The clones are the x86-64 micro-architecture levels: v4 (AVX-512 F/BW/CD/DQ/VL) and v3 (AVX2
// with FMA, as on every AVX2 CPU since Haswell and Zen 1). A plain "avx2" clone would not use FMA:
// its multiply-adds would be two instructions each, about half the speed on an AVX2-only machine.
// GCC accepts the levels in target_clones from version 12; older compilers get the plain
// instruction-set clones. A build for one target (DREAMPORTRAIT_CPU_ARCH, dreamportrait/_build.py)
// has no clones.
#pragma once

#include <type_traits>

#if defined(DREAMPORTRAIT_CPU_SINGLE_TARGET)
#define DP_CPU_CLONES
#elif defined(__linux__) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && \
    !defined(__clang__) && !defined(__CUDACC__) && __GNUC__ >= 12
#define DP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__linux__) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define DP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DP_CPU_CLONES
#endif

namespace dreamportrait {

// Kernels whose register tiles depend on the vector width are templates on it, instantiated per
// x86-64 level by run_with_widest_vectors(body): `body` is a generic lambda taking
// VectorBytes<64> (AVX-512), <32> (AVX2 with FMA) or <16> (SSE2, or a non-x86 CPU), called inside a
// function compiled for that level, so it and everything it inlines (mark the lambda
// DP_ALWAYS_INLINE_LAMBDA and the functions it calls DP_ALWAYS_INLINE) are compiled for the CPU
// that runs them. (target_clones cannot do this: a vector type wider than
// the clone's registers, such as 64 bytes in the AVX2 clone, is lowered through the stack.)
template <int kBytes>
using VectorBytes = std::integral_constant<int, kBytes>;

#define DP_ALWAYS_INLINE __attribute__((always_inline)) inline
#define DP_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

#if !defined(DREAMPORTRAIT_CPU_SINGLE_TARGET) && defined(__linux__) && defined(__x86_64__) && \
    defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && __GNUC__ >= 12
template <typename Body>
__attribute__((target("arch=x86-64-v4"))) void run_with_avx512(Body& body) {
  body(VectorBytes<64>{});
}
template <typename Body>
__attribute__((target("arch=x86-64-v3"))) void run_with_avx2(Body& body) {
  body(VectorBytes<32>{});
}
template <typename Body>
void run_with_widest_vectors(Body&& body) {
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
  if (level == 4)
    run_with_avx512(body);
  else if (level == 3)
    run_with_avx2(body);
  else
    body(VectorBytes<16>{});
}
#else
// One build target (or a compiler without x86-64 levels): the widest vectors it was compiled for.
template <typename Body>
void run_with_widest_vectors(Body&& body) {
#if defined(__AVX512F__)
  body(VectorBytes<64>{});
#elif defined(__AVX2__) && defined(__FMA__)
  body(VectorBytes<32>{});
#else
  body(VectorBytes<16>{});
#endif
}
#endif

// kCount values of T as one vector (GCC/Clang vector extension), which the compiler keeps in
// registers and lowers for the instruction set of the clone it is used in: 16 float32 are one
// 512-bit register with AVX-512, two 256-bit ones with AVX2. (Arrays of values would live on the
// stack, a multiply-add loading and storing its accumulator.) Move them in and out of memory with
// memcpy (unaligned), inside cloned or always-inlined functions: a function taking or returning
// one would have a different ABI per clone.
template <typename T, int kCount>
struct VectorOf;
template <int kCount>
struct VectorOf<float, kCount> {
  typedef float type __attribute__((vector_size(kCount * sizeof(float))));
};
template <int kCount>
struct VectorOf<double, kCount> {
  typedef double type __attribute__((vector_size(kCount * sizeof(double))));
};

}  // namespace dreamportrait
