// CPU helpers of the tri-plane kernels shared by triplane_sample and sample_and_decode (defined in
// cpu/triplane_sample.cpp for float and double).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

#include "dreamportrait/triplane_math.h"

namespace dreamportrait {

// Prefetches the cache line at `address` into L1, for reading or (kForWriting) for writing. The
// kernels form addresses as integers, so that a tap outside the plane gives an address outside the
// buffer, which a prefetch ignores. On x86 the instructions are written out (GCC deletes loops that
// hold only __builtin_prefetch).
template <bool kForWriting>
inline void prefetch_line(uintptr_t address) {
#if defined(__x86_64__) || defined(__i386__)
  if (kForWriting)
    asm volatile("prefetchw (%0)" : : "r"(address));
  else
    asm volatile("prefetcht0 (%0)" : : "r"(address));
#else
  __builtin_prefetch(reinterpret_cast<const void*>(address), kForWriting ? 1 : 0, 3);
#endif
}

constexpr int64_t kCacheLineBytes = 64;

// Prefetches (for reading) the rows that a point's taps on the 3 planes touch in a channel-innermost
// (3, H, W, C) buffer: per plane and tap row the 2 C values from column x0. `channels.C` is the
// channel count (a compile-time constant where the caller has one).
template <typename scalar_t, typename T, typename Channels>
inline void prefetch_point(const scalar_t* base, const triplane::BilinearTaps<T>* taps, const triplane::Problem& p,
                           const Channels& channels) {
  const int64_t bytes = 2 * channels.C * int64_t(sizeof(scalar_t));
  for (int plane = 0; plane < triplane::kPlanes; ++plane) {
    for (int dy = 0; dy < 2; ++dy) {
      const int64_t offset = ((plane * p.H + taps[plane].y0 + dy) * p.W + taps[plane].x0) * channels.C;
      const uintptr_t row = reinterpret_cast<uintptr_t>(base) + offset * int64_t(sizeof(scalar_t));
      for (int64_t byte = 0; byte < bytes; byte += kCacheLineBytes) prefetch_line<false>(row + byte);
    }
  }
}

// Calls fn(b, planes_b) for each batch element b of planes (B, 3, C, H, W) in turn, with planes_b
// its planes channel-innermost, (3, H, W, C) contiguous. Planes stored that way are used in place;
// others are transposed one batch element at a time into one reused workspace (a cache-blocked
// transpose, about twice as fast as torch's strided copy of the whole tensor).
template <typename scalar_t>
void for_each_batch_element(const at::Tensor& planes, const triplane::Problem& p,
                            const std::function<void(int64_t, const scalar_t*)>& fn);

}  // namespace dreamportrait
