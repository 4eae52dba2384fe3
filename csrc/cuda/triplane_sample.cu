// CUDA kernels of triplane_sample. The per-sample math is include/dreamportrait/triplane_math.h,
// the same code the CPU kernels run (and are tested with); this file only maps it onto threads.
//
// Planes are read channel-innermost, (B, 3, H, W, C). Forward and plane-gradient threads own one
// (point, channel) pair, so a warp reads or atomically adds a tap's channels coalesced. The
// point gradient is a reduction over channels: one warp per point, lanes over channels.
// Only c10/ATen headers that need no CUDA library headers (cuBLAS, cuSPARSE) are included, so the
// build needs nothing but nvcc and the CUDA runtime headers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "dreamportrait/ops.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace {

using triplane::kPlanes;
using triplane::Problem;
using triplane::Reduce;

constexpr int kThreads = 256;
constexpr int kWarp = 32;

int64_t blocks_for(int64_t work) {
  // Grid-stride loops cover the rest; a few waves of blocks keep every SM busy.
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535 * 8));
}


template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_point(const scalar_t* points, int64_t i, acc_t point[3]) {
  for (int k = 0; k < 3; ++k) point[k] = static_cast<acc_t>(points[i * 3 + k]);
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ planes,
                               const scalar_t* __restrict__ points, scalar_t* __restrict__ out,
                               Problem p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const int64_t total = p.B * p.N * p.C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C, i = idx / p.C, b = i / p.N, n = i % p.N;
    acc_t point[3];
    load_point(points, i, point);
    acc_t acc = 0;
    for (int plane = 0; plane < kPlanes; ++plane) {
      const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
      if (!taps.finite) acc = NAN;
      if (taps.in_bounds) {
        const scalar_t* base = planes + (b * kPlanes + plane) * p.H * p.W * p.C + c;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx)
            if (taps.valid(dy, dx))
              acc += taps.weight(dy, dx) *
                     static_cast<acc_t>(base[((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C]);
      }
      if (p.reduce == Reduce::kNone) {
        out[triplane::output_row(p, b, n, plane) + c] = static_cast<scalar_t>(acc);
        acc = 0;
      }
    }
    if (p.reduce != Reduce::kNone) out[triplane::output_row(p, b, n, 0) + c] = static_cast<scalar_t>(acc * rw);
  }
}

// grad_planes (B, 3, H, W, C) in the accumulation type, zero on entry.
template <typename scalar_t, typename acc_t>
__global__ void backward_planes_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ points,
                                       acc_t* __restrict__ grad_planes, Problem p) {
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const int64_t total = p.B * p.N * p.C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C, i = idx / p.C, b = i / p.N, n = i % p.N;
    acc_t point[3];
    load_point(points, i, point);
    for (int plane = 0; plane < kPlanes; ++plane) {
      const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
      if (!taps.in_bounds) continue;
      const acc_t g = static_cast<acc_t>(grad_out[triplane::output_row(p, b, n, plane) + c]) * rw;
      acc_t* base = grad_planes + (b * kPlanes + plane) * p.H * p.W * p.C + c;
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx)
          if (taps.valid(dy, dx))
            gpuAtomicAdd(base + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C,
                         taps.weight(dy, dx) * g);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void backward_points_kernel(const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ planes,
                                       const scalar_t* __restrict__ points,
                                       scalar_t* __restrict__ grad_points, Problem p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const acc_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * rw;
  const acc_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * rw;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = int64_t(gridDim.x) * blockDim.x / kWarp;
  // The whole warp shares a point, so it leaves the loop together and every shuffle is full.
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; i < p.B * p.N;
       i += warps_per_grid) {
    const int64_t b = i / p.N, n = i % p.N;
    acc_t point[3];
    load_point(points, i, point);
    acc_t grad[3] = {0, 0, 0};
    for (int plane = 0; plane < kPlanes; ++plane) {
      const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
      if (!taps.in_bounds && taps.finite) continue;
      const scalar_t* g = grad_out + triplane::output_row(p, b, n, plane);
      const scalar_t* base = planes + (b * kPlanes + plane) * p.H * p.W * p.C;
      acc_t dot[2][2] = {{0, 0}, {0, 0}};
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (!taps.valid(dy, dx)) continue;
          const scalar_t* src = base + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C;
          acc_t s = 0;
          for (int64_t c = lane; c < p.C; c += kWarp)
            s += static_cast<acc_t>(g[c]) * static_cast<acc_t>(src[c]);
          dot[dy][dx] = warp_sum(s);
        }
      }
      acc_t d_dx = NAN, d_dy = NAN;
      if (taps.finite) triplane::bilinear_position_grad(taps, dot[0][0], dot[0][1], dot[1][0], dot[1][1], d_dx, d_dy);
      triplane::add_to_coordinate(grad, p.axes[2 * plane], d_dx * dx_dpoint);
      triplane::add_to_coordinate(grad, p.axes[2 * plane + 1], d_dy * dy_dpoint);
    }
    if (lane == 0)
      for (int k = 0; k < 3; ++k) grad_points[i * 3 + k] = static_cast<scalar_t>(grad[k]);
  }
}


}  // namespace

