// CPU kernels of sample_and_decode: tri-plane sampling, the mean over planes and EG3D's decoder MLP
// (FC C->K, softplus, FC K->O, widened sigmoid on outputs 1..O-1), fused per tile of points.
//
// A worker takes tiles of kTile points. Per tile it computes every point's bilinear taps, gathers
// the mean features into a (tile, C) buffer, and runs the two small matmuls on the tile in register
// blocks (vector code for AVX-512, AVX2 or SSE, picked at load time), with the weights transposed
// and zero-padded to whole vectors once per call (they stay in L1). Only the (tile, O) output is
// written: the (N, 3, C) samples, (N, C) features and (N, K) hidden units never reach memory.
//
// The backward recomputes a tile the same way and back-propagates through the MLP on the tile. The
// weight gradients are summed per worker and the workers' sums added in worker order at the end
// (deterministic for a given thread count). From the feature gradients it computes the point
// gradients while the corner rows are still in cache from the gather. The plane gradient is
// triplane_sample's with the (N, C) feature gradients as its output gradient: they are written out
// per tile and scattered afterwards by (plane, channel chunk), so that no thread needs a gradient
// buffer of its own the size of the planes (zeroing, filling at random and summing those cost
// more, once there are several, than the one (N, C) buffer).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "dreamportrait/cpu_dispatch.h"
#include "dreamportrait/cpu_products.h"
#include "dreamportrait/decoder_host.h"
#include "dreamportrait/decoder_math.h"
#include "dreamportrait/ops.h"
#include "dreamportrait/triplane_cpu.h"
#include "dreamportrait/triplane_host.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace {

using triplane::BilinearTaps;
using triplane::kPlanes;
using triplane::Problem;

// Points per tile: the tile's buffers (and the plane rows its points touch) stay in L2.
constexpr int64_t kTile = 64;
// Row widths of the tile buffers and weights are padded to whole 64-byte vectors of float32;
// matrix products run in register blocks of kBlockRows rows by kLanes columns.
constexpr int64_t kLanes = 16;
constexpr int kBlockRows = cpu::kProductRows;
// The plane rows of the point this many ahead are prefetched while one point is gathered: the
// points are scattered over the planes, so the gather otherwise waits on memory for every point.
constexpr int64_t kPrefetchAhead = 4;

constexpr int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
constexpr int64_t block_rows(int64_t n) { return (n + kBlockRows - 1) / kBlockRows * kBlockRows; }
// Row width Op of the raw outputs and their weights: the density in column 0, then the O - 1 colour
// columns, computed by a product of whole vectors from column 1. EG3D's 1 + 32 outputs then take two
// AVX-512 (four AVX2) vectors' work and one dot product, not three vectors' (a third of that layer).
constexpr int64_t output_width(int64_t O) { return padded(1 + padded(O - 1)); }



// The channel count as the gather and scatter loops see it: EG3D's 32 as a compile-time constant,
// so that those loops unroll and keep a point's channels in registers; other counts run the same
// code with a run-time bound (RuntimeSizes::C).
struct Eg3dChannels {
  static constexpr int64_t C = 32;
};
using RuntimeSizes = decoder::Sizes;

// The decoder's weights, zero-padded to whole vectors: w1t (C, Kp) = weight1^T, b1 (Kp),
// w2t (K, Op) = weight2^T, b2 (Op); for the backward also w2 (O, Kp) and w1 (K, Cp).
template <typename scalar_t>
struct Weights {
  std::vector<scalar_t> w1t, b1, w2t, b2, w2, w1;

  Weights(const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2, const at::Tensor& bias2,
          const RuntimeSizes& s) {
    const int64_t Cp = padded(s.C), Kp = padded(s.K), Op = output_width(s.O);
    const at::Tensor W1 = weight1.contiguous(), B1 = bias1.contiguous(), W2 = weight2.contiguous(),
                     B2 = bias2.contiguous();
    const scalar_t *w1_in = W1.const_data_ptr<scalar_t>(), *w2_in = W2.const_data_ptr<scalar_t>();
    w1t.assign(s.C * Kp, 0), b1.assign(Kp, 0), w2t.assign(s.K * Op, 0), b2.assign(Op, 0);
    w2.assign(s.O * Kp, 0), w1.assign(s.K * Cp, 0);
    for (int64_t k = 0; k < s.K; ++k) {
      b1[k] = B1.const_data_ptr<scalar_t>()[k];
      for (int64_t c = 0; c < s.C; ++c) w1t[c * Kp + k] = w1[k * Cp + c] = w1_in[k * s.C + c];
    }
    for (int64_t o = 0; o < s.O; ++o) {
      b2[o] = B2.const_data_ptr<scalar_t>()[o];
      for (int64_t k = 0; k < s.K; ++k) w2t[k * Op + o] = w2[o * Kp + k] = w2_in[o * s.K + k];
    }
  }
};

