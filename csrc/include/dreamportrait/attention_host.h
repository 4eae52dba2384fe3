// Host-side argument checks of the gated_cross_attention operators, shared by the CPU and CUDA
// kernels. The Python front end raises friendlier errors first; these keep direct torch.ops calls
// memory-safe.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "dreamportrait/attention_math.h"
#include "dreamportrait/attention_tiles.h"
#include "dreamportrait/host_checks.h"

namespace dreamportrait {
namespace attention {

// Every tensor's shape, dtype and device; any strides (the kernels read through .contiguous()).
// float16 and bfloat16 are taken by the CUDA kernels, or where `reduced_precision` says so.
inline Problem check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& gate, const std::optional<at::Tensor>& mask, double scale,
                             std::optional<bool> reduced_precision = std::nullopt) {
  TORCH_CHECK(q.dim() == 4, "gated_cross_attention: q must have shape (B, H, Lq, D), got ", q.sizes());
  check_kernel_dtype("gated_cross_attention", "q", q, reduced_precision.value_or(takes_reduced_precision(q)));
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "gated_cross_attention: k must have shape (B, H, Lk, D) matching q, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "gated_cross_attention: v must have the shape of k, got ", v.sizes());
  TORCH_CHECK(gate.dim() == 1 && gate.size(0) == H, "gated_cross_attention: gate must have shape (H,), got ",
              gate.sizes());
  const std::pair<const at::Tensor*, const char*> like_q[] = {{&k, "k"}, {&v, "v"}, {&gate, "gate"}};
  for (const auto& [t, name] : like_q)
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), "gated_cross_attention: ", name,
                " must match q in dtype and device (", q.scalar_type(), " on ", q.device(), "), got ",
                t->scalar_type(), " on ", t->device());
  if (mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == k.size(2) &&
                    mask->scalar_type() == at::kBool && mask->device() == q.device(),
                "gated_cross_attention: key_padding_mask must be a bool (B, Lk) tensor on q's device, got ",
                mask->scalar_type(), " ", mask->sizes());
  }
  TORCH_CHECK(std::isfinite(scale), "gated_cross_attention: scale must be finite, got ", scale);
  return {B, H, Lq, k.size(2), D, scale, mask.has_value()};
}

// The backward's own arguments: the output gradient has q's shape, dtype and device; the
// log-sum-exp is (B, H, Lq) of `lse_type` on q's device (each kernel reads B*H*Lq values of it).
inline void check_backward(const Problem& p, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& lse,
                           at::ScalarType lse_type) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.device() == q.device(),
              "gated_cross_attention_backward: grad_out must be a ", q.scalar_type(), " tensor of q's shape ",
              q.sizes(), " on ", q.device(), ", got ", grad_out.scalar_type(), " ", grad_out.sizes(), " on ",
              grad_out.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.Lq &&
                  lse.scalar_type() == lse_type && lse.device() == q.device(),
              "gated_cross_attention_backward: lse must be a ", lse_type, " tensor of shape (", p.B, ", ", p.H,
              ", ", p.Lq, ") on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
}

// ---- The host side of the tiled kernels (attention_tiles.h), shared by the CUDA launcher and the
// host emulation. They differ in how a launch runs: `launch_forward(io, blocks)` and
// `launch_backward(io, blocks)` run the block programs forward_tile and backward_tile for blocks
// 0..blocks-1, on the GPU or one after the other on the host.

// How the tile sizes, the forward's query tiles per block and the backward's query splits are
// chosen: from the shared memory a block may have and `target_blocks`, a few blocks per SM (the
// backward's blocks; the forward aims at twice as many, each taking as many query tiles as that
// leaves, so that K and V are staged once for several), unless `shape` (block_q > 0; block_d 0
// or past the head dim: not split), `tiles_per_block` or `splits` (> 0) are given.
struct TilePlan {
  size_t shared_memory;
  int64_t target_blocks;
  tiles::Shape shape{0, 0, 0, 0};
  int64_t tiles_per_block = 0;
  int64_t splits = 0;

  template <typename acc_t>
  tiles::Shape shape_for(bool backward, const Problem& p, int element_bytes) const {
    if (shape.block_q > 0) {
      const int dim = round_up(p.D > 0 ? p.D : 1, tiles::kFragment);
      return {shape.block_q, shape.block_k, dim, shape.block_d > 0 && shape.block_d < dim ? shape.block_d : dim};
    }
    const tiles::Shape chosen = tiles::choose_shape<acc_t>(backward, p.Lk, p.D, element_bytes, shared_memory);
    TORCH_CHECK(chosen.block_q > 0, "gated_cross_attention: the ", shared_memory, " bytes of shared memory a ",
                "block may have on this GPU do not hold even 16 x 16 tiles (use backend='triton' or 'reference')");
    return chosen;
  }
};

