// Host emulations of the CUDA kernels' tile schedules, as test-only CPU operators. They run the
// same block programs as the GPU (attention_tiles.h, composite_scan.h), block after block, with a
// one-thread block and scalar tile products, so the CPU test suite checks the GPU's schedule: tile
// sizes, zero padding, the online softmax across key tiles, the per-block partial sums of the
// backward and the warp scans of the compositing.
//
//   attention_tile_emulation(q, k, v, gate, mask, scale, block_q, block_k) -> (out, lse)
//   attention_tile_emulation_backward(grad_out, q, k, v, gate, mask, lse, scale, block_q, block_k,
//                                     splits) -> (dq, dk, dv, dgate)
// take the arguments of gated_cross_attention(_backward) plus the tile sizes (multiples of 16) and
// the number of query splits of the backward (0: as many as the GPU launcher would make for an
// H100's 132 SMs).
//   attention_tile_shape(backward, Lk, D, dtype, shared_memory) -> [block_q, block_k, dim, bytes]
// is the tile shape the CUDA launcher picks on a GPU whose blocks may have `shared_memory` bytes,
// and the dynamic shared memory a block of it takes (for occupancy figures).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dreamportrait/attention_host.h"
#include "dreamportrait/attention_tiles.h"

namespace dreamportrait {
namespace {

namespace tiles = attention::tiles;

struct HostBlock {
  int thread() const { return 0; }
  int threads() const { return 1; }
  void sync() const {}
};

// Shared memory of one emulated block, aligned as the GPU's (every buffer offset is 128-aligned).
class SharedMemory {
 public:
  explicit SharedMemory(size_t bytes) : storage_((bytes + 127) / 128 + 1) {}
  unsigned char* data() { return reinterpret_cast<unsigned char*>(storage_.data()); }

 private:
  struct alignas(128) Line {
    unsigned char bytes[128];
  };
  std::vector<Line> storage_;
};

struct EmulateForward {
  template <typename scalar_t, typename acc_t>
  void operator()(const tiles::ForwardIo<scalar_t, acc_t>& io, int64_t blocks) const {
    SharedMemory smem(tiles::forward_layout<acc_t>(io.shape, sizeof(scalar_t)).bytes);
    for (int tile = 0; tile < blocks; ++tile) tiles::forward_tile<tiles::ScalarGemm>(HostBlock{}, smem.data(), io, tile);
  }
};

struct EmulateBackward {
  template <typename scalar_t, typename acc_t>
  void operator()(const tiles::BackwardIo<scalar_t, acc_t>& io, int64_t blocks) const {
    SharedMemory smem(tiles::backward_layout<acc_t>(io.shape, sizeof(scalar_t)).bytes);
    for (int tile = 0; tile < blocks; ++tile) tiles::backward_tile<tiles::ScalarGemm>(HostBlock{}, smem.data(), io, tile);
  }
};

attention::TilePlan emulation_plan(const at::Tensor& q, int64_t block_q, int64_t block_k, int64_t splits) {
  TORCH_CHECK(q.device().is_cpu(), "attention_tile_emulation: runs on CPU tensors, got ", q.device());
  for (const int64_t size : {block_q, block_k})
    TORCH_CHECK(size > 0 && size <= 256 && size % tiles::kFragment == 0,
                "attention_tile_emulation: block_q and block_k must be multiples of 16 in [16, 256], got ", size);
  TORCH_CHECK(splits >= 0, "attention_tile_emulation: splits must be >= 0 (0: as on the GPU), got ", splits);
  attention::TilePlan plan{0, 4 * 132};  // the backward's splits as for an H100's 132 SMs unless given
  plan.shape = {int(block_q), int(block_k), 0};
  plan.splits = splits;
  return plan;
}

std::tuple<at::Tensor, at::Tensor> attention_tile_emulation(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& gate,
                                                            const std::optional<at::Tensor>& key_padding_mask,
                                                            double scale, int64_t block_q, int64_t block_k) {
  const attention::Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  const attention::TilePlan plan = emulation_plan(q, block_q, block_k, 0);
  return attention::tiled_forward(p, plan, q, k, v, gate, key_padding_mask, EmulateForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_tile_emulation_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& lse, double scale,
    int64_t block_q, int64_t block_k, int64_t splits) {
  const attention::Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  attention::check_backward(p, q, grad_out, lse, at::toOpMathType(q.scalar_type()));
  const attention::TilePlan plan = emulation_plan(q, block_q, block_k, splits);
  return attention::tiled_backward(p, plan, grad_out, q, k, v, gate, key_padding_mask, lse, EmulateForward{},
                                   EmulateBackward{});
}

std::vector<int64_t> attention_tile_shape(bool backward, int64_t Lk, int64_t D, at::ScalarType dtype,
                                          int64_t shared_memory) {
  TORCH_CHECK(Lk >= 0 && D >= 0 && shared_memory > 0, "attention_tile_shape: Lk and D must be >= 0 and shared_memory > 0");
  TORCH_CHECK(at::isFloatingType(dtype), "attention_tile_shape: dtype must be a floating-point type, got ", dtype);
  std::vector<int64_t> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_tile_shape", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const tiles::Shape shape = tiles::choose_shape<acc_t>(backward, Lk, D, sizeof(scalar_t), size_t(shared_memory));
    const size_t bytes = shape.block_q == 0 ? 0
                         : backward       ? tiles::backward_layout<acc_t>(shape, sizeof(scalar_t)).bytes
                                          : tiles::forward_layout<acc_t>(shape, sizeof(scalar_t)).bytes;
    result = {shape.block_q, shape.block_k, shape.dim, int64_t(bytes)};
  });
  return result;
}

}  // namespace
}  // namespace dreamportrait

TORCH_LIBRARY_FRAGMENT(dreamportrait, m) {
  m.def("attention_tile_emulation(Tensor q, Tensor k, Tensor v, Tensor gate, Tensor? key_padding_mask, "
        "float scale, int block_q, int block_k) -> (Tensor out, Tensor lse)");
  m.def("attention_tile_emulation_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor gate, "
        "Tensor? key_padding_mask, Tensor lse, float scale, int block_q, int block_k, int splits) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_tile_shape(bool backward, int Lk, int D, ScalarType dtype, int shared_memory) -> int[]",
        &dreamportrait::attention_tile_shape);
}

TORCH_LIBRARY_IMPL(dreamportrait, CPU, m) {
  m.impl("attention_tile_emulation", &dreamportrait::attention_tile_emulation);
  m.impl("attention_tile_emulation_backward", &dreamportrait::attention_tile_emulation_backward);
}