// A worker's tile buffers: the points' taps (kTile, 3); features F and their gradient GF
// (kTile, Cp); pre-activations A and hidden units H (kTile, Kp), H later overwritten by the
// pre-activations' gradient; raw outputs X and their gradient GX (kTile, Op).
template <typename scalar_t>
struct TileBuffers {
  std::vector<BilinearTaps<scalar_t>> taps;
  std::vector<scalar_t> F, GF, A, H, X, GX;

  explicit TileBuffers(const RuntimeSizes& s)
      : taps(kTile * kPlanes), F(kTile * padded(s.C), 0), GF(kTile * padded(s.C), 0), A(kTile * padded(s.K)),
        H(kTile * padded(s.K)), X(kTile * output_width(s.O)), GX(kTile * output_width(s.O)) {}
};

// Per-worker sums of the weight gradients, padded: gw1 (Kp, Cp), gb1 (Kp), gw2 (Op, Kp), gb2 (Op).
template <typename scalar_t>
struct WeightGradients {
  std::vector<scalar_t> gw1, gb1, gw2, gb2;

  explicit WeightGradients(const RuntimeSizes& s)
      : gw1(padded(s.K) * padded(s.C), 0), gb1(padded(s.K), 0), gw2(output_width(s.O) * padded(s.K), 0),
        gb2(output_width(s.O), 0) {}
};

// First element of corner (dy, dx) of `plane`'s taps in a (3, H, W, C) buffer.
template <typename scalar_t, typename T>
inline scalar_t* corner(scalar_t* base, const BilinearTaps<T>& t, const Problem& p, int plane, int dy, int dx) {
  return base + ((plane * p.H + t.y0 + dy) * p.W + t.x0 + dx) * p.C;
}

// Taps and mean features F (rows of Cp) of points [begin, begin + count) of batch element b;
// planes_b is (3, H, W, C).
template <typename scalar_t, typename Channels>
DP_CPU_CLONES void gather_tile(const scalar_t* __restrict__ planes_b, const scalar_t* __restrict__ points,
                               const Problem& p, const Channels& ch, int64_t b, int64_t begin,
                               int64_t count, BilinearTaps<scalar_t>* __restrict__ taps, scalar_t* __restrict__ F) {
  const int64_t Cp = padded(ch.C);
  const scalar_t scale = static_cast<scalar_t>(p.scale), third = scalar_t(1) / scalar_t(kPlanes);
  for (int64_t t = 0; t < count; ++t) {
    const scalar_t* pt = points + (b * p.N + begin + t) * 3;
    const scalar_t point[3] = {pt[0], pt[1], pt[2]};
    for (int plane = 0; plane < kPlanes; ++plane)
      taps[t * kPlanes + plane] = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
  }
  // The corner rows of the points kPrefetchAhead ahead are fetched while one point is summed.
  for (int64_t t = 0; t < std::min(kPrefetchAhead, count); ++t)
    prefetch_point(planes_b, taps + t * kPlanes, p, ch);
  for (int64_t t = 0; t < count; ++t) {
    if (t + kPrefetchAhead < count) prefetch_point(planes_b, taps + (t + kPrefetchAhead) * kPlanes, p, ch);
    scalar_t* __restrict__ f = F + t * Cp;
    for (int64_t c = 0; c < ch.C; ++c) f[c] = 0;
    bool finite = true;
    for (int plane = 0; plane < kPlanes; ++plane) {
      const BilinearTaps<scalar_t>& tp = taps[t * kPlanes + plane];
      finite = finite && tp.finite;
      for (int dy = 0; dy < 2 && tp.in_bounds; ++dy) {
        for (int dx = 0; dx < 2; ++dx) {
          if (!tp.valid(dy, dx)) continue;
          const scalar_t w = tp.weight(dy, dx);
          const scalar_t* __restrict__ src = corner(planes_b, tp, p, plane, dy, dx);
          for (int64_t c = 0; c < ch.C; ++c) f[c] += w * src[c];
        }
      }
    }
    const scalar_t factor = finite ? third : std::numeric_limits<scalar_t>::quiet_NaN();
    for (int64_t c = 0; c < ch.C; ++c) f[c] *= factor;
  }
}

