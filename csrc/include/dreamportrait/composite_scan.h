// The warp-parallel schedule of the CUDA composite_rays kernels. The ray programs below are the
// per-lane code of a warp; the GPU runs them with shuffles (csrc/cuda/composite_rays.cu), the host
// emulation (csrc/cpu/tile_emulation.cpp) with 32 threads that exchange values the same way, and
// the CPU tests check that against the reference.
//
// A warp composites one ray, 32 samples at a time (a chunk; the last one ragged): lane l takes
// sample base + l. Along the ray the forward needs the transmittance T_i = prod_{j<i} exp(-tau_j),
// the backward also the suffix R_k = alpha_{k+1} G_{k+1} + exp(-tau_{k+1}) R_{k+1}
// (composite_math.h). Both are scans over the chunk's lanes (Hillis-Steele, five shuffle steps)
// carried from chunk to chunk:
//   forward   an inclusive product scan of the survivals exp(-tau): the prefix sum of optical
//             depth kept as its exponential, so that an opaque sample makes every later
//             transmittance exactly 0, as in the sequential kernel;
//   backward  a suffix scan of the affine maps x -> alpha_j G_j + exp(-tau_j) x, composed from
//             the back of the ray.
// Samples past S scan as identities. The forward's early stop is the first sample whose
// transmittance is below the threshold: it and every later sample get weight 0 and the warp
// stops reading the ray. Colours are read and written with lanes over channels (coalesced), the
// chunk's weights broadcast through `chunk_weights`, a per-warp buffer of 32 values.
//
// A Warp provides lane(), shuffle(v, src_lane) (a lane outside the warp reads its own value),
// first_lane(pred) (the lowest lane where pred holds, 32 if none) and sync() (a barrier of the
// warp's lanes, ordering chunk_weights' writes and reads).
#pragma once

#include "dreamportrait/common.h"
#include "dreamportrait/composite_math.h"

