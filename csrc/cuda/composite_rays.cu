// CUDA kernels of composite_rays: one thread per ray running the per-ray code of
// include/dreamportrait/composite_math.h, the same code the CPU kernels run (and are tested with).
// Half-precision inputs accumulate rgb and the density/spacing gradients (which double as scratch)
// in float32 buffers that are converted at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

#include "dreamportrait/composite_host.h"
#include "dreamportrait/composite_math.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

using composite::Problem;

constexpr int kThreads = 128;

int64_t blocks_for(int64_t rays) {
  return std::max<int64_t>(1, std::min<int64_t>((rays + kThreads - 1) / kThreads, 65535 * 8));
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ densities, const scalar_t* __restrict__ colors,
                               const scalar_t* __restrict__ depths, const scalar_t* __restrict__ deltas,
                               acc_t* __restrict__ rgb, scalar_t* __restrict__ depth,
                               scalar_t* __restrict__ opacity, scalar_t* __restrict__ weights, Problem p) {
  const acc_t threshold = static_cast<acc_t>(p.transmittance_threshold);
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < p.R; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = r * p.S;
    composite::forward_ray(densities + row, colors + row * p.C, depths + row, deltas + row, rgb + r * p.C,
                           depth + r, opacity + r, weights + row, p.S, p.C, threshold);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ densities, const scalar_t* __restrict__ colors,
                                const scalar_t* __restrict__ depths, const scalar_t* __restrict__ deltas,
                                const scalar_t* __restrict__ grad_rgb, const scalar_t* __restrict__ grad_depth,
                                const scalar_t* __restrict__ grad_opacity,
                                const scalar_t* __restrict__ grad_weights, acc_t* __restrict__ grad_densities,
                                scalar_t* __restrict__ grad_colors, scalar_t* __restrict__ grad_depths,
                                acc_t* __restrict__ grad_deltas, Problem p) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < p.R; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = r * p.S;
    composite::backward_ray(densities + row, colors + row * p.C, depths + row, deltas + row, grad_rgb + r * p.C,
                            static_cast<acc_t>(grad_depth[r]), static_cast<acc_t>(grad_opacity[r]),
                            grad_weights + row, grad_densities + row, grad_colors + row * p.C,
                            grad_depths + row, grad_deltas + row, p.S, p.C);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_cuda(
    const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths,
    const at::Tensor& deltas, double transmittance_threshold) {
  const Problem p = composite::check_problem(densities, colors, depths, deltas, transmittance_threshold);
  const c10::cuda::CUDAGuard guard(densities.device());
  const auto options = densities.options();
  const auto acc_options = options.dtype(at::toOpMathType(densities.scalar_type()));
  at::Tensor rgb = at::empty({p.R, p.C}, acc_options), depth = at::empty({p.R}, options),
             opacity = at::empty({p.R}, options), weights = at::empty({p.R, p.S}, options);
  if (p.R > 0) {
    const at::Tensor densities_c = densities.contiguous(), colors_c = colors.contiguous(),
                     depths_c = depths.contiguous(), deltas_c = deltas.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, densities.scalar_type(), "composite_rays_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      forward_kernel<scalar_t, acc_t><<<blocks_for(p.R), kThreads, 0, stream>>>(
          densities_c.const_data_ptr<scalar_t>(), colors_c.const_data_ptr<scalar_t>(),
          depths_c.const_data_ptr<scalar_t>(), deltas_c.const_data_ptr<scalar_t>(), rgb.mutable_data_ptr<acc_t>(),
          depth.mutable_data_ptr<scalar_t>(), opacity.mutable_data_ptr<scalar_t>(),
          weights.mutable_data_ptr<scalar_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {rgb.to(densities.scalar_type()), depth, opacity, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_backward_cuda(
    const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
    const at::Tensor& grad_weights, const at::Tensor& densities, const at::Tensor& colors,
    const at::Tensor& depths, const at::Tensor& deltas) {
  const Problem p = composite::check_problem(densities, colors, depths, deltas, 0.0);
  composite::check_grads(p, densities, grad_rgb, grad_depth, grad_opacity, grad_weights);
  const c10::cuda::CUDAGuard guard(densities.device());
  const auto options = densities.options();
  const auto acc_options = options.dtype(at::toOpMathType(densities.scalar_type()));
  at::Tensor grad_densities = at::empty({p.R, p.S}, acc_options), grad_colors = at::empty({p.R, p.S, p.C}, options),
             grad_depths = at::empty({p.R, p.S}, options), grad_deltas = at::empty({p.R, p.S}, acc_options);
  if (p.R > 0) {
    const at::Tensor densities_c = densities.contiguous(), colors_c = colors.contiguous(),
                     depths_c = depths.contiguous(), deltas_c = deltas.contiguous(),
                     grad_rgb_c = grad_rgb.contiguous(), grad_depth_c = grad_depth.contiguous(),
                     grad_opacity_c = grad_opacity.contiguous(), grad_weights_c = grad_weights.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, densities.scalar_type(), "composite_rays_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<blocks_for(p.R), kThreads, 0, stream>>>(
          densities_c.const_data_ptr<scalar_t>(), colors_c.const_data_ptr<scalar_t>(),
          depths_c.const_data_ptr<scalar_t>(), deltas_c.const_data_ptr<scalar_t>(),
          grad_rgb_c.const_data_ptr<scalar_t>(), grad_depth_c.const_data_ptr<scalar_t>(),
          grad_opacity_c.const_data_ptr<scalar_t>(), grad_weights_c.const_data_ptr<scalar_t>(),
          grad_densities.mutable_data_ptr<acc_t>(), grad_colors.mutable_data_ptr<scalar_t>(),
          grad_depths.mutable_data_ptr<scalar_t>(), grad_deltas.mutable_data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = densities.scalar_type();
  return {grad_densities.to(dtype), grad_colors, grad_depths, grad_deltas.to(dtype)};
}

}  // namespace dreamportrait
