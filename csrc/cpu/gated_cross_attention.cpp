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

// Every product below is a small matrix product out (count x N) = rows (count x K) . columns
// (K x N) over a block of kBlockRows query rows, with N padded to a multiple of kLanes: each
// kLanes-wide slice of the outputs is summed over K in registers, and each column slice loaded
// from cache serves all rows of the block. The head's keys and values are copied once into
// zero-padded layouts that make every N a multiple of kLanes.
constexpr int64_t kLanes = 16;
constexpr int kBlockRows = 4;  // axpy_rows is written out for 4

inline int64_t padded(int64_t n) {
  return (n + kLanes - 1) / kLanes * kLanes;
}

// out[r][n] = sum_k rows[r][k] * columns[k * stride + n] for r < count, n < N (a multiple of
// kLanes). rows[] holds kBlockRows valid pointers: a short block repeats a row, whose outputs are
// not written.
template <typename T>
inline void block_products(const T* const rows[kBlockRows], int count, const T* __restrict__ columns, int64_t stride,
                           int64_t K, T* out, int64_t out_stride, int64_t N) {
  static_assert(kBlockRows == 4, "the accumulators below are written out for 4 rows");
  const T *__restrict__ row0 = rows[0], *__restrict__ row1 = rows[1], *__restrict__ row2 = rows[2],
          *__restrict__ row3 = rows[3];
  for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
    // Four independent accumulators, so consecutive multiply-adds do not wait on each other.
    T acc0[kLanes] = {}, acc1[kLanes] = {}, acc2[kLanes] = {}, acc3[kLanes] = {};
    for (int64_t k = 0; k < K; ++k) {
      const T* __restrict__ column = columns + k * stride + n0;
      const T a0 = row0[k], a1 = row1[k], a2 = row2[k], a3 = row3[k];
      for (int64_t i = 0; i < kLanes; ++i) {
        const T c = column[i];
        acc0[i] += a0 * c;
        acc1[i] += a1 * c;
        acc2[i] += a2 * c;
        acc3[i] += a3 * c;
      }
    }
    T* const accs[kBlockRows] = {acc0, acc1, acc2, acc3};
    for (int r = 0; r < count; ++r) std::copy(accs[r], accs[r] + kLanes, out + r * out_stride + n0);
  }
}

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

// Per-thread scratch for one head and one block of query rows. Lp, Dp: Lk, D padded. Nothing of
// size Lq x Lk.
template <typename T>
struct Scratch {
  int64_t Lp, Dp;
  std::vector<T> keys_t, values_t;  // (D, Lp), zero beyond Lk
  std::vector<T> keys_p, values_p;  // (Lk, Dp), zero beyond D
  std::vector<T> probs, dp;         // (kBlockRows, Lp): scores, then probabilities; dp, then ds
  std::vector<T> attended, d_attended, dq;  // (kBlockRows, Dp)

  Scratch(int64_t Lk, int64_t D)
      : Lp(padded(Lk)), Dp(padded(D)), keys_t(D * Lp), values_t(D * Lp), keys_p(Lk * Dp), values_p(Lk * Dp),
        probs(kBlockRows * Lp), dp(kBlockRows * Lp), attended(kBlockRows * Dp), d_attended(kBlockRows * Dp),
        dq(kBlockRows * Dp) {}

  // Lays out one head's (Lk, D) keys or values both ways.
  void load(const T* __restrict__ x, int64_t Lk, int64_t D, std::vector<T>& transposed, std::vector<T>& row_padded) {
    std::fill(transposed.begin(), transposed.end(), T(0));
    std::fill(row_padded.begin(), row_padded.end(), T(0));
    for (int64_t j = 0; j < Lk; ++j)
      for (int64_t d = 0; d < D; ++d) {
        transposed[d * Lp + j] = x[j * D + d];
        row_padded[j * Dp + d] = x[j * D + d];
      }
  }
};

