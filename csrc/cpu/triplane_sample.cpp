// CPU kernels of triplane_sample (at::parallel_for). The per-sample math lives in
// include/dreamportrait/triplane_math.h and is shared with the CUDA kernels.
//
// The kernels read planes channel-innermost, (B, 3, H, W, C): one bilinear tap is then C
// contiguous values, which the compiler vectorises. Planes stored that way are used as they are;
// others are copied once (the only temporary, plane-sized).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "dreamportrait/ops.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace {

using triplane::kPlanes;
using triplane::Problem;
using triplane::Reduce;

// Points per parallel work item: large enough to amortise scheduling, small enough to balance.
constexpr int64_t kPointGrain = 256;
// Channels per work item of the plane-gradient scatter: one 64-byte line of float32, so two
// threads never write the same cache line.
constexpr int64_t kChannelChunk = 16;



template <typename scalar_t>
void forward_kernel(const scalar_t* __restrict__ planes, const scalar_t* __restrict__ points,
                    scalar_t* __restrict__ out, const Problem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  at::parallel_for(0, p.B * p.N, kPointGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.N, n = i % p.N;
      const acc_t point[3] = {points[i * 3], points[i * 3 + 1], points[i * 3 + 2]};
      for (int plane = 0; plane < kPlanes; ++plane) {
        scalar_t* __restrict__ dst = out + triplane::output_row(p, b, n, plane);
        if (plane == 0 || p.reduce == Reduce::kNone) std::fill(dst, dst + p.C, scalar_t(0));
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.in_bounds) continue;
        const scalar_t* base = planes + (b * kPlanes + plane) * p.H * p.W * p.C;
        for (int dy = 0; dy < 2; ++dy) {
          for (int dx = 0; dx < 2; ++dx) {
            if (!taps.valid(dy, dx)) continue;
            const scalar_t w = static_cast<scalar_t>(taps.weight(dy, dx) * rw);
            const scalar_t* __restrict__ src = base + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C;
            for (int64_t c = 0; c < p.C; ++c) dst[c] += w * src[c];
          }
        }
      }
    }
  });
}

// grad_planes (B, 3, H, W, C), zero on entry. Work items own (batch, plane, channel chunk), so
// the scatter-adds of different threads never touch the same element.
template <typename scalar_t>
void backward_planes_kernel(const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ points, scalar_t* __restrict__ grad_planes,
                            const Problem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const int64_t chunks = (p.C + kChannelChunk - 1) / kChannelChunk;
  at::parallel_for(0, p.B * kPlanes * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % chunks;
      const int plane = static_cast<int>((item / chunks) % kPlanes);
      const int64_t b = item / (chunks * kPlanes);
      const int64_t c0 = chunk * kChannelChunk, c1 = std::min(p.C, c0 + kChannelChunk);
      scalar_t* base = grad_planes + (b * kPlanes + plane) * p.H * p.W * p.C;
      for (int64_t n = 0; n < p.N; ++n) {
        const scalar_t* pt = points + (b * p.N + n) * 3;
        const acc_t point[3] = {pt[0], pt[1], pt[2]};
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.in_bounds) continue;
        const scalar_t* __restrict__ g = grad_out + triplane::output_row(p, b, n, plane);
        for (int dy = 0; dy < 2; ++dy) {
          for (int dx = 0; dx < 2; ++dx) {
            if (!taps.valid(dy, dx)) continue;
            const scalar_t w = static_cast<scalar_t>(taps.weight(dy, dx) * rw);
            scalar_t* __restrict__ dst = base + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C;
            for (int64_t c = c0; c < c1; ++c) dst[c] += w * g[c];
          }
        }
      }
    }
  });
}

