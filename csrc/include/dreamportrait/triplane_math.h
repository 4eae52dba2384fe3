// Per-sample math of triplane_sample, shared verbatim by the CPU and CUDA kernels.
//
// Each plane p is sampled like F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) at the normalised coordinates
//   u = points[..., axes[2p]] * 2 / box_warp,   v = points[..., axes[2p + 1]] * 2 / box_warp,
// u indexing the plane's width W and v its height H.
#pragma once

#include <cmath>
#include <cstdint>

#include "dreamportrait/common.h"

namespace dreamportrait {
namespace triplane {

constexpr int kPlanes = 3;

enum class Reduce : int { kMean = 0, kSum = 1, kNone = 2 };

// Sizes and arguments of one call; plain data so it is passed to CUDA kernels by value.
struct Problem {
  int64_t B, C, H, W, N;
  double scale;  // 2 / box_warp
  int64_t axes[6];
  Reduce reduce;
};

// Offset of the output row (b, n, plane) in a (B, N, C) ("mean"/"sum") or (B, N, 3, C) tensor.
DP_INLINE int64_t output_row(const Problem& p, int64_t b, int64_t n, int plane) {
  return p.reduce == Reduce::kNone ? ((b * p.N + n) * kPlanes + plane) * p.C : (b * p.N + n) * p.C;
}

// Pixel-space position of a normalised coordinate (align_corners=False):
// -1 is the left edge of the first pixel, +1 the right edge of the last.
template <typename T>
DP_INLINE T unnormalize(T coord, int64_t size) {
  return ((coord + T(1)) * static_cast<T>(size) - T(1)) * T(0.5);
}

// The four bilinear taps around a pixel-space position. Corners outside the plane carry
// weight zero and must not be read (zero padding); `in_bounds` says whether any tap is inside.
// A non-finite position samples NaN (as grid_sample does), so bad points are not hidden.
template <typename T>
struct BilinearTaps {
  int64_t x0, y0;        // top-left tap; the others are x0 + 1 and y0 + 1
  T fx, fy;              // fractional position inside the cell, in [0, 1]
  bool x0_in, x1_in, y0_in, y1_in;
  bool in_bounds;
  bool finite;

  DP_INLINE bool valid(int dy, int dx) const {
    return (dy ? y1_in : y0_in) && (dx ? x1_in : x0_in);
  }
  DP_INLINE T weight(int dy, int dx) const {
    return (dy ? fy : T(1) - fy) * (dx ? fx : T(1) - fx);
  }
};

// `x`, `y` are pixel-space positions. Far-away positions (which would overflow the integer cast)
// and non-finite ones have no tap inside the plane.
template <typename T>
DP_INLINE BilinearTaps<T> bilinear_taps(T x, T y, int64_t H, int64_t W) {
  BilinearTaps<T> t;
  t.finite = std::isfinite(x) && std::isfinite(y);
  // Written so that NaN fails the test.
  t.in_bounds = x >= T(-1) && x <= static_cast<T>(W) && y >= T(-1) && y <= static_cast<T>(H);
  if (!t.in_bounds) {
    t.x0 = t.y0 = 0;
    t.fx = t.fy = T(0);
    t.x0_in = t.x1_in = t.y0_in = t.y1_in = false;
    return t;
  }
  const T xf = std::floor(x);
  const T yf = std::floor(y);
  t.x0 = static_cast<int64_t>(xf);
  t.y0 = static_cast<int64_t>(yf);
  t.fx = x - xf;
  t.fy = y - yf;
  t.x0_in = t.x0 >= 0 && t.x0 < W;
  t.x1_in = t.x0 + 1 >= 0 && t.x0 + 1 < W;
  t.y0_in = t.y0 >= 0 && t.y0 < H;
  t.y1_in = t.y0 + 1 >= 0 && t.y0 + 1 < H;
  return t;
}

// Coordinate `axis` (0, 1 or 2) of a point. Selected, not indexed: on a GPU a local array indexed
// by a run-time value lives in local memory (the stack), while three selects stay in registers.
template <typename T>
DP_INLINE T coordinate(const T point[3], int64_t axis) {
  return axis == 0 ? point[0] : (axis == 1 ? point[1] : point[2]);
}

// grad[axis] += value, without indexing by `axis` (see coordinate()).
template <typename T>
DP_INLINE void add_to_coordinate(T grad[3], int64_t axis, T value) {
  if (axis == 0) grad[0] += value;
  if (axis == 1) grad[1] += value;
  if (axis == 2) grad[2] += value;
}

// Taps of plane p for one point. `point` holds the point's three coordinates, `scale` is
// 2 / box_warp and `axes` the six axis indices.
template <typename T>
DP_INLINE BilinearTaps<T> plane_taps(const T point[3], const int64_t axes[6], int p, T scale,
                                     int64_t H, int64_t W) {
  const T u = coordinate(point, axes[2 * p]) * scale;
  const T v = coordinate(point, axes[2 * p + 1]) * scale;
  return bilinear_taps(unnormalize(u, W), unnormalize(v, H), H, W);
}

// Derivatives of one channel's bilinear sample with respect to the pixel-space position,
// from its four corner values (zero where the corner is outside the plane).
template <typename T>
DP_INLINE void bilinear_position_grad(const BilinearTaps<T>& t, T v00, T v01, T v10, T v11,
                                      T& d_dx, T& d_dy) {
  d_dx = (v01 - v00) * (T(1) - t.fy) + (v11 - v10) * t.fy;
  d_dy = (v10 - v00) * (T(1) - t.fx) + (v11 - v01) * t.fx;
}

// Factor that turns d/d(pixel x) into d/d(point coordinate): dx/du * du/dpoint = (W / 2) * scale.
template <typename T>
DP_INLINE T pixel_per_point(int64_t size, T scale) {
  return static_cast<T>(size) * T(0.5) * scale;
}

// Weight of each plane's sample in the output: 1/3 for "mean", 1 otherwise.
template <typename T>
DP_INLINE T reduce_weight(Reduce reduce) {
  return reduce == Reduce::kMean ? T(1) / T(kPlanes) : T(1);
}

}  // namespace triplane
}  // namespace dreamportrait
