// CUDA kernels of sample_and_decode. The per-point math is include/dreamportrait/triplane_math.h
// and decoder_math.h, the same functions the CPU kernel runs (and is tested with); this file maps
// it onto thread blocks.
//
// One block takes tiles of P points (a grid-stride loop over tiles). The decoder's weights are
// copied into shared memory once per block; a tile's features, pre-activations, hidden units and
// raw-output gradients live in shared memory only (rows padded by one element, so that threads of
// neighbouring points read different banks). Two mappings of threads:
//   - sampling and scattering: one warp per point, lanes over channels (coalesced plane reads and
//     atomic adds of a tap's channels; the point gradient is a warp reduction over channels);
//   - the MLP: one thread per (point, unit), the point index fastest, each summing over the
//     previous layer with the weights broadcast from shared memory.
// The backward sums each weight's gradient over the tiles of a block in shared memory and writes
// one partial per block, summed over blocks in block order by a second kernel (no atomics:
// deterministic). Plane gradients are added atomically into a float32 (for 16-bit inputs) or
// float64 channel-innermost buffer, as triplane_sample's backward does.
// Only c10/ATen headers that need no CUDA library headers are included (see triplane_sample.cu).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

#include "dreamportrait/decoder_host.h"
#include "dreamportrait/decoder_math.h"
#include "dreamportrait/ops.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace {

using triplane::kPlanes;
using triplane::Problem;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Points per tile when shared memory allows; halved (down to kMinTile) for large decoders or float64.
constexpr int kMaxTile = 32;
constexpr int kMinTile = 4;

// Offsets (in elements of the accumulation type) of the weights and tile buffers in shared memory.
// Weights: w1 (K, C), b1 (K), w2 (O, K), b2 (O), the same order as the backward's gradient sums.
struct Layout {
  int64_t C, K, O;
  int tile;                // points per tile, P
  int64_t w1, b1, w2, b2;  // offsets of the weights
  int64_t weights;         // their count
  int64_t sums;            // backward: the weight-gradient sums (weights elements)
  int64_t F, H;            // features (P, C + 1), hidden units (P, K + 1)
  int64_t A, GX;           // backward: pre-activations (P, K + 1), raw outputs' gradient (P, O + 1)
  int64_t total;           // elements in all

  Layout(const decoder::Sizes& d, int points, bool backward) : C(d.C), K(d.K), O(d.O), tile(points) {
    w1 = 0, b1 = K * C, w2 = b1 + K, b2 = w2 + O * K, weights = b2 + O;
    sums = weights;
    F = backward ? sums + weights : weights;
    H = F + tile * (C + 1);
    A = H + tile * (K + 1);
    GX = A + tile * (K + 1);
    total = backward ? GX + tile * (O + 1) : A;
  }
};