at::Tensor triplane_sample_cuda(const at::Tensor& planes, const at::Tensor& points,
                                double box_warp, at::IntArrayRef axes, std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce);
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor out = triplane::empty_output(planes, p);
  if (out.numel() == 0) return out;
  const at::Tensor planes_cl = triplane::channels_innermost(planes);
  const at::Tensor points_c = points.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                  "triplane_sample_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(p.B * p.N * p.C), kThreads, 0, stream>>>(
        planes_cl.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor triplane_sample_backward_planes_cuda(const at::Tensor& grad_output,
                                                const at::Tensor& planes, const at::Tensor& points,
                                                double box_warp, at::IntArrayRef axes,
                                                std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce, grad_output);
  const c10::cuda::CUDAGuard guard(planes.device());
  // Accumulate in float32 for half/bfloat16 (atomics on 16-bit types lose most of the sum).
  const auto acc_dtype = at::toOpMathType(planes.scalar_type());
  at::Tensor grad_planes =
      at::zeros({p.B, kPlanes, p.H, p.W, p.C}, planes.options().dtype(acc_dtype));
  if (grad_planes.numel() > 0 && p.N > 0) {
    const at::Tensor grad_c = grad_output.contiguous();
    const at::Tensor points_c = points.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                    "triplane_sample_backward_planes_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_planes_kernel<scalar_t, acc_t><<<blocks_for(p.B * p.N * p.C), kThreads, 0, stream>>>(
          grad_c.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
          grad_planes.mutable_data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad_planes.to(planes.scalar_type()).permute({0, 1, 4, 2, 3}).contiguous();
}

at::Tensor triplane_sample_backward_points_cuda(const at::Tensor& grad_output,
                                                const at::Tensor& planes, const at::Tensor& points,
                                                double box_warp, at::IntArrayRef axes,
                                                std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce, grad_output);
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor grad_points = at::empty({p.B, p.N, 3}, points.options());
  if (grad_points.numel() == 0) return grad_points;
  if (p.C == 0 || p.H == 0 || p.W == 0) return grad_points.zero_();
  const at::Tensor planes_cl = triplane::channels_innermost(planes);
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor points_c = points.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(),
                                  "triplane_sample_backward_points_cuda", [&] {
    backward_points_kernel<scalar_t><<<blocks_for(p.B * p.N * kWarp), kThreads, 0, stream>>>(
        grad_c.const_data_ptr<scalar_t>(), planes_cl.const_data_ptr<scalar_t>(),
        points_c.const_data_ptr<scalar_t>(), grad_points.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_points;
}

}  // namespace dreamportrait
