// Host emulations of the CUDA kernels' schedules, as test-only CPU operators. They run the same
// block and warp programs as the GPU (attention_tiles.h: block after block, with a one-thread
// block and scalar tile products; composite_scan.h: a warp of 32 threads; decoder_tiles.h: block
// after block, each a block of threads that meet at every barrier and warp exchange), so the CPU
// test suite checks the GPU's schedule: tile sizes, zero padding, the online softmax across key
// tiles, the per-block partial sums of the backward, the warp scans of the compositing and the
// warp-per-point sampling of the fused decoder.
//
//   attention_tile_emulation(q, k, v, gate, mask, scale, block_q, block_k, tiles_per_block,
//                            block_d=0) -> (out, lse)
//   attention_tile_emulation_backward(grad_out, q, k, v, gate, mask, lse, scale, block_q, block_k,
//                                     tiles_per_block, splits, block_d=0) -> (dq, dk, dv, dgate)
// take the arguments of gated_cross_attention(_backward) plus the tile sizes (multiples of 16), the
// query tiles per forward block, the number of query splits of the backward (0: as many as the
// GPU launcher would make for an H100's 132 SMs) and the head dim's columns per tile (0: all).
//   attention_tile_shape(backward, Lk, D, dtype, shared_memory)
//       -> [block_q, block_k, dim, block_d, bytes]
// is the tile shape the CUDA launcher picks on a GPU whose blocks may have `shared_memory` bytes,
// and the dynamic shared memory a block of it takes (for occupancy figures).
//   composite_warp_emulation(densities, colors, depths, deltas, threshold) and
//   composite_warp_emulation_backward(grad_rgb, grad_depth, grad_opacity, grad_weights, densities,
//                                     colors, depths, deltas)
// take the arguments of composite_rays(_backward); a warp is 32 threads that meet at every shuffle.
//   sample_and_decode_tile_shape(backward, C, K, O, dtype, shared_memory) -> [tile, bytes]
// is the tile (points per block) the CUDA launcher picks for a decoder C -> K -> O on a GPU whose
// blocks may have `shared_memory` bytes, and the block's dynamic shared memory ([0, 0]: none fits).
//   sample_and_decode_tile_emulation(planes, points, box_warp, axes, weight1, bias1, weight2, bias2,
//                                    shared_memory, sms, threads) -> out
//   sample_and_decode_tile_emulation_backward(grad_output, planes, points, box_warp, axes, weight1,
//       bias1, weight2, bias2, needs_planes, needs_points, shared_memory, sms, threads)
//       -> (grad_planes, grad_points, grad_weight1, grad_bias1, grad_weight2, grad_bias2)
// take the arguments of sample_and_decode(_backward) plus the GPU planned for (a block's shared
// memory in bytes, which sets the tile, and the SM count, which sets the blocks) and the threads
// of an emulated block (a multiple of 32 up to 256; the GPU's blocks have 256).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dreamportrait/attention_host.h"
#include "dreamportrait/attention_tiles.h"
#include "dreamportrait/composite_host.h"
#include "dreamportrait/composite_scan.h"
#include "dreamportrait/decoder_host.h"
#include "dreamportrait/decoder_tiles.h"

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
    for (int tile = 0; tile < blocks; ++tile)
      tiles::forward_tile<tiles::ScalarGemm>(HostBlock{}, smem.data(), io, tile);
  }
};

struct EmulateBackward {
  template <typename scalar_t, typename acc_t>
  void operator()(const tiles::BackwardIo<scalar_t, acc_t>& io, int64_t blocks) const {
    SharedMemory smem(tiles::backward_layout<acc_t>(io.shape, sizeof(scalar_t)).bytes);
    for (int tile = 0; tile < blocks; ++tile)
      tiles::backward_tile<tiles::ScalarGemm>(HostBlock{}, smem.data(), io, tile);
  }
};