// Points in the tile that starts at point `first` of a batch element of N points.
__device__ __forceinline__ int tile_count(int tile, int64_t first, int64_t N) {
  return N - first < tile ? static_cast<int>(N - first) : tile;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_point(const scalar_t* points, int64_t i, acc_t point[3]) {
  for (int k = 0; k < 3; ++k) point[k] = static_cast<acc_t>(points[i * 3 + k]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Copies the four weight tensors into shared memory in the Layout's order.
template <typename scalar_t, typename acc_t>
__device__ void load_weights(acc_t* s, const Layout& l, const scalar_t* __restrict__ w1,
                             const scalar_t* __restrict__ b1, const scalar_t* __restrict__ w2,
                             const scalar_t* __restrict__ b2) {
  for (int64_t i = threadIdx.x; i < l.weights; i += blockDim.x) {
    scalar_t value;
    if (i < l.b1)
      value = w1[i];
    else if (i < l.w2)
      value = b1[i - l.b1];
    else if (i < l.b2)
      value = w2[i - l.w2];
    else
      value = b2[i - l.b2];
    s[i] = static_cast<acc_t>(value);
  }
}

// Mean features of the tile's points [0, count) (point `first` onwards of batch element b) into
// F (P, C + 1); rows from count on are zero. One warp per point, lanes over channels.
template <typename scalar_t, typename acc_t>
__device__ void sample_tile(const scalar_t* __restrict__ planes, const scalar_t* __restrict__ points,
                            const Problem& p, const Layout& l, int64_t b, int64_t first, int count, acc_t* F) {
  const acc_t scale = static_cast<acc_t>(p.scale), third = acc_t(1) / acc_t(kPlanes);
  const int lane = threadIdx.x % kWarp;
  for (int q = threadIdx.x / kWarp; q < l.tile; q += blockDim.x / kWarp) {
    acc_t point[3] = {0, 0, 0};
    if (q < count) load_point(points, b * p.N + first + q, point);
    for (int64_t c = lane; c < p.C; c += kWarp) {
      acc_t acc = 0;
      for (int plane = 0; plane < kPlanes && q < count; ++plane) {
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.finite) acc = NAN;
        if (!taps.in_bounds) continue;
        const scalar_t* base = planes + (b * kPlanes + plane) * p.H * p.W * p.C + c;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx)
            if (taps.valid(dy, dx))
              acc += taps.weight(dy, dx) * static_cast<acc_t>(base[((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C]);
      }
      F[q * (l.C + 1) + c] = acc * third;
    }
  }
}

// out[q, j] = bias[j] + sum_i in[q, i] W[j, i] for q < P, j < n_out: W (n_out, n_in) row-major in
// shared memory, `in` and `out` tile buffers with rows of n_in + 1 and n_out + 1. Thread per
// (q, j), q fastest: the tile rows are read without bank conflicts, W broadcast.
template <typename acc_t, typename Epilogue>
__device__ __forceinline__ void dense_tile(const acc_t* in, int64_t n_in, const acc_t* W, const acc_t* bias,
                                           int64_t n_out, int tile, const Epilogue& epilogue) {
  for (int64_t idx = threadIdx.x; idx < tile * n_out; idx += blockDim.x) {
    const int q = static_cast<int>(idx % tile);
    const int64_t j = idx / tile;
    acc_t sum = bias[j];
    for (int64_t i = 0; i < n_in; ++i) sum += in[q * (n_in + 1) + i] * W[j * n_in + i];
    epilogue(q, j, sum);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ planes, const scalar_t* __restrict__ points, const scalar_t* __restrict__ w1,
    const scalar_t* __restrict__ b1, const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
    scalar_t* __restrict__ out, Problem p, Layout l) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* s = reinterpret_cast<acc_t*>(shared_bytes);
  load_weights(s, l, w1, b1, w2, b2);
  const int64_t tiles_per_element = (p.N + l.tile - 1) / l.tile;
  for (int64_t tile = blockIdx.x; tile < p.B * tiles_per_element; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_element, first = tile % tiles_per_element * l.tile;
    const int count = tile_count(l.tile, first, p.N);
    __syncthreads();  // the weights are loaded, the previous tile's buffers are free
    sample_tile(planes, points, p, l, b, first, count, s + l.F);
    __syncthreads();
    acc_t* H = s + l.H;
    dense_tile(s + l.F, l.C, s + l.w1, s + l.b1, l.K, l.tile,
               [&](int q, int64_t k, acc_t a) { H[q * (l.K + 1) + k] = decoder::softplus(a); });
    __syncthreads();
    scalar_t* out_tile = out + (b * p.N + first) * l.O;
    dense_tile(static_cast<const acc_t*>(H), l.K, s + l.w2, s + l.b2, l.O, l.tile, [&](int q, int64_t o, acc_t x) {
      if (q < count) out_tile[q * l.O + o] = static_cast<scalar_t>(decoder::output_value(x, o));
    });
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ planes, const scalar_t* __restrict__ points,
    const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1, const scalar_t* __restrict__ w2,
    const scalar_t* __restrict__ b2, at::opmath_type<scalar_t>* __restrict__ grad_planes,
    scalar_t* __restrict__ grad_points, at::opmath_type<scalar_t>* __restrict__ partials, Problem p, Layout l) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char shared_bytes[];
  acc_t* s = reinterpret_cast<acc_t*>(shared_bytes);
  acc_t *F = s + l.F, *A = s + l.A, *H = s + l.H, *GX = s + l.GX, *sums = s + l.sums;
  load_weights(s, l, w1, b1, w2, b2);
  for (int64_t i = threadIdx.x; i < l.weights; i += blockDim.x) sums[i] = 0;
  const acc_t scale = static_cast<acc_t>(p.scale), third = acc_t(1) / acc_t(kPlanes);
  const acc_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * third;
  const acc_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * third;
  const int lane = threadIdx.x % kWarp;
  const int64_t tiles_per_element = (p.N + l.tile - 1) / l.tile;
  for (int64_t tile = blockIdx.x; tile < p.B * tiles_per_element; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_element, first = tile % tiles_per_element * l.tile;
    const int count = tile_count(l.tile, first, p.N);
    const scalar_t* grad_tile = grad_out + (b * p.N + first) * l.O;
    __syncthreads();
    sample_tile(planes, points, p, l, b, first, count, F);
    __syncthreads();
    // The forward again: A = F W1^T + b1, H = softplus(A); then GX, the raw outputs' gradient.
    dense_tile(static_cast<const acc_t*>(F), l.C, s + l.w1, s + l.b1, l.K, l.tile, [&](int q, int64_t k, acc_t a) {
      A[q * (l.K + 1) + k] = a;
      H[q * (l.K + 1) + k] = decoder::softplus(a);
    });
    __syncthreads();
    dense_tile(static_cast<const acc_t*>(H), l.K, s + l.w2, s + l.b2, l.O, l.tile, [&](int q, int64_t o, acc_t x) {
      const acc_t g = q < count ? static_cast<acc_t>(grad_tile[q * l.O + o]) : acc_t(0);
      GX[q * (l.O + 1) + o] = q < count ? decoder::raw_gradient(x, g, o) : acc_t(0);
    });
    __syncthreads();
    // gw2[o, k] += sum_q GX[q, o] H[q, k] and gb2 (thread per weight); A <- GA = (GX W2) * softplus'(A)
    // (thread per (q, k)). Neither reads what the other writes.
    for (int64_t idx = threadIdx.x; idx < l.O * (l.K + 1); idx += blockDim.x) {
      const int64_t o = idx / (l.K + 1), k = idx % (l.K + 1);
      acc_t sum = 0;
      for (int q = 0; q < count; ++q) sum += GX[q * (l.O + 1) + o] * (k < l.K ? H[q * (l.K + 1) + k] : acc_t(1));
      sums[k < l.K ? l.w2 + o * l.K + k : l.b2 + o] += sum;
    }
    for (int64_t idx = threadIdx.x; idx < l.tile * l.K; idx += blockDim.x) {
      const int q = static_cast<int>(idx % l.tile);
      const int64_t k = idx / l.tile;
      acc_t sum = 0;
      for (int64_t o = 0; o < l.O; ++o) sum += GX[q * (l.O + 1) + o] * s[l.w2 + o * l.K + k];
      A[q * (l.K + 1) + k] = sum * decoder::softplus_grad(A[q * (l.K + 1) + k]);
    }
    __syncthreads();
    const acc_t* GA = A;
    // gw1[k, c] += sum_q GA[q, k] F[q, c] and gb1.
    for (int64_t idx = threadIdx.x; idx < l.K * (l.C + 1); idx += blockDim.x) {
      const int64_t k = idx / (l.C + 1), c = idx % (l.C + 1);
      acc_t sum = 0;
      for (int q = 0; q < count; ++q) sum += GA[q * (l.K + 1) + k] * (c < l.C ? F[q * (l.C + 1) + c] : acc_t(1));
      sums[c < l.C ? l.w1 + k * l.C + c : l.b1 + k] += sum;
    }
    __syncthreads();
    // F <- GF = GA W1: the features' gradient.
    for (int64_t idx = threadIdx.x; idx < l.tile * l.C; idx += blockDim.x) {
      const int q = static_cast<int>(idx % l.tile);
      const int64_t c = idx / l.tile;
      acc_t sum = 0;
      for (int64_t k = 0; k < l.K; ++k) sum += GA[q * (l.K + 1) + k] * s[l.w1 + k * l.C + c];
      F[q * (l.C + 1) + c] = sum;
    }
    __syncthreads();
    // Per point (a warp, lanes over channels): the plane gradient's atomic adds and the point gradient.
    for (int q = threadIdx.x / kWarp; q < count; q += blockDim.x / kWarp) {
      const int64_t i = b * p.N + first + q;
      acc_t point[3];
      load_point(points, i, point);
      acc_t grad[3] = {0, 0, 0};
      for (int plane = 0; plane < kPlanes; ++plane) {
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.in_bounds && taps.finite) continue;
        const int64_t plane_offset = (b * kPlanes + plane) * p.H * p.W * p.C;
        acc_t d_dx = 0, d_dy = 0;
        for (int64_t c = lane; c < p.C && taps.in_bounds; c += kWarp) {
          const acc_t g = F[q * (l.C + 1) + c];
          acc_t v[2][2] = {{0, 0}, {0, 0}};
          for (int dy = 0; dy < 2; ++dy) {
            for (int dx = 0; dx < 2; ++dx) {
              if (!taps.valid(dy, dx)) continue;
              const int64_t at = plane_offset + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C + c;
              v[dy][dx] = static_cast<acc_t>(planes[at]);
              if (grad_planes != nullptr) gpuAtomicAdd(grad_planes + at, taps.weight(dy, dx) * third * g);
            }
          }
          acc_t cx, cy;
          triplane::bilinear_position_grad(taps, v[0][0], v[0][1], v[1][0], v[1][1], cx, cy);
          d_dx += g * cx;
          d_dy += g * cy;
        }
        d_dx = warp_sum(d_dx), d_dy = warp_sum(d_dy);
        if (!taps.finite) d_dx = d_dy = NAN;
        triplane::add_to_coordinate(grad, p.axes[2 * plane], d_dx * dx_dpoint);
        triplane::add_to_coordinate(grad, p.axes[2 * plane + 1], d_dy * dy_dpoint);
      }
      if (grad_points != nullptr && lane == 0)
        for (int k = 0; k < 3; ++k) grad_points[i * 3 + k] = static_cast<scalar_t>(grad[k]);
    }
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < l.weights; idx += blockDim.x)
    partials[blockIdx.x * l.weights + idx] = sums[idx];
}

// out[e] = sum over blocks, in block order, of partials[block, e].
template <typename scalar_t, typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t blocks, int64_t count,
                                    scalar_t* __restrict__ out) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = 0;
    for (int64_t block = 0; block < blocks; ++block) sum += partials[block * count + e];
    out[e] = static_cast<scalar_t>(sum);
  }
}

