// CPU kernels of triplane_sample. The per-sample math lives in include/dreamportrait/triplane_math.h
// and is shared with the CUDA kernels.
//
// The kernels read planes channel-innermost, (B, 3, H, W, C): one bilinear tap is then C
// contiguous values, which vectorise (for_each_batch_element changes the layout). Each kernel is
// a function over a range of work items, run by at::parallel_for and compiled for several
// instruction sets (DP_CPU_CLONES).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>

#include "dreamportrait/cpu_dispatch.h"
#include "dreamportrait/ops.h"
#include "dreamportrait/triplane_cpu.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace {

using triplane::BilinearTaps;
using triplane::kPlanes;
using triplane::Problem;
using triplane::Reduce;

// Points per parallel work item: large enough to amortise scheduling, small enough to balance.
constexpr int64_t kPointGrain = 256;
// Channels summed at once in the forward pass, in a local array the compiler keeps in registers.
constexpr int64_t kChannelBlock = 32;
// Channels per work item of the plane-gradient scatter: one 64-byte line of float32, so two
// threads never write the same cache line.
constexpr int64_t kChannelChunk = 16;
// The scatter prefetches (for writing) the gradient lines of the point this many ahead: each
// point's four taps are read-modify-writes of lines that are seldom in cache, and without the
// prefetch the scatter spent most of its time waiting on those loads.
constexpr int64_t kScatterAhead = 8;
// The forward prefetches the plane rows of the point this many ahead (as sample_and_decode's
// gather does): the points' corner rows are spread over the planes and seldom in cache.
constexpr int64_t kGatherAhead = 4;

// Strides (plane, channel, y, x) of one batch element's planes.
struct PlaneStrides {
  int64_t plane, channel, y, x;
};

PlaneStrides strides_of(const at::Tensor& planes) {
  return {planes.stride(1), planes.stride(2), planes.stride(3), planes.stride(4)};
}

PlaneStrides channels_innermost_strides(const Problem& p) {
  return {p.H * p.W * p.C, 1, p.W * p.C, p.C};
}

// Copies plane rows [begin, end) of the 3 * H rows of one batch element from one layout to
// another; the layout change between (3, C, H, W) and (3, H, W, C) is a transpose of each row's
// C x W block, which stays in cache (torch's generic strided copy is ~2x slower here).
template <typename scalar_t>
DP_CPU_CLONES void copy_plane_rows(const scalar_t* __restrict__ src, PlaneStrides from,
                                   scalar_t* __restrict__ dst, PlaneStrides to, const Problem& p,
                                   int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / p.H, y = row % p.H;
    const scalar_t* __restrict__ src_row = src + plane * from.plane + y * from.y;
    scalar_t* __restrict__ dst_row = dst + plane * to.plane + y * to.y;
    for (int64_t c = 0; c < p.C; ++c)
      for (int64_t x = 0; x < p.W; ++x) dst_row[c * to.channel + x * to.x] = src_row[c * from.channel + x * from.x];
  }
}

template <typename scalar_t>
void copy_planes(const scalar_t* src, PlaneStrides from, scalar_t* dst, PlaneStrides to, const Problem& p) {
  at::parallel_for(0, kPlanes * p.H, 4, [&](int64_t begin, int64_t end) {
    copy_plane_rows(src, from, dst, to, p, begin, end);
  });
}

// Runs fn(begin, end) over [0, count) in tiles of kPointGrain, dealt to the threads round-robin:
// neighbouring points (rays) are processed at the same time by all threads, so the threads share
// the planes' cache lines rather than each working through a different part of the planes (as
// at::parallel_for's contiguous split would have them do).
template <typename F>
void parallel_over_tiles(int64_t count, const F& fn) {
  const int64_t tiles = (count + kPointGrain - 1) / kPointGrain;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tiles);
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    for (int64_t worker = first; worker < last; ++worker)
      for (int64_t tile = worker; tile < tiles; tile += workers)
        fn(tile * kPointGrain, std::min(count, (tile + 1) * kPointGrain));
  });
}

