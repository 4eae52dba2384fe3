// CUDA kernels of gated_cross_attention: one warp per query row, lanes over the head dimension
// (D <= 128, up to 4 values per lane, kept in registers). Scores are warp reductions, the softmax
// is online (attention::OnlineSoftmax, shared with the CPU kernel). The backward recomputes the
// probabilities and adds dk, dv and the gate gradient atomically into float32 (or float64) buffers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

#include "dreamportrait/attention_host.h"
#include "dreamportrait/attention_math.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

using attention::Problem;

constexpr int kWarp = 32;
constexpr int kPerLane = 4;  // D <= kWarp * kPerLane = 128
constexpr int kThreads = 256;

int64_t blocks_for_rows(int64_t rows) {
  const int64_t warps_per_block = kThreads / kWarp;
  return std::max<int64_t>(1, std::min<int64_t>((rows + warps_per_block - 1) / warps_per_block, 65535 * 8));
}

template <typename T>
__device__ __forceinline__ T warp_all_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* row, int64_t D, int lane, acc_t out[kPerLane]) {
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    out[t] = d < D ? static_cast<acc_t>(row[d]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_dot(const acc_t a[kPerLane], const scalar_t* row, int64_t D, int lane) {
  acc_t sum = 0;
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + t * kWarp;
    if (d < D) sum += a[t] * static_cast<acc_t>(row[d]);
  }
  return warp_all_sum(sum);
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ gate,
                               const bool* __restrict__ mask, scalar_t* __restrict__ out, acc_t* __restrict__ lse,
                               Problem p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = p.B * p.H * p.Lq, warps = int64_t(gridDim.x) * blockDim.x / kWarp;
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; row < rows; row += warps) {
    const int64_t bh = row / p.Lq, b = bh / p.H, h = bh % p.H;
    acc_t q_row[kPerLane], acc[kPerLane] = {0, 0, 0, 0};
    load_row(q + row * p.D, p.D, lane, q_row);
    attention::OnlineSoftmax<acc_t> softmax;
    for (int64_t j = 0; j < p.Lk; ++j) {
      if (p.has_mask && !mask[b * p.Lk + j]) continue;
      const scalar_t* key = k + (bh * p.Lk + j) * p.D;
      const scalar_t* value = v + (bh * p.Lk + j) * p.D;
      acc_t weight;
      const acc_t rescale = softmax.add(scale * row_dot(q_row, key, p.D, lane), weight);
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        acc[t] = acc[t] * rescale + (d < p.D ? weight * static_cast<acc_t>(value[d]) : acc_t(0));
      }
    }
    const acc_t factor = softmax.empty() ? acc_t(0) : tanh(static_cast<acc_t>(gate[h])) / softmax.sum;
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + t * kWarp;
      if (d < p.D) out[row * p.D + d] = static_cast<scalar_t>(acc[t] * factor);
    }
    if (lane == 0) lse[row] = softmax.log_sum_exp();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                const scalar_t* __restrict__ gate, const bool* __restrict__ mask,
                                const acc_t* __restrict__ lse, scalar_t* __restrict__ dq, acc_t* __restrict__ dk,
                                acc_t* __restrict__ dv, acc_t* __restrict__ dgate, Problem p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = p.B * p.H * p.Lq, warps = int64_t(gridDim.x) * blockDim.x / kWarp;
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; row < rows; row += warps) {
    const int64_t bh = row / p.Lq, b = bh / p.H, h = bh % p.H;
    const acc_t gate_value = tanh(static_cast<acc_t>(gate[h]));
    const acc_t row_lse = lse[row];
    acc_t q_row[kPerLane], g_row[kPerLane], attended[kPerLane] = {0, 0, 0, 0}, d_attended[kPerLane],
        dq_row[kPerLane] = {0, 0, 0, 0};
    load_row(q + row * p.D, p.D, lane, q_row);
    load_row(grad_out + row * p.D, p.D, lane, g_row);
    // A = sum_j p_j v_j.
    for (int64_t j = 0; j < p.Lk; ++j) {
      if (p.has_mask && !mask[b * p.Lk + j]) continue;
      const acc_t prob = attention::probability(scale * row_dot(q_row, k + (bh * p.Lk + j) * p.D, p.D, lane), row_lse);
      const scalar_t* value = v + (bh * p.Lk + j) * p.D;
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        if (d < p.D) attended[t] += prob * static_cast<acc_t>(value[d]);
      }
    }
    acc_t delta = 0, gate_sum = 0;
    for (int t = 0; t < kPerLane; ++t) {
      d_attended[t] = gate_value * g_row[t];
      delta += d_attended[t] * attended[t];
      gate_sum += g_row[t] * attended[t];
    }
    delta = warp_all_sum(delta);
    gate_sum = warp_all_sum(gate_sum);
    if (lane == 0) gpuAtomicAdd(dgate + h, attention::gate_slope(gate_value) * gate_sum);
    for (int64_t j = 0; j < p.Lk; ++j) {
      if (p.has_mask && !mask[b * p.Lk + j]) continue;
      const scalar_t* key = k + (bh * p.Lk + j) * p.D;
      const scalar_t* value = v + (bh * p.Lk + j) * p.D;
      const acc_t prob = attention::probability(scale * row_dot(q_row, key, p.D, lane), row_lse);
      if (prob == acc_t(0)) continue;  // uniform across the warp
      const acc_t ds = attention::score_grad(prob, row_dot(d_attended, value, p.D, lane), delta);
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + t * kWarp;
        if (d >= p.D) continue;
        dq_row[t] += scale * ds * static_cast<acc_t>(key[d]);
        gpuAtomicAdd(dk + (bh * p.Lk + j) * p.D + d, scale * ds * q_row[t]);
        gpuAtomicAdd(dv + (bh * p.Lk + j) * p.D + d, prob * d_attended[t]);
      }
    }
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + t * kWarp;
      if (d < p.D) dq[row * p.D + d] = static_cast<scalar_t>(dq_row[t]);
    }
  }
}

