// CUDA kernels of composite_rays: a warp per ray running the warp programs of
// include/dreamportrait/composite_scan.h (shuffle scans of the transmittance and of the backward's
// suffix recurrence, 32 samples at a time; colours with lanes over channels), the code the host
// emulation runs and the CPU tests check. Half-precision inputs accumulate rgb and the
// density/spacing gradients (which double as scratch) in float32 buffers converted at the end.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <tuple>

#include "dreamportrait/composite_host.h"
#include "dreamportrait/composite_math.h"
#include "dreamportrait/composite_scan.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

using composite::Problem;
namespace scan = composite::scan;

// The warp programs' view of a CUDA warp. (Host-device so that the shared templates may call it;
// only the device side is ever run.)
struct CudaWarp {
  DP_HOST_DEVICE int lane() const {
#ifdef __CUDA_ARCH__
    return threadIdx.x % scan::kLanes;
#else
    return 0;
#endif
  }
  template <typename T>
  DP_HOST_DEVICE T shuffle(T v, int source) const {
#ifdef __CUDA_ARCH__
    return __shfl_sync(0xffffffffu, v, source);
#else
    return v;
#endif
  }
  DP_HOST_DEVICE int first_lane(bool predicate) const {
#ifdef __CUDA_ARCH__
    const unsigned lanes = __ballot_sync(0xffffffffu, predicate);
    return lanes ? __ffs(lanes) - 1 : scan::kLanes;
#else
    return predicate ? 0 : scan::kLanes;
#endif
  }
  DP_HOST_DEVICE void sync() const {
#ifdef __CUDA_ARCH__
    __syncwarp();
#endif
  }
};

// One warp per ray.
int blocks_for(int64_t rays) {
  const int64_t blocks = (rays + scan::kRaysPerBlock - 1) / scan::kRaysPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "composite_rays: ", rays, " rays exceed a CUDA grid");
  return static_cast<int>(blocks);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(scan::kThreads)
    forward_kernel(const scalar_t* __restrict__ densities, const scalar_t* __restrict__ colors,
                   const scalar_t* __restrict__ depths, const scalar_t* __restrict__ deltas, acc_t* __restrict__ rgb,
                   scalar_t* __restrict__ depth, scalar_t* __restrict__ opacity, scalar_t* __restrict__ weights,
                   Problem p) {
  __shared__ acc_t chunk_weights[scan::kRaysPerBlock][scan::kLanes];
  const int warp = threadIdx.x / scan::kLanes;
  const int64_t r = int64_t(blockIdx.x) * scan::kRaysPerBlock + warp, row = r * p.S;
  if (r >= p.R) return;  // the whole warp
  scan::forward_ray_warp(CudaWarp{}, chunk_weights[warp], densities + row, colors + row * p.C, depths + row,
                         deltas + row, rgb + r * p.C, depth + r, opacity + r, weights + row, p.S, p.C,
                         static_cast<acc_t>(p.transmittance_threshold));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(scan::kThreads)
    backward_kernel(const scalar_t* __restrict__ densities, const scalar_t* __restrict__ colors,
                    const scalar_t* __restrict__ depths, const scalar_t* __restrict__ deltas,
                    const scalar_t* __restrict__ grad_rgb, const scalar_t* __restrict__ grad_depth,
                    const scalar_t* __restrict__ grad_opacity, const scalar_t* __restrict__ grad_weights,
                    acc_t* __restrict__ grad_densities, scalar_t* __restrict__ grad_colors,
                    scalar_t* __restrict__ grad_depths, acc_t* __restrict__ grad_deltas, Problem p) {
  __shared__ acc_t chunk_weights[scan::kRaysPerBlock][scan::kLanes];
  const int warp = threadIdx.x / scan::kLanes;
  const int64_t r = int64_t(blockIdx.x) * scan::kRaysPerBlock + warp, row = r * p.S;
  if (r >= p.R) return;  // the whole warp
  scan::backward_ray_warp(CudaWarp{}, chunk_weights[warp], densities + row, colors + row * p.C, depths + row,
                          deltas + row, grad_rgb + r * p.C, static_cast<acc_t>(grad_depth[r]),
                          static_cast<acc_t>(grad_opacity[r]), grad_weights + row, grad_densities + row,
                          grad_colors + row * p.C, grad_depths + row, grad_deltas + row, p.S, p.C);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_cuda(
    const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths,
    const at::Tensor& deltas, double transmittance_threshold) {
  const Problem p = composite::check_problem(densities, colors, depths, deltas, transmittance_threshold);
  const c10::cuda::CUDAGuard guard(densities.device());
  return composite::warp_forward(p, densities, colors, depths, deltas, [&p](auto... arguments) {
    forward_kernel<<<blocks_for(p.R), scan::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(arguments...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_rays_backward_cuda(
    const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
    const at::Tensor& grad_weights, const at::Tensor& densities, const at::Tensor& colors,
    const at::Tensor& depths, const at::Tensor& deltas) {
  const Problem p = composite::check_problem(densities, colors, depths, deltas, 0.0);
  composite::check_grads(p, densities, grad_rgb, grad_depth, grad_opacity, grad_weights);
  const c10::cuda::CUDAGuard guard(densities.device());
  return composite::warp_backward(p, grad_rgb, grad_depth, grad_opacity, grad_weights, densities, colors, depths,
                                  deltas, [&p](auto... arguments) {
                                    backward_kernel<<<blocks_for(p.R), scan::kThreads, 0,
                                                      c10::cuda::getCurrentCUDAStream()>>>(arguments...);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
}

}  // namespace dreamportrait
