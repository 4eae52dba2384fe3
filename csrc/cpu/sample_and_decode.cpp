// CPU kernels of sample_and_decode: tri-plane sampling, the mean over planes and EG3D's decoder MLP
// (FC C->K, softplus, FC K->O, widened sigmoid on outputs 1..O-1), fused per tile of points.
//
// Each worker takes tiles of kTile points: it samples the tile's mean features into a buffer that
// stays in its cache, runs the two small matmuls on it (ATen's single-threaded GEMM inside the
// parallel region), and writes only the (tile, O) output. The backward recomputes a tile's
// activations the same way, accumulates the weight gradients in per-worker buffers (summed at the
// end), computes the point gradients from the feature gradients in place, and hands the feature
// gradients to triplane_sample's plane-gradient kernel (which owns the race-free scatter).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "dreamportrait/cpu_dispatch.h"
#include "dreamportrait/decoder_math.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace {

using triplane::BilinearTaps;
using triplane::kPlanes;
using triplane::Problem;

constexpr int64_t kTile = 512;
using decoder::kSigmoidScale;
using decoder::kSigmoidShift;

struct Decoder {
  int64_t K, O;
};

Decoder check_decoder(const at::Tensor& planes, const at::Tensor& weight1, const at::Tensor& bias1,
                      const at::Tensor& weight2, const at::Tensor& bias2) {
  const int64_t C = planes.size(2);
  for (const auto* t : {&weight1, &bias1, &weight2, &bias2}) {
    TORCH_CHECK(t->scalar_type() == planes.scalar_type() && t->device() == planes.device(),
                "sample_and_decode: the decoder weights must match planes in dtype and device");
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
  return {K, O};
}

// Mean features of points [begin, end) of batch element b into rows of `features` (count, C);
// planes_b is (3, H, W, C) contiguous.
template <typename scalar_t>
DP_CPU_CLONES void sample_mean(const scalar_t* __restrict__ planes_b, const scalar_t* __restrict__ points,
                               scalar_t* __restrict__ features, const Problem& p, int64_t b, int64_t begin,
                               int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t third = acc_t(1) / acc_t(kPlanes);
  std::vector<acc_t> acc(p.C);
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* pt = points + (b * p.N + n) * 3;
    const acc_t point[3] = {pt[0], pt[1], pt[2]};
    std::fill(acc.begin(), acc.end(), acc_t(0));
    bool finite = true;
    for (int plane = 0; plane < kPlanes; ++plane) {
      const auto t = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
      finite = finite && t.finite;
      const scalar_t* base = planes_b + plane * p.H * p.W * p.C;
      for (int dy = 0; dy < 2 && t.in_bounds; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (!t.valid(dy, dx)) continue;
          const acc_t w = t.weight(dy, dx);
          const scalar_t* __restrict__ src = base + ((t.y0 + dy) * p.W + t.x0 + dx) * p.C;
          acc_t* __restrict__ a = acc.data();
          for (int64_t c = 0; c < p.C; ++c) a[c] += w * src[c];
        }
      }
    }
    scalar_t* __restrict__ dst = features + (n - begin) * p.C;
    for (int64_t c = 0; c < p.C; ++c)
      dst[c] = finite ? static_cast<scalar_t>(acc[c] * third) : std::numeric_limits<scalar_t>::quiet_NaN();
  }
}

// Point gradients of points [begin, end) of batch element b from their feature gradients
// (rows of grad_features, (count, C)).
template <typename scalar_t>
DP_CPU_CLONES void point_grads(const scalar_t* __restrict__ planes_b, const scalar_t* __restrict__ points,
                               const scalar_t* __restrict__ grad_features, scalar_t* __restrict__ grad_points,
                               const Problem& p, int64_t b, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t third = acc_t(1) / acc_t(kPlanes);
  const acc_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * third;
  const acc_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * third;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t i = b * p.N + n;
    const scalar_t* pt = points + i * 3;
    const acc_t point[3] = {pt[0], pt[1], pt[2]};
    const scalar_t* __restrict__ g = grad_features + (n - begin) * p.C;
    acc_t grad[3] = {0, 0, 0};
    for (int plane = 0; plane < kPlanes; ++plane) {
      const auto t = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
      if (!t.finite) {
        grad[p.axes[2 * plane]] = grad[p.axes[2 * plane + 1]] = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      if (!t.in_bounds) continue;
      // Dot products of the gradient with the four corners (zero outside the plane).
      acc_t dot[2][2] = {{0, 0}, {0, 0}};
      const scalar_t* base = planes_b + plane * p.H * p.W * p.C;
      for (int dy = 0; dy < 2; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (!t.valid(dy, dx)) continue;
          const scalar_t* __restrict__ src = base + ((t.y0 + dy) * p.W + t.x0 + dx) * p.C;
          acc_t sum = 0;
          DP_SIMD_SUM(sum)
          for (int64_t c = 0; c < p.C; ++c) sum += static_cast<acc_t>(g[c]) * src[c];
          dot[dy][dx] = sum;
        }
      }
      acc_t d_dx, d_dy;
      triplane::bilinear_position_grad(t, dot[0][0], dot[0][1], dot[1][0], dot[1][1], d_dx, d_dy);
      grad[p.axes[2 * plane]] += d_dx * dx_dpoint;
      grad[p.axes[2 * plane + 1]] += d_dy * dy_dpoint;
    }
    for (int k = 0; k < 3; ++k) grad_points[i * 3 + k] = static_cast<scalar_t>(grad[k]);
  }
}

