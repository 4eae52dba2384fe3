// Host-side argument checks of the composite_rays operators, shared by the CPU and CUDA kernels.
// The Python front end flattens leading dimensions and raises friendlier errors first; these keep
// direct torch.ops calls memory-safe.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "dreamportrait/composite_math.h"
#include "dreamportrait/composite_scan.h"
#include "dreamportrait/host_checks.h"

namespace dreamportrait {
namespace composite {

inline void check_like(const at::Tensor& t, const at::Tensor& densities, const char* name) {
  TORCH_CHECK(t.scalar_type() == densities.scalar_type() && t.device() == densities.device(),
              "composite_rays: ", name, " must match densities in dtype and device, got ",
              t.scalar_type(), " on ", t.device());
}

// Every tensor's shape, dtype and device; any strides (the kernels read through .contiguous()).
// float16 and bfloat16 are taken by the CUDA kernels, or where `reduced_precision` says so.
inline Problem check_problem(const at::Tensor& densities, const at::Tensor& colors,
                             const at::Tensor& depths, const at::Tensor& deltas,
                             double transmittance_threshold, std::optional<bool> reduced_precision = std::nullopt) {
  TORCH_CHECK(densities.dim() == 2, "composite_rays: densities must have shape (R, S), got ", densities.sizes());
  check_kernel_dtype("composite_rays", "densities", densities,
                     reduced_precision.value_or(takes_reduced_precision(densities)));
  const int64_t R = densities.size(0), S = densities.size(1);
  TORCH_CHECK(colors.dim() == 3 && colors.size(0) == R && colors.size(1) == S,
              "composite_rays: colors must have shape (R, S, C) = (", R, ", ", S, ", C), got ", colors.sizes());
  TORCH_CHECK(depths.sizes() == densities.sizes(), "composite_rays: depths must have shape ", densities.sizes(),
              ", got ", depths.sizes());
  TORCH_CHECK(deltas.sizes() == densities.sizes(), "composite_rays: deltas must have shape ", densities.sizes(),
              ", got ", deltas.sizes());
  check_like(colors, densities, "colors");
  check_like(depths, densities, "depths");
  check_like(deltas, densities, "deltas");
  TORCH_CHECK(std::isfinite(transmittance_threshold) && transmittance_threshold >= 0 && transmittance_threshold < 1,
              "composite_rays: transmittance_threshold must be in [0, 1), got ", transmittance_threshold);
  return {R, S, colors.size(2), transmittance_threshold};
}

inline void check_grads(const Problem& p, const at::Tensor& densities, const at::Tensor& grad_rgb,
                        const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
                        const at::Tensor& grad_weights) {
  TORCH_CHECK(grad_rgb.dim() == 2 && grad_rgb.size(0) == p.R && grad_rgb.size(1) == p.C,
              "composite_rays_backward: grad_rgb must have shape (R, C), got ", grad_rgb.sizes());
  TORCH_CHECK(grad_depth.dim() == 1 && grad_depth.size(0) == p.R,
              "composite_rays_backward: grad_depth must have shape (R,), got ", grad_depth.sizes());
  TORCH_CHECK(grad_opacity.dim() == 1 && grad_opacity.size(0) == p.R,
              "composite_rays_backward: grad_opacity must have shape (R,), got ", grad_opacity.sizes());
  TORCH_CHECK(grad_weights.sizes() == densities.sizes(),
              "composite_rays_backward: grad_weights must have shape (R, S), got ", grad_weights.sizes());
  check_like(grad_rgb, densities, "grad_rgb");
  check_like(grad_depth, densities, "grad_depth");
  check_like(grad_opacity, densities, "grad_opacity");
  check_like(grad_weights, densities, "grad_weights");
}

// ---- The host side of the warp-per-ray kernels (composite_scan.h), shared by the CUDA launcher
// and the host emulation, which differ in how `launch(pointers..., problem)` runs the rays.

// A block of the grid per kRaysPerBlock rays, its index 32-bit: checked before anything is allocated.
inline void check_warp_grid(const Problem& p) {
  check_int32("composite_rays", "densities", "blocks of rays",
              (p.R + scan::kRaysPerBlock - 1) / scan::kRaysPerBlock);
}
// Half-precision rgb and the density/spacing gradients (which double as scratch) are accumulated
// in the accumulation type and converted at the end.

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warp_forward(const Problem& p, const at::Tensor& densities,
                                                                        const at::Tensor& colors,
                                                                        const at::Tensor& depths,
                                                                        const at::Tensor& deltas, Launch launch) {
  check_warp_grid(p);
  const auto options = densities.options();
  const auto acc_options = options.dtype(at::toOpMathType(densities.scalar_type()));
  at::Tensor rgb = at::empty({p.R, p.C}, acc_options), depth = at::empty({p.R}, options),
             opacity = at::empty({p.R}, options), weights = at::empty({p.R, p.S}, options);
  if (p.R > 0) {
    const at::Tensor densities_c = densities.contiguous(), colors_c = colors.contiguous(),
                     depths_c = depths.contiguous(), deltas_c = deltas.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, densities.scalar_type(), "composite_rays_warp", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(densities_c.const_data_ptr<scalar_t>(), colors_c.const_data_ptr<scalar_t>(),
             depths_c.const_data_ptr<scalar_t>(), deltas_c.const_data_ptr<scalar_t>(), rgb.mutable_data_ptr<acc_t>(),
             depth.mutable_data_ptr<scalar_t>(), opacity.mutable_data_ptr<scalar_t>(),
             weights.mutable_data_ptr<scalar_t>(), p);
    });
  }
  return {rgb.to(densities.scalar_type()), depth, opacity, weights};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warp_backward(
    const Problem& p, const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
    const at::Tensor& grad_weights, const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths,
    const at::Tensor& deltas, Launch launch) {
  check_warp_grid(p);
  const auto dtype = densities.scalar_type();
  const auto options = densities.options();
  const auto acc_options = options.dtype(at::toOpMathType(dtype));
  at::Tensor grad_densities = at::empty({p.R, p.S}, acc_options), grad_colors = at::empty({p.R, p.S, p.C}, options),
             grad_depths = at::empty({p.R, p.S}, options), grad_deltas = at::empty({p.R, p.S}, acc_options);
  if (p.R > 0) {
    const at::Tensor densities_c = densities.contiguous(), colors_c = colors.contiguous(),
                     depths_c = depths.contiguous(), deltas_c = deltas.contiguous(),
                     grad_rgb_c = grad_rgb.contiguous(), grad_depth_c = grad_depth.contiguous(),
                     grad_opacity_c = grad_opacity.contiguous(), grad_weights_c = grad_weights.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "composite_rays_warp_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(densities_c.const_data_ptr<scalar_t>(), colors_c.const_data_ptr<scalar_t>(),
             depths_c.const_data_ptr<scalar_t>(), deltas_c.const_data_ptr<scalar_t>(),
             grad_rgb_c.const_data_ptr<scalar_t>(), grad_depth_c.const_data_ptr<scalar_t>(),
             grad_opacity_c.const_data_ptr<scalar_t>(), grad_weights_c.const_data_ptr<scalar_t>(),
             grad_densities.mutable_data_ptr<acc_t>(), grad_colors.mutable_data_ptr<scalar_t>(),
             grad_depths.mutable_data_ptr<scalar_t>(), grad_deltas.mutable_data_ptr<acc_t>(), p);
    });
  }
  return {grad_densities.to(dtype), grad_colors, grad_depths, grad_deltas.to(dtype)};
}

}  // namespace composite
}  // namespace dreamportrait
