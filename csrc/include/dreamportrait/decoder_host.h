// Host side of the sample_and_decode operators: argument checks shared by the CPU and CUDA kernels
// (the Python front end raises friendlier errors first; these keep direct torch.ops calls
// memory-safe; the tri-plane half is checked by triplane::check_problem), and the host half of the
// CUDA kernels' tiled schedule (decoder_tiles.h), shared by their launcher and the host emulation.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "dreamportrait/decoder_tiles.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace decoder {

// Sizes of the decoder: C input features (the planes' channels), K hidden units, O outputs.
struct Sizes {
  int64_t C, K, O;
};

// weight1 (K, C), bias1 (K,), weight2 (O, K), bias2 (O,), O >= 2, all like planes (B, 3, C, H, W).
inline Sizes check_weights(const at::Tensor& planes, const at::Tensor& weight1, const at::Tensor& bias1,
                           const at::Tensor& weight2, const at::Tensor& bias2) {
  const int64_t C = planes.size(2);
  const std::pair<const at::Tensor*, const char*> weights[] = {
      {&weight1, "weight1"}, {&bias1, "bias1"}, {&weight2, "weight2"}, {&bias2, "bias2"}};
  for (const auto& [t, name] : weights) {
    TORCH_CHECK(t->scalar_type() == planes.scalar_type() && t->device() == planes.device(), "sample_and_decode: ",
                name, " must match planes in dtype and device (", planes.scalar_type(), " on ", planes.device(),
                "), got ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(weight1.dim() == 2 && weight1.size(1) == C && weight1.size(0) >= 1,
              "sample_and_decode: weight1 must have shape (K, ", C, "), got ", weight1.sizes());
  const int64_t K = weight1.size(0);
  TORCH_CHECK(bias1.dim() == 1 && bias1.size(0) == K, "sample_and_decode: bias1 must have shape (", K,
              ",), got ", bias1.sizes());
  TORCH_CHECK(weight2.dim() == 2 && weight2.size(1) == K && weight2.size(0) >= 2,
              "sample_and_decode: weight2 must have shape (O, ", K, ") with O >= 2, got ", weight2.sizes());
  const int64_t O = weight2.size(0);
  TORCH_CHECK(bias2.dim() == 1 && bias2.size(0) == O, "sample_and_decode: bias2 must have shape (", O,
              ",), got ", bias2.sizes());
  return {C, K, O};
}

// grad_output (B, N, O) like planes.
inline void check_grad_output(const at::Tensor& grad_output, const triplane::Problem& p, const Sizes& d,
                              const at::Tensor& planes) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == p.B && grad_output.size(1) == p.N &&
                  grad_output.size(2) == d.O,
              "sample_and_decode_backward: grad_output must have shape (", p.B, ", ", p.N, ", ", d.O, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == planes.scalar_type() && grad_output.device() == planes.device(),
              "sample_and_decode_backward: grad_output must match planes in dtype and device (", planes.scalar_type(),
              " on ", planes.device(), "), got ", grad_output.scalar_type(), " on ", grad_output.device());
}

// ---- The tiled schedule of the CUDA kernels (decoder_tiles.h).

// What a launch is planned for: the shared memory a block may have, and the GPU's SM count.
struct TileTarget {
  int64_t shared_memory;
  int64_t sms;
};

// The largest tile whose buffers fit the target's shared memory, checked.
inline tiles::Layout tile_layout(const Sizes& d, const TileTarget& target, bool backward, at::ScalarType dtype,
                                 const char* op) {
  const size_t element_size = at::elementSize(at::toOpMathType(dtype));
  const tiles::Layout l = tiles::largest_layout(d.C, d.K, d.O, backward, element_size, size_t(target.shared_memory));
  TORCH_CHECK(size_t(l.total) * element_size <= size_t(target.shared_memory), op, ": the decoder (C=", d.C, ", K=",
              d.K, ", O=", d.O, ") needs ", size_t(l.total) * element_size,
              " bytes of shared memory per block, more than this GPU's ", target.shared_memory);
  return l;
}

// Blocks of a launch: a few per SM, at most one per tile. The block programs count tiles in an int
// (64-bit counters cost the backward a register it does not have), stepping past the last by at
// most the tiles again: 2^30 tiles at most.
inline int64_t tile_blocks(const triplane::Problem& p, const tiles::Layout& l, const TileTarget& target) {
  const int64_t tiles = p.B * ceil_div(p.N, l.tile);
  TORCH_CHECK(tiles <= kMaxInt32 / 2, "sample_and_decode: points is too large: it makes ", tiles, " tiles of ", l.tile,
              " points, more than the 2^30 the kernels' 32-bit tile counter holds");
  return std::max<int64_t>(1, std::min<int64_t>(tiles, target.sms * tiles::kBlocksPerSm));
}

