// Kernel entry points registered in ops.cpp. Outputs are always contiguous.
// triplane_sample:
//   planes (B, 3, C, H, W) any strides; points (B, N, 3); output (B, N, C) or (B, N, 3, C).
//   The plane gradient is returned with channel-innermost strides (a permuted (B, 3, H, W, C)
//   buffer): scatter-adds then touch C contiguous values per tap.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

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

// composite_rays: densities, depths, deltas (R, S); colors (R, S, C). Returns rgb (R, C),
// depth (R,), opacity (R,), weights (R, S); the backward returns the four input gradients.
#define DP_DECLARE_COMPOSITE_KERNELS(device)                                                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_##device(             \
      const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths,            \
      const at::Tensor& deltas, double transmittance_threshold);                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_backward_##device(    \
      const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,   \
      const at::Tensor& grad_weights, const at::Tensor& densities, const at::Tensor& colors,      \
      const at::Tensor& depths, const at::Tensor& deltas);

// gated_cross_attention: q (B, H, Lq, D), k and v (B, H, Lk, D), gate (H,), mask (B, Lk) bool.
// Returns out (B, H, Lq, D) and the log-sum-exp per query row (B, H, Lq); the backward returns
// dq, dk, dv and dgate (H,).
#define DP_DECLARE_ATTENTION_KERNELS(device)                                                      \
  std::tuple<at::Tensor, at::Tensor> gated_cross_attention_##device(                              \
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,      \
      const std::optional<at::Tensor>& key_padding_mask, double scale);                           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_cross_attention_backward_##device( \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,  \
      const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& lse, \
      double scale);

// sample_and_decode: planes and points as triplane_sample; weight1 (K, C), bias1 (K,), weight2 (O, K),
// bias2 (O,). Returns (B, N, O); the backward returns the gradients of planes and points (empty
// when not asked for) and of weight1, bias1, weight2, bias2.
#define DP_DECLARE_DECODER_KERNELS(device)                                                          \
  at::Tensor sample_and_decode_##device(const at::Tensor& planes, const at::Tensor& points, double box_warp, \
                                        at::IntArrayRef axes, const at::Tensor& weight1,             \
                                        const at::Tensor& bias1, const at::Tensor& weight2,          \
                                        const at::Tensor& bias2);                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>                \
  sample_and_decode_backward_##device(const at::Tensor& grad_output, const at::Tensor& planes,       \
                                      const at::Tensor& points, double box_warp, at::IntArrayRef axes, \
                                      const at::Tensor& weight1, const at::Tensor& bias1,            \
                                      const at::Tensor& weight2, const at::Tensor& bias2,            \
                                      bool needs_planes, bool needs_points);

DP_DECLARE_TRIPLANE_KERNELS(cpu)
DP_DECLARE_COMPOSITE_KERNELS(cpu)
DP_DECLARE_ATTENTION_KERNELS(cpu)
DP_DECLARE_DECODER_KERNELS(cpu)
#ifdef DREAMPORTRAIT_WITH_CUDA
DP_DECLARE_TRIPLANE_KERNELS(cuda)
DP_DECLARE_COMPOSITE_KERNELS(cuda)
DP_DECLARE_ATTENTION_KERNELS(cuda)
DP_DECLARE_DECODER_KERNELS(cuda)
#endif

#undef DP_DECLARE_TRIPLANE_KERNELS
#undef DP_DECLARE_COMPOSITE_KERNELS
#undef DP_DECLARE_ATTENTION_KERNELS
#undef DP_DECLARE_DECODER_KERNELS

}  // namespace dreamportrait
