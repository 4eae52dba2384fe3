// CUDA kernels of sample_and_decode. The block programs are include/dreamportrait/decoder_tiles.h
// (with the per-point math of triplane_math.h and decoder_math.h, the functions the CPU kernel runs),
// also run on the CPU by the host emulation of the schedule (csrc/cpu/tile_emulation.cpp) in the
// tests; decoder_host.h plans the launch (tile size from the shared memory, blocks from the SMs) and
// lays out the outputs, for both. This file maps the programs onto CUDA blocks.
// Only c10/ATen headers that need no CUDA library headers are included (see triplane_sample.cu).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>
#include <type_traits>

#include "dreamportrait/cuda_block.h"
#include "dreamportrait/decoder_host.h"
#include "dreamportrait/decoder_tiles.h"
#include "dreamportrait/ops.h"
#include "dreamportrait/triplane_host.h"

namespace dreamportrait {
namespace {

namespace tiles = decoder::tiles;

constexpr int kWarp = 32;

// A CUDA block as decoder_tiles.h's programs see it: warps of 32 lanes that sum by shuffles, and
// atomic adds to global memory.
struct DecoderBlock : CudaBlock {
  DP_HOST_DEVICE int lanes() const { return kWarp; }
  template <typename T>
  DP_HOST_DEVICE T warp_sum(T v) const {
#ifdef __CUDA_ARCH__
    for (int mask = kWarp / 2; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
#endif
    return v;
  }
  template <typename T>
  DP_HOST_DEVICE void add(T* address, T value) const {
#ifdef __CUDA_ARCH__
    gpuAtomicAdd(address, value);
#endif
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(tiles::kThreads) forward_kernel(tiles::ForwardIo<scalar_t> io) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];  // 16-byte vector reads of the weights
  tiles::forward_block(DecoderBlock{}, blockIdx.x, gridDim.x, reinterpret_cast<acc_t*>(shared_bytes), io);
}

// Two blocks per SM: the bound holds the backward to 128 registers a thread (with none it took 166,
// one block per SM).
template <typename scalar_t>
__global__ void __launch_bounds__(tiles::kThreads, 2) backward_kernel(
    tiles::BackwardIo<scalar_t, at::opmath_type<scalar_t>> io) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  tiles::backward_block(DecoderBlock{}, blockIdx.x, gridDim.x, reinterpret_cast<acc_t*>(shared_bytes), io);
}

// out[e] = sum over blocks, in block order, of partials[block, e].
template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t blocks, int64_t count,
                                    scalar_t* __restrict__ out) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = static_cast<scalar_t>(tiles::sum_partials(partials, blocks, count, e));
}

// This GPU's shared memory per block (opt-in) and SM count.
decoder::TileTarget this_gpu() {
  int device = 0, max_shared = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return {max_shared, sms};
}

}  // namespace

at::Tensor sample_and_decode_cuda(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                                  at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1,
                                  const at::Tensor& weight2, const at::Tensor& bias2) {
  const triplane::Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  const decoder::Sizes d = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  const c10::cuda::CUDAGuard guard(planes.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  return decoder::tiled_forward(p, d, this_gpu(), planes, points, weight1, bias1, weight2, bias2,
                                [&](const auto& io, int64_t blocks, size_t shared_bytes) {
    using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(io.out)>>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(forward_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(shared_bytes)));
    forward_kernel<scalar_t><<<blocks, tiles::kThreads, shared_bytes, stream>>>(io);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_decode_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& planes, const at::Tensor& points, double box_warp,
    at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2, bool needs_planes, bool needs_points) {
  const triplane::Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  const decoder::Sizes d = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  decoder::check_grad_output(grad_output, p, d, planes);
  const c10::cuda::CUDAGuard guard(planes.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  return decoder::tiled_backward(
      p, d, this_gpu(), grad_output, planes, points, weight1, bias1, weight2, bias2, needs_planes, needs_points,
      [&](const auto& io, int64_t blocks, size_t shared_bytes, auto* grad_weights) {
        using scalar_t = std::remove_pointer_t<decltype(grad_weights)>;
        using acc_t = at::opmath_type<scalar_t>;
        C10_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            int(shared_bytes)));
        backward_kernel<scalar_t><<<blocks, tiles::kThreads, shared_bytes, stream>>>(io);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const int64_t weights = io.l.weights;
        sum_partials_kernel<scalar_t, acc_t><<<(weights + tiles::kThreads - 1) / tiles::kThreads, tiles::kThreads, 0,
                                               stream>>>(io.partials, blocks, weights, grad_weights);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace dreamportrait
