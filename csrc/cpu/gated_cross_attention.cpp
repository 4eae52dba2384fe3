// CPU kernels of gated_cross_attention. The forward is parallel over chunks of one head's query
// rows; a row's scores over the text's keys (at most 77) are held in a per-thread buffer and
// computed, for blocks of kBlockRows rows at once, by register-blocked products over the head's
// keys and values laid out once per chunk. Keys the padding mask excludes are left out of those
// layouts. The backward is parallel over (batch, head) pairs: each owns its dk and dv rows, so their
// accumulation over queries has no races. Per-element math: include/dreamportrait/attention_math.h.
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
#include "dreamportrait/cpu_products.h"
#include "dreamportrait/ops.h"

namespace dreamportrait {
namespace {

using attention::Problem;

// Query rows per forward work item (each transposes its head's keys once).
constexpr int64_t kRowGrain = 1024;

template <typename T>
DP_ALWAYS_INLINE T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T sum = 0;
  DP_SIMD_SUM(sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// x[j] = exp(x[j] - shift) for j < n. float32: an inline exp the compiler vectorises (glibc's expf
// is a call per element, which made the exponentials half the forward's time): x = m ln2 + r with
// |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (relative error < 2e-8), 2^m built
// from exponent bits; arguments below -87 give ~1e-38 instead of underflowing further, which no
// softmax sum can tell apart. float64: std::exp.
DP_ALWAYS_INLINE void exp_shifted(float* __restrict__ x, float shift, int64_t n) {
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

DP_ALWAYS_INLINE void exp_shifted(double* __restrict__ x, double shift, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// Every product below is a small matrix product out (count x N) = rows (count x K) . columns
// (K x N) over a block of kBlockRows rows, with N padded to a multiple of kLanes: each kLanes-wide
// slice of the outputs is summed over K in registers (one AVX-512 or two AVX2 registers of
// float32 per row), and each column slice loaded from cache serves all rows of the block. The
// head's keys and values are copied once into zero-padded layouts that make every N a multiple of
// kLanes.
constexpr int64_t kLanes = 16;
constexpr int kBlockRows = cpu::kProductRows;
// Query rows whose P and dS the backward gathers before updating dK and dV (a multiple of
// kBlockRows): the products then run over this many rows instead of one block's.
constexpr int64_t kGatherRows = 64;

inline int64_t padded(int64_t n) {
  return (n + kLanes - 1) / kLanes * kLanes;
}

// block_product over this file's row pointers (a_step 1) and kLanes-wide slices.
template <int kVectorBytes, typename T>
DP_ALWAYS_INLINE void block_products(const T* const rows[kBlockRows], int count, const T* __restrict__ columns,
                                     int64_t stride, int64_t K, T* out, int64_t out_stride, int64_t N,
                                     bool accumulate = false) {
  cpu::block_product<kVectorBytes, kLanes>(rows, 1, count, columns, stride, K, out, out_stride, N, accumulate);
}

// Per-thread scratch for one head and one block of query rows: the head's keys and values in the
// layouts the products read, and buffers of kBlockRows rows. Nothing of size Lq x Lk.
//
// The keys a head's mask excludes are left out of the layouts (`key_index` maps the kept ones back),
// so a prompt of n tokens padded to 77 costs n keys' work, not 77. That is exact: an excluded key's
// probability is 0, and 0 * x adds nothing. Unless x is not finite (0 * inf is NaN): if an excluded
// key or value holds inf or NaN, the head keeps every key and applies the mask in the softmax, so
// the kernel gives the same NaN pattern as the reference.
template <typename T>
struct Scratch {
  int64_t D, Dp;       // head dim, padded
  int64_t keys = 0;    // keys laid out for the current head
  int64_t Lp = 0;      // keys padded
  bool masked = false; // whether softmax_row must still apply the mask (excluded keys kept)
  std::vector<int64_t> key_index;   // (keys,): position in the head's k and v
  std::vector<T> keys_t, values_t;  // (D, Lp), zero beyond `keys`
  std::vector<T> keys_p, values_p;  // (keys, Dp), zero beyond D
  std::vector<T> probs, dp;         // (kBlockRows, Lp): scores, then probabilities; dp, then ds
  std::vector<T> attended, dq;      // (kBlockRows, Dp)
  // The backward's gather of kGatherRows query rows: Q and dA padded, P and dS by key; and the
  // head's dK and dV accumulated, padded.
  std::vector<T> q_gather, d_attended_gather;  // (kGatherRows, Dp)
  std::vector<T> probs_t, ds_t;                // (keys, kGatherRows)
  std::vector<T> dk_acc, dv_acc;               // (keys, Dp)

  Scratch(int64_t Lk, int64_t D)
      : D(D), Dp(padded(D)), key_index(Lk), keys_t(D * padded(Lk)), values_t(D * padded(Lk)), keys_p(Lk * Dp),
        values_p(Lk * Dp), probs(kBlockRows * padded(Lk)), dp(kBlockRows * padded(Lk)), attended(kBlockRows * Dp),
        dq(kBlockRows * Dp) {}

  // The backward's buffers, which the forward does not need.
  void allocate_backward(int64_t Lk) {
    q_gather.resize(kGatherRows * Dp), d_attended_gather.resize(kGatherRows * Dp);
    probs_t.resize(Lk * kGatherRows), ds_t.resize(Lk * kGatherRows);
    dk_acc.resize(Lk * Dp), dv_acc.resize(Lk * Dp);
  }

  // Lays out one head's (Lk, D) keys and values, without the keys `attend` (nullable) excludes
  // when they are all finite: the keys transposed and times `scale` (so that Q K^T gives the
  // scores) and the values by rows (what the forward reads), and with `both_ways` also the other
  // way round, unscaled (the backward's dq and dp).
  void load(const T* __restrict__ k, const T* __restrict__ v, const bool* attend, int64_t Lk, T scale,
            bool both_ways) {
    masked = false;
    if (attend)
      for (int64_t j = 0; j < Lk && !masked; ++j)
        if (!attend[j])
          for (int64_t d = 0; d < D; ++d)
            if (!std::isfinite(k[j * D + d]) || !std::isfinite(v[j * D + d])) {
              masked = true;
              break;
            }
    keys = 0;
    for (int64_t j = 0; j < Lk; ++j)
      if (masked || !attend || attend[j]) key_index[keys++] = j;
    Lp = padded(keys);
    lay_out(k, scale, keys_t.data(), both_ways ? keys_p.data() : nullptr);
    lay_out(v, T(1), both_ways ? values_t.data() : nullptr, values_p.data());
  }

  // The kept rows of x (Lk, D) into `transposed` (D, Lp), times `factor`, and `by_rows` (keys, Dp),
  // either nullable.
  void lay_out(const T* __restrict__ x, T factor, T* __restrict__ transposed, T* __restrict__ by_rows) const {
    if (transposed) {
      std::fill(transposed, transposed + D * Lp, T(0));
      for (int64_t j = 0; j < keys; ++j)
        for (int64_t d = 0; d < D; ++d) transposed[d * Lp + j] = factor * x[key_index[j] * D + d];
    }
    if (by_rows) {
      for (int64_t j = 0; j < keys; ++j) {
        std::copy(x + key_index[j] * D, x + key_index[j] * D + D, by_rows + j * Dp);
        std::fill(by_rows + j * Dp + D, by_rows + (j + 1) * Dp, T(0));
      }
    }
  }
};

// Pointers to rows i0 .. i0 + count - 1 of `base` (row length `stride`), the last repeated to fill
// the block.
template <typename T>
inline void block_rows(T* base, int64_t stride, int count, T* rows[kBlockRows]) {
  for (int r = 0; r < kBlockRows; ++r) rows[r] = base + std::min(r, count - 1) * stride;
}

// Softmax of one row's n scores in place, the keys `attend` (nullable) excludes getting 0; returns
// the log-sum-exp (-inf when there is no key to attend to, with all probabilities 0). Whether the
// row is empty comes from the mask alone: a NaN score propagates to every probability and the
// log-sum-exp. Without a mask every loop vectorises (the maximum by vmaxps, which skips NaN, so
// NaN is looked for apart).
template <typename T>
DP_ALWAYS_INLINE T softmax_row(T* __restrict__ scores, const bool* attend, int64_t n) {
  bool any = n > 0;
  if (attend) {
    any = false;
    for (int64_t j = 0; j < n; ++j) {
      any |= attend[j];
      if (!attend[j]) scores[j] = -std::numeric_limits<T>::infinity();
    }
  }
  if (!any) {
    std::fill(scores, scores + n, T(0));
    return -std::numeric_limits<T>::infinity();
  }
  T max = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    max = scores[j] > max ? scores[j] : max;
    nan |= scores[j] != scores[j];
  }
  if (nan) max = std::numeric_limits<T>::quiet_NaN();
  exp_shifted(scores, max, n);
  if (attend)  // exp_shifted gives ~1e-38, not 0, for the excluded keys' -inf
    for (int64_t j = 0; j < n; ++j)
      if (!attend[j]) scores[j] = 0;
  T sum = 0;
  DP_SIMD_SUM(sum)
  for (int64_t j = 0; j < n; ++j) sum += scores[j];
  const T inverse = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) scores[j] *= inverse;
  return max + std::log(sum);
}

// Forward of the query rows [begin, end) of one (batch, head). A row holds all its Lk scores at
// once (Lk is the text length), so its softmax is exact in two passes.
template <int kVectorBytes, typename scalar_t>
DP_ALWAYS_INLINE void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* gate,
                                const bool* mask, scalar_t* out, scalar_t* lse, Scratch<scalar_t>& scratch,
                                const Problem& p, int64_t bh, int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  const scalar_t gate_value = std::tanh(gate[bh % p.H]);
  const bool* attend = mask ? mask + (bh / p.H) * p.Lk : nullptr;
  scratch.load(k + bh * p.Lk * p.D, v + bh * p.Lk * p.D, attend, p.Lk, scale, /*both_ways=*/false);
  const bool* row_mask = scratch.masked ? attend : nullptr;
  const int64_t Lp = scratch.Lp, Dp = scratch.Dp, keys = scratch.keys;
  for (int64_t i0 = begin; i0 < end; i0 += kBlockRows) {
    const int count = static_cast<int>(std::min<int64_t>(kBlockRows, end - i0));
    const int64_t first = bh * p.Lq + i0;
    const scalar_t* q_rows[kBlockRows];
    const scalar_t* prob_rows[kBlockRows];
    block_rows(q + first * p.D, p.D, count, q_rows);
    block_rows<const scalar_t>(scratch.probs.data(), Lp, count, prob_rows);
    block_products<kVectorBytes>(q_rows, count, scratch.keys_t.data(), Lp, p.D, scratch.probs.data(), Lp, Lp);
    for (int r = 0; r < count; ++r) lse[first + r] = softmax_row(scratch.probs.data() + r * Lp, row_mask, keys);
    block_products<kVectorBytes>(prob_rows, count, scratch.values_p.data(), Dp, keys, scratch.attended.data(), Dp, Dp);
    for (int r = 0; r < count; ++r) {
      const scalar_t* attended = scratch.attended.data() + r * Dp;
      scalar_t* out_row = out + (first + r) * p.D;
      for (int64_t d = 0; d < p.D; ++d) out_row[d] = gate_value * attended[d];
    }
  }
}

// Backward of (batch, head) pairs [begin, end). dk, dv are zero on entry; gate_partial gets each
// pair's contribution to its head's gate gradient. Blocks of kBlockRows query rows give dq; their
// P and dS are gathered by key over kGatherRows rows, after which dK += dS^T Q and dV += P^T dA
// are register-blocked products into the head's padded accumulators, written out once per head.
template <int kVectorBytes, typename scalar_t>
DP_ALWAYS_INLINE void backward_heads(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                                  const scalar_t* gate, const bool* mask, const scalar_t* lse, scalar_t* dq,
                                  scalar_t* dk, scalar_t* dv, scalar_t* gate_partial, Scratch<scalar_t>& scratch,
                                  const Problem& p, int64_t begin, int64_t end) {
  const auto scale = static_cast<scalar_t>(p.scale);
  for (int64_t bh = begin; bh < end; ++bh) {
    const scalar_t gate_value = std::tanh(gate[bh % p.H]);
    const bool* attend = mask ? mask + (bh / p.H) * p.Lk : nullptr;
    scratch.load(k + bh * p.Lk * p.D, v + bh * p.Lk * p.D, attend, p.Lk, scale, /*both_ways=*/true);
    const bool* row_mask = scratch.masked ? attend : nullptr;
    const int64_t Lp = scratch.Lp, Dp = scratch.Dp, keys = scratch.keys;
    scalar_t *const dk_acc = scratch.dk_acc.data(), *const dv_acc = scratch.dv_acc.data();
    std::fill(dk_acc, dk_acc + keys * Dp, scalar_t(0));
    std::fill(dv_acc, dv_acc + keys * Dp, scalar_t(0));
    scalar_t gate_sum = 0;
    for (int64_t g0 = 0; g0 < p.Lq; g0 += kGatherRows) {
      const int64_t gathered = std::min(kGatherRows, p.Lq - g0);
      for (int64_t i0 = g0; i0 < g0 + gathered; i0 += kBlockRows) {
        const int count = static_cast<int>(std::min<int64_t>(kBlockRows, g0 + gathered - i0));
        const int64_t first = bh * p.Lq + i0, slot = i0 - g0;
        scalar_t* const q_block = scratch.q_gather.data() + slot * Dp;
        scalar_t* const d_attended_block = scratch.d_attended_gather.data() + slot * Dp;
        const scalar_t *q_rows[kBlockRows], *prob_rows[kBlockRows], *d_attended_rows[kBlockRows], *ds_rows[kBlockRows];
        for (int r = 0; r < count; ++r) {  // the block's query rows, padded (dK's product reads Dp columns)
          std::copy(q + (first + r) * p.D, q + (first + r + 1) * p.D, q_block + r * Dp);
          std::fill(q_block + r * Dp + p.D, q_block + (r + 1) * Dp, scalar_t(0));
        }
        block_rows<const scalar_t>(q_block, Dp, count, q_rows);
        block_rows<const scalar_t>(scratch.probs.data(), Lp, count, prob_rows);
        block_rows<const scalar_t>(d_attended_block, Dp, count, d_attended_rows);
        block_rows<const scalar_t>(scratch.dp.data(), Lp, count, ds_rows);
        // Recompute p_j = exp(s_j - lse) (the keys hold the scale) and the ungated outputs A.
        block_products<kVectorBytes>(q_rows, count, scratch.keys_t.data(), Lp, p.D, scratch.probs.data(), Lp, Lp);
        for (int r = 0; r < count; ++r) {
          scalar_t* probs = scratch.probs.data() + r * Lp;
          const scalar_t row_lse = lse[first + r];
          if (row_lse == -std::numeric_limits<scalar_t>::infinity()) {  // every key masked: no gradient
            std::fill(probs, probs + keys, scalar_t(0));
            continue;
          }
          exp_shifted(probs, row_lse, keys);
          if (row_mask)
            for (int64_t j = 0; j < keys; ++j)
              if (!row_mask[j]) probs[j] = 0;
        }
        block_products<kVectorBytes>(prob_rows, count, scratch.values_p.data(), Dp, keys, scratch.attended.data(), Dp, Dp);
        scalar_t delta[kBlockRows];
        for (int r = 0; r < count; ++r) {
          const scalar_t* g_row = grad_out + (first + r) * p.D;
          const scalar_t* attended = scratch.attended.data() + r * Dp;
          scalar_t* d_attended = d_attended_block + r * Dp;
          for (int64_t d = 0; d < p.D; ++d) d_attended[d] = gate_value * g_row[d];
          std::fill(d_attended + p.D, d_attended + Dp, scalar_t(0));
          delta[r] = dot(d_attended, attended, p.D);
          gate_sum += dot(g_row, attended, p.D);
        }
        // dp_j = dA . v_j, then ds_j = p_j (dp_j - delta) in place, then dq = scale ds K. A key of
        // probability 0 (masked, or every key of the row masked) gets ds_j = 0 even if dp_j or delta
        // is not finite, as the reference's masking gives it no gradient.
        block_products<kVectorBytes>(d_attended_rows, count, scratch.values_t.data(), Lp, p.D, scratch.dp.data(), Lp, Lp);
        for (int r = 0; r < count; ++r) {
          scalar_t* ds = scratch.dp.data() + r * Lp;
          const scalar_t* probs = scratch.probs.data() + r * Lp;
          for (int64_t j = 0; j < keys; ++j)
            ds[j] = probs[j] == scalar_t(0) ? scalar_t(0) : scale * attention::score_grad(probs[j], ds[j], delta[r]);
        }
        block_products<kVectorBytes>(ds_rows, count, scratch.keys_p.data(), Dp, keys, scratch.dq.data(), Dp, Dp);
        for (int r = 0; r < count; ++r)
          std::copy(scratch.dq.data() + r * Dp, scratch.dq.data() + r * Dp + p.D, dq + (first + r) * p.D);
        for (int64_t j = 0; j < keys; ++j)  // P and dS by key, for the gather's products
          for (int r = 0; r < count; ++r) {
            scratch.probs_t[j * kGatherRows + slot + r] = scratch.probs[r * Lp + j];
            scratch.ds_t[j * kGatherRows + slot + r] = scratch.dp[r * Lp + j];
          }
      }
      // dk_j += sum_r ds_rj q_r and dv_j += sum_r p_rj dA_r over the gathered rows, kBlockRows keys at once.
      for (int64_t j0 = 0; j0 < keys; j0 += kBlockRows) {
        const int count = static_cast<int>(std::min<int64_t>(kBlockRows, keys - j0));
        const scalar_t *ds_by_key[kBlockRows], *probs_by_key[kBlockRows];
        block_rows<const scalar_t>(scratch.ds_t.data() + j0 * kGatherRows, kGatherRows, count, ds_by_key);
        block_rows<const scalar_t>(scratch.probs_t.data() + j0 * kGatherRows, kGatherRows, count, probs_by_key);
        block_products<kVectorBytes>(ds_by_key, count, scratch.q_gather.data(), Dp, gathered, dk_acc + j0 * Dp, Dp, Dp,
                       /*accumulate=*/true);
        block_products<kVectorBytes>(probs_by_key, count, scratch.d_attended_gather.data(), Dp, gathered, dv_acc + j0 * Dp, Dp, Dp,
                       /*accumulate=*/true);
      }
    }
    for (int64_t j = 0; j < keys; ++j) {
      const int64_t key = scratch.key_index[j];
      std::copy(dk_acc + j * Dp, dk_acc + j * Dp + p.D, dk + (bh * p.Lk + key) * p.D);
      std::copy(dv_acc + j * Dp, dv_acc + j * Dp + p.D, dv + (bh * p.Lk + key) * p.D);
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
        run_with_widest_vectors([&](auto vector_bytes) DP_ALWAYS_INLINE_LAMBDA {
          forward_rows<decltype(vector_bytes)::value>(
              q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(), v_c.const_data_ptr<scalar_t>(),
              gate_c.const_data_ptr<scalar_t>(), p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr,
              out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), scratch, p, bh, first,
              std::min(p.Lq, first + kRowGrain));
        });
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
        scratch.allocate_backward(p.Lk);
        run_with_widest_vectors([&](auto vector_bytes) DP_ALWAYS_INLINE_LAMBDA {
          backward_heads<decltype(vector_bytes)::value>(
              g_c.const_data_ptr<scalar_t>(), q_c.const_data_ptr<scalar_t>(), k_c.const_data_ptr<scalar_t>(),
              v_c.const_data_ptr<scalar_t>(), gate_c.const_data_ptr<scalar_t>(),
              p.has_mask ? mask_c.const_data_ptr<bool>() : nullptr, lse_c.const_data_ptr<scalar_t>(),
              dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
              gate_partial.mutable_data_ptr<scalar_t>(), scratch, p, begin, end);
        });
      });
    });
  }
  return {dq, dk, dv, gate_partial.sum(0)};
}

}  // namespace dreamportrait
