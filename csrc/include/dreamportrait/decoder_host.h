// Host-side argument checks of the sample_and_decode operators, shared by the CPU and CUDA kernels
// (the Python front end raises friendlier errors first; these keep direct torch.ops calls
// memory-safe). The tri-plane half is checked by triplane::check_problem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>

#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace decoder {

// Sizes of the decoder: C input features (the planes' channels), K hidden units, O outputs.
struct Sizes {
  int64_t C, K, O;
};

// weight1 (K, C), bias1 (K,), weight2 (O, K), bias2 (O,), O >= 2, all like planes (B, 3, C, H, W).
inline Sizes check_weights(const at::Tensor& planes, const at::Tensor& weight1, const at::Tensor& bias1,
                           const at::Tensor& weight2, const at::Tensor& bias2) {
  const int64_t C = planes.size(2);
  const std::pair<const at::Tensor*, const char*> weights[] = {
      {&weight1, "weight1"}, {&bias1, "bias1"}, {&weight2, "weight2"}, {&bias2, "bias2"}};
  for (const auto& [t, name] : weights) {
    TORCH_CHECK(t->scalar_type() == planes.scalar_type() && t->device() == planes.device(), "sample_and_decode: ",
                name, " must match planes in dtype and device (", planes.scalar_type(), " on ", planes.device(),
                "), got ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(weight1.dim() == 2 && weight1.size(1) == C && weight1.size(0) >= 1,
              "sample_and_decode: weight1 must have shape (K, ", C, "), got ", weight1.sizes());
  const int64_t K = weight1.size(0);
  TORCH_CHECK(bias1.dim() == 1 && bias1.size(0) == K, "sample_and_decode: bias1 must have shape (", K,
              ",), got ", bias1.sizes());
  TORCH_CHECK(weight2.dim() == 2 && weight2.size(1) == K && weight2.size(0) >= 2,
              "sample_and_decode: weight2 must have shape (O, ", K, ") with O >= 2, got ", weight2.sizes());
  const int64_t O = weight2.size(0);
  TORCH_CHECK(bias2.dim() == 1 && bias2.size(0) == O, "sample_and_decode: bias2 must have shape (", O,
              ",), got ", bias2.sizes());
  return {C, K, O};
}

// grad_output (B, N, O) like planes.
inline void check_grad_output(const at::Tensor& grad_output, const triplane::Problem& p, const Sizes& d,
                              const at::Tensor& planes) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == p.B && grad_output.size(1) == p.N &&
                  grad_output.size(2) == d.O,
              "sample_and_decode_backward: grad_output must have shape (", p.B, ", ", p.N, ", ", d.O, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == planes.scalar_type() && grad_output.device() == planes.device(),
              "sample_and_decode_backward: grad_output must match planes in dtype and device (", planes.scalar_type(),
              " on ", planes.device(), "), got ", grad_output.scalar_type(), " on ", grad_output.device());
}

}  // namespace decoder
}  // namespace dreamportrait
