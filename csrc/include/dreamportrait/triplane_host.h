// Host-side helpers of the triplane_sample operators shared by the CPU and CUDA kernels: argument
// checks (the Python front end raises friendlier errors first; these keep direct torch.ops calls
// memory-safe) and the channel-innermost plane layout the kernels read.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>

#include "dreamportrait/host_checks.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace triplane {

inline Reduce parse_reduce(std::string_view reduce) {
  if (reduce == "mean") return Reduce::kMean;
  if (reduce == "sum") return Reduce::kSum;
  if (reduce == "none") return Reduce::kNone;
  TORCH_CHECK(false, "triplane_sample: reduce must be 'mean', 'sum' or 'none', got '", reduce, "'");
}

// Every tensor's shape, dtype and device; any strides (the kernels read through .contiguous() or
// a channel-innermost copy). `reduced_precision`: whether float16 and bfloat16 are taken (default:
// on GPU tensors only; the host emulations of the CUDA schedule take them on the CPU).
inline Problem check_problem(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                             at::IntArrayRef axes, std::string_view reduce,
                             const std::optional<at::Tensor>& grad_output = std::nullopt,
                             std::optional<bool> reduced_precision = std::nullopt) {
  TORCH_CHECK(planes.dim() == 5 && planes.size(1) == kPlanes,
              "triplane_sample: planes must have shape (B, 3, C, H, W), got ", planes.sizes());
  check_kernel_dtype("triplane_sample", "planes", planes, reduced_precision.value_or(takes_reduced_precision(planes)));
  TORCH_CHECK(points.dim() == 3 && points.size(2) == 3,
              "triplane_sample: points must have shape (B, N, 3), got ", points.sizes());
  TORCH_CHECK(points.size(0) == planes.size(0), "triplane_sample: points batch ", points.size(0),
              " does not match planes batch ", planes.size(0));
  TORCH_CHECK(points.scalar_type() == planes.scalar_type(), "triplane_sample: points dtype ",
              points.scalar_type(), " does not match planes dtype ", planes.scalar_type());
  TORCH_CHECK(points.device() == planes.device(), "triplane_sample: points device ",
              points.device(), " does not match planes device ", planes.device());
  TORCH_CHECK(std::isfinite(box_warp) && box_warp > 0,
              "triplane_sample: box_warp must be a finite positive number, got ", box_warp);
  TORCH_CHECK(axes.size() == 6, "triplane_sample: axes must hold six ints, got ", axes.size());
  Problem p{planes.size(0), planes.size(2), planes.size(3), planes.size(4), points.size(1),
            2.0 / box_warp, {}, parse_reduce(reduce)};
  for (size_t i = 0; i < 6; ++i) {
    TORCH_CHECK(axes[i] >= 0 && axes[i] < 3, "triplane_sample: axes must be in {0, 1, 2}, got ",
                axes);
    p.axes[i] = axes[i];
  }
  if (grad_output) {
    const auto& g = *grad_output;
    const bool none = p.reduce == Reduce::kNone;
    const bool shape_ok = none ? (g.dim() == 4 && g.size(0) == p.B && g.size(1) == p.N &&
                                  g.size(2) == kPlanes && g.size(3) == p.C)
                               : (g.dim() == 3 && g.size(0) == p.B && g.size(1) == p.N &&
                                  g.size(2) == p.C);
    TORCH_CHECK(shape_ok, "triplane_sample_backward: grad_output has shape ", g.sizes(),
                ", which does not match the forward output");
    TORCH_CHECK(g.scalar_type() == planes.scalar_type() && g.device() == planes.device(),
                "triplane_sample_backward: grad_output must match planes in dtype and device");
  }
  return p;
}

// Uninitialised output: (B, N, C) for "mean"/"sum", (B, N, 3, C) for "none".
inline at::Tensor empty_output(const at::Tensor& planes, const Problem& p) {
  if (p.reduce == Reduce::kNone) return at::empty({p.B, p.N, kPlanes, p.C}, planes.options());
  return at::empty({p.B, p.N, p.C}, planes.options());
}

// Whether planes (B, 3, C, H, W) are stored as a contiguous (B, 3, H, W, C) tensor.
inline bool is_channels_innermost(const at::Tensor& planes) {
  return planes.permute({0, 1, 3, 4, 2}).is_contiguous();
}

// (B, 3, C, H, W) -> (B, 3, H, W, C) contiguous; no copy when the planes are stored that way.
// (The kernels' outputs are always contiguous, whatever the inputs' layout.)
inline at::Tensor channels_innermost(const at::Tensor& planes) {
  return planes.permute({0, 1, 3, 4, 2}).contiguous();
}



}  // namespace triplane
}  // namespace dreamportrait
