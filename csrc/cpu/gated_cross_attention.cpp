// CPU kernels of gated_cross_attention. The forward is parallel over the B * H * Lq query rows;
// a row's Lk scores (Lk is the text length) are held in a per-thread buffer and computed from
// transposed keys as vectorised multiply-adds. The backward is parallel over (batch, head) pairs: each owns
// its dk and dv rows, so their accumulation over queries has no races. Per-element math:
// include/dreamportrait/attention_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Query rows per work item: a work item transposes its head's keys once per head it visits.
constexpr int64_t kRowGrain = 256;

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

// x[j] = exp(x[j] - shift) for j < n. float32: an inline exp the compiler vectorises (glibc's expf
// is a call per element, which made the exponentials half the forward's time): x = m ln2 + r with
// |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (relative error < 2e-8), 2^m built
// from exponent bits; arguments below -87 give ~1e-38 instead of underflowing further, which no
// softmax sum can tell apart. float64: std::exp.
inline void exp_shifted(float* __restrict__ x, float shift, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float y = std::max(x[j] - shift, -87.0f);
    const float m = std::floor(y * 1.44269504088896341f + 0.5f);
    const float r = (y - m * 0.693145751953125f) - m * 1.42860682030941723212e-6f;  // Cody-Waite
    const float poly =
        1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    const int32_t bits = (static_cast<int32_t>(m) + 127) << 23;
    float two_to_m;
    std::memcpy(&two_to_m, &bits, sizeof(float));
    x[j] = poly * two_to_m;
  }
}

inline void exp_shifted(double* __restrict__ x, double shift, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// keys (Lk, D) -> keys_t (D, Lk), so that a row's Lk scores are D vectorised multiply-adds over
// the keys rather than Lk horizontal dot products.
template <typename T>
inline void transpose_keys(const T* __restrict__ keys, T* __restrict__ keys_t, int64_t Lk, int64_t D) {
  for (int64_t j = 0; j < Lk; ++j)
    for (int64_t d = 0; d < D; ++d) keys_t[d * Lk + j] = keys[j * D + d];
}

// scores[j] = scale * q . k_j for all keys, from the transposed keys.
template <typename T>
inline void row_scores(const T* __restrict__ q_row, const T* __restrict__ keys_t, T scale, T* __restrict__ scores,
                       int64_t Lk, int64_t D) {
  std::fill(scores, scores + Lk, T(0));
  for (int64_t d = 0; d < D; ++d) axpy(scores, q_row[d], keys_t + d * Lk, Lk);
  for (int64_t j = 0; j < Lk; ++j) scores[j] *= scale;
}

// Per-thread scratch of the attention kernels: a row's scores/probabilities and dp (Lk), transposed
// keys and values (D x Lk) and two D-vectors. Nothing of size Lq x Lk.
template <typename T>
struct Scratch {
  std::vector<T> scores, dp, keys_t, values_t, first, second;
  Scratch(int64_t Lk, int64_t D) : scores(Lk), dp(Lk), keys_t(Lk * D), values_t(Lk * D), first(D), second(D) {}
};

// Forward of query rows [begin, end) of the flattened (B * H * Lq) rows. A row holds all its Lk
// scores at once (Lk is the text length, 77), so the softmax is exact in two passes; masked keys
// get probability 0.
template <typename scalar_t>
DP_CPU_CLONES void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* gate,
                                const bool* mask, scalar_t* out, scalar_t* lse, Scratch<scalar_t>& scratch,
                                const Problem& p, int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  scalar_t* scores = scratch.scores.data();
  int64_t transposed_bh = -1;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t bh = row / p.Lq, b = bh / p.H, h = bh % p.H;
    if (bh != transposed_bh) {
      transpose_keys(k + bh * p.Lk * p.D, scratch.keys_t.data(), p.Lk, p.D);
      transposed_bh = bh;
    }
    const scalar_t* values = v + bh * p.Lk * p.D;
    const bool* attend = mask ? mask + b * p.Lk : nullptr;
    row_scores(q + row * p.D, scratch.keys_t.data(), scale, scores, p.Lk, p.D);
    scalar_t max = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < p.Lk; ++j)
      if (!attend || attend[j]) max = std::max(max, scores[j]);
    scalar_t* out_row = out + row * p.D;
    std::fill(out_row, out_row + p.D, scalar_t(0));
    if (max == -std::numeric_limits<scalar_t>::infinity()) {  // every key masked
      lse[row] = max;
      continue;
    }
    exp_shifted(scores, max, p.Lk);
    scalar_t sum = 0;
    for (int64_t j = 0; j < p.Lk; ++j) {
      if (attend && !attend[j]) continue;
      sum += scores[j];
      axpy(out_row, scores[j], values + j * p.D, p.D);
    }
    const scalar_t factor = std::tanh(gate[h]) / sum;
    for (int64_t d = 0; d < p.D; ++d) out_row[d] *= factor;
    lse[row] = max + std::log(sum);
  }
}

