// Elementwise math of EG3D's tri-plane decoder (softplus with torch's threshold of 20, the widened
// sigmoid, and their derivatives), shared by the CPU and CUDA kernels of sample_and_decode.
//
// On the CPU float uses a branch-free exp (Cephes' polynomial after Cody-Waite range reduction,
// ~1 ulp) and log1p on (0, 1] (the atanh series, ~1e-9 relative), which the compiler vectorises;
// on the GPU float uses CUDA's expf/log1pf; double uses the C library (CUDA's on the GPU).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dreamportrait/common.h"

namespace dreamportrait {
namespace decoder {

constexpr double kSoftplusThreshold = 20.0;
constexpr double kSigmoidScale = 1.0 + 2 * 0.001;
constexpr double kSigmoidShift = 0.001;

DP_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = x / ln 2 rounded to the nearest integer, as nearbyint would: adding 1.5 * 2^23 leaves n in
  // the low bits of t. No nearbyint or float-to-int conversion, which keep the loops from
  // vectorising without AVX-512.
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (t_bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3.
DP_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 17;
  p = p * s2 + 1.0f / 15;
  p = p * s2 + 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

DP_INLINE float softplus(float x) {
#ifdef __CUDA_ARCH__
  return x > static_cast<float>(kSoftplusThreshold) ? x : log1pf(expf(x));
#else
  const float magnitude = x < 0.0f ? -x : x;
  const float soft = (x > 0.0f ? x : 0.0f) + log1p_unit(exp_approx(-magnitude));
  return x > static_cast<float>(kSoftplusThreshold) ? x : soft;
#endif
}

DP_INLINE double softplus(double x) {
  return x > kSoftplusThreshold ? x : std::log1p(std::exp(x));
}

DP_INLINE float sigmoid(float x) {
#ifdef __CUDA_ARCH__
  return 1.0f / (1.0f + expf(-x));
#else
  return 1.0f / (1.0f + exp_approx(-x));
#endif
}
DP_INLINE double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// d softplus / dx: sigmoid(x), 1 above the threshold (as torch's softplus_backward).
template <typename T>
DP_INLINE T softplus_grad(T x) {
  return x > static_cast<T>(kSoftplusThreshold) ? T(1) : sigmoid(x);
}

#ifndef __CUDA_ARCH__
// softplus(x), with its derivative in `grad`, from one exponential e = exp(-|x|) (the CPU
// backward needs both for every hidden unit): sigmoid(x) is 1 / (1 + e) for x >= 0 and
// e / (1 + e) below.
DP_INLINE float softplus_with_grad(float x, float& grad) {
  const float magnitude = x < 0.0f ? -x : x;
  const float e = exp_approx(-magnitude);
  const float reciprocal = 1.0f / (1.0f + e);
  const bool linear = x > static_cast<float>(kSoftplusThreshold);
  grad = linear ? 1.0f : (x < 0.0f ? e * reciprocal : reciprocal);
  return linear ? x : (x > 0.0f ? x : 0.0f) + log1p_unit(e);
}

DP_INLINE double softplus_with_grad(double x, double& grad) {
  grad = softplus_grad(x);
  return softplus(x);
}
#endif

// Output column `column` of the decoder from its raw value: the density (column 0) as is, the
// colour features through the widened sigmoid.
template <typename T>
DP_INLINE T output_value(T raw, int64_t column) {
  return column == 0 ? raw : sigmoid(raw) * static_cast<T>(kSigmoidScale) - static_cast<T>(kSigmoidShift);
}

// Gradient of the raw value of column `column` from the gradient of its output value.
template <typename T>
DP_INLINE T raw_gradient(T raw, T grad, int64_t column) {
  if (column == 0) return grad;
  const T s = sigmoid(raw);
  return grad * static_cast<T>(kSigmoidScale) * s * (T(1) - s);
}

}  // namespace decoder
}  // namespace dreamportrait
