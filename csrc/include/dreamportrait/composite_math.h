// Per-sample math of composite_rays, shared verbatim by the CPU and CUDA kernels.
//
// Along a ray with samples i = 0..S-1, densities sigma_i >= 0, spacings delta_i >= 0:
//   tau_i = sigma_i * delta_i            optical thickness
//   E_i   = sum_{j<i} tau_j              optical depth in front of sample i
//   T_i   = exp(-E_i) = prod_{j<i} exp(-tau_j)   transmittance,   alpha_i = 1 - exp(-tau_i)
//   w_i   = T_i * alpha_i                weight; rgb = sum w_i c_i, depth = sum w_i t_i, opacity = sum w_i
//
// Backward. With G_i = dL/dw_i in total (the weights' own gradient plus g_rgb . c_i + g_depth t_i
// + g_opacity), dw_i/dtau_k is T_{k+1} for i = k and -w_i for i > k, so
//   dL/dtau_k = G_k T_{k+1} - sum_{i>k} G_i w_i = T_{k+1} (G_k - R_k),
//   R_k = sum_{i>k} G_i alpha_i prod_{k<j<i} exp(-tau_j) = alpha_{k+1} G_{k+1} + exp(-tau_{k+1}) R_{k+1}.
// R is a suffix recurrence without cancellation, and T_{k+1} is recomputed front to back, so
// gradients stay exact for opaque rays and huge densities: where T_{k+1} is 0 the gradient is 0,
// not a rounding residue multiplied by a huge density.
#pragma once

#include <cmath>

#include "dreamportrait/common.h"