// The largest tile (points per block) whose shared memory fits the device, and the grid size.
struct Launch {
  Layout layout;
  int64_t blocks;
  size_t shared_bytes;
};

template <typename Kernel>
Launch plan(Kernel kernel, const decoder::Sizes& d, const Problem& p, bool backward, size_t element_size) {
  int device = 0, max_shared = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int tile = kMaxTile;
  while (tile > kMinTile && Layout(d, tile, backward).total * element_size > size_t(max_shared)) tile /= 2;
  const Layout layout(d, tile, backward);
  const size_t bytes = layout.total * element_size;
  TORCH_CHECK(bytes <= size_t(max_shared), "sample_and_decode: the decoder (C=", d.C, ", K=", d.K, ", O=", d.O,
              ") needs ", bytes, " bytes of shared memory per block, more than this GPU's ", max_shared);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  const int64_t tiles = p.B * ((p.N + tile - 1) / tile);
  // A few blocks per SM; each block's weights are loaded (and, backward, its partial sums written) once.
  return {layout, std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t(sms) * 4)), bytes};
}

}  // namespace

at::Tensor sample_and_decode_cuda(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                                  at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1,
                                  const at::Tensor& weight2, const at::Tensor& bias2) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  const decoder::Sizes d = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor out = at::empty({p.B, p.N, d.O}, planes.options());
  if (out.numel() == 0) return out;
  const at::Tensor planes_cl = triplane::channels_innermost(planes);
  const at::Tensor points_c = points.contiguous(), w1 = weight1.contiguous(), b1 = bias1.contiguous(),
                   w2 = weight2.contiguous(), b2 = bias2.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, planes.scalar_type(), "sample_and_decode_cuda", [&] {
    const Launch launch = plan(forward_kernel<scalar_t>, d, p, false, sizeof(at::opmath_type<scalar_t>));
    forward_kernel<scalar_t><<<launch.blocks, kThreads, launch.shared_bytes, stream>>>(
        planes_cl.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(), w1.const_data_ptr<scalar_t>(),
        b1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), p, launch.layout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_decode_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& planes, const at::Tensor& points, double box_warp,
    at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2, bool needs_planes, bool needs_points) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  const decoder::Sizes d = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  decoder::check_grad_output(grad_output, p, d, planes);
  const c10::cuda::CUDAGuard guard(planes.device());
  const auto acc_dtype = at::toOpMathType(planes.scalar_type());
  // The weight gradients, flat in the Layout's order: w1 (K, C), b1 (K), w2 (O, K), b2 (O).
  const int64_t weights = d.K * d.C + d.K + d.O * d.K + d.O;
  at::Tensor grad_weights = at::zeros({weights}, planes.options());
  at::Tensor grad_planes = needs_planes ? at::zeros({p.B, kPlanes, p.H, p.W, p.C}, planes.options().dtype(acc_dtype))
                                        : at::empty({0}, planes.options());
  at::Tensor grad_points = needs_points ? at::zeros({p.B, p.N, 3}, points.options()) : at::empty({0}, points.options());
  if (p.B > 0 && p.N > 0) {
    const at::Tensor planes_cl = triplane::channels_innermost(planes);
    const at::Tensor grad_c = grad_output.contiguous(), points_c = points.contiguous(), w1 = weight1.contiguous(),
                     b1 = bias1.contiguous(), w2 = weight2.contiguous(), b2 = bias2.contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto dtype = planes.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sample_and_decode_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Launch launch = plan(backward_kernel<scalar_t>, d, p, true, sizeof(acc_t));
      at::Tensor partials = at::empty({launch.blocks, weights}, planes.options().dtype(acc_dtype));
      backward_kernel<scalar_t><<<launch.blocks, kThreads, launch.shared_bytes, stream>>>(
          grad_c.const_data_ptr<scalar_t>(), planes_cl.const_data_ptr<scalar_t>(), points_c.const_data_ptr<scalar_t>(),
          w1.const_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(), w2.const_data_ptr<scalar_t>(),
          b2.const_data_ptr<scalar_t>(), needs_planes ? grad_planes.mutable_data_ptr<acc_t>() : nullptr,
          needs_points ? grad_points.mutable_data_ptr<scalar_t>() : nullptr, partials.mutable_data_ptr<acc_t>(), p,
          launch.layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t, acc_t><<<(weights + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          partials.const_data_ptr<acc_t>(), launch.blocks, weights, grad_weights.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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

}  // namespace dreamportrait