// Elementwise loops of the decoder, vectorised per instruction set.
// a += bias (per column), h = softplus(a): rows of width `width`.
template <typename scalar_t>
DP_CPU_CLONES void bias_softplus(scalar_t* __restrict__ a, const scalar_t* __restrict__ bias,
                                 scalar_t* __restrict__ h, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      const scalar_t value = a[r * width + j] + bias[j];
      a[r * width + j] = value;
      h[r * width + j] = decoder::softplus(value);
    }
  }
}

// x += bias (per column), rows of width `width`.
template <typename scalar_t>
DP_CPU_CLONES void add_bias(scalar_t* __restrict__ x, const scalar_t* __restrict__ bias, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < width; ++j) x[r * width + j] += bias[j];
}

// grad_hidden *= softplus'(a), in place.
template <typename scalar_t>
DP_CPU_CLONES void softplus_grad_inplace(const scalar_t* __restrict__ a, scalar_t* __restrict__ g, int64_t count) {
  for (int64_t i = 0; i < count; ++i) g[i] *= decoder::softplus_grad(a[i]);
}

// Output rows from raw decoder rows x (rows, O): column 0 as is, the others through the widened sigmoid.
template <typename scalar_t>
DP_CPU_CLONES void outputs_from_raw(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t rows,
                                    int64_t O) {
  const scalar_t scale = static_cast<scalar_t>(kSigmoidScale), shift = static_cast<scalar_t>(kSigmoidShift);
  for (int64_t r = 0; r < rows; ++r) {
    out[r * O] = x[r * O];
    for (int64_t j = 1; j < O; ++j) out[r * O + j] = decoder::sigmoid(x[r * O + j]) * scale - shift;
  }
}

// Gradient of the raw decoder rows from the output gradient: 1 for column 0, scale * s (1 - s) else.
template <typename scalar_t>
DP_CPU_CLONES void raw_grads(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
                             scalar_t* __restrict__ gx, int64_t rows, int64_t O) {
  const scalar_t scale = static_cast<scalar_t>(kSigmoidScale);
  for (int64_t r = 0; r < rows; ++r) {
    gx[r * O] = grad[r * O];
    for (int64_t j = 1; j < O; ++j) {
      const scalar_t s = decoder::sigmoid(x[r * O + j]);
      gx[r * O + j] = grad[r * O + j] * scale * s * (scalar_t(1) - s);
    }
  }
}

// A worker's tile buffers: features F (T, C), pre-activations A and hidden H (T, K), raw outputs X
// and their gradient GX (T, O).
struct Scratch {
  at::Tensor F, A, H, X, GX;
  Scratch(const Problem& p, const Decoder& d, const at::TensorOptions& options)
      : F(at::empty({kTile, p.C}, options)), A(at::empty({kTile, d.K}, options)), H(at::empty({kTile, d.K}, options)),
        X(at::empty({kTile, d.O}, options)), GX(at::empty({kTile, d.O}, options)) {}
};