// The forward on the tiled schedule: launch(io, blocks, shared_bytes) runs forward_block for blocks
// 0 .. blocks - 1 with io (tiles::ForwardIo). Arguments checked by the caller.
template <class Launch>
at::Tensor tiled_forward(const triplane::Problem& p, const Sizes& d, const TileTarget& target,
                         const at::Tensor& planes, const at::Tensor& points, const at::Tensor& weight1,
                         const at::Tensor& bias1, const at::Tensor& weight2, const at::Tensor& bias2, Launch launch) {
  const tiles::Layout l = tile_layout(d, target, false, planes.scalar_type(), "sample_and_decode");
  at::Tensor out = at::empty({p.B, p.N, d.O}, planes.options());
  if (out.numel() == 0) return out;
  const at::Tensor planes_cl = triplane::channels_innermost(planes);
  const at::Tensor points_c = points.contiguous(), w1 = weight1.contiguous(), b1 = bias1.contiguous(),
                   w2 = weight2.contiguous(), b2 = bias2.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(), "sample_and_decode_tiled", [&] {
    const tiles::ForwardIo<scalar_t> io{planes_cl.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
                                        w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(),
                                        w2.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(),
                                        out.mutable_data_ptr<scalar_t>(), p, l};
    launch(io, tile_blocks(p, l, target), size_t(l.total) * sizeof(at::opmath_type<scalar_t>));
  });
  return out;
}

// The backward on the tiled schedule: launch(io, blocks, shared_bytes, grad_weights) runs
// backward_block for blocks 0 .. blocks - 1 with io (tiles::BackwardIo), then writes each of the
// io.l.weights gradients to grad_weights (scalar_t) with tiles::sum_partials. Arguments checked by
// the caller. Returns (grad_planes, grad_points, grad_weight1, grad_bias1, grad_weight2, grad_bias2).
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_backward(
    const triplane::Problem& p, const Sizes& d, const TileTarget& target, const at::Tensor& grad_output,
    const at::Tensor& planes, const at::Tensor& points, const at::Tensor& weight1, const at::Tensor& bias1,
    const at::Tensor& weight2, const at::Tensor& bias2, bool needs_planes, bool needs_points, Launch launch) {
  const tiles::Layout l = tile_layout(d, target, true, planes.scalar_type(), "sample_and_decode_backward");
  const auto acc_dtype = at::toOpMathType(planes.scalar_type());
  // The weight gradients, flat in the Layout's order: w1 (K, C), b1 (K), w2 (O, K), b2 (O).
  at::Tensor grad_weights = at::zeros({l.weights}, planes.options());
  at::Tensor grad_planes = needs_planes ? at::zeros({p.B, triplane::kPlanes, p.H, p.W, p.C},
                                                    planes.options().dtype(acc_dtype))
                                        : at::empty({0}, planes.options());
  at::Tensor grad_points = needs_points ? at::zeros({p.B, p.N, 3}, points.options()) : at::empty({0}, points.options());
  if (p.B > 0 && p.N > 0) {
    const at::Tensor planes_cl = triplane::channels_innermost(planes);
    const at::Tensor grad_c = grad_output.contiguous(), points_c = points.contiguous(), w1 = weight1.contiguous(),
                     b1 = bias1.contiguous(), w2 = weight2.contiguous(), b2 = bias2.contiguous();
    const int64_t blocks = tile_blocks(p, l, target);
    at::Tensor partials = at::empty({blocks, l.weights}, planes.options().dtype(acc_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(), "sample_and_decode_backward_tiled",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const tiles::BackwardIo<scalar_t, acc_t> io{
          grad_c.const_data_ptr<scalar_t>(), planes_cl.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
          w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(),
          b2.const_data_ptr<scalar_t>(), needs_planes ? grad_planes.mutable_data_ptr<acc_t>() : nullptr,
          needs_points ? grad_points.mutable_data_ptr<scalar_t>() : nullptr, partials.mutable_data_ptr<acc_t>(), p, l};
      launch(io, blocks, size_t(l.total) * sizeof(acc_t), grad_weights.mutable_data_ptr<scalar_t>());
    });
  }
  if (needs_planes) grad_planes = grad_planes.to(planes.scalar_type()).permute({0, 1, 4, 2, 3}).contiguous();
  int64_t offset = 0;
  auto next = [&](at::IntArrayRef shape, int64_t count) {
    at::Tensor part = grad_weights.narrow(0, offset, count).view(shape);
    offset += count;
    return part;
  };
  at::Tensor gw1 = next({d.K, d.C}, d.K * d.C), gb1 = next({d.K}, d.K), gw2 = next({d.O, d.K}, d.O * d.K),
             gb2 = next({d.O}, d.O);
  return {grad_planes, grad_points, gw1, gb1, gw2, gb2};
}

}  // namespace decoder
}  // namespace dreamportrait
