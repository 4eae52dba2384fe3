// CPU kernels of gated_cross_attention. The forward is parallel over chunks of query rows; a row's
// Lk scores (Lk is the text length) are held in a per-thread buffer and computed, for blocks of
// kBlockRows rows at once, from transposed keys as vectorised multiply-adds. The backward is parallel over (batch, head) pairs: each owns
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

// Query rows per forward work item (each transposes its head's keys once).
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
    // Adding 1.5 * 2^23 rounds y / ln2 to the integer m, whose bits can then be read off: no
    // floor() or float-to-int conversion, which keep the loop from vectorising.
    const float t = y * 1.44269504088896341f + 12582912.0f;
    const float m = t - 12582912.0f;
    const int32_t m_bits = __builtin_bit_cast(int32_t, t) - 0x4B400000;
    const float r = (y - m * 0.693145751953125f) - m * 1.42860682030941723212e-6f;  // Cody-Waite
    const float poly =
        1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    x[j] = poly * __builtin_bit_cast(float, (m_bits + 127) << 23);
  }
}

inline void exp_shifted(double* __restrict__ x, double shift, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// Keys per register block of the score products; rows of transposed keys and of scores are padded
// to a multiple of it (with zeros), so the products need no tail handling.
constexpr int64_t kLanes = 16;

inline int64_t padded_keys(int64_t Lk) {
  return (Lk + kLanes - 1) / kLanes * kLanes;
}

// keys (Lk, D) -> keys_t (D, Lp), zero beyond Lk: a row's scores are then D vectorised
// multiply-adds over the keys rather than Lk horizontal dot products.
template <typename T>
inline void transpose_keys(const T* __restrict__ keys, T* __restrict__ keys_t, int64_t Lk, int64_t D) {
  const int64_t Lp = padded_keys(Lk);
  std::fill(keys_t, keys_t + D * Lp, T(0));
  for (int64_t j = 0; j < Lk; ++j)
    for (int64_t d = 0; d < D; ++d) keys_t[d * Lp + j] = keys[j * D + d];
}

// Query rows processed together: each key (and transposed-key row) loaded from cache serves all of
// them, and dk_j / dv_j are read and written once per block instead of once per row.
constexpr int kBlockRows = 4;  // axpy_rows is written out for 4

// Per-thread scratch of the attention kernels, for one block of query rows: scores/probabilities
// and dp (kBlockRows x Lk), the ungated outputs A and dA (kBlockRows x D), and the head's keys and
// values transposed (D x Lk). Nothing of size Lq x Lk.
template <typename T>
struct Scratch {
  std::vector<T> probs, dp, attended, d_attended, keys_t, values_t;
  Scratch(int64_t Lk, int64_t D)
      : probs(kBlockRows * padded_keys(Lk)), dp(kBlockRows * padded_keys(Lk)), attended(kBlockRows * D),
        d_attended(kBlockRows * D), keys_t(padded_keys(Lk) * D), values_t(padded_keys(Lk) * D) {}
};

// y += sum_r a[r] x[r] over the block's rows, reading and writing y once.
template <typename T>
inline void axpy_rows(T* __restrict__ y, const T a[kBlockRows], const T* const x[kBlockRows], int count, int64_t n) {
  if (count < kBlockRows) {
    for (int r = 0; r < count; ++r) axpy(y, a[r], x[r], n);
    return;
  }
  const T *__restrict__ x0 = x[0], *__restrict__ x1 = x[1], *__restrict__ x2 = x[2], *__restrict__ x3 = x[3];
  for (int64_t i = 0; i < n; ++i) y[i] += a[0] * x0[i] + a[1] * x1[i] + a[2] * x2[i] + a[3] * x3[i];
}

// out[r] (Lp) = sum_d rows[r][d] * columns_t[d] for the block's rows: a block of scores (from the
// transposed keys) or of dp (from the transposed values). Each kLanes-wide slice of the kBlockRows
// outputs is summed over d in registers; rows[] must hold kBlockRows valid pointers (the caller
// repeats a row for a short block; only `count` outputs are written).
template <typename T>
inline void block_products(const T* const rows[kBlockRows], int count, const T* __restrict__ columns_t, T* out,
                           int64_t Lp, int64_t D) {
  for (int64_t j0 = 0; j0 < Lp; j0 += kLanes) {
    T acc[kBlockRows][kLanes] = {};
    for (int64_t d = 0; d < D; ++d) {
      const T* __restrict__ column = columns_t + d * Lp + j0;
      for (int r = 0; r < kBlockRows; ++r) {
        const T a = rows[r][d];
        for (int64_t jj = 0; jj < kLanes; ++jj) acc[r][jj] += a * column[jj];
      }
    }
    for (int r = 0; r < count; ++r) std::copy(acc[r], acc[r] + kLanes, out + r * Lp + j0);
  }
}

// Forward of the query rows [begin, end) of one (batch, head): rows are never split across heads
// by the caller. A row holds all its Lk scores at once (Lk is the text length), so the softmax is
// exact in two passes; masked keys get probability 0.
template <typename scalar_t>
DP_CPU_CLONES void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* gate,
                                const bool* mask, scalar_t* out, scalar_t* lse, Scratch<scalar_t>& scratch,
                                const Problem& p, int64_t bh, int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  const int64_t b = bh / p.H, h = bh % p.H;
  const scalar_t gate_value = std::tanh(gate[h]);
  const scalar_t* values = v + bh * p.Lk * p.D;
  const bool* attend = mask ? mask + b * p.Lk : nullptr;
  const int64_t Lp = padded_keys(p.Lk);
  transpose_keys(k + bh * p.Lk * p.D, scratch.keys_t.data(), p.Lk, p.D);
  for (int64_t i0 = begin; i0 < end; i0 += kBlockRows) {
    const int count = static_cast<int>(std::min<int64_t>(kBlockRows, end - i0));
    const scalar_t* q_rows[kBlockRows];
    for (int r = 0; r < kBlockRows; ++r) q_rows[r] = q + (bh * p.Lq + i0 + std::min(r, count - 1)) * p.D;
    block_products(q_rows, count, scratch.keys_t.data(), scratch.probs.data(), Lp, p.D);
    scalar_t factor[kBlockRows];
    for (int r = 0; r < count; ++r) {
      scalar_t* scores = scratch.probs.data() + r * Lp;
      scalar_t max = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t j = 0; j < p.Lk; ++j) {
        scores[j] *= scale;
        if (!attend || attend[j]) max = std::max(max, scores[j]);
      }
      const int64_t row = bh * p.Lq + i0 + r;
      if (max == -std::numeric_limits<scalar_t>::infinity()) {  // every key masked
        std::fill(scores, scores + p.Lk, scalar_t(0));
        lse[row] = max;
        factor[r] = 0;
        continue;
      }
      exp_shifted(scores, max, p.Lk);
      scalar_t sum = 0;
      for (int64_t j = 0; j < p.Lk; ++j) {
        if (attend && !attend[j]) scores[j] = 0;
        sum += scores[j];
      }
      lse[row] = max + std::log(sum);
      factor[r] = gate_value / sum;
    }
    scalar_t* out_rows[kBlockRows];
    for (int r = 0; r < count; ++r) {
      out_rows[r] = out + (bh * p.Lq + i0 + r) * p.D;
      std::fill(out_rows[r], out_rows[r] + p.D, scalar_t(0));
    }
    for (int64_t j = 0; j < p.Lk; ++j)
      for (int r = 0; r < count; ++r) {
        const scalar_t weight = scratch.probs[r * Lp + j];
        if (weight != scalar_t(0)) axpy(out_rows[r], weight, values + j * p.D, p.D);
      }
    for (int r = 0; r < count; ++r)
      for (int64_t d = 0; d < p.D; ++d) out_rows[r][d] *= factor[r];
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
  const int64_t Lp = padded_keys(p.Lk);
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
    for (int64_t i0 = 0; i0 < p.Lq; i0 += kBlockRows) {
      const int count = static_cast<int>(std::min<int64_t>(kBlockRows, p.Lq - i0));
      const scalar_t* q_rows[kBlockRows];
      const scalar_t* d_attended_rows[kBlockRows];
      scalar_t* dq_rows[kBlockRows];
      scalar_t delta[kBlockRows];
      for (int r = 0; r < kBlockRows; ++r) {  // a short block repeats its last row (outputs unused)
        const int64_t row = bh * p.Lq + i0 + std::min(r, count - 1);
        q_rows[r] = q + row * p.D;
        dq_rows[r] = dq + row * p.D;
        d_attended_rows[r] = scratch.d_attended.data() + std::min(r, count - 1) * p.D;
      }
      for (int r = 0; r < count; ++r) std::fill(dq_rows[r], dq_rows[r] + p.D, scalar_t(0));
      // Recompute the probabilities p_j = exp(s_j - lse) and the ungated outputs A.
      block_products(q_rows, count, scratch.keys_t.data(), scratch.probs.data(), Lp, p.D);
      for (int r = 0; r < count; ++r) {
        const int64_t row = bh * p.Lq + i0 + r;
        scalar_t* probs = scratch.probs.data() + r * Lp;
        scalar_t* attended = scratch.attended.data() + r * p.D;
        std::fill(attended, attended + p.D, scalar_t(0));
        if (lse[row] == -std::numeric_limits<scalar_t>::infinity()) {  // every key masked: no gradient
          std::fill(probs, probs + p.Lk, scalar_t(0));
        } else {
          for (int64_t j = 0; j < p.Lk; ++j) probs[j] *= scale;
          exp_shifted(probs, lse[row], p.Lk);
        }
        for (int64_t j = 0; j < p.Lk; ++j) {
          if (attend && !attend[j]) probs[j] = scalar_t(0);
          if (probs[j] != scalar_t(0)) axpy(attended, probs[j], values + j * p.D, p.D);
        }
        const scalar_t* g_row = grad_out + row * p.D;
        scalar_t* d_attended = scratch.d_attended.data() + r * p.D;
        for (int64_t d = 0; d < p.D; ++d) d_attended[d] = gate_value * g_row[d];
        delta[r] = dot(d_attended, attended, p.D);
        gate_sum += dot(g_row, attended, p.D);
      }
      // dp_j = dA . v_j for the block, from the transposed values; then ds and the gradients,
      // each key's dk_j and dv_j updated once for the whole block.
      block_products(d_attended_rows, count, scratch.values_t.data(), scratch.dp.data(), Lp, p.D);
      for (int64_t j = 0; j < p.Lk; ++j) {
        scalar_t ds[kBlockRows] = {}, prob[kBlockRows] = {};
        bool any = false;
        for (int r = 0; r < count; ++r) {
          prob[r] = scratch.probs[r * Lp + j];
          ds[r] = scale * attention::score_grad(prob[r], scratch.dp[r * Lp + j], delta[r]);
          any |= prob[r] != scalar_t(0);
        }
        if (!any) continue;  // masked or underflowed for every row: no gradient flows
        const scalar_t* key = keys + j * p.D;
        for (int r = 0; r < count; ++r) axpy(dq_rows[r], ds[r], key, p.D);
        axpy_rows(d_keys + j * p.D, ds, q_rows, count, p.D);
        axpy_rows(d_values + j * p.D, prob, d_attended_rows, count, p.D);
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
    // Work items are chunks of one head's query rows, so a chunk transposes one head's keys.
    const int64_t chunks = (p.Lq + kRowGrain - 1) / kRowGrain;
    at::parallel_for(0, p.B * p.H * chunks, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(p.Lk, p.D);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / chunks, first = (item % chunks) * kRowGrain;
        forward_rows(q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(), v_c.const_data_ptr<scalar_t>(),
                     gate_c.const_data_ptr<scalar_t>(), p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr,
                     out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), scratch, p, bh, first,
                     std::min(p.Lq, first + kRowGrain));
      }
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