inline at::Tensor contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask ? mask->contiguous() : at::Tensor();
}

// The tile programs index blocks, (batch, head) pairs, query and key tiles and head-dim columns with
// 32-bit ints, as a CUDA grid does its blocks: a problem past that is refused before anything is
// allocated or read (the CPU kernel has no such limit).
inline void check_head_dim(const Problem& p) {
  check_int32("gated_cross_attention", "q", "head-dim columns (D rounded up to 16)",
              p.D <= kMaxInt32 - tiles::kFragment ? p.D : kMaxInt32 + int64_t(1));
  check_int32("gated_cross_attention", "q", "(batch, head) pairs", saturating_mul(p.B, p.H));
}

inline void check_tiles(const Problem& p, const tiles::Shape& shape) {
  check_int32("gated_cross_attention", "q", "query tiles per head", ceil_div(p.Lq, shape.block_q));
  check_int32("gated_cross_attention", "k", "key tiles per head", ceil_div(p.Lk, shape.block_k));
}

// Blocks of a launch: the (batch, head) pairs times `per_head` blocks each.
inline int64_t checked_blocks(const Problem& p, int64_t per_head) {
  const int64_t blocks = saturating_mul(saturating_mul(p.B, p.H), per_head);
  check_int32("gated_cross_attention", "q", "blocks", blocks);
  return blocks;
}

// The forward's tiles and blocks, checked; no tensor is read.
template <typename scalar_t, typename acc_t>
tiles::ForwardIo<scalar_t, acc_t> forward_schedule(const Problem& p, const TilePlan& plan) {
  check_head_dim(p);
  tiles::ForwardIo<scalar_t, acc_t> io{};
  io.p = p;
  io.shape = plan.shape_for<acc_t>(false, p, sizeof(scalar_t));
  check_tiles(p, io.shape);
  io.query_tiles = ceil_div(p.Lq, io.shape.block_q);
  const int64_t per_block =
      saturating_mul(saturating_mul(p.B * p.H, io.query_tiles), tiles::column_parts(io.shape)) / (2 * plan.target_blocks);
  io.tiles_per_block = plan.tiles_per_block > 0 ? plan.tiles_per_block : (per_block > 1 ? per_block : 1);
  checked_blocks(p, saturating_mul(tiles::forward_blocks_per_head(io.query_tiles, io.tiles_per_block),
                                   tiles::column_parts(io.shape)));
  return io;
}

// Per (batch, head): its groups of query tiles times the head dim's column chunks.
template <typename scalar_t, typename acc_t>
int64_t forward_blocks(const Problem& p, const tiles::ForwardIo<scalar_t, acc_t>& io) {
  return p.B * p.H * tiles::forward_blocks_per_head(io.query_tiles, io.tiles_per_block) *
         tiles::column_parts(io.shape);
}

template <typename scalar_t, typename acc_t>
tiles::ForwardIo<scalar_t, acc_t> forward_io(const Problem& p, const TilePlan& plan, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
                                             const at::Tensor& mask) {
  tiles::ForwardIo<scalar_t, acc_t> io = forward_schedule<scalar_t, acc_t>(p, plan);
  io.q = q.const_data_ptr<scalar_t>();
  io.k = k.const_data_ptr<scalar_t>();
  io.v = v.const_data_ptr<scalar_t>();
  io.gate = gate.const_data_ptr<scalar_t>();
  io.mask = p.has_mask ? mask.const_data_ptr<bool>() : nullptr;
  return io;
}

// out (B, H, Lq, D) and lse (B, H, Lq) in the accumulation type.
template <class LaunchForward>
std::tuple<at::Tensor, at::Tensor> tiled_forward(const Problem& p, const TilePlan& plan, const at::Tensor& q,
                                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 LaunchForward launch_forward) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_cross_attention_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_schedule<scalar_t, acc_t>(p, plan);  // checks the tiles and blocks before anything is allocated
  });
  at::Tensor out = at::empty({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (lse.numel() == 0) return {out, lse};
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous(), gate_c = gate.contiguous(),
                   mask_c = contiguous_mask(key_padding_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_cross_attention_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto io = forward_io<scalar_t, acc_t>(p, plan, q_c, k_c, v_c, gate_c, mask_c);
    io.out = out.mutable_data_ptr<scalar_t>();
    io.lse = lse.mutable_data_ptr<acc_t>();
    launch_forward(io, forward_blocks(p, io));
  });
  return {out, lse};
}