attention::TilePlan emulation_plan(const at::Tensor& q, int64_t block_q, int64_t block_k, int64_t tiles_per_block,
                                   int64_t splits, int64_t block_d) {
  TORCH_CHECK(q.device().is_cpu(), "attention_tile_emulation: runs on CPU tensors, got ", q.device());
  for (const int64_t size : {block_q, block_k})
    TORCH_CHECK(size > 0 && size <= 256 && size % tiles::kFragment == 0,
                "attention_tile_emulation: block_q and block_k must be multiples of 16 in [16, 256], got ", size);
  TORCH_CHECK(block_d >= 0 && block_d <= 256 && block_d % tiles::kFragment == 0,
              "attention_tile_emulation: block_d must be 0 (the whole head dim) or a multiple of 16 in [16, 256], ",
              "got ", block_d);
  TORCH_CHECK(tiles_per_block >= 0 && splits >= 0,
              "attention_tile_emulation: tiles_per_block and splits must be >= 0 (0: as on the GPU), got ",
              tiles_per_block, " and ", splits);
  attention::TilePlan plan{0, 4 * 132};  // the backward's splits as for an H100's 132 SMs unless given
  plan.shape = {int(block_q), int(block_k), 0, int(block_d)};
  plan.tiles_per_block = tiles_per_block;
  plan.splits = splits;
  return plan;
}

std::tuple<at::Tensor, at::Tensor> attention_tile_emulation(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& gate,
                                                            const std::optional<at::Tensor>& key_padding_mask,
                                                            double scale, int64_t block_q, int64_t block_k,
                                                            int64_t tiles_per_block, int64_t block_d) {
  const attention::Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale, true);
  const attention::TilePlan plan = emulation_plan(q, block_q, block_k, tiles_per_block, 0, block_d);
  return attention::tiled_forward(p, plan, q, k, v, gate, key_padding_mask, EmulateForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_tile_emulation_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& lse, double scale,
    int64_t block_q, int64_t block_k, int64_t tiles_per_block, int64_t splits, int64_t block_d) {
  const attention::Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale, true);
  attention::check_backward(p, q, grad_out, lse, at::toOpMathType(q.scalar_type()));
  const attention::TilePlan plan = emulation_plan(q, block_q, block_k, tiles_per_block, splits, block_d);
  return attention::tiled_backward(p, plan, grad_out, q, k, v, gate, key_padding_mask, lse, EmulateForward{},
                                   EmulateBackward{});
}

// ---- A warp on the host: 32 threads, one per lane, that run the same warp program and meet at
// every exchange (shuffle, vote) and sync, as the lanes of a GPU warp do.
// A barrier of `count` host threads, reusable.
class HostBarrier {
 public:
  explicit HostBarrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  const int count_;
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

class HostWarpExchange {
 public:
  void barrier() { barrier_.wait(); }
  // Each lane offers `value` and receives lane `source`'s.
  template <typename T>
  T exchange(int lane, T value, int source) {
    T received;
    gather(lane, value, [&](const Slot* slots) { std::memcpy(&received, slots[source].bytes, sizeof(T)); });
    return received;
  }
  // The lowest lane whose predicate holds, kLanes if none.
  int first(int lane, bool predicate) {
    int first = composite::scan::kLanes;
    gather(lane, predicate, [&](const Slot* slots) {
      for (int other = composite::scan::kLanes - 1; other >= 0; --other)
        if (slots[other].bytes[0]) first = other;
    });
    return first;
  }

 private:
  struct Slot {
    alignas(16) unsigned char bytes[16];
  };
  template <typename T, class Read>
  void gather(int lane, T value, Read read) {
    static_assert(sizeof(T) <= sizeof(Slot));
    std::memcpy(slots_[lane].bytes, &value, sizeof(T));
    barrier();
    read(slots_);
    barrier();  // every lane has read before the next exchange writes
  }

  HostBarrier barrier_{composite::scan::kLanes};
  Slot slots_[composite::scan::kLanes];
};

struct HostWarp {
  HostWarpExchange* exchange;
  int lane_index;

  int lane() const { return lane_index; }
  template <typename T>
  T shuffle(T v, int source) const {
    return exchange->exchange(lane_index, v, source);
  }
  int first_lane(bool predicate) const { return exchange->first(lane_index, predicate); }
  void sync() const { exchange->barrier(); }
};

// Runs program(warp, chunk_weights, ray) for every ray on one emulated warp.
template <typename acc_t, class Program>
void run_warp(int64_t rays, Program program) {
  HostWarpExchange exchange;
  acc_t chunk_weights[composite::scan::kLanes];
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < composite::scan::kLanes; ++lane)
    lanes.emplace_back([&, lane] {
      for (int64_t r = 0; r < rays; ++r) program(HostWarp{&exchange, lane}, chunk_weights, r);
    });
  for (std::thread& lane : lanes) lane.join();
}