// C = init + A B in register blocks of kBlockRows x kLanes (cpu::block_product), the one matrix
// product of the kernels: for i < rows (a multiple of kBlockRows) and j < cols (a multiple of kLanes),
//   C[i * ldc + j] = init + sum_{r < n} A[i * a_row + r * a_inner] * B[r * ldb + j],
// init being C's own value when `accumulate`, else bias[j] (0 without a bias). The strides of A let
// the same loops multiply by a transposed A (the weight gradients).
template <typename scalar_t>
void matmul(int64_t rows, int64_t cols, int64_t n, const scalar_t* __restrict__ A, int64_t a_row, int64_t a_inner,
            const scalar_t* __restrict__ B, int64_t ldb, const scalar_t* __restrict__ bias, bool accumulate,
            scalar_t* __restrict__ C, int64_t ldc) {
  run_with_widest_vectors([&](auto vector_bytes) DP_ALWAYS_INLINE_LAMBDA {
    for (int64_t i0 = 0; i0 < rows; i0 += kBlockRows) {
      const scalar_t* a[kBlockRows];
      for (int i = 0; i < kBlockRows; ++i) a[i] = A + (i0 + i) * a_row;
      cpu::block_product<decltype(vector_bytes)::value, kLanes>(a, a_inner, kBlockRows, B, ldb, n, C + i0 * ldc, ldc,
                                                                 cols, accumulate, bias);
    }
  });
}

// h = softplus(a) over `count` elements; with `derivative`, a is overwritten by softplus'(a).
template <typename scalar_t>
DP_CPU_CLONES void softplus_rows(scalar_t* __restrict__ a, scalar_t* __restrict__ h, int64_t count, bool derivative) {
  if (derivative) {
    for (int64_t i = 0; i < count; ++i) h[i] = decoder::softplus_with_grad(a[i], a[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) h[i] = decoder::softplus(a[i]);
  }
}

// Column 0 of X (rows, Op), the raw density: b2[0] + H[t] . weight2[0] (w2's row 0).
template <typename scalar_t>
DP_CPU_CLONES void density_column(const Weights<scalar_t>& w, int64_t rows, int64_t K, int64_t Kp, int64_t Op,
                                  const scalar_t* __restrict__ H, scalar_t* __restrict__ X) {
  const scalar_t* __restrict__ weights = w.w2.data();
  for (int64_t t = 0; t < rows; ++t) {
    const scalar_t* __restrict__ h = H + t * Kp;
    scalar_t sum = 0;
    DP_SIMD_SUM(sum)
    for (int64_t k = 0; k < K; ++k) sum += h[k] * weights[k];
    X[t * Op] = w.b2[0] + sum;
  }
}

// The MLP on a tile of features F (rows, Cp), rows a multiple of kBlockRows:
// A = F W1^T + b1, H = softplus(A), X = H W2^T + b2. For the backward (`derivative`) A is left
// holding softplus'(A) instead, which is all the backward needs of it.
template <typename scalar_t>
void decode_tile(const Weights<scalar_t>& w, const RuntimeSizes& s, int64_t rows, const scalar_t* F, scalar_t* A,
                 scalar_t* H, scalar_t* X, bool derivative) {
  const int64_t Cp = padded(s.C), Kp = padded(s.K), Op = output_width(s.O);
  matmul(rows, Kp, s.C, F, Cp, 1, w.w1t.data(), Kp, w.b1.data(), false, A, Kp);
  softplus_rows(A, H, rows * Kp, derivative);
  density_column(w, rows, s.K, Kp, Op, static_cast<const scalar_t*>(H), X);
  matmul(rows, padded(s.O - 1), s.K, static_cast<const scalar_t*>(H), Kp, 1, w.w2t.data() + 1, Op, w.b2.data() + 1,
         false, X + 1, Op);
}

// Output rows (count, O) from the raw outputs X (count, Op).
template <typename scalar_t>
DP_CPU_CLONES void write_outputs(const RuntimeSizes& s, int64_t count, const scalar_t* __restrict__ X,
                                 scalar_t* __restrict__ out) {
  const int64_t Op = output_width(s.O);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t j = 0; j < s.O; ++j) out[t * s.O + j] = decoder::output_value(X[t * Op + j], j);
}

