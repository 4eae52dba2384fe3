// Argument checks shared by every operator's host code (CPU kernels, CUDA launchers and the host
// emulations of the CUDA schedules): the dtypes a kernel takes, and the sizes past which a CUDA
// grid or a kernel's 32-bit block and tile indices would wrap. Each error names the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace dreamportrait {

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

// Whether the kernels of `t`'s device take float16 and bfloat16 (the CUDA kernels do; the CPU
// kernels take float32 and float64).
inline bool takes_reduced_precision(const at::Tensor& t) { return !t.device().is_cpu(); }

// float32 or float64, or also float16 and bfloat16 where `reduced_precision`; a TypeError otherwise.
inline void check_kernel_dtype(const char* op, const char* name, const at::Tensor& t, bool reduced_precision) {
  const auto type = t.scalar_type();
  const bool ok = type == at::kFloat || type == at::kDouble ||
                  (reduced_precision && (type == at::kHalf || type == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must be float32 or float64",
                   reduced_precision ? ", float16 or bfloat16" : "", " for the kernel on ", t.device(), ", got ",
                   type);
}

// a * b for sizes (non-negative), or INT64_MAX where the product would overflow.
inline int64_t saturating_mul(int64_t a, int64_t b) {
  return a != 0 && b > std::numeric_limits<int64_t>::max() / a ? std::numeric_limits<int64_t>::max() : a * b;
}

// `count` (what the kernel indexes with 32 bits, e.g. its blocks) fits in an int32.
inline void check_int32(const char* op, const char* name, const char* what, int64_t count) {
  TORCH_CHECK(count >= 0 && count <= kMaxInt32, op, ": ", name, " is too large: it makes ", count, " ", what,
              ", more than the 2^31 - 1 a CUDA grid and the kernel's 32-bit indices hold");
}

}  // namespace dreamportrait