// Forward for points [begin, end) of batch element b; planes_b is (3, H, W, C).
template <typename scalar_t>
DP_CPU_CLONES void forward_points(const scalar_t* __restrict__ planes_b,
                                  const scalar_t* __restrict__ points, scalar_t* __restrict__ out,
                                  const Problem& p, int64_t b, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const bool per_plane = p.reduce == Reduce::kNone;
  // The taps of points n .. n + kGatherAhead - 1, point m's in ahead[(m - begin) % kGatherAhead].
  BilinearTaps<acc_t> ahead[kGatherAhead][kPlanes];
  auto taps_of = [&](int64_t n, BilinearTaps<acc_t>* taps) {
    const int64_t i = b * p.N + n;
    const acc_t point[3] = {points[i * 3], points[i * 3 + 1], points[i * 3 + 2]};
    for (int plane = 0; plane < kPlanes; ++plane)
      taps[plane] = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
    prefetch_point(planes_b, static_cast<const BilinearTaps<acc_t>*>(taps), p, p);
  };
  for (int64_t n = begin; n < std::min(begin + kGatherAhead, end); ++n) taps_of(n, ahead[n - begin]);
  for (int64_t n = begin; n < end; ++n) {
    BilinearTaps<acc_t> taps[kPlanes];
    BilinearTaps<acc_t>* slot = ahead[(n - begin) % kGatherAhead];
    std::copy(slot, slot + kPlanes, taps);
    if (n + kGatherAhead < end) taps_of(n + kGatherAhead, slot);
    // Channels in register-sized blocks: the sums stay in a local array, not in `out`.
    for (int64_t c0 = 0; c0 < p.C; c0 += kChannelBlock) {
      const int64_t count = std::min(kChannelBlock, p.C - c0);
      acc_t acc[kChannelBlock];
      for (int plane = 0; plane < kPlanes; ++plane) {
        if (plane == 0 || per_plane) std::fill(acc, acc + count, acc_t(0));
        const BilinearTaps<acc_t>& t = taps[plane];
        if (!t.finite) std::fill(acc, acc + count, std::numeric_limits<acc_t>::quiet_NaN());
        const scalar_t* base = planes_b + plane * p.H * p.W * p.C + c0;
        for (int dy = 0; dy < 2 && t.in_bounds; ++dy) {
          for (int dx = 0; dx < 2; ++dx) {
            if (!t.valid(dy, dx)) continue;
            const acc_t w = t.weight(dy, dx);
            const scalar_t* __restrict__ src = base + ((t.y0 + dy) * p.W + t.x0 + dx) * p.C;
            for (int64_t c = 0; c < count; ++c) acc[c] += w * src[c];
          }
        }
        if (per_plane || plane == kPlanes - 1) {
          scalar_t* __restrict__ dst = out + triplane::output_row(p, b, n, plane) + c0;
          for (int64_t c = 0; c < count; ++c) dst[c] = static_cast<scalar_t>(acc[c] * rw);
        }
      }
    }
  }
}

// Plane gradient of batch element b for work items [begin, end) of (plane, channel chunk);
// grad_planes_b is (3, H, W, C) and zero on entry. Each item scatters all N points into its own
// channels, so the adds of different threads never touch the same element.
template <typename scalar_t>
DP_CPU_CLONES void backward_planes_items(const scalar_t* __restrict__ grad_out,
                                         const scalar_t* __restrict__ points,
                                         scalar_t* __restrict__ grad_planes_b, const Problem& p,
                                         int64_t b, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const int64_t chunks = (p.C + kChannelChunk - 1) / kChannelChunk;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t chunk = item % chunks;
    const int plane = static_cast<int>(item / chunks);
    const int64_t c0 = chunk * kChannelChunk, count = std::min(kChannelChunk, p.C - c0);
    scalar_t* base = grad_planes_b + plane * p.H * p.W * p.C + c0;
    const int64_t chunk_bytes = count * int64_t(sizeof(scalar_t));
    auto taps_of = [&](int64_t n) {
      const scalar_t* pt = points + (b * p.N + n) * 3;
      const acc_t point[3] = {pt[0], pt[1], pt[2]};
      return triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
    };
    // The taps of points n .. n + kScatterAhead - 1, point m's in ahead[m % kScatterAhead].
    BilinearTaps<acc_t> ahead[kScatterAhead];
    auto prefetch = [&](const BilinearTaps<acc_t>& t) {
      if (!t.in_bounds) return;
      for (int dy = 0; dy < 2; ++dy) {
        const uintptr_t row = reinterpret_cast<uintptr_t>(base) +
                              ((t.y0 + dy) * p.W + t.x0) * p.C * int64_t(sizeof(scalar_t));
        for (int64_t byte = 0; byte < chunk_bytes; byte += kCacheLineBytes) {
          prefetch_line<true>(row + byte);
          prefetch_line<true>(row + p.C * int64_t(sizeof(scalar_t)) + byte);
        }
      }
    };
    for (int64_t n = 0; n < std::min(kScatterAhead, p.N); ++n) prefetch(ahead[n] = taps_of(n));
    for (int64_t n = 0; n < p.N; ++n) {
      const BilinearTaps<acc_t> t = ahead[n % kScatterAhead];
      if (n + kScatterAhead < p.N) prefetch(ahead[n % kScatterAhead] = taps_of(n + kScatterAhead));
      if (!t.in_bounds) continue;
      const scalar_t* __restrict__ g = grad_out + triplane::output_row(p, b, n, plane) + c0;
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (!t.valid(dy, dx)) continue;
          const scalar_t w = static_cast<scalar_t>(t.weight(dy, dx) * rw);
          scalar_t* __restrict__ dst = base + ((t.y0 + dy) * p.W + t.x0 + dx) * p.C;
          for (int64_t c = 0; c < count; ++c) dst[c] += w * g[c];
        }
      }
    }
  }
}