// GX (count, Op) = the raw outputs' gradient from the output gradient rows grad (count, O), zero in
// the padding; gb2 += its column sums.
template <typename scalar_t>
DP_CPU_CLONES void raw_gradients(const RuntimeSizes& s, int64_t count, const scalar_t* __restrict__ grad,
                                 const scalar_t* __restrict__ X, scalar_t* __restrict__ GX,
                                 scalar_t* __restrict__ gb2) {
  const int64_t Op = output_width(s.O);
  for (int64_t t = 0; t < count; ++t) {
    scalar_t* __restrict__ gx = GX + t * Op;
    for (int64_t j = 0; j < Op; ++j)
      gx[j] = j < s.O ? decoder::raw_gradient(X[t * Op + j], grad[t * s.O + j], j) : scalar_t(0);
    for (int64_t j = 0; j < Op; ++j) gb2[j] += gx[j];
  }
}

// GA = GH * softplus'(A) in place over count rows of width Kp, from S = softplus'(A); gb1 += its
// column sums.
template <typename scalar_t>
DP_CPU_CLONES void hidden_gradients(int64_t count, int64_t Kp, const scalar_t* __restrict__ S,
                                    scalar_t* __restrict__ GA, scalar_t* __restrict__ gb1) {
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t j = 0; j < Kp; ++j) GA[t * Kp + j] *= S[t * Kp + j];
    for (int64_t j = 0; j < Kp; ++j) gb1[j] += GA[t * Kp + j];
  }
}

// Back-propagates the output gradient rows grad (count, O) through the MLP of a decoded tile (rows
// of its buffers, a multiple of kBlockRows, >= count): adds the weight gradients of the tile's
// count points to `sums` and leaves the feature gradients in GF. S holds softplus'(A) (decode_tile
// with `derivative`); H is overwritten by the pre-activations' gradient.
template <typename scalar_t>
void backprop_tile(const Weights<scalar_t>& w, const RuntimeSizes& s, int64_t count, int64_t rows,
                   const scalar_t* grad, const scalar_t* F, const scalar_t* S, scalar_t* H, const scalar_t* X,
                   scalar_t* GX, scalar_t* GF, WeightGradients<scalar_t>& sums) {
  const int64_t Cp = padded(s.C), Kp = padded(s.K), Op = output_width(s.O);
  raw_gradients(s, count, grad, X, GX, sums.gb2.data());
  // gw2 (Op, Kp) += GX^T H over the tile's points (its rows past O, all zero, left out).
  matmul(block_rows(s.O), Kp, count, static_cast<const scalar_t*>(GX), 1, Op, static_cast<const scalar_t*>(H), Kp,
         static_cast<const scalar_t*>(nullptr), true, sums.gw2.data(), Kp);
  // H <- GX W2, then times softplus'(A).
  matmul(rows, Kp, s.O, static_cast<const scalar_t*>(GX), Op, 1, w.w2.data(), Kp,
         static_cast<const scalar_t*>(nullptr), false, H, Kp);
  hidden_gradients(count, Kp, S, H, sums.gb1.data());
  // gw1 (Kp, Cp) += GA^T F; GF = GA W1.
  matmul(Kp, Cp, count, static_cast<const scalar_t*>(H), 1, Kp, F, Cp, static_cast<const scalar_t*>(nullptr), true,
         sums.gw1.data(), Cp);
  matmul(rows, Cp, s.K, static_cast<const scalar_t*>(H), Kp, 1, w.w1.data(), Cp,
         static_cast<const scalar_t*>(nullptr), false, GF, Cp);
}

