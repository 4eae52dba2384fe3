// CPU kernels of composite_rays: one ray per work item (at::parallel_for). The per-ray code is
// include/dreamportrait/composite_math.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <tuple>

#include "dreamportrait/composite_host.h"
#include "dreamportrait/composite_math.h"
#include "dreamportrait/cpu_dispatch.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

using composite::Problem;

// Rays per parallel work item (a ray is a few thousand multiply-adds at EG3D's shapes).
constexpr int64_t kRayGrain = 16;

// On the CPU the accumulation type is the element type (float32, float64), so the outputs
// themselves serve as the accumulators the per-ray code asks for.
template <typename scalar_t>
DP_CPU_CLONES void forward_rays(const scalar_t* densities, const scalar_t* colors, const scalar_t* depths,
                                const scalar_t* deltas, scalar_t* rgb, scalar_t* depth, scalar_t* opacity,
                                scalar_t* weights, const Problem& p, int64_t begin, int64_t end) {
  const auto threshold = static_cast<scalar_t>(p.transmittance_threshold);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = r * p.S;
    composite::forward_ray(densities + row, colors + row * p.C, depths + row, deltas + row, rgb + r * p.C,
                           depth + r, opacity + r, weights + row, p.S, p.C, threshold);
  }
}

template <typename scalar_t>
DP_CPU_CLONES void backward_rays(const scalar_t* densities, const scalar_t* colors, const scalar_t* depths,
                                 const scalar_t* deltas, const scalar_t* grad_rgb, const scalar_t* grad_depth,
                                 const scalar_t* grad_opacity, const scalar_t* grad_weights,
                                 scalar_t* grad_densities, scalar_t* grad_colors, scalar_t* grad_depths,
                                 scalar_t* grad_deltas, const Problem& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = r * p.S;
    composite::backward_ray(densities + row, colors + row * p.C, depths + row, deltas + row,
                            grad_rgb + r * p.C, grad_depth[r], grad_opacity[r], grad_weights + row,
                            grad_densities + row, grad_colors + row * p.C, grad_depths + row,
                            grad_deltas + row, p.S, p.C);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_cpu(
    const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths,
    const at::Tensor& deltas, double transmittance_threshold) {
  const Problem p = composite::check_problem(densities, colors, depths, deltas, transmittance_threshold);
  const auto options = densities.options();
  at::Tensor rgb = at::empty({p.R, p.C}, options), depth = at::empty({p.R}, options),
             opacity = at::empty({p.R}, options), weights = at::empty({p.R, p.S}, options);
  if (p.R == 0) return {rgb, depth, opacity, weights};
  const at::Tensor densities_c = densities.contiguous(), colors_c = colors.contiguous(),
                   depths_c = depths.contiguous(), deltas_c = deltas.contiguous();
  AT_DISPATCH_FLOATING_TYPES(densities.scalar_type(), "composite_rays_cpu", [&] {
    at::parallel_for(0, p.R, kRayGrain, [&](int64_t begin, int64_t end) {
      forward_rays(densities_c.const_data_ptr<scalar_t>(), colors_c.const_data_ptr<scalar_t>(),
                   depths_c.const_data_ptr<scalar_t>(), deltas_c.const_data_ptr<scalar_t>(),
                   rgb.mutable_data_ptr<scalar_t>(), depth.mutable_data_ptr<scalar_t>(),
                   opacity.mutable_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(), p, begin, end);
    });
  });
  return {rgb, depth, opacity, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_backward_cpu(
    const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
    const at::Tensor& grad_weights, const at::Tensor& densities, const at::Tensor& colors,
    const at::Tensor& depths, const at::Tensor& deltas) {
  const Problem p = composite::check_problem(densities, colors, depths, deltas, 0.0);
  composite::check_grads(p, densities, grad_rgb, grad_depth, grad_opacity, grad_weights);
  const auto options = densities.options();
  at::Tensor grad_densities = at::empty({p.R, p.S}, options), grad_colors = at::empty({p.R, p.S, p.C}, options),
             grad_depths = at::empty({p.R, p.S}, options), grad_deltas = at::empty({p.R, p.S}, options);
  if (p.R == 0) return {grad_densities, grad_colors, grad_depths, grad_deltas};
  const at::Tensor densities_c = densities.contiguous(), colors_c = colors.contiguous(),
                   depths_c = depths.contiguous(), deltas_c = deltas.contiguous(),
                   grad_rgb_c = grad_rgb.contiguous(), grad_depth_c = grad_depth.contiguous(),
                   grad_opacity_c = grad_opacity.contiguous(), grad_weights_c = grad_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES(densities.scalar_type(), "composite_rays_backward_cpu", [&] {
    at::parallel_for(0, p.R, kRayGrain, [&](int64_t begin, int64_t end) {
      backward_rays(densities_c.const_data_ptr<scalar_t>(), colors_c.const_data_ptr<scalar_t>(),
                    depths_c.const_data_ptr<scalar_t>(), deltas_c.const_data_ptr<scalar_t>(),
                    grad_rgb_c.const_data_ptr<scalar_t>(), grad_depth_c.const_data_ptr<scalar_t>(),
                    grad_opacity_c.const_data_ptr<scalar_t>(), grad_weights_c.const_data_ptr<scalar_t>(),
                    grad_densities.mutable_data_ptr<scalar_t>(), grad_colors.mutable_data_ptr<scalar_t>(),
                    grad_depths.mutable_data_ptr<scalar_t>(), grad_deltas.mutable_data_ptr<scalar_t>(), p,
                    begin, end);
    });
  });
  return {grad_densities, grad_colors, grad_depths, grad_deltas};
}

}  // namespace dreamportrait