// Point gradient for points [begin, end) of batch element b. Corners outside the plane read
// `zeros` (C zeros) instead of branching, so the channel loop is one vectorised reduction per
// position coordinate.
template <typename scalar_t>
DP_CPU_CLONES void backward_points_range(const scalar_t* __restrict__ grad_out,
                                         const scalar_t* __restrict__ planes_b,
                                         const scalar_t* __restrict__ points,
                                         const scalar_t* __restrict__ zeros,
                                         scalar_t* __restrict__ grad_points, const Problem& p,
                                         int64_t b, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rw = triplane::reduce_weight<acc_t>(p.reduce);
  const acc_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * rw;
  const acc_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * rw;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t i = b * p.N + n;
    const acc_t point[3] = {points[i * 3], points[i * 3 + 1], points[i * 3 + 2]};
    acc_t grad[3] = {0, 0, 0};
    for (int plane = 0; plane < kPlanes; ++plane) {
      const auto t = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
      acc_t d_dx = 0, d_dy = 0;
      if (!t.finite) {
        d_dx = d_dy = std::numeric_limits<acc_t>::quiet_NaN();
      } else if (t.in_bounds) {
        const scalar_t* __restrict__ g = grad_out + triplane::output_row(p, b, n, plane);
        const scalar_t* base = planes_b + plane * p.H * p.W * p.C;
        const scalar_t* corner[2][2];
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx)
            corner[dy][dx] = t.valid(dy, dx) ? base + ((t.y0 + dy) * p.W + t.x0 + dx) * p.C : zeros;
        const scalar_t *__restrict__ v00 = corner[0][0], *__restrict__ v01 = corner[0][1];
        const scalar_t *__restrict__ v10 = corner[1][0], *__restrict__ v11 = corner[1][1];
        DP_SIMD_SUM(d_dx, d_dy)
        for (int64_t c = 0; c < p.C; ++c) {
          acc_t cx, cy;
          triplane::bilinear_position_grad<acc_t>(t, v00[c], v01[c], v10[c], v11[c], cx, cy);
          d_dx += static_cast<acc_t>(g[c]) * cx;
          d_dy += static_cast<acc_t>(g[c]) * cy;
        }
      }
      triplane::add_to_coordinate(grad, p.axes[2 * plane], d_dx * dx_dpoint);
      triplane::add_to_coordinate(grad, p.axes[2 * plane + 1], d_dy * dy_dpoint);
    }
    for (int k = 0; k < 3; ++k) grad_points[i * 3 + k] = static_cast<scalar_t>(grad[k]);
  }
}

}  // namespace

