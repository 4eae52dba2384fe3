// Host-side argument checks of the gated_cross_attention operators, shared by the CPU and CUDA
// kernels. The Python front end raises friendlier errors first; these keep direct torch.ops calls
// memory-safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "dreamportrait/attention_math.h"

namespace dreamportrait {
namespace attention {

inline Problem check_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& gate, const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4, "gated_cross_attention: q must have shape (B, H, Lq, D), got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D,
              "gated_cross_attention: k must have shape (B, H, Lk, D) matching q, got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "gated_cross_attention: v must have the shape of k, got ", v.sizes());
  TORCH_CHECK(gate.dim() == 1 && gate.size(0) == H, "gated_cross_attention: gate must have shape (H,), got ",
              gate.sizes());
  for (const at::Tensor* t : {&k, &v, &gate})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "gated_cross_attention: k, v and gate must match q in dtype and device");
  if (mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == k.size(2) &&
                    mask->scalar_type() == at::kBool && mask->device() == q.device(),
                "gated_cross_attention: key_padding_mask must be a bool (B, Lk) tensor on q's device, got ",
                mask->scalar_type(), " ", mask->sizes());
  }
  TORCH_CHECK(std::isfinite(scale), "gated_cross_attention: scale must be finite, got ", scale);
  return {B, H, Lq, k.size(2), D, scale, mask.has_value()};
}

// The backward's own arguments: the output gradient has q's shape, dtype and device; the
// log-sum-exp is (B, H, Lq) of `lse_type` on q's device (each kernel reads B*H*Lq values of it).
inline void check_backward(const Problem& p, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& lse,
                           at::ScalarType lse_type) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.device() == q.device(),
              "gated_cross_attention_backward: grad_out must be a ", q.scalar_type(), " tensor of q's shape ",
              q.sizes(), " on ", q.device(), ", got ", grad_out.scalar_type(), " ", grad_out.sizes(), " on ",
              grad_out.device());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.Lq &&
                  lse.scalar_type() == lse_type && lse.device() == q.device(),
              "gated_cross_attention_backward: lse must be a ", lse_type, " tensor of shape (", p.B, ", ", p.H,
              ", ", p.Lq, ") on ", q.device(), ", got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
}

}  // namespace attention
}  // namespace dreamportrait