void check_head_dim(const Problem& p) {
  TORCH_CHECK(p.D <= kWarp * kPerLane, "gated_cross_attention: the cuda backend supports D <= ", kWarp * kPerLane,
              ", got ", p.D, " (use backend='triton' or 'reference')");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_cross_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& gate,
                                                              const std::optional<at::Tensor>& key_padding_mask,
                                                              double scale) {
  const Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  check_head_dim(p);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc_dtype = at::toOpMathType(q.scalar_type());
  at::Tensor out = at::empty({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(acc_dtype));
  if (lse.numel() > 0) {
    const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous(), gate_c = gate.contiguous();
    const at::Tensor mask_c = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_cross_attention_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      forward_kernel<scalar_t, acc_t><<<blocks_for_rows(p.B * p.H * p.Lq), kThreads, 0, stream>>>(
          q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(), v_c.const_data_ptr<scalar_t>(),
          gate_c.const_data_ptr<scalar_t>(), p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, lse};  // the log-sum-exp stays in the accumulation type (float32 for 16-bit inputs)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_cross_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& lse,
    double scale) {
  const Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  check_head_dim(p);
  const auto acc_options = q.options().dtype(at::toOpMathType(q.scalar_type()));
  attention::check_backward(p, q, grad_out, lse, acc_options.dtype().toScalarType());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), acc_options), dv = at::zeros(v.sizes(), acc_options);
  at::Tensor dgate = at::zeros({p.H}, acc_options);
  if (q.numel() > 0) {
    const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous(), gate_c = gate.contiguous(),
                     g_c = grad_out.contiguous(), lse_c = lse.contiguous();
    const at::Tensor mask_c = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gated_cross_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<blocks_for_rows(p.B * p.H * p.Lq), kThreads, 0, stream>>>(
          g_c.const_data_ptr<scalar_t>(), q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(),
          v_c.const_data_ptr<scalar_t>(), gate_c.const_data_ptr<scalar_t>(),
          p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr, lse_c.const_data_ptr<acc_t>(),
          dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<acc_t>(), dv.mutable_data_ptr<acc_t>(),
          dgate.mutable_data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = q.scalar_type();
  return {dq, dk.to(dtype), dv.to(dtype), dgate.to(dtype)};
}

}  // namespace dreamportrait
