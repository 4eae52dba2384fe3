// Kernel entry points registered in ops.cpp. Layout conventions for every triplane_sample kernel:
//   planes (B, 3, C, H, W) any strides; points (B, N, 3); output (B, N, C) or (B, N, 3, C).
//   The plane gradient is returned with channel-innermost strides (a permuted (B, 3, H, W, C)
//   buffer): scatter-adds then touch C contiguous values per tap.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>

namespace dreamportrait {

#define DP_DECLARE_TRIPLANE_KERNELS(device)                                                     \
  at::Tensor triplane_sample_##device(const at::Tensor& planes, const at::Tensor& points,        \
                                      double box_warp, at::IntArrayRef axes,                     \
                                      std::string_view reduce);                                  \
  at::Tensor triplane_sample_backward_planes_##device(                                           \
      const at::Tensor& grad_output, const at::Tensor& planes, const at::Tensor& points,         \
      double box_warp, at::IntArrayRef axes, std::string_view reduce);                           \
  at::Tensor triplane_sample_backward_points_##device(                                           \
      const at::Tensor& grad_output, const at::Tensor& planes, const at::Tensor& points,         \
      double box_warp, at::IntArrayRef axes, std::string_view reduce);

DP_DECLARE_TRIPLANE_KERNELS(cpu)
#ifdef DREAMPORTRAIT_WITH_CUDA
DP_DECLARE_TRIPLANE_KERNELS(cuda)
#endif

#undef DP_DECLARE_TRIPLANE_KERNELS

}  // namespace dreamportrait