// Processing one element at a time lets the threads share its planes in the last-level cache
// instead of each streaming a different element's (which made a batch of 4 twice as slow per point).
// The workspace is half the output at EG3D's inference shape, a quarter at a batch of 4.
template <typename scalar_t>
void for_each_batch_element(const at::Tensor& planes, const Problem& p,
                            const std::function<void(int64_t, const scalar_t*)>& fn) {
  const scalar_t* data = planes.const_data_ptr<scalar_t>();
  if (triplane::is_channels_innermost(planes)) {
    for (int64_t b = 0; b < p.B; ++b) fn(b, data + b * planes.stride(0));
    return;
  }
  at::Tensor workspace = at::empty({kPlanes, p.H, p.W, p.C}, planes.options());
  scalar_t* workspace_ptr = workspace.mutable_data_ptr<scalar_t>();
  for (int64_t b = 0; b < p.B; ++b) {
    copy_planes(data + b * planes.stride(0), strides_of(planes), workspace_ptr, channels_innermost_strides(p), p);
    fn(b, static_cast<const scalar_t*>(workspace_ptr));
  }
}

template void for_each_batch_element<float>(const at::Tensor&, const Problem&,
                                            const std::function<void(int64_t, const float*)>&);
template void for_each_batch_element<double>(const at::Tensor&, const Problem&,
                                             const std::function<void(int64_t, const double*)>&);

at::Tensor triplane_sample_cpu(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                               at::IntArrayRef axes, std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce);
  at::Tensor out = triplane::empty_output(planes, p);
  if (out.numel() == 0) return out;
  const at::Tensor points_c = points.contiguous();
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_sample_cpu", [&] {
    const scalar_t* points_ptr = points_c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    for_each_batch_element<scalar_t>(planes, p, [&](int64_t b, const scalar_t* planes_b) {
      parallel_over_tiles(p.N, [&](int64_t begin, int64_t end) {
        forward_points(planes_b, points_ptr, out_ptr, p, b, begin, end);
      });
    });
  });
  return out;
}

// The plane gradient is contiguous (B, 3, C, H, W): each batch element is scattered into a
// channel-innermost workspace (C contiguous adds per tap) and transposed into place.
at::Tensor triplane_sample_backward_planes_cpu(const at::Tensor& grad_output,
                                               const at::Tensor& planes, const at::Tensor& points,
                                               double box_warp, at::IntArrayRef axes,
                                               std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce, grad_output);
  at::Tensor grad_planes = at::empty(planes.sizes(), planes.options());
  if (grad_planes.numel() == 0 || p.N == 0) return grad_planes.zero_();
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor points_c = points.contiguous();
  at::Tensor workspace = at::empty({kPlanes, p.H, p.W, p.C}, planes.options());
  const int64_t items = kPlanes * ((p.C + kChannelChunk - 1) / kChannelChunk);
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_sample_backward_planes_cpu", [&] {
    const scalar_t* grad_ptr = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* points_ptr = points_c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = grad_planes.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < p.B; ++b) {  // one batch element at a time, as for_each_batch_element
      scalar_t* scratch = workspace.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, workspace.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
        std::fill(scratch + begin, scratch + end, scalar_t(0));
      });
      at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        backward_planes_items(grad_ptr, points_ptr, scratch, p, b, begin, end);
      });
      copy_planes(static_cast<const scalar_t*>(scratch), channels_innermost_strides(p),
                  out_ptr + b * grad_planes.stride(0), strides_of(grad_planes), p);
    }
  });
  return grad_planes;
}

at::Tensor triplane_sample_backward_points_cpu(const at::Tensor& grad_output,
                                               const at::Tensor& planes, const at::Tensor& points,
                                               double box_warp, at::IntArrayRef axes,
                                               std::string_view reduce) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, reduce, grad_output);
  at::Tensor grad_points = at::empty({p.B, p.N, 3}, points.options());
  if (grad_points.numel() == 0) return grad_points;
  if (p.C == 0 || p.H == 0 || p.W == 0) return grad_points.zero_();
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor points_c = points.contiguous();
  const at::Tensor zeros = at::zeros({p.C}, planes.options());
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_sample_backward_points_cpu", [&] {
    const scalar_t* grad_ptr = grad_c.const_data_ptr<scalar_t>();
    const scalar_t* zeros_ptr = zeros.const_data_ptr<scalar_t>();
    const scalar_t* points_ptr = points_c.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = grad_points.mutable_data_ptr<scalar_t>();
    for_each_batch_element<scalar_t>(planes, p, [&](int64_t b, const scalar_t* planes_b) {
      parallel_over_tiles(p.N, [&](int64_t begin, int64_t end) {
        backward_points_range(grad_ptr, planes_b, points_ptr, zeros_ptr, out_ptr, p, b, begin, end);
      });
    });
  });
  return grad_points;
}

}  // namespace dreamportrait
