// CUDA kernels of gated_cross_attention: the tiled block programs of attention_tiles.h (shared
// with the host emulation that tests them), one block of four warps per tile, the tiles in shared
// memory. The tile products run on tensor cores for float16 and bfloat16 (WMMA 16x16x16, float32
// accumulation) and for float32 when torch allows TF32 (torch.backends.cuda.matmul.allow_tf32;
// WMMA 16x16x8), and as exact scalar FMAs for float32 otherwise and for float64.
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "dreamportrait/attention_host.h"
#include "dreamportrait/attention_math.h"
#include "dreamportrait/attention_tiles.h"
#include "dreamportrait/cuda_block.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

namespace tiles = attention::tiles;
namespace wmma = nvcuda::wmma;
using attention::Problem;

constexpr int kWarp = 32;
// Blocks per SM the tile shapes' shared memory aims at. Stating it lets ptxas use up to 255
// registers a thread; without it, it held some kernels under ~80 and spilled loop bounds.
constexpr int kMinBlocks = 2;

template <class Layout>
struct WmmaLayout {
  using type = wmma::row_major;
};
template <>
struct WmmaLayout<tiles::ColMajor> {
  using type = wmma::col_major;
};

// The CUDA type WMMA takes for a tile element type (at::Half and __half share their bits).
template <typename T>
struct WmmaElement {
  using type = T;
};
template <>
struct WmmaElement<at::Half> {
  using type = __half;
};
template <>
struct WmmaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Tile products on tensor cores: each warp computes 16x16 output fragments in turn, over K in
// steps of kStep; float32 operands are rounded to TF32 (kStep 8), 16-bit ones are used as they are
// (kStep 16). Accumulation is float32.
template <int kStep>
struct TensorCoreGemm {
  template <class LayoutA, class LayoutB, class Block, typename in_t>
  static DP_HOST_DEVICE void run(const Block&, float* c, int ldc, const in_t* a, int lda, const in_t* b, int ldb,
                                 int M, int N, int K, bool accumulate) {
#ifdef __CUDA_ARCH__
    using T = typename WmmaElement<in_t>::type;
    using Fragment = std::conditional_t<std::is_same_v<T, float>, wmma::precision::tf32, T>;
    const T* a_ = reinterpret_cast<const T*>(a);
    const T* b_ = reinterpret_cast<const T*>(b);
    const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp, tiles_n = N / tiles::kFragment;
    for (int t = warp; t < M / tiles::kFragment * tiles_n; t += warps) {
      const int i0 = t / tiles_n * tiles::kFragment, j0 = t % tiles_n * tiles::kFragment;
      wmma::fragment<wmma::accumulator, 16, 16, kStep, float> acc;
      if (accumulate)
        wmma::load_matrix_sync(acc, c + i0 * ldc + j0, ldc, wmma::mem_row_major);
      else
        wmma::fill_fragment(acc, 0.0f);
      for (int k0 = 0; k0 < K; k0 += kStep) {
        wmma::fragment<wmma::matrix_a, 16, 16, kStep, Fragment, typename WmmaLayout<LayoutA>::type> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, kStep, Fragment, typename WmmaLayout<LayoutB>::type> fb;
        wmma::load_matrix_sync(fa, a_ + LayoutA::at(i0, k0, lda), lda);
        wmma::load_matrix_sync(fb, b_ + LayoutB::at(k0, j0, ldb), ldb);
        if constexpr (std::is_same_v<T, float>) {
#pragma unroll
          for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
#pragma unroll
          for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
        }
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
    }
#endif
  }
};
using HalfGemm = TensorCoreGemm<16>;
using Tf32Gemm = TensorCoreGemm<8>;

template <class Gemm, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(tiles::kThreads, kMinBlocks)
    forward_kernel(const tiles::ForwardIo<scalar_t, acc_t> io) {
  extern __shared__ __align__(128) unsigned char smem[];
  tiles::forward_tile<Gemm>(CudaBlock{}, smem, io, blockIdx.x);
}

template <class Gemm, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(tiles::kThreads, kMinBlocks)
    backward_kernel(const tiles::BackwardIo<scalar_t, acc_t> io) {
  extern __shared__ __align__(128) unsigned char smem[];
  tiles::backward_tile<Gemm>(CudaBlock{}, smem, io, blockIdx.x);
}

template <typename Kernel, typename Io>
void launch(Kernel kernel, const Io& io, int64_t blocks, size_t shared_bytes) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "gated_cross_attention: ", blocks,
              " blocks exceed a CUDA grid");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)));
  kernel<<<int(blocks), tiles::kThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(io);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls body(Gemm{}) with the tile product for scalar_t: tensor cores for 16-bit types and for
// float32 with TF32 allowed, scalar FMAs otherwise.
template <typename scalar_t, typename Body>
void with_gemm(Body body) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    body(HalfGemm{});
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (at::globalContext().allowTF32CuBLAS())
      body(Tf32Gemm{});
    else
      body(tiles::ScalarGemm{});
  } else {
    body(tiles::ScalarGemm{});
  }
}

struct LaunchForward {
  template <typename scalar_t, typename acc_t>
  void operator()(const tiles::ForwardIo<scalar_t, acc_t>& io, int64_t blocks) const {
    const size_t bytes = tiles::forward_layout<acc_t>(io.shape, sizeof(scalar_t)).bytes;
    with_gemm<scalar_t>([&](auto gemm) { launch(forward_kernel<decltype(gemm), scalar_t, acc_t>, io, blocks, bytes); });
  }
};

struct LaunchBackward {
  template <typename scalar_t, typename acc_t>
  void operator()(const tiles::BackwardIo<scalar_t, acc_t>& io, int64_t blocks) const {
    const size_t bytes = tiles::backward_layout<acc_t>(io.shape, sizeof(scalar_t)).bytes;
    with_gemm<scalar_t>(
        [&](auto gemm) { launch(backward_kernel<decltype(gemm), scalar_t, acc_t>, io, blocks, bytes); });
  }
};

// Tiles as large as this GPU's shared memory allows; backward blocks for four per SM.
attention::TilePlan device_plan() {
  const int device = c10::cuda::current_device();
  int shared = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return {size_t(shared), 4 * int64_t(sms)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_cross_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& gate,
                                                              const std::optional<at::Tensor>& key_padding_mask,
                                                              double scale) {
  const Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  return attention::tiled_forward(p, device_plan(), q, k, v, gate, key_padding_mask, LaunchForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_cross_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& lse,
    double scale) {
  const Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  attention::check_backward(p, q, grad_out, lse, at::toOpMathType(q.scalar_type()));
  const c10::cuda::CUDAGuard guard(q.device());
  return attention::tiled_backward(p, device_plan(), grad_out, q, k, v, gate, key_padding_mask, lse,
                                   LaunchForward{}, LaunchBackward{});
}

}  // namespace dreamportrait