namespace dreamportrait {
namespace composite {
namespace scan {

constexpr int kLanes = 32;        // samples per chunk: one per lane of a warp
constexpr int kRaysPerBlock = 4;  // warps per block: 4,096 rays make 1,024 blocks
constexpr int kThreads = kLanes * kRaysPerBlock;

// x -> offset + scale * x.
template <typename T>
struct Affine {
  T scale, offset;
};

// outer(inner(x)).
template <typename T>
DP_INLINE Affine<T> compose(Affine<T> outer, Affine<T> inner) {
  return {outer.scale * inner.scale, outer.offset + outer.scale * inner.offset};
}

template <class Warp, typename T>
DP_INLINE T shuffle_up(const Warp& warp, T v, int offset) {
  return warp.shuffle(v, warp.lane() >= offset ? warp.lane() - offset : warp.lane());
}

template <class Warp, typename T>
DP_INLINE T shuffle_down(const Warp& warp, T v, int offset) {
  return warp.shuffle(v, warp.lane() + offset < kLanes ? warp.lane() + offset : warp.lane());
}

// prod_{j <= lane} v_j.
template <class Warp, typename T>
DP_INLINE T inclusive_product(const Warp& warp, T v) {
  for (int offset = 1; offset < kLanes; offset *= 2) {
    const T lower = shuffle_up(warp, v, offset);
    if (warp.lane() >= offset) v = lower * v;
  }
  return v;
}

// map_lane o map_{lane+1} o ... o map_31.
template <class Warp, typename T>
DP_INLINE Affine<T> inclusive_suffix_composition(const Warp& warp, Affine<T> map) {
  for (int offset = 1; offset < kLanes; offset *= 2) {
    const Affine<T> upper{shuffle_down(warp, map.scale, offset), shuffle_down(warp, map.offset, offset)};
    if (warp.lane() + offset < kLanes) map = compose(map, upper);
  }
  return map;
}

template <class Warp, typename T>
DP_INLINE T warp_sum(const Warp& warp, T v) {
  for (int mask = kLanes / 2; mask > 0; mask /= 2) v += warp.shuffle(v, warp.lane() ^ mask);
  return v;
}

// A sample's attenuation; an identity (alpha 0, survival 1) past the ray's end.
template <typename acc_t, typename scalar_t>
DP_INLINE Attenuation<acc_t> sample_attenuation(const scalar_t* sigma, const scalar_t* delta, int64_t i, int64_t S) {
  if (i >= S) return {acc_t(0), acc_t(1)};
  return attenuation_of(static_cast<acc_t>(sigma[i]) * static_cast<acc_t>(delta[i]));
}

// ---- One ray per warp; pointers and semantics as forward_ray / backward_ray in composite_math.h.

template <class Warp, typename scalar_t, typename acc_t>
DP_INLINE void forward_ray_warp(const Warp& warp, acc_t* chunk_weights, const scalar_t* sigma, const scalar_t* color,
                                const scalar_t* t, const scalar_t* delta, acc_t* rgb, scalar_t* depth,
                                scalar_t* opacity, scalar_t* weights, int64_t S, int64_t C, acc_t threshold) {
  const int lane = warp.lane();
  acc_t transmittance_in = 1, depth_sum = 0, opacity_sum = 0;  // transmittance in front of the chunk
  for (int64_t c = lane; c < C; c += kLanes) rgb[c] = acc_t(0);
  for (int64_t base = 0; base < S; base += kLanes) {
    const int64_t i = base + lane;
    const Attenuation<acc_t> a = sample_attenuation<acc_t>(sigma, delta, i, S);
    const acc_t through = inclusive_product(warp, a.survival);  // survivals of base..i
    const acc_t before = shuffle_up(warp, through, 1);
    const acc_t transmittance = transmittance_in * (lane == 0 ? acc_t(1) : before);
    const int stop = warp.first_lane(i < S && transmittance < threshold);  // never for threshold 0; NaN goes on
    const acc_t w = lane < stop ? transmittance * a.alpha : acc_t(0);
    if (i < S) {
      weights[i] = static_cast<scalar_t>(w);
      depth_sum += w * static_cast<acc_t>(t[i]);
      opacity_sum += w;
    }
    chunk_weights[lane] = w;
    warp.sync();
    const int64_t samples = S - base < kLanes ? S - base : kLanes;
    for (int64_t c = lane; c < C; c += kLanes) {
      acc_t sum = 0;
      for (int64_t s = 0; s < samples; ++s) sum += chunk_weights[s] * static_cast<acc_t>(color[(base + s) * C + c]);
      rgb[c] += sum;
    }
    warp.sync();  // chunk_weights read before the next chunk writes them
    if (stop < kLanes) {  // the rest of the ray is hidden
      for (int64_t j = base + kLanes + lane; j < S; j += kLanes) weights[j] = scalar_t(0);
      break;
    }
    transmittance_in *= warp.shuffle(through, kLanes - 1);
  }
  depth_sum = warp_sum(warp, depth_sum);
  opacity_sum = warp_sum(warp, opacity_sum);
  if (lane == 0) {
    *depth = static_cast<scalar_t>(depth_sum);
    *opacity = static_cast<scalar_t>(opacity_sum);
  }
}

template <class Warp, typename scalar_t, typename acc_t>
DP_INLINE void backward_ray_warp(const Warp& warp, acc_t* chunk_weights, const scalar_t* sigma,
                                 const scalar_t* color, const scalar_t* t, const scalar_t* delta,
                                 const scalar_t* g_rgb, acc_t g_depth, acc_t g_opacity, const scalar_t* g_weights,
                                 acc_t* grad_sigma, scalar_t* grad_color, scalar_t* grad_t, acc_t* grad_delta,
                                 int64_t S, int64_t C) {
  const int lane = warp.lane();
  // Back to front: G_k (into grad_delta) and R_k (into grad_sigma). suffix_in is R of the chunk's
  // lane-31 sample: 0 at the end of the ray (the samples past S are identities).
  acc_t suffix_in = 0;
  for (int64_t base = (S - 1) / kLanes * kLanes; base >= 0 && S > 0; base -= kLanes) {
    const int64_t k = base + lane;
    Affine<acc_t> map{acc_t(1), acc_t(0)};
    if (k < S) {
      const acc_t weight_grad = total_weight_grad(color + k * C, g_rgb, g_weights[k], t[k], g_depth, g_opacity, C);
      const Attenuation<acc_t> a = sample_attenuation<acc_t>(sigma, delta, k, S);
      map = {a.survival, a.alpha * weight_grad};  // R_{k-1} = suffix_step(R_k, G_k, a) = map(R_k)
      grad_delta[k] = weight_grad;
    }
    const Affine<acc_t> through = inclusive_suffix_composition(warp, map);  // maps k..31
    const Affine<acc_t> after{shuffle_down(warp, through.scale, 1), shuffle_down(warp, through.offset, 1)};
    if (k < S) grad_sigma[k] = lane == kLanes - 1 ? suffix_in : after.offset + after.scale * suffix_in;
    suffix_in = warp.shuffle(through.offset, 0) + warp.shuffle(through.scale, 0) * suffix_in;
  }
  // Front to back: the transmittances, and every gradient.
  acc_t transmittance_in = 1;
  for (int64_t base = 0; base < S; base += kLanes) {
    const int64_t k = base + lane;
    const Attenuation<acc_t> a = sample_attenuation<acc_t>(sigma, delta, k, S);
    const acc_t through = inclusive_product(warp, a.survival);
    const acc_t before = shuffle_up(warp, through, 1);
    const acc_t transmittance = transmittance_in * (lane == 0 ? acc_t(1) : before);
    const acc_t w = transmittance * a.alpha;
    if (k < S) {
      const acc_t d_tau = optical_thickness_grad(transmittance_in * through, grad_delta[k], grad_sigma[k]);
      grad_sigma[k] = d_tau * static_cast<acc_t>(delta[k]);
      grad_delta[k] = d_tau * static_cast<acc_t>(sigma[k]);
      grad_t[k] = static_cast<scalar_t>(w * g_depth);
    }
    chunk_weights[lane] = w;
    warp.sync();
    const int64_t samples = S - base < kLanes ? S - base : kLanes;
    for (int64_t c = lane; c < C; c += kLanes) {
      const acc_t g = static_cast<acc_t>(g_rgb[c]);
      for (int64_t s = 0; s < samples; ++s)
        grad_color[(base + s) * C + c] = static_cast<scalar_t>(chunk_weights[s] * g);
    }
    warp.sync();
    transmittance_in *= warp.shuffle(through, kLanes - 1);
  }
}

}  // namespace scan
}  // namespace composite
}  // namespace dreamportrait