// Samples and decodes points [begin, end): fills F, A, H, X of `s` (their first end - begin rows).
template <typename scalar_t>
void decode_tile(Scratch& s, const scalar_t* planes_b, const scalar_t* points, const Problem& p, const Decoder& d,
                 int64_t b, int64_t begin, int64_t end, const at::Tensor& w1, const at::Tensor& b1,
                 const at::Tensor& w2, const at::Tensor& b2, at::Tensor& F, at::Tensor& A, at::Tensor& H,
                 at::Tensor& X) {
  const int64_t count = end - begin;
  F = s.F.narrow(0, 0, count), A = s.A.narrow(0, 0, count), H = s.H.narrow(0, 0, count), X = s.X.narrow(0, 0, count);
  sample_mean(planes_b, points, F.mutable_data_ptr<scalar_t>(), p, b, begin, end);
  // Plain matmuls, the biases added in the elementwise passes (addmm would first copy them into
  // every row of the output).
  at::mm_out(A, F, w1.t());
  bias_softplus(A.mutable_data_ptr<scalar_t>(), b1.const_data_ptr<scalar_t>(), H.mutable_data_ptr<scalar_t>(),
                count, d.K);
  at::mm_out(X, H, w2.t());
  add_bias(X.mutable_data_ptr<scalar_t>(), b2.const_data_ptr<scalar_t>(), count, d.O);
}

// Runs fn(worker, begin, end) over [0, count) in tiles of kTile dealt round-robin to the workers.
template <typename F>
void for_tiles(int64_t count, int64_t workers, const F& fn) {
  const int64_t tiles = (count + kTile - 1) / kTile;
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    for (int64_t worker = first; worker < last; ++worker)
      for (int64_t tile = worker; tile < tiles; tile += workers)
        fn(worker, tile * kTile, std::min(count, (tile + 1) * kTile));
  });
}

int64_t worker_count(int64_t count) {
  const int64_t tiles = (count + kTile - 1) / kTile;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
}

}  // namespace