namespace dreamportrait {
namespace composite {

// A sample's opacity alpha = 1 - exp(-tau) and survival exp(-tau) = 1 - alpha, both to full
// relative precision with one transcendental: the smaller of the two is computed directly (expm1
// for small tau) and the other as its complement, which then is at least 1/2 and loses nothing.
// Transmittances are running products of survivals (T_{i+1} = T_i exp(-tau_i)), so an opaque
// sample makes every later transmittance exactly 0.
template <typename T>
struct Attenuation {
  T alpha, survival;
};

template <typename T>
DP_INLINE Attenuation<T> attenuation_of(T tau) {
  if (tau > T(0.6931471805599453)) {  // ln 2: exp(-tau) < 1/2
    const T survival = std::exp(-tau);
    return {T(1) - survival, survival};
  }
  const T alpha = -std::expm1(-tau);
  return {alpha, T(1) - alpha};
}

// R_k from R_{k+1} and sample k+1's total weight gradient and attenuation.
template <typename T>
DP_INLINE T suffix_step(T suffix_next, T weight_grad_next, Attenuation<T> next) {
  return next.alpha * weight_grad_next + next.survival * suffix_next;
}

// G_k, the total gradient of w_k: the weights' own gradient plus g_rgb . c_k + g_depth t_k + g_opacity.
template <typename scalar_t, typename acc_t>
DP_INLINE acc_t total_weight_grad(const scalar_t* color_k, const scalar_t* g_rgb, scalar_t g_weight, scalar_t t_k,
                                  acc_t g_depth, acc_t g_opacity, int64_t C) {
  acc_t color_grad = 0;
  DP_SIMD_SUM(color_grad)
  for (int64_t c = 0; c < C; ++c) color_grad += static_cast<acc_t>(g_rgb[c]) * static_cast<acc_t>(color_k[c]);
  return static_cast<acc_t>(g_weight) + g_depth * static_cast<acc_t>(t_k) + g_opacity + color_grad;
}

// dL/dtau_k from the transmittance behind sample k, its total weight gradient and R_k.
template <typename T>
DP_INLINE T optical_thickness_grad(T transmittance_after, T weight_grad, T suffix) {
  return transmittance_after * (weight_grad - suffix);
}

// Sizes and arguments of one call; plain data so it is passed to CUDA kernels by value.
// Rays are rows of (R, S) tensors, colours (R, S, C).
struct Problem {
  int64_t R, S, C;
  double transmittance_threshold;  // 0: never stop early
};

// ---- One ray. The CPU kernel runs these for a range of rays, the CUDA kernel one per thread. ----
// Pointers are to the ray's rows: sigma, t, delta, weights (S), color (S, C), rgb (C).

// Forward: weights, depth and opacity; returns the number of samples composited (fewer than S
// when the transmittance fell below `threshold`; later weights are 0). `rgb` holds the
// accumulation type so half-precision colours are summed in float.
template <typename scalar_t, typename acc_t>
DP_INLINE void forward_ray(const scalar_t* sigma, const scalar_t* color, const scalar_t* t,
                           const scalar_t* delta, acc_t* rgb, scalar_t* depth, scalar_t* opacity,
                           scalar_t* weights, int64_t S, int64_t C, acc_t threshold) {
  acc_t transmittance = 1, depth_sum = 0, opacity_sum = 0;
  for (int64_t c = 0; c < C; ++c) rgb[c] = 0;
  for (int64_t i = 0; i < S; ++i) {
    if (transmittance < threshold) {  // never true for threshold 0 (and NaN propagates)
      for (int64_t j = i; j < S; ++j) weights[j] = scalar_t(0);
      break;
    }
    const auto a = attenuation_of(static_cast<acc_t>(sigma[i]) * static_cast<acc_t>(delta[i]));
    const acc_t w = transmittance * a.alpha;
    transmittance *= a.survival;
    weights[i] = static_cast<scalar_t>(w);
    depth_sum += w * static_cast<acc_t>(t[i]);
    opacity_sum += w;
    const scalar_t* color_i = color + i * C;
    for (int64_t c = 0; c < C; ++c) rgb[c] += w * static_cast<acc_t>(color_i[c]);
  }
  *depth = static_cast<scalar_t>(depth_sum);
  *opacity = static_cast<scalar_t>(opacity_sum);
}

// Backward from the upstream gradients of all four outputs (g_rgb row (C), g_depth, g_opacity,
// g_weights row (S)). grad_sigma and grad_delta hold the accumulation type because they first
// serve as scratch for R_k and G_k (so nothing per sample is stored beyond inputs and outputs).
template <typename scalar_t, typename acc_t>
DP_INLINE void backward_ray(const scalar_t* sigma, const scalar_t* color, const scalar_t* t,
                            const scalar_t* delta, const scalar_t* g_rgb, acc_t g_depth,
                            acc_t g_opacity, const scalar_t* g_weights, acc_t* grad_sigma,
                            scalar_t* grad_color, scalar_t* grad_t, acc_t* grad_delta, int64_t S,
                            int64_t C) {
  // Back to front: G_k (into grad_delta) and R_k (into grad_sigma).
  acc_t suffix = 0;
  for (int64_t k = S - 1; k >= 0; --k) {
    const acc_t weight_grad = total_weight_grad(color + k * C, g_rgb, g_weights[k], t[k], g_depth, g_opacity, C);
    grad_sigma[k] = suffix;
    grad_delta[k] = weight_grad;
    suffix = suffix_step(suffix, weight_grad, attenuation_of(static_cast<acc_t>(sigma[k]) * static_cast<acc_t>(delta[k])));
  }
  // Front to back: the transmittances, and every gradient.
  acc_t transmittance = 1;
  for (int64_t k = 0; k < S; ++k) {
    const acc_t s = static_cast<acc_t>(sigma[k]), d = static_cast<acc_t>(delta[k]);
    const auto a = attenuation_of(s * d);
    const acc_t w = transmittance * a.alpha;
    const acc_t transmittance_after = transmittance * a.survival;
    const acc_t d_tau = optical_thickness_grad(transmittance_after, grad_delta[k], grad_sigma[k]);
    grad_sigma[k] = d_tau * d;
    grad_delta[k] = d_tau * s;
    grad_t[k] = static_cast<scalar_t>(w * g_depth);
    scalar_t* grad_color_k = grad_color + k * C;
    for (int64_t c = 0; c < C; ++c) grad_color_k[c] = static_cast<scalar_t>(w * static_cast<acc_t>(g_rgb[c]));
    transmittance = transmittance_after;
  }
}

}  // namespace composite
}  // namespace dreamportrait