void check_cpu(const at::Tensor& densities) {
  TORCH_CHECK(densities.device().is_cpu(), "composite_warp_emulation: runs on CPU tensors, got ", densities.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_warp_emulation(
    const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths, const at::Tensor& deltas,
    double transmittance_threshold) {
  const composite::Problem p = composite::check_problem(densities, colors, depths, deltas, transmittance_threshold, true);
  check_cpu(densities);
  return composite::warp_forward(p, densities, colors, depths, deltas,
                                 [](const auto* sigma, const auto* color, const auto* t, const auto* delta,
                                    auto* rgb, auto* depth, auto* opacity, auto* weights, const composite::Problem& p) {
    using acc_t = std::remove_pointer_t<decltype(rgb)>;
    const acc_t threshold = static_cast<acc_t>(p.transmittance_threshold);
    run_warp<acc_t>(p.R, [&](const HostWarp& warp, acc_t* chunk_weights, int64_t r) {
      const int64_t row = r * p.S;
      composite::scan::forward_ray_warp(warp, chunk_weights, sigma + row, color + row * p.C, t + row, delta + row,
                                        rgb + r * p.C, depth + r, opacity + r, weights + row, p.S, p.C, threshold);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_warp_emulation_backward(
    const at::Tensor& grad_rgb, const at::Tensor& grad_depth, const at::Tensor& grad_opacity,
    const at::Tensor& grad_weights, const at::Tensor& densities, const at::Tensor& colors, const at::Tensor& depths,
    const at::Tensor& deltas) {
  const composite::Problem p = composite::check_problem(densities, colors, depths, deltas, 0.0, true);
  composite::check_grads(p, densities, grad_rgb, grad_depth, grad_opacity, grad_weights);
  check_cpu(densities);
  return composite::warp_backward(
      p, grad_rgb, grad_depth, grad_opacity, grad_weights, densities, colors, depths, deltas,
      [](const auto* sigma, const auto* color, const auto* t, const auto* delta, const auto* g_rgb,
         const auto* g_depth, const auto* g_opacity, const auto* g_weights, auto* grad_sigma, auto* grad_color,
         auto* grad_t, auto* grad_delta, const composite::Problem& p) {
        using acc_t = std::remove_pointer_t<decltype(grad_sigma)>;
        run_warp<acc_t>(p.R, [&](const HostWarp& warp, acc_t* chunk_weights, int64_t r) {
          const int64_t row = r * p.S;
          composite::scan::backward_ray_warp(warp, chunk_weights, sigma + row, color + row * p.C, t + row,
                                             delta + row, g_rgb + r * p.C, static_cast<acc_t>(g_depth[r]),
                                             static_cast<acc_t>(g_opacity[r]), g_weights + row, grad_sigma + row,
                                             grad_color + row * p.C, grad_t + row, grad_delta + row, p.S, p.C);
        });
      });
}

// ---- A CUDA block of sample_and_decode on the host: `threads` threads that run the block program;
// sync() is a barrier of all of them, warp_sum a butterfly of exchanges among the 32 lanes of a
// warp (as __shfl_xor_sync), add() an atomic add (serialised by a lock).
struct DecoderBlockState {
  explicit DecoderBlockState(int threads) : block(threads), warps(threads / kLanes) {}
  static constexpr int kLanes = composite::scan::kLanes;
  HostBarrier block;
  std::vector<HostWarpExchange> warps;
  std::mutex add_lock;
};

struct DecoderBlock {
  DecoderBlockState* state;
  int thread_index, thread_count;

  int thread() const { return thread_index; }
  int threads() const { return thread_count; }
  int lanes() const { return DecoderBlockState::kLanes; }
  void sync() const { state->block.wait(); }
  template <typename T>
  T warp_sum(T v) const {
    const int lane = thread_index % lanes();
    HostWarpExchange& warp = state->warps[thread_index / lanes()];
    for (int mask = lanes() / 2; mask > 0; mask /= 2) v += warp.exchange(lane, v, lane ^ mask);
    return v;
  }
  template <typename T>
  void add(T* address, T value) const {
    const std::lock_guard<std::mutex> lock(state->add_lock);
    *address += value;
  }
};

// Runs program(block, block_index, shared) for blocks 0 .. blocks - 1, one after another, each on
// `threads` host threads and its own shared memory of `shared_bytes`, filled with NaN first so that
// a read of a buffer the program has not written shows in the results.
template <typename acc_t, class Program>
void run_blocks(int64_t blocks, int threads, size_t shared_bytes, Program program) {
  for (int64_t index = 0; index < blocks; ++index) {
    SharedMemory smem(shared_bytes);
    acc_t* shared = reinterpret_cast<acc_t*>(smem.data());
    std::fill(shared, shared + shared_bytes / sizeof(acc_t), std::numeric_limits<acc_t>::quiet_NaN());
    DecoderBlockState state(threads);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
      workers.emplace_back([&, t] { program(DecoderBlock{&state, t, threads}, index, shared); });
    for (std::thread& worker : workers) worker.join();
  }
}

decoder::TileTarget emulated_gpu(const at::Tensor& planes, int64_t shared_memory, int64_t sms, int64_t threads,
                                 const char* op) {
  TORCH_CHECK(planes.device().is_cpu(), op, ": runs on CPU tensors, got ", planes.device());
  TORCH_CHECK(shared_memory > 0 && shared_memory <= (1 << 20) && sms > 0 && sms <= 1024, op,
              ": shared_memory must be in (0, 1 MiB] and sms in [1, 1024], got ", shared_memory, " and ", sms);
  TORCH_CHECK(threads >= 32 && threads <= decoder::tiles::kThreads && threads % 32 == 0, op,
              ": threads must be a multiple of 32 in [32, ", decoder::tiles::kThreads, "], got ", threads);
  return {shared_memory, sms};
}

at::Tensor sample_and_decode_tile_emulation(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                                            at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1,
                                            const at::Tensor& weight2, const at::Tensor& bias2, int64_t shared_memory,
                                            int64_t sms, int64_t threads) {
  const char* op = "sample_and_decode_tile_emulation";
  const triplane::Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean", std::nullopt, true);
  const decoder::Sizes d = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  const decoder::TileTarget gpu = emulated_gpu(planes, shared_memory, sms, threads, op);
  return decoder::tiled_forward(p, d, gpu, planes, points, weight1, bias1, weight2, bias2,
                                [&](const auto& io, int64_t blocks, size_t shared_bytes) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(io.out)>>;
    using acc_t = at::opmath_type<scalar_t>;
    run_blocks<acc_t>(blocks, int(threads), shared_bytes, [&](const DecoderBlock& block, int64_t index, acc_t* shared) {
      decoder::tiles::forward_block(block, index, blocks, shared, io);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sample_and_decode_tile_emulation_backward(const at::Tensor& grad_output, const at::Tensor& planes,
                                          const at::Tensor& points, double box_warp, at::IntArrayRef axes,
                                          const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
                                          const at::Tensor& bias2, bool needs_planes, bool needs_points,
                                          int64_t shared_memory, int64_t sms, int64_t threads) {
  const char* op = "sample_and_decode_tile_emulation_backward";
  const triplane::Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean", std::nullopt, true);
  const decoder::Sizes d = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  decoder::check_grad_output(grad_output, p, d, planes);
  const decoder::TileTarget gpu = emulated_gpu(planes, shared_memory, sms, threads, op);
  return decoder::tiled_backward(
      p, d, gpu, grad_output, planes, points, weight1, bias1, weight2, bias2, needs_planes, needs_points,
      [&](const auto& io, int64_t blocks, size_t shared_bytes, auto* grad_weights) {
        using scalar_t = std::remove_pointer_t<decltype(grad_weights)>;
        using acc_t = at::opmath_type<scalar_t>;
        run_blocks<acc_t>(blocks, int(threads), shared_bytes,
                          [&](const DecoderBlock& block, int64_t index, acc_t* shared) {
          decoder::tiles::backward_block(block, index, blocks, shared, io);
        });
        for (int64_t e = 0; e < io.l.weights; ++e)
          grad_weights[e] = static_cast<scalar_t>(decoder::tiles::sum_partials(io.partials, blocks, io.l.weights, e));
      });
}

std::vector<int64_t> attention_tile_shape(bool backward, int64_t Lk, int64_t D, at::ScalarType dtype,
                                          int64_t shared_memory) {
  TORCH_CHECK(Lk >= 0 && D >= 0 && shared_memory > 0,
              "attention_tile_shape: Lk and D must be >= 0 and shared_memory > 0");
  TORCH_CHECK(at::isFloatingType(dtype), "attention_tile_shape: dtype must be a floating-point type, got ", dtype);
  std::vector<int64_t> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_tile_shape", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const tiles::Shape shape = tiles::choose_shape<acc_t>(backward, Lk, D, sizeof(scalar_t), size_t(shared_memory));
    const size_t bytes = shape.block_q == 0 ? 0
                         : backward       ? tiles::backward_layout<acc_t>(shape, sizeof(scalar_t)).bytes
                                          : tiles::forward_layout<acc_t>(shape, sizeof(scalar_t)).bytes;
    result = {shape.block_q, shape.block_k, shape.dim, shape.block_d, int64_t(bytes)};
  });
  return result;
}

std::vector<int64_t> sample_and_decode_tile_shape(bool backward, int64_t C, int64_t K, int64_t O,
                                                 at::ScalarType dtype, int64_t shared_memory) {
  TORCH_CHECK(C >= 1 && K >= 1 && O >= 2 && shared_memory > 0,
              "sample_and_decode_tile_shape: C and K must be >= 1, O >= 2 and shared_memory > 0");
  TORCH_CHECK(at::isFloatingType(dtype), "sample_and_decode_tile_shape: dtype must be a floating-point type, got ",
              dtype);
  const size_t element_size = at::elementSize(at::toOpMathType(dtype));
  const decoder::tiles::Layout l =
      decoder::tiles::largest_layout(C, K, O, backward, element_size, size_t(shared_memory));
  const int64_t bytes = l.total * int64_t(element_size);
  if (bytes > shared_memory) return {0, 0};
  return {l.tile, bytes};
}

}  // namespace
}  // namespace dreamportrait

TORCH_LIBRARY_FRAGMENT(dreamportrait, m) {
  m.def("attention_tile_emulation(Tensor q, Tensor k, Tensor v, Tensor gate, Tensor? key_padding_mask, "
        "float scale, int block_q, int block_k, int tiles_per_block, int block_d=0) -> (Tensor out, Tensor lse)");
  m.def("attention_tile_emulation_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor gate, "
        "Tensor? key_padding_mask, Tensor lse, float scale, int block_q, int block_k, int tiles_per_block, "
        "int splits, int block_d=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("composite_warp_emulation(Tensor densities, Tensor colors, Tensor depths, Tensor deltas, "
        "float transmittance_threshold) -> (Tensor rgb, Tensor depth, Tensor opacity, Tensor weights)");
  m.def("composite_warp_emulation_backward(Tensor grad_rgb, Tensor grad_depth, Tensor grad_opacity, "
        "Tensor grad_weights, Tensor densities, Tensor colors, Tensor depths, Tensor deltas) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_and_decode_tile_emulation(Tensor planes, Tensor points, float box_warp, int[6] axes, "
        "Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, int shared_memory, int sms, int threads) "
        "-> Tensor");
  m.def("sample_and_decode_tile_emulation_backward(Tensor grad_output, Tensor planes, Tensor points, "
        "float box_warp, int[6] axes, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, "
        "bool needs_planes, bool needs_points, int shared_memory, int sms, int threads) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_and_decode_tile_shape(bool backward, int C, int K, int O, ScalarType dtype, int shared_memory) "
        "-> int[]",
        &dreamportrait::sample_and_decode_tile_shape);
  m.def("attention_tile_shape(bool backward, int Lk, int D, ScalarType dtype, int shared_memory) -> int[]",
        &dreamportrait::attention_tile_shape);
}

TORCH_LIBRARY_IMPL(dreamportrait, CPU, m) {
  m.impl("attention_tile_emulation", &dreamportrait::attention_tile_emulation);
  m.impl("attention_tile_emulation_backward", &dreamportrait::attention_tile_emulation_backward);
  m.impl("composite_warp_emulation", &dreamportrait::composite_warp_emulation);
  m.impl("composite_warp_emulation_backward", &dreamportrait::composite_warp_emulation_backward);
  m.impl("sample_and_decode_tile_emulation", &dreamportrait::sample_and_decode_tile_emulation);
  m.impl("sample_and_decode_tile_emulation_backward", &dreamportrait::sample_and_decode_tile_emulation_backward);
}