// Pointers to rows i0 .. i0 + count - 1 of `base` (row length `stride`), the last repeated to fill
// the block.
template <typename T>
inline void block_rows(T* base, int64_t stride, int count, T* rows[kBlockRows]) {
  for (int r = 0; r < kBlockRows; ++r) rows[r] = base + std::min(r, count - 1) * stride;
}

// Softmax of one row's scores in place over its unmasked keys (masked keys get 0); returns the
// log-sum-exp (-inf when every key is masked, with all probabilities 0). Whether the row is empty
// comes from the mask alone: a NaN score propagates to every probability and the log-sum-exp.
template <typename T>
inline T softmax_row(T* scores, const bool* attend, T scale, int64_t Lk) {
  T max = -std::numeric_limits<T>::infinity();
  bool any = false;
  for (int64_t j = 0; j < Lk; ++j) {
    scores[j] *= scale;
    if (attend && !attend[j]) continue;
    any = true;
    if (scores[j] > max || std::isnan(scores[j])) max = scores[j];
  }
  if (!any) {
    std::fill(scores, scores + Lk, T(0));
    return -std::numeric_limits<T>::infinity();
  }
  exp_shifted(scores, max, Lk);
  T sum = 0;
  for (int64_t j = 0; j < Lk; ++j) {
    if (attend && !attend[j]) scores[j] = 0;
    sum += scores[j];
  }
  for (int64_t j = 0; j < Lk; ++j) scores[j] /= sum;
  return max + std::log(sum);
}