// From the feature gradients GF (count, Cp) of a tile: the points' gradients, rows of grad_points
// (count, 3). `zeros` holds C zeros, read for corners outside the plane.
template <typename scalar_t, typename Channels>
DP_CPU_CLONES void point_gradients(const scalar_t* __restrict__ planes_b, const scalar_t* __restrict__ zeros,
                                   scalar_t* __restrict__ grad_points, const Problem& p, const Channels& ch,
                                   int64_t count, const BilinearTaps<scalar_t>* __restrict__ taps,
                                   const scalar_t* __restrict__ GF) {
  const int64_t Cp = padded(ch.C);
  const scalar_t scale = static_cast<scalar_t>(p.scale), third = scalar_t(1) / scalar_t(kPlanes);
  const scalar_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * third;
  const scalar_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * third;
  for (int64_t t = 0; t < count; ++t) {
    const scalar_t* __restrict__ g = GF + t * Cp;
    scalar_t grad[3] = {0, 0, 0};
    for (int plane = 0; plane < kPlanes; ++plane) {
      const BilinearTaps<scalar_t>& tp = taps[t * kPlanes + plane];
      scalar_t d_dx = 0, d_dy = 0;
      if (!tp.finite) {
        d_dx = d_dy = std::numeric_limits<scalar_t>::quiet_NaN();
      } else if (tp.in_bounds) {
        const scalar_t* v[2][2];
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx) v[dy][dx] = tp.valid(dy, dx) ? corner(planes_b, tp, p, plane, dy, dx) : zeros;
        const scalar_t *__restrict__ v00 = v[0][0], *__restrict__ v01 = v[0][1];
        const scalar_t *__restrict__ v10 = v[1][0], *__restrict__ v11 = v[1][1];
        DP_SIMD_SUM(d_dx, d_dy)
        for (int64_t c = 0; c < ch.C; ++c) {
          scalar_t cx, cy;
          triplane::bilinear_position_grad(tp, v00[c], v01[c], v10[c], v11[c], cx, cy);
          d_dx += g[c] * cx;
          d_dy += g[c] * cy;
        }
      }
      triplane::add_to_coordinate(grad, p.axes[2 * plane], d_dx * dx_dpoint);
      triplane::add_to_coordinate(grad, p.axes[2 * plane + 1], d_dy * dy_dpoint);
    }
    for (int k = 0; k < 3; ++k) grad_points[t * 3 + k] = grad[k];
  }
}

// Rows (count, C) of the feature gradient from the tile's GF (count, Cp).
template <typename scalar_t>
void write_feature_gradients(const RuntimeSizes& s, int64_t count, const scalar_t* __restrict__ GF,
                             scalar_t* __restrict__ out) {
  const int64_t Cp = padded(s.C);
  for (int64_t t = 0; t < count; ++t) std::memcpy(out + t * s.C, GF + t * Cp, s.C * sizeof(scalar_t));
}

// Runs fn(worker, begin, end) over [0, count) in tiles of kTile dealt round-robin to the workers:
// neighbouring points (rays) are processed at the same time, so the threads share plane rows in cache.
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
  return std::max<int64_t>(1, std::min(int64_t(at::get_num_threads()), tiles));
}

// Calls fn(channels) with EG3D's channel count as a compile-time constant when it matches, else
// with the run-time sizes.
template <typename F>
void with_channels(const RuntimeSizes& s, const F& fn) {
  if (s.C == Eg3dChannels::C)
    fn(Eg3dChannels{});
  else
    fn(s);
}

void check_cpu(const at::Tensor& planes, const char* op) {
  TORCH_CHECK(planes.device().is_cpu(), op, ": the cpu kernel needs CPU tensors");
  TORCH_CHECK(planes.scalar_type() == at::kFloat || planes.scalar_type() == at::kDouble, op,
              ": the cpu kernel takes float32 or float64, got ", planes.scalar_type());
}

}  // namespace