// The position derivative is linear in the corner values, so it is taken once per tap on
// sum_c grad[c] * corner[c] instead of once per channel.
template <typename scalar_t>
void backward_points_kernel(const scalar_t* __restrict__ grad_out,
                            const scalar_t* __restrict__ planes,
                            const scalar_t* __restrict__ points,
                            scalar_t* __restrict__ grad_points, const Problem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const acc_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * rw;
  const acc_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * rw;
  at::parallel_for(0, p.B * p.N, kPointGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.N, n = i % p.N;
      const acc_t point[3] = {points[i * 3], points[i * 3 + 1], points[i * 3 + 2]};
      acc_t grad[3] = {0, 0, 0};
      for (int plane = 0; plane < kPlanes; ++plane) {
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.in_bounds) continue;
        const scalar_t* __restrict__ g = grad_out + triplane::output_row(p, b, n, plane);
        const scalar_t* base = planes + (b * kPlanes + plane) * p.H * p.W * p.C;
        acc_t dot[2][2] = {{0, 0}, {0, 0}};
        for (int dy = 0; dy < 2; ++dy) {
          for (int dx = 0; dx < 2; ++dx) {
            if (!taps.valid(dy, dx)) continue;
            const scalar_t* __restrict__ src = base + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C;
            acc_t s = 0;
            for (int64_t c = 0; c < p.C; ++c) s += static_cast<acc_t>(g[c]) * src[c];
            dot[dy][dx] = s;
          }
        }
        acc_t d_dx, d_dy;
        triplane::bilinear_position_grad(taps, dot[0][0], dot[0][1], dot[1][0], dot[1][1], d_dx,
                                         d_dy);
        grad[p.axes[2 * plane]] += d_dx * dx_dpoint;
        grad[p.axes[2 * plane + 1]] += d_dy * dy_dpoint;
      }
      for (int k = 0; k < 3; ++k) grad_points[i * 3 + k] = static_cast<scalar_t>(grad[k]);
    }
  });
}

at::Tensor output_like(const at::Tensor& planes, const Problem& p) {
  if (p.reduce == Reduce::kNone) return at::empty({p.B, p.N, kPlanes, p.C}, planes.options());
  return at::empty({p.B, p.N, p.C}, planes.options());
}

}  // namespace

at::Tensor triplane_sample_cpu(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                               at::IntArrayRef axes, std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce);
  at::Tensor out = output_like(planes, p);
  if (out.numel() == 0) return out;
  const at::Tensor planes_cl = triplane::channels_innermost(planes);
  const at::Tensor points_c = points.contiguous();
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_sample_cpu", [&] {
    forward_kernel(planes_cl.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), p);
  });
  return out;
}

at::Tensor triplane_sample_backward_planes_cpu(const at::Tensor& grad_output,
                                               const at::Tensor& planes, const at::Tensor& points,
                                               double box_warp, at::IntArrayRef axes,
                                               std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce, grad_output);
  at::Tensor grad_planes = at::zeros({p.B, kPlanes, p.H, p.W, p.C}, planes.options());
  if (grad_planes.numel() > 0 && p.N > 0) {
    const at::Tensor grad_c = grad_output.contiguous();
    const at::Tensor points_c = points.contiguous();
    AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_sample_backward_planes_cpu", [&] {
      backward_planes_kernel(grad_c.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
                             grad_planes.mutable_data_ptr<scalar_t>(), p);
    });
  }
  return grad_planes.permute({0, 1, 4, 2, 3});
}

at::Tensor triplane_sample_backward_points_cpu(const at::Tensor& grad_output,
                                               const at::Tensor& planes, const at::Tensor& points,
                                               double box_warp, at::IntArrayRef axes,
                                               std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce, grad_output);
  at::Tensor grad_points = at::empty({p.B, p.N, 3}, points.options());
  if (grad_points.numel() == 0) return grad_points;
  if (p.C == 0 || p.H == 0 || p.W == 0) return grad_points.zero_();
  const at::Tensor planes_cl = triplane::channels_innermost(planes);
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor points_c = points.contiguous();
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_sample_backward_points_cpu", [&] {
    backward_points_kernel(grad_c.const_data_ptr<scalar_t>(), planes_cl.const_data_ptr<scalar_t>(),
                           points_c.const_data_ptr<scalar_t>(),
                           grad_points.mutable_data_ptr<scalar_t>(), p);
  });
  return grad_points;
}

}  // namespace dreamportrait