// Forward of the query rows [begin, end) of one (batch, head). A row holds all its Lk scores at
// once (Lk is the text length), so its softmax is exact in two passes.
template <typename scalar_t>
DP_CPU_CLONES void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* gate,
                                const bool* mask, scalar_t* out, scalar_t* lse, Scratch<scalar_t>& scratch,
                                const Problem& p, int64_t bh, int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  const scalar_t gate_value = std::tanh(gate[bh % p.H]);
  const bool* attend = mask ? mask + (bh / p.H) * p.Lk : nullptr;
  const int64_t Lp = scratch.Lp, Dp = scratch.Dp;
  scratch.load(k + bh * p.Lk * p.D, p.Lk, p.D, scratch.keys_t, scratch.keys_p);
  scratch.load(v + bh * p.Lk * p.D, p.Lk, p.D, scratch.values_t, scratch.values_p);
  for (int64_t i0 = begin; i0 < end; i0 += kBlockRows) {
    const int count = static_cast<int>(std::min<int64_t>(kBlockRows, end - i0));
    const int64_t first = bh * p.Lq + i0;
    const scalar_t* q_rows[kBlockRows];
    const scalar_t* prob_rows[kBlockRows];
    block_rows(q + first * p.D, p.D, count, q_rows);
    block_rows<const scalar_t>(scratch.probs.data(), Lp, count, prob_rows);
    block_products(q_rows, count, scratch.keys_t.data(), Lp, p.D, scratch.probs.data(), Lp, Lp);
    for (int r = 0; r < count; ++r) lse[first + r] = softmax_row(scratch.probs.data() + r * Lp, attend, scale, p.Lk);
    block_products(prob_rows, count, scratch.values_p.data(), Dp, p.Lk, scratch.attended.data(), Dp, Dp);
    for (int r = 0; r < count; ++r) {
      const scalar_t* attended = scratch.attended.data() + r * Dp;
      scalar_t* out_row = out + (first + r) * p.D;
      for (int64_t d = 0; d < p.D; ++d) out_row[d] = gate_value * attended[d];
    }
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
  const int64_t Lp = scratch.Lp, Dp = scratch.Dp;
  for (int64_t bh = begin; bh < end; ++bh) {
    const scalar_t gate_value = std::tanh(gate[bh % p.H]);
    const bool* attend = mask ? mask + (bh / p.H) * p.Lk : nullptr;
    scratch.load(k + bh * p.Lk * p.D, p.Lk, p.D, scratch.keys_t, scratch.keys_p);
    scratch.load(v + bh * p.Lk * p.D, p.Lk, p.D, scratch.values_t, scratch.values_p);
    scalar_t* d_keys = dk + bh * p.Lk * p.D;
    scalar_t* d_values = dv + bh * p.Lk * p.D;
    scalar_t gate_sum = 0;
    for (int64_t i0 = 0; i0 < p.Lq; i0 += kBlockRows) {
      const int count = static_cast<int>(std::min<int64_t>(kBlockRows, p.Lq - i0));
      const int64_t first = bh * p.Lq + i0;
      const scalar_t *q_rows[kBlockRows], *prob_rows[kBlockRows], *d_attended_rows[kBlockRows], *ds_rows[kBlockRows];
      block_rows(q + first * p.D, p.D, count, q_rows);
      block_rows<const scalar_t>(scratch.probs.data(), Lp, count, prob_rows);
      block_rows<const scalar_t>(scratch.d_attended.data(), Dp, count, d_attended_rows);
      block_rows<const scalar_t>(scratch.dp.data(), Lp, count, ds_rows);
      // Recompute p_j = exp(s_j - lse) and the ungated outputs A.
      block_products(q_rows, count, scratch.keys_t.data(), Lp, p.D, scratch.probs.data(), Lp, Lp);
      for (int r = 0; r < count; ++r) {
        scalar_t* probs = scratch.probs.data() + r * Lp;
        const scalar_t row_lse = lse[first + r];
        if (row_lse == -std::numeric_limits<scalar_t>::infinity()) {  // every key masked: no gradient
          std::fill(probs, probs + p.Lk, scalar_t(0));
          continue;
        }
        for (int64_t j = 0; j < p.Lk; ++j) probs[j] *= scale;
        exp_shifted(probs, row_lse, p.Lk);
        if (attend)
          for (int64_t j = 0; j < p.Lk; ++j)
            if (!attend[j]) probs[j] = 0;
      }
      block_products(prob_rows, count, scratch.values_p.data(), Dp, p.Lk, scratch.attended.data(), Dp, Dp);
      scalar_t delta[kBlockRows];
      for (int r = 0; r < count; ++r) {
        const scalar_t* g_row = grad_out + (first + r) * p.D;
        const scalar_t* attended = scratch.attended.data() + r * Dp;
        scalar_t* d_attended = scratch.d_attended.data() + r * Dp;
        std::fill(d_attended + p.D, d_attended + Dp, scalar_t(0));
        for (int64_t d = 0; d < p.D; ++d) d_attended[d] = gate_value * g_row[d];
        delta[r] = dot(d_attended, attended, p.D);
        gate_sum += dot(g_row, attended, p.D);
      }
      // dp_j = dA . v_j, then ds_j = p_j (dp_j - delta) in place, then dq = scale ds K.
      block_products(d_attended_rows, count, scratch.values_t.data(), Lp, p.D, scratch.dp.data(), Lp, Lp);
      for (int r = 0; r < count; ++r) {
        scalar_t* ds = scratch.dp.data() + r * Lp;
        const scalar_t* probs = scratch.probs.data() + r * Lp;
        for (int64_t j = 0; j < p.Lk; ++j) ds[j] = scale * attention::score_grad(probs[j], ds[j], delta[r]);
      }
      block_products(ds_rows, count, scratch.keys_p.data(), Dp, p.Lk, scratch.dq.data(), Dp, Dp);
      for (int r = 0; r < count; ++r) std::copy(scratch.dq.data() + r * Dp, scratch.dq.data() + r * Dp + p.D, dq + (first + r) * p.D);
      // dk_j += sum_r ds_rj q_r and dv_j += sum_r p_rj dA_r, each key's rows updated once per block.
      for (int64_t j = 0; j < p.Lk; ++j) {
        scalar_t ds[kBlockRows], prob[kBlockRows];
        bool any = false;
        for (int r = 0; r < count; ++r) {
          prob[r] = scratch.probs[r * Lp + j];
          ds[r] = scratch.dp[r * Lp + j];
          any |= prob[r] != scalar_t(0);
        }
        if (!any) continue;  // masked or underflowed for every row: no gradient flows
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
  attention::check_backward(p, q, grad_out, lse, q.scalar_type());
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
