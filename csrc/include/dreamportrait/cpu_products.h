// The register-blocked matrix product the CPU kernels are built on (attention's scores, P V and
// gradients; the fused decoder's layers and weight gradients): kProductRows rows of the left
// operand times column slices of kLanes values of the right one, each slice's accumulators held
// in registers for the whole inner dimension, so that every slice loaded from cache serves all
// rows of the block. Instantiated per vector width by run_with_widest_vectors (cpu_dispatch.h):
// 16 float32 columns are one AVX-512 register or two AVX2 registers per row.
#pragma once

#include <cstdint>
#include <cstring>

#include "dreamportrait/cpu_dispatch.h"

namespace dreamportrait {
namespace cpu {

constexpr int kProductRows = 4;

// A vector from, or to, unaligned memory. (Everything here is inlined, so no call passes a vector:
// GCC's note that such a call's ABI depends on the instruction set does not apply.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V, typename T>
DP_ALWAYS_INLINE V load_vector(const T* from) {
  V value;
  std::memcpy(&value, from, sizeof(V));
  return value;
}
template <typename V, typename T>
DP_ALWAYS_INLINE void store_vector(T* to, V value) {
  std::memcpy(to, &value, sizeof(V));
}

// For r < count and n < N (a multiple of kLanes):
//   out[r * ldo + n] = init + sum_{k < K} a[r][k * a_step] * b[k * ldb + n],
// init being out's own value when `accumulate`, else bias[n] (0 without a bias). a[] holds
// kProductRows valid pointers (a short block repeats a row, whose outputs are not written); a_step
// lets the same loops read a transposed left operand.
template <int kVectorBytes, int kLanes, typename T>
DP_ALWAYS_INLINE void block_product(const T* const a[kProductRows], int64_t a_step, int count,
                                    const T* __restrict__ b, int64_t ldb, int64_t K, T* __restrict__ out,
                                    int64_t ldo, int64_t N, bool accumulate = false, const T* bias = nullptr) {
  constexpr int kWidth = kVectorBytes / sizeof(T);
  constexpr int kVectors = kLanes / kWidth;  // per row and slice
  static_assert(kVectors * kWidth == kLanes, "a slice is whole vectors");
  using V = typename VectorOf<T, kWidth>::type;
  for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
    // kProductRows x kVectors independent accumulators, so consecutive multiply-adds do not wait
    // on each other. Their address is never taken, so that the compiler keeps them in registers.
    V acc[kProductRows][kVectors] = {};
#pragma GCC unroll 4
    for (int r = 0; r < kProductRows; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) {
        if (accumulate && r < count)
          acc[r][v] = load_vector<V>(out + r * ldo + n0 + v * kWidth);
        else if (!accumulate && bias != nullptr)
          acc[r][v] = load_vector<V>(bias + n0 + v * kWidth);
      }
    for (int64_t k = 0; k < K; ++k) {
      V column[kVectors];
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v) column[v] = load_vector<V>(b + k * ldb + n0 + v * kWidth);
#pragma GCC unroll 4
      for (int r = 0; r < kProductRows; ++r) {
        const T factor = a[r][k * a_step];
#pragma GCC unroll 8
        for (int v = 0; v < kVectors; ++v) acc[r][v] += factor * column[v];
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kProductRows; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kVectors; ++v)
        if (r < count) store_vector(out + r * ldo + n0 + v * kWidth, acc[r][v]);
  }
}

#pragma GCC diagnostic pop

}  // namespace cpu
}  // namespace dreamportrait