at::Tensor sample_and_decode_cpu(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                                 at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1,
                                 const at::Tensor& weight2, const at::Tensor& bias2) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  TORCH_CHECK(planes.device().is_cpu(), "sample_and_decode: the cpu kernel needs CPU tensors");
  TORCH_CHECK(planes.scalar_type() == at::kFloat || planes.scalar_type() == at::kDouble,
              "sample_and_decode: the cpu kernel takes float32 or float64, got ", planes.scalar_type());
  const Decoder d = check_decoder(planes, weight1, bias1, weight2, bias2);
  at::Tensor out = at::empty({p.B, p.N, d.O}, planes.options());
  if (p.B == 0 || p.N == 0) return out;
  const at::Tensor planes_ci = triplane::channels_innermost(planes);
  const at::Tensor pts = points.contiguous();
  // Detached: the matmuls below run on the worker threads, where no autograd guard applies.
  const at::Tensor w1 = weight1.detach().contiguous(), b1 = bias1.detach().contiguous(),
                   w2 = weight2.detach().contiguous(), b2 = bias2.detach().contiguous();
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "sample_and_decode_cpu", [&] {
    const int64_t workers = worker_count(p.N);
    std::vector<Scratch> scratch;
    for (int64_t w = 0; w < workers; ++w) scratch.emplace_back(p, d, planes.options());
    for (int64_t b = 0; b < p.B; ++b) {
      const scalar_t* planes_b = planes_ci.const_data_ptr<scalar_t>() + b * planes_ci.stride(0);
      for_tiles(p.N, workers, [&](int64_t worker, int64_t begin, int64_t end) {
        at::Tensor F, A, H, X;
        decode_tile(scratch[worker], planes_b, pts.const_data_ptr<scalar_t>(), p, d, b, begin, end, w1, b1, w2, b2,
                    F, A, H, X);
        outputs_from_raw(X.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>() + (b * p.N + begin) * d.O,
                         end - begin, d.O);
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_decode_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& planes, const at::Tensor& points, double box_warp,
    at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2, bool needs_planes, bool needs_points) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  TORCH_CHECK(planes.device().is_cpu(), "sample_and_decode_backward: the cpu kernel needs CPU tensors");
  TORCH_CHECK(planes.scalar_type() == at::kFloat || planes.scalar_type() == at::kDouble,
              "sample_and_decode_backward: the cpu kernel takes float32 or float64, got ", planes.scalar_type());
  const Decoder d = check_decoder(planes, weight1, bias1, weight2, bias2);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == p.B && grad_output.size(1) == p.N &&
                  grad_output.size(2) == d.O,
              "sample_and_decode_backward: grad_output must have shape (", p.B, ", ", p.N, ", ", d.O, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == planes.scalar_type() && grad_output.device() == planes.device(),
              "sample_and_decode_backward: grad_output must match planes in dtype and device");
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor planes_ci = triplane::channels_innermost(planes);
  const at::Tensor pts = points.contiguous();
  // Detached: the matmuls below run on the worker threads, where no autograd guard applies.
  const at::Tensor w1 = weight1.detach().contiguous(), b1 = bias1.detach().contiguous(),
                   w2 = weight2.detach().contiguous(), b2 = bias2.detach().contiguous();
  at::Tensor grad_features = needs_planes ? at::empty({p.B, p.N, p.C}, planes.options()) : at::Tensor();
  at::Tensor grad_points = needs_points ? at::empty({p.B, p.N, 3}, points.options()) : at::empty({0}, points.options());
  const int64_t workers = worker_count(p.N);
  // Per-worker weight-gradient sums: [gW1 (K, C), gb1 (K), gW2 (O, K), gb2 (O)].
  std::vector<std::vector<at::Tensor>> sums(workers);
  for (auto& s : sums)
    s = {at::zeros({d.K, p.C}, planes.options()), at::zeros({d.K}, planes.options()),
         at::zeros({d.O, d.K}, planes.options()), at::zeros({d.O}, planes.options())};
  if (p.B > 0 && p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "sample_and_decode_backward_cpu", [&] {
      std::vector<Scratch> scratch;
      std::vector<at::Tensor> feature_grads(workers);
      for (int64_t w = 0; w < workers; ++w) {
        scratch.emplace_back(p, d, planes.options());
        feature_grads[w] = at::empty({kTile, p.C}, planes.options());
      }
      for (int64_t b = 0; b < p.B; ++b) {
        const scalar_t* planes_b = planes_ci.const_data_ptr<scalar_t>() + b * planes_ci.stride(0);
        for_tiles(p.N, workers, [&](int64_t worker, int64_t begin, int64_t end) {
          const int64_t count = end - begin;
          Scratch& s = scratch[worker];
          at::Tensor F, A, H, X;
          decode_tile(s, planes_b, pts.const_data_ptr<scalar_t>(), p, d, b, begin, end, w1, b1, w2, b2, F, A, H, X);
          at::Tensor GX = s.GX.narrow(0, 0, count);
          raw_grads(X.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>() + (b * p.N + begin) * d.O,
                    GX.mutable_data_ptr<scalar_t>(), count, d.O);
          auto& acc = sums[worker];
          acc[2].addmm_(GX.t(), H);
          acc[3].add_(GX.sum(0));
          at::Tensor GA = H;  // H is no longer needed: its buffer takes the hidden gradient
          at::mm_out(GA, GX, w2);
          softplus_grad_inplace(A.const_data_ptr<scalar_t>(), GA.mutable_data_ptr<scalar_t>(), count * d.K);
          acc[0].addmm_(GA.t(), F);
          acc[1].add_(GA.sum(0));
          at::Tensor GF = needs_planes ? grad_features[b].narrow(0, begin, count)
                                       : feature_grads[worker].narrow(0, 0, count);
          at::mm_out(GF, GA, w1);  // (count, C)
          if (needs_points)
            point_grads(planes_b, pts.const_data_ptr<scalar_t>(), GF.const_data_ptr<scalar_t>(),
                        grad_points.mutable_data_ptr<scalar_t>(), p, b, begin, end);
        });
      }
    });
  }
  for (int64_t w = 1; w < workers; ++w)
    for (int k = 0; k < 4; ++k) sums[0][k].add_(sums[w][k]);
  at::Tensor grad_planes = at::empty({0}, planes.options());
  if (needs_planes) {
    static auto scatter = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("dreamportrait::triplane_sample_backward_planes", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                c10::IntArrayRef, c10::string_view)>();
    grad_planes = scatter.call(grad_features, planes, points, box_warp, axes, "mean");
  }
  return {grad_planes, grad_points, sums[0][0], sums[0][1], sums[0][2], sums[0][3]};
}

}  // namespace dreamportrait

TORCH_LIBRARY_FRAGMENT(dreamportrait, m) {
  m.def("sample_and_decode(Tensor planes, Tensor points, float box_warp, int[6] axes, Tensor weight1, "
        "Tensor bias1, Tensor weight2, Tensor bias2) -> Tensor");
  m.def("sample_and_decode_backward(Tensor grad_output, Tensor planes, Tensor points, float box_warp, "
        "int[6] axes, Tensor weight1, Tensor bias1, Tensor weight2, Tensor bias2, bool needs_planes, "
        "bool needs_points) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dreamportrait, CPU, m) {
  m.impl("sample_and_decode", &dreamportrait::sample_and_decode_cpu);
  m.impl("sample_and_decode_backward", &dreamportrait::sample_and_decode_backward_cpu);
}
