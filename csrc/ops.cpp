// Operator schemas of dreamportrait._C and their CPU / CUDA registrations. Autograd and fake
// (meta) implementations are registered from Python (dreamportrait/ops/_registration.py).
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "dreamportrait/cpu_dispatch.h"
#include "dreamportrait/ops.h"

namespace {

// CUDA architectures the extension holds code for, as compute capabilities (80 = sm_80): SASS
// (machine code) and PTX (which the driver compiles for newer GPUs). Empty when it was built without
// CUDA. The build defines them, e.g. DREAMPORTRAIT_CUDA_SASS_ARCHS=80,86,90 and ..._PTX_ARCHS=90.
std::vector<int64_t> cuda_archs() {
#ifdef DREAMPORTRAIT_CUDA_SASS_ARCHS
  return {DREAMPORTRAIT_CUDA_SASS_ARCHS};
#else
  return {};
#endif
}

std::vector<int64_t> cuda_ptx_archs() {
#ifdef DREAMPORTRAIT_CUDA_PTX_ARCHS
  return {DREAMPORTRAIT_CUDA_PTX_ARCHS};
#else
  return {};
#endif
}

// The width in bytes of the vectors the CPU kernels' register tiles use on this CPU: 64 (AVX-512),
// 32 (AVX2 with FMA) or 16 (cpu_dispatch.h).
int64_t cpu_vector_bytes() {
  int64_t bytes = 0;
  dreamportrait::run_with_widest_vectors([&](auto vector_bytes) { bytes = decltype(vector_bytes)::value; });
  return bytes;
}

}  // namespace

TORCH_LIBRARY(dreamportrait, m) {
  m.def("cuda_archs() -> int[]", &cuda_archs);
  m.def("cuda_ptx_archs() -> int[]", &cuda_ptx_archs);
  m.def("cpu_vector_bytes() -> int", &cpu_vector_bytes);
  m.def("triplane_sample(Tensor planes, Tensor points, float box_warp, int[6] axes, str reduce) -> Tensor");
  m.def("triplane_sample_backward_planes(Tensor grad_output, Tensor planes, Tensor points, "
        "float box_warp, int[6] axes, str reduce) -> Tensor");
  m.def("triplane_sample_backward_points(Tensor grad_output, Tensor planes, Tensor points, "
        "float box_warp, int[6] axes, str reduce) -> Tensor");
  m.def("composite_rays(Tensor densities, Tensor colors, Tensor depths, Tensor deltas, "
        "float transmittance_threshold) -> (Tensor rgb, Tensor depth, Tensor opacity, Tensor weights)");
  m.def("composite_rays_backward(Tensor grad_rgb, Tensor grad_depth, Tensor grad_opacity, Tensor grad_weights, "
        "Tensor densities, Tensor colors, Tensor depths, Tensor deltas) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_cross_attention(Tensor q, Tensor k, Tensor v, Tensor gate, Tensor? key_padding_mask, "
        "float scale) -> (Tensor out, Tensor lse)");
  m.def("gated_cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor gate, "
        "Tensor? key_padding_mask, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sample_and_decode(Tensor planes, Tensor points, float box_warp, int[6] axes, Tensor weight1, "
        "Tensor bias1, Tensor weight2, Tensor bias2) -> Tensor");
  m.def("sample_and_decode_backward(Tensor grad_output, Tensor planes, Tensor points, float box_warp, "
        "int[6] axes, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, bool needs_planes, "
        "bool needs_points) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define DP_REGISTER_KERNELS(m, device)                                           \
  m.impl("triplane_sample", &dreamportrait::triplane_sample_##device);                     \
  m.impl("triplane_sample_backward_planes",                                               \
         &dreamportrait::triplane_sample_backward_planes_##device);                        \
  m.impl("triplane_sample_backward_points", &dreamportrait::triplane_sample_backward_points_##device); \
  m.impl("composite_rays", &dreamportrait::composite_rays_##device);                       \
  m.impl("composite_rays_backward", &dreamportrait::composite_rays_backward_##device);     \
  m.impl("gated_cross_attention", &dreamportrait::gated_cross_attention_##device);         \
  m.impl("gated_cross_attention_backward", &dreamportrait::gated_cross_attention_backward_##device); \
  m.impl("sample_and_decode", &dreamportrait::sample_and_decode_##device);                 \
  m.impl("sample_and_decode_backward", &dreamportrait::sample_and_decode_backward_##device);

TORCH_LIBRARY_IMPL(dreamportrait, CPU, m) { DP_REGISTER_KERNELS(m, cpu) }

#ifdef DREAMPORTRAIT_WITH_CUDA
TORCH_LIBRARY_IMPL(dreamportrait, CUDA, m) { DP_REGISTER_KERNELS(m, cuda) }
#endif

// `import dreamportrait._C` only has to run the static registrations above; the module itself is
// empty. (A JIT build is loaded with torch.ops.load_library instead and never calls this.)
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "DreamPortrait operators (torch.ops.dreamportrait)", -1, nullptr};
  return PyModule_Create(&module);
}
