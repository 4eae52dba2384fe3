// Per-element math of gated_cross_attention, shared by the CPU and CUDA kernels.
//
// For one query row with scores s_j = scale * q . k_j over the keys it may attend to:
//   lse = log sum_j exp(s_j),  p_j = exp(s_j - lse),  A = sum_j p_j v_j,  out = tanh(gate_h) A.
// The forward keeps only lse per row; the backward recomputes p_j and, with dA = tanh(gate_h) dO,
//   delta = dA . A,  ds_j = p_j (dA . v_j - delta),
//   dq = scale sum_j ds_j k_j,  dk_j += scale ds_j q,  dv_j += p_j dA,
//   dgate_h += (1 - tanh^2(gate_h)) dO . A.
// A row whose keys are all masked has lse = -inf, p = 0 and outputs (and gradients) 0.
#pragma once

#include <cmath>
#include <limits>

#include "dreamportrait/common.h"

namespace dreamportrait {
namespace attention {

// Running maximum and sum of exponentials of the scores seen so far (online softmax).
template <typename T>
struct OnlineSoftmax {
  T max = -std::numeric_limits<T>::infinity();
  T sum = 0;
  bool any = false;  // whether a key was added: a row is empty by its mask, never by its scores

  // Adds score s. Returns the factor the accumulated p-weighted sums must be multiplied by
  // (they were relative to the old maximum) and sets `p` to s's weight relative to the new one.
  // A NaN score becomes the maximum, so that NaN reaches the sum and every output of the row.
  DP_INLINE T add(T s, T& p) {
    const T new_max = (s > max || s != s) ? s : max;
    const T rescale = any ? std::exp(max - new_max) : T(0);
    p = std::exp(s - new_max);
    sum = sum * rescale + p;
    max = new_max;
    any = true;
    return rescale;
  }

  DP_INLINE bool empty() const { return !any; }

  DP_INLINE T log_sum_exp() const {
    return empty() ? -std::numeric_limits<T>::infinity() : max + std::log(sum);
  }
};

// p_j from the score and the row's log-sum-exp; 0 for a fully masked row.
template <typename T>
DP_INLINE T probability(T score, T lse) {
  return lse == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(score - lse);
}

template <typename T>
DP_INLINE T score_grad(T p, T dp, T delta) {
  return p * (dp - delta);
}

// d tanh(g) / dg.
template <typename T>
DP_INLINE T gate_slope(T gate_value) {
  return T(1) - gate_value * gate_value;
}

// Sizes of one call; plain data so it is passed to CUDA kernels by value. q, k, v, out are
// contiguous (B, H, L, D); the mask (B, Lk) is optional.
struct Problem {
  int64_t B, H, Lq, Lk, D;
  double scale;
  bool has_mask;
};

}  // namespace attention
}  // namespace dreamportrait
