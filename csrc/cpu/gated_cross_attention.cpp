// CPU kernels of gated_cross_attention. The forward runs an online softmax per query row, in
// parallel over the B * H * Lq rows. The backward is parallel over (batch, head) pairs: each owns
// its dk and dv rows, so their accumulation over queries has no races. Per-element math:
// include/dreamportrait/attention_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "dreamportrait/attention_host.h"
#include "dreamportrait/attention_math.h"
#include "dreamportrait/cpu_dispatch.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

using attention::Problem;

constexpr int64_t kRowGrain = 32;

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T sum = 0;
  DP_SIMD_SUM(sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
inline void axpy(T* __restrict__ y, T a, const T* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Forward of query rows [begin, end) of the flattened (B * H * Lq) rows; `acc` is D scratch.
template <typename scalar_t>
DP_CPU_CLONES void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* gate,
                                const bool* mask, scalar_t* out, scalar_t* lse, scalar_t* acc, const Problem& p,
                                int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bh = row / p.Lq, b = bh / p.H, h = bh % p.H;
    const scalar_t* q_row = q + row * p.D;
    const scalar_t* keys = k + bh * p.Lk * p.D;
    const scalar_t* values = v + bh * p.Lk * p.D;
    const bool* attend = mask ? mask + b * p.Lk : nullptr;
    attention::OnlineSoftmax<scalar_t> softmax;
    std::fill(acc, acc + p.D, scalar_t(0));
    for (int64_t j = 0; j < p.Lk; ++j) {
      if (attend && !attend[j]) continue;
      scalar_t weight;
      const scalar_t rescale = softmax.add(scale * dot(q_row, keys + j * p.D, p.D), weight);
      for (int64_t d = 0; d < p.D; ++d) acc[d] = acc[d] * rescale + weight * values[j * p.D + d];
    }
    const scalar_t factor = softmax.empty() ? scalar_t(0) : std::tanh(gate[h]) / softmax.sum;
    scalar_t* out_row = out + row * p.D;
    for (int64_t d = 0; d < p.D; ++d) out_row[d] = acc[d] * factor;
    lse[row] = softmax.log_sum_exp();
  }
}

// Backward of (batch, head) pairs [begin, end). dk, dv are zero on entry; gate_partial gets each
// pair's contribution to its head's gate gradient.
template <typename scalar_t>
DP_CPU_CLONES void backward_heads(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                  const scalar_t* gate, const bool* mask, const scalar_t* lse, scalar_t* dq,
                                  scalar_t* dk, scalar_t* dv, scalar_t* gate_partial, const Problem& p,
                                  int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  std::vector<scalar_t> probs(p.Lk), attended(p.D), d_attended(p.D);
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.H, h = bh % p.H;
    const scalar_t gate_value = std::tanh(gate[h]);
    const scalar_t* keys = k + bh * p.Lk * p.D;
    const scalar_t* values = v + bh * p.Lk * p.D;
    scalar_t* d_keys = dk + bh * p.Lk * p.D;
    scalar_t* d_values = dv + bh * p.Lk * p.D;
    const bool* attend = mask ? mask + b * p.Lk : nullptr;
    scalar_t gate_sum = 0;
    for (int64_t i = 0; i < p.Lq; ++i) {
      const int64_t row = bh * p.Lq + i;
      const scalar_t* q_row = q + row * p.D;
      const scalar_t* g_row = grad_out + row * p.D;
      scalar_t* dq_row = dq + row * p.D;
      std::fill(dq_row, dq_row + p.D, scalar_t(0));
      // Recompute the probabilities and the ungated output A.
      std::fill(attended.begin(), attended.end(), scalar_t(0));
      for (int64_t j = 0; j < p.Lk; ++j) {
        const bool used = !attend || attend[j];
        probs[j] = used ? attention::probability(scale * dot(q_row, keys + j * p.D, p.D), lse[row]) : scalar_t(0);
        axpy(attended.data(), probs[j], values + j * p.D, p.D);
      }
      for (int64_t d = 0; d < p.D; ++d) d_attended[d] = gate_value * g_row[d];
      const scalar_t delta = dot(d_attended.data(), attended.data(), p.D);
      gate_sum += dot(g_row, attended.data(), p.D);
      for (int64_t j = 0; j < p.Lk; ++j) {
        if (probs[j] == scalar_t(0)) continue;  // masked or underflowed: no gradient flows
        const scalar_t ds = attention::score_grad(probs[j], dot(d_attended.data(), values + j * p.D, p.D), delta);
        axpy(dq_row, scale * ds, keys + j * p.D, p.D);
        axpy(d_keys + j * p.D, scale * ds, q_row, p.D);
        axpy(d_values + j * p.D, probs[j], d_attended.data(), p.D);
      }
    }
    gate_partial[bh] = attention::gate_slope(gate_value) * gate_sum;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_cross_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& gate,
                                                             const std::optional<at::Tensor>& key_padding_mask,
                                                             double scale) {
  const Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  at::Tensor out = at::empty({p.B, p.H, p.Lq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options());
  if (lse.numel() == 0) return {out, lse};
  const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous(), gate_c = gate.contiguous();
  const at::Tensor mask_c = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gated_cross_attention_cpu", [&] {
    at::parallel_for(0, p.B * p.H * p.Lq, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(p.D);
      forward_rows(q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(), v_c.const_data_ptr<scalar_t>(),
                   gate_c.const_data_ptr<scalar_t>(), p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr,
                   out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), acc.data(), p, begin, end);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_cross_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& gate, const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& lse,
    double scale) {
  const Problem p = attention::check_problem(q, k, v, gate, key_padding_mask, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && lse.dim() == 3 && lse.size(2) == p.Lq,
              "gated_cross_attention_backward: grad_out must have q's shape and lse (B, H, Lq)");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options()), dv = at::zeros(v.sizes(), v.options());
  at::Tensor gate_partial = at::zeros({p.B, p.H}, q.options());
  if (q.numel() > 0) {
    const at::Tensor q_c = q.contiguous(), k_c = k.contiguous(), v_c = v.contiguous(), gate_c = gate.contiguous(),
                     g_c = grad_out.contiguous(), lse_c = lse.contiguous();
    const at::Tensor mask_c = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gated_cross_attention_backward_cpu", [&] {
      at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
        backward_heads(g_c.const_data_ptr<scalar_t>(), q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(),
                       v_c.const_data_ptr<scalar_t>(), gate_c.const_data_ptr<scalar_t>(),
                       p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr, lse_c.const_data_ptr<scalar_t>(),
                       dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                       gate_partial.mutable_data_ptr<scalar_t>(), p, begin, end);
      });
    });
  }
  return {dq, dk, dv, gate_partial.sum(0)};
}

}  // namespace dreamportrait