at::Tensor sample_and_decode_cpu(const at::Tensor& planes, const at::Tensor& points, double box_warp,
                                 at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1,
                                 const at::Tensor& weight2, const at::Tensor& bias2) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  check_cpu(planes, "sample_and_decode");
  const RuntimeSizes sizes = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  at::Tensor out = at::empty({p.B, p.N, sizes.O}, planes.options());
  if (p.B == 0 || p.N == 0) return out;
  const at::Tensor pts = points.contiguous();
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "sample_and_decode_cpu", [&] {
    const Weights<scalar_t> w(weight1, bias1, weight2, bias2, sizes);
    const int64_t workers = worker_count(p.N);
    std::vector<TileBuffers<scalar_t>> tiles(workers, TileBuffers<scalar_t>(sizes));
    with_channels(sizes, [&](const auto& channels) {
      for_each_batch_element<scalar_t>(planes, p, [&](int64_t b, const scalar_t* planes_b) {
        for_tiles(p.N, workers, [&](int64_t worker, int64_t begin, int64_t end) {
          TileBuffers<scalar_t>& tb = tiles[worker];
          const int64_t count = end - begin;
          gather_tile(planes_b, pts.const_data_ptr<scalar_t>(), p, channels, b, begin, count, tb.taps.data(),
                      tb.F.data());
          decode_tile(w, sizes, block_rows(count), tb.F.data(), tb.A.data(), tb.H.data(), tb.X.data(), false);
          write_outputs(sizes, count, tb.X.data(), out.mutable_data_ptr<scalar_t>() + (b * p.N + begin) * sizes.O);
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_and_decode_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& planes, const at::Tensor& points, double box_warp,
    at::IntArrayRef axes, const at::Tensor& weight1, const at::Tensor& bias1, const at::Tensor& weight2,
    const at::Tensor& bias2, bool needs_planes, bool needs_points) {
  const Problem p = triplane::check_problem(planes, points, box_warp, axes, "mean");
  check_cpu(planes, "sample_and_decode_backward");
  const RuntimeSizes sizes = decoder::check_weights(planes, weight1, bias1, weight2, bias2);
  decoder::check_grad_output(grad_output, p, sizes, planes);
  at::Tensor grad_points = needs_points ? at::empty({p.B, p.N, 3}, points.options()) : at::empty({0}, points.options());
  at::Tensor grads[4] = {at::zeros({sizes.K, sizes.C}, planes.options()), at::zeros({sizes.K}, planes.options()),
                         at::zeros({sizes.O, sizes.K}, planes.options()), at::zeros({sizes.O}, planes.options())};
  // The features' gradient (B, N, C), the output gradient of the sampling, for the plane gradient.
  at::Tensor feature_grads = at::empty({needs_planes ? p.B : 0, p.N, sizes.C}, planes.options());
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor pts = points.contiguous();
  if (p.B > 0 && p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "sample_and_decode_backward_cpu", [&] {
      const Weights<scalar_t> w(weight1, bias1, weight2, bias2, sizes);
      const int64_t workers = worker_count(p.N);
      std::vector<TileBuffers<scalar_t>> tiles(workers, TileBuffers<scalar_t>(sizes));
      std::vector<WeightGradients<scalar_t>> sums(workers, WeightGradients<scalar_t>(sizes));
      const std::vector<scalar_t> zeros(p.C, 0);
      with_channels(sizes, [&](const auto& channels) {
        for_each_batch_element<scalar_t>(planes, p, [&](int64_t b, const scalar_t* planes_b) {
          for_tiles(p.N, workers, [&](int64_t worker, int64_t begin, int64_t end) {
            TileBuffers<scalar_t>& tb = tiles[worker];
            const int64_t count = end - begin, rows = block_rows(count);
            gather_tile(planes_b, pts.const_data_ptr<scalar_t>(), p, channels, b, begin, count, tb.taps.data(),
                        tb.F.data());
            decode_tile(w, sizes, rows, tb.F.data(), tb.A.data(), tb.H.data(), tb.X.data(), true);
            backprop_tile(w, sizes, count, rows, grad.const_data_ptr<scalar_t>() + (b * p.N + begin) * sizes.O,
                          tb.F.data(), tb.A.data(), tb.H.data(), tb.X.data(), tb.GX.data(), tb.GF.data(),
                          sums[worker]);
            if (needs_points)
              point_gradients(planes_b, zeros.data(), grad_points.mutable_data_ptr<scalar_t>() + (b * p.N + begin) * 3,
                              p, channels, count, tb.taps.data(), static_cast<const scalar_t*>(tb.GF.data()));
            if (needs_planes)
              write_feature_gradients(sizes, count, static_cast<const scalar_t*>(tb.GF.data()),
                                      feature_grads.mutable_data_ptr<scalar_t>() + (b * p.N + begin) * sizes.C);
          });
        });
      });
      // The workers' sums, added in worker order, without the padding.
      const int64_t Cp = padded(sizes.C), Kp = padded(sizes.K);
      scalar_t *gw1 = grads[0].mutable_data_ptr<scalar_t>(), *gb1 = grads[1].mutable_data_ptr<scalar_t>();
      scalar_t *gw2 = grads[2].mutable_data_ptr<scalar_t>(), *gb2 = grads[3].mutable_data_ptr<scalar_t>();
      for (const auto& sum : sums) {
        for (int64_t k = 0; k < sizes.K; ++k) {
          gb1[k] += sum.gb1[k];
          for (int64_t c = 0; c < sizes.C; ++c) gw1[k * sizes.C + c] += sum.gw1[k * Cp + c];
        }
        for (int64_t o = 0; o < sizes.O; ++o) {
          gb2[o] += sum.gb2[o];
          for (int64_t k = 0; k < sizes.K; ++k) gw2[o * sizes.K + k] += sum.gw2[o * Kp + k];
        }
      }
    });
  }
  at::Tensor grad_planes =
      needs_planes ? triplane_sample_backward_planes_cpu(feature_grads, planes, points, box_warp, axes, "mean")
                   : at::empty({0}, planes.options());
  return {grad_planes, grad_points, grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace dreamportrait