// Backward of (batch, head) pairs [begin, end). dk, dv are zero on entry; gate_partial gets each
// pair's contribution to its head's gate gradient.
template <typename scalar_t>
DP_CPU_CLONES void backward_heads(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                  const scalar_t* gate, const bool* mask, const scalar_t* lse, scalar_t* dq,
                                  scalar_t* dk, scalar_t* dv, scalar_t* gate_partial, Scratch<scalar_t>& scratch,
                                  const Problem& p, int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  scalar_t* probs = scratch.scores.data();
  scalar_t* attended = scratch.first.data();
  scalar_t* d_attended = scratch.second.data();
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.H, h = bh % p.H;
    const scalar_t gate_value = std::tanh(gate[h]);
    const scalar_t* keys = k + bh * p.Lk * p.D;
    const scalar_t* values = v + bh * p.Lk * p.D;
    transpose_keys(keys, scratch.keys_t.data(), p.Lk, p.D);
    transpose_keys(values, scratch.values_t.data(), p.Lk, p.D);
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
      std::fill(attended, attended + p.D, scalar_t(0));
      if (lse[row] == -std::numeric_limits<scalar_t>::infinity()) {  // every key masked: no gradient
        std::fill(probs, probs + p.Lk, scalar_t(0));
      } else {
        row_scores(q_row, scratch.keys_t.data(), scale, probs, p.Lk, p.D);
        exp_shifted(probs, lse[row], p.Lk);  // p_j = exp(s_j - lse)
      }
      for (int64_t j = 0; j < p.Lk; ++j) {
        if (attend && !attend[j]) probs[j] = scalar_t(0);
        if (probs[j] != scalar_t(0)) axpy(attended, probs[j], values + j * p.D, p.D);
      }
      for (int64_t d = 0; d < p.D; ++d) d_attended[d] = gate_value * g_row[d];
      const scalar_t delta = dot(d_attended, attended, p.D);
      gate_sum += dot(g_row, attended, p.D);
      // dp_j = dA . v_j for all keys at once, from the transposed values; then ds_j and the three
      // gradients.
      scalar_t* dp = scratch.dp.data();
      std::fill(dp, dp + p.Lk, scalar_t(0));
      for (int64_t d = 0; d < p.D; ++d) axpy(dp, d_attended[d], scratch.values_t.data() + d * p.Lk, p.Lk);
      for (int64_t j = 0; j < p.Lk; ++j) {
        if (probs[j] == scalar_t(0)) continue;  // masked or underflowed: no gradient flows
        const scalar_t ds = attention::score_grad(probs[j], dp[j], delta);
        axpy(dq_row, scale * ds, keys + j * p.D, p.D);
        axpy(d_keys + j * p.D, scale * ds, q_row, p.D);
        axpy(d_values + j * p.D, probs[j], d_attended, p.D);
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
      Scratch<scalar_t> scratch(p.Lk, p.D);
      forward_rows(q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(), v_c.const_data_ptr<scalar_t>(),
                   gate_c.const_data_ptr<scalar_t>(), p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr,
                   out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), scratch, p, begin, end);
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
        Scratch<scalar_t> scratch(p.Lk, p.D);
        backward_heads(g_c.const_data_ptr<scalar_t>(), q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(),
                       v_c.const_data_ptr<scalar_t>(), gate_c.const_data_ptr<scalar_t>(),
                       p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr, lse_c.const_data_ptr<scalar_t>(),
                       dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                       gate_partial.mutable_data_ptr<scalar_t>(), scratch, p, begin, end);
      });
    });
  }
  return {dq, dk, dv, gate_partial.sum(0)};
}

}  // namespace dreamportrait