// dq, dk, dv and dgate (H,) in q's dtype. The key-tile blocks, preceded, when the keys take more
// than one tile, by the forward's schedule for dO . A per row and column chunk, summed here into
// dO . A and delta = tanh(g) dO . A (with one key tile the blocks form them); the partials (dq per
// key tile, dk and dv per query split, dO . A per row) are summed here, in a fixed order.
template <class LaunchForward, class LaunchBackward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_backward(
    const Problem& p, const TilePlan& plan, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& lse, LaunchForward launch_forward, LaunchBackward launch_backward) {
  const auto acc_options = q.options().dtype(at::toOpMathType(q.scalar_type()));
  const auto dtype = q.scalar_type();
  if (q.numel() == 0 || k.numel() == 0) {  // nothing attends or nothing to attend to
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), q.options()), at::zeros(v.sizes(), q.options()),
            at::zeros({p.H}, q.options())};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gated_cross_attention_backward_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // the tiles and blocks, checked before anything is allocated or read
    check_head_dim(p);
    const tiles::Shape shape = plan.shape_for<acc_t>(true, p, sizeof(scalar_t));
    check_tiles(p, shape);
    const int64_t query_tiles = ceil_div(p.Lq, shape.block_q), key_tiles = ceil_div(p.Lk, shape.block_k);
    const int64_t per_head = saturating_mul(key_tiles, tiles::column_parts(shape));
    checked_blocks(p, per_head);  // so that the splits' arithmetic cannot overflow
    const int64_t splits = plan.splits > 0 ? plan.splits
                                           : tiles::backward_splits(query_tiles, per_head, p.B * p.H, plan.target_blocks);
    checked_blocks(p, saturating_mul(splits, per_head));
    if (key_tiles > 1) forward_schedule<scalar_t, acc_t>(p, plan);
  });
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous(), gate_c = gate.contiguous(),
                   g_c = grad_out.contiguous(), lse_c = lse.contiguous(), mask_c = contiguous_mask(key_padding_mask);
  const at::Tensor gate_value = at::tanh(gate_c.to(acc_options.dtype()));
  at::Tensor gate_dot, delta;
  at::Tensor dq_partial, dk_partial, dv_partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gated_cross_attention_backward_tiled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    tiles::BackwardIo<scalar_t, acc_t> io{};
    io.p = p;
    io.shape = plan.shape_for<acc_t>(true, p, sizeof(scalar_t));
    io.query_tiles = ceil_div(p.Lq, io.shape.block_q);
    io.key_tiles = ceil_div(p.Lk, io.shape.block_k);
    if (io.key_tiles > 1) {
      auto first = forward_io<scalar_t, acc_t>(p, plan, q_c, k_c, v_c, gate_c, mask_c);
      const at::Tensor chunk_dots = at::empty({tiles::column_parts(first.shape), p.B, p.H, p.Lq}, acc_options);
      first.grad_out = g_c.const_data_ptr<scalar_t>();
      first.gate_dot = chunk_dots.mutable_data_ptr<acc_t>();
      launch_forward(first, forward_blocks(p, first));
      gate_dot = chunk_dots.sum(0);
      delta = gate_dot.mul(gate_value.view({1, p.H, 1})).contiguous();
      io.delta = delta.const_data_ptr<acc_t>();
    } else {
      gate_dot = at::empty({p.B, p.H, p.Lq}, acc_options);
      io.gate_dot = gate_dot.mutable_data_ptr<acc_t>();
    }
    io.splits = plan.splits > 0 ? plan.splits
                                : tiles::backward_splits(io.query_tiles, io.key_tiles * tiles::column_parts(io.shape),
                                                         p.B * p.H, plan.target_blocks);
    dq_partial = at::empty({io.key_tiles, p.B, p.H, p.Lq, p.D}, acc_options);
    dk_partial = at::empty({io.splits, p.B, p.H, p.Lk, p.D}, acc_options);
    dv_partial = at::empty({io.splits, p.B, p.H, p.Lk, p.D}, acc_options);
    io.grad_out = g_c.const_data_ptr<scalar_t>();
    io.q = q_c.const_data_ptr<scalar_t>();
    io.k = k_c.const_data_ptr<scalar_t>();
    io.v = v_c.const_data_ptr<scalar_t>();
    io.gate = gate_c.const_data_ptr<scalar_t>();
    io.mask = p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr;
    io.lse = lse_c.const_data_ptr<acc_t>();
    io.dq_partial = dq_partial.mutable_data_ptr<acc_t>();
    io.dk_partial = dk_partial.mutable_data_ptr<acc_t>();
    io.dv_partial = dv_partial.mutable_data_ptr<acc_t>();
    launch_backward(io, p.B * p.H * io.splits * io.key_tiles * tiles::column_parts(io.shape));
  });
  const at::Tensor dgate = gate_dot.sum({0, 2}).mul(gate_value.mul(gate_value).neg().add(1));  // (1 - tanh^2) dO . A
  return {dq_partial.sum(0).to(dtype), dk_partial.sum(0).to(dtype), dv_partial.sum(0).to(dtype), dgate.to(dtype)};
}

}  // namespace attention
}  // namespace dreamportrait
