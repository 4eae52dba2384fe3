// The block programs of the CUDA sample_and_decode kernels. The GPU runs them with CUDA blocks
// (csrc/cuda/sample_and_decode.cu), the host emulation (csrc/cpu/tile_emulation.cpp) with threads
// that meet at the same barriers and exchanges, and the CPU tests check that against the reference.
//
// A block takes tiles of P points (a grid-stride loop over tiles). The decoder's weights are copied
// into shared memory once per block; a tile's features, pre-activations, hidden units and
// raw-output gradients live in shared memory only (rows padded by one element, so that threads of
// neighbouring points read different banks). Three mappings of threads:
//   - sampling and scattering: one warp per point, lanes over channels (coalesced plane reads and
//     atomic adds of a tap's channels; the point gradient is a warp reduction over channels);
//   - the MLP's products with the weights (both layers, forward and in the backward's recompute,
//     and the backward's input gradients): a thread per point and 8 units (1 in float64), the
//     point index fastest. The weights are staged transposed, so that a thread's units are side
//     by side along a row (the layers) or its units' rows run along the inputs (the input
//     gradients): per input a warp reads its 32 points' values once (no bank conflicts) and the
//     weights as broadcast 16-byte vectors, 3 shared-memory wavefronts for 256 multiply-adds. A
//     thread per (point, unit) reads two values per multiply-add, which would bound the products by
//     shared memory at an eighth of the FMA units' rate;
//   - the weight gradients: a thread per 4 x 4 square of weights (2 x 2 in float64), summing over the
//     tile's points: per point 8 shared-memory reads for 16 multiply-adds, a warp's lanes reading
//     consecutive inputs and broadcast outputs.
// The backward sums each weight's gradient over the tiles of a block in shared memory and writes
// one partial per block; sum_partials adds them in block order (no atomics: deterministic). Plane
// gradients are added atomically into a float32 (for 16-bit inputs) or float64 channel-innermost
// buffer, as triplane_sample's backward does.
//
// A Block provides thread(), threads() (a multiple of lanes()), lanes() (threads per warp), sync()
// (a barrier of the block's threads, ordering shared memory), warp_sum(v) (the sum over the lanes of
// the calling warp, in every lane; all of them call it together) and add(address, value) (an
// atomic add to global memory).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dreamportrait/common.h"
#include "dreamportrait/decoder_math.h"
#include "dreamportrait/triplane_math.h"

namespace dreamportrait {
namespace decoder {
namespace tiles {

constexpr int kThreads = 256;
// Points per tile when shared memory allows; halved (down to kMinTile) for large decoders or float64.
constexpr int kMaxTile = 32;
constexpr int kMinTile = 4;
// Blocks per SM of a launch: each block's weights are loaded (and, backward, its partial sums
// written) once, so a few per SM, not one per tile.
constexpr int kBlocksPerSm = 4;
// Units (outputs of a product) per thread in the products with the weights: 8 in float32 (two
// 16-byte vectors of weights per input); 1 in float64, a correctness tool (with 2, 4 or 8, nvcc
// spilled the float64 forward for sm_80 within the 64 registers it gives the kernel). The staged
// weights are padded to whole groups of kUnitsPerThread.
constexpr int kUnitsPerThread = 8;
template <typename acc_t>
constexpr int units_per_thread() {
  return sizeof(acc_t) == 4 ? 8 : 1;
}
static_assert(kUnitsPerThread % units_per_thread<double>() == 0 && kUnitsPerThread == units_per_thread<float>());
// Edge of a thread's square of weights in the weight-gradient sums: 4 x 4 in float32, 2 x 2 in
// float64 (its accumulators take two registers each).
template <typename acc_t>
constexpr int weight_gradient_edge() {
  return sizeof(acc_t) == 4 ? 4 : 2;
}

// Offsets (in elements of the accumulation type) of the weights and tile buffers in shared memory.
// The weights are staged transposed and zero-padded to whole groups of kUnitsPerThread units:
// w1 (C1, K1), b1 (K1), w2 (K1, O1), b2 (O1), C1, K1 and O1 being C, K and O rounded up, so that
// every offset and row falls on a 16-byte boundary of the (128-byte aligned) buffer and the rows
// read as units (dense_tile_rows) come in whole groups. The backward's
// weight-gradient sums are in the weights' own order, that of the launcher's gradient buffer:
// w1 (K, C) at 0, b1 (K) at gb1, w2 (O, K) at gw2, b2 (O) at gb2, `weights` elements.
struct Layout {
  int64_t C, K, O;
  int tile;                // points per tile, P
  int64_t C1, K1, O1;      // C, K and O padded (the staged weights' shapes)
  int64_t w1, b1, w2, b2;  // offsets of the staged weights
  int64_t staged;          // their count
  int64_t gb1, gw2, gb2;   // offsets within the weight-gradient sums
  int64_t weights;         // the weights' count (K C + K + O K + O)
  int64_t sums;            // backward: the weight-gradient sums
  int64_t F, H;            // features (P, C + 1), hidden units (P, K + 1)
  int64_t A, GX;           // backward: pre-activations (P, K + 1), raw outputs' gradient (P, O + 1)
  int64_t total;           // elements in all

  DP_HOST_DEVICE Layout(int64_t C_, int64_t K_, int64_t O_, int points, bool backward)
      : C(C_), K(K_), O(O_), tile(points) {
    C1 = round_up(C, kUnitsPerThread), K1 = round_up(K, kUnitsPerThread), O1 = round_up(O, kUnitsPerThread);
    w1 = 0, b1 = C1 * K1, w2 = b1 + K1, b2 = w2 + K1 * O1, staged = b2 + O1;
    gb1 = K * C, gw2 = gb1 + K, gb2 = gw2 + O * K, weights = gb2 + O;
    sums = staged;
    F = backward ? sums + weights : staged;
    H = F + tile * (C + 1);
    A = H + tile * (K + 1);
    GX = A + tile * (K + 1);
    total = backward ? GX + tile * (O + 1) : A;
  }
};

// The largest tile from kMaxTile down (halving) whose buffers fit `max_shared` bytes of shared
// memory with `element_size`-byte elements; kMinTile's layout if none fits (the caller checks it).
inline Layout largest_layout(int64_t C, int64_t K, int64_t O, bool backward, size_t element_size,
                             size_t max_shared) {
  int tile = kMaxTile;
  while (tile > kMinTile && size_t(Layout(C, K, O, tile, backward).total) * element_size > max_shared) tile /= 2;
  return Layout(C, K, O, tile, backward);
}

// Pointers and sizes of one forward launch; planes are (B, 3, H, W, C), points (B, N, 3).
template <typename scalar_t>
struct ForwardIo {
  const scalar_t *planes, *points, *w1, *b1, *w2, *b2;
  scalar_t* out;  // (B, N, O)
  triplane::Problem p;
  Layout l;
};

// Pointers and sizes of one backward launch. grad_planes (B, 3, H, W, C) in acc_t, or null when not
// wanted; grad_points (B, N, 3), or null; partials (blocks, l.weights).
template <typename scalar_t, typename acc_t>
struct BackwardIo {
  const scalar_t *grad_out, *planes, *points, *w1, *b1, *w2, *b2;
  acc_t* grad_planes;
  scalar_t* grad_points;
  acc_t* partials;
  triplane::Problem p;
  Layout l;
};

// Points in the tile that starts at point `first` of a batch element of N points.
DP_INLINE int tile_count(int tile, int64_t first, int64_t N) {
  return N - first < tile ? static_cast<int>(N - first) : tile;
}

template <typename scalar_t, typename acc_t>
DP_INLINE void load_point(const scalar_t* points, int64_t i, acc_t point[3]) {
  for (int k = 0; k < 3; ++k) point[k] = static_cast<acc_t>(points[i * 3 + k]);
}

// Copies the four weight tensors into shared memory transposed and zero-padded (the Layout's
// staged weights).
template <class Block, typename scalar_t, typename acc_t>
DP_INLINE void load_weights_transposed(const Block& block, acc_t* s, const Layout& l, const scalar_t* w1,
                                       const scalar_t* b1, const scalar_t* w2, const scalar_t* b2) {
  for (int64_t i = block.thread(); i < l.staged; i += block.threads()) {
    acc_t value = 0;
    if (i < l.b1) {
      const int64_t c = i / l.K1, k = i % l.K1;
      if (c < l.C && k < l.K) value = static_cast<acc_t>(w1[k * l.C + c]);
    } else if (i < l.w2) {
      if (i - l.b1 < l.K) value = static_cast<acc_t>(b1[i - l.b1]);
    } else if (i < l.b2) {
      const int64_t k = (i - l.w2) / l.O1, o = (i - l.w2) % l.O1;
      if (k < l.K && o < l.O) value = static_cast<acc_t>(w2[o * l.K + k]);
    } else if (i - l.b2 < l.O) {
      value = static_cast<acc_t>(b2[i - l.b2]);
    }
    s[i] = value;
  }
}

// 16 bytes of shared memory read as one vector (LDS.128 on the GPU); `from` 16-byte aligned. The GPU
// faults on a misaligned vector read; the host emulation reads NaN there instead, so that its tests
// fail where the kernel would.
template <typename acc_t>
struct alignas(16) Vector16 {
  static constexpr int kCount = int(16 / sizeof(acc_t));
  acc_t v[kCount];
};

template <typename acc_t>
DP_INLINE Vector16<acc_t> load16(const acc_t* from) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const Vector16<acc_t>*>(from);
#else
  Vector16<acc_t> vector;
  if (reinterpret_cast<std::uintptr_t>(from) % 16 != 0) {
    for (acc_t& value : vector.v) value = std::numeric_limits<acc_t>::quiet_NaN();
  } else {
    std::memcpy(vector.v, from, sizeof(vector.v));
  }
  return vector;
#endif
}

// Mean features of the tile's points [0, count) (point `first` onwards of batch element b) into
// F (P, C + 1); rows from count on are zero. One warp per point, lanes over channels.
template <class Block, typename scalar_t, typename acc_t>
DP_INLINE void sample_tile(const Block& block, const scalar_t* planes, const scalar_t* points,
                           const triplane::Problem& p, const Layout& l, int64_t b, int64_t first, int count,
                           acc_t* F) {
  const acc_t scale = static_cast<acc_t>(p.scale), third = acc_t(1) / acc_t(triplane::kPlanes);
  const int lane = block.thread() % block.lanes(), warps = block.threads() / block.lanes();
  for (int q = block.thread() / block.lanes(); q < l.tile; q += warps) {
    acc_t point[3] = {0, 0, 0};
    if (q < count) load_point(points, b * p.N + first + q, point);
    for (int64_t c = lane; c < p.C; c += block.lanes()) {
      acc_t acc = 0;
      for (int plane = 0; plane < triplane::kPlanes && q < count; ++plane) {
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.finite) acc = NAN;
        if (!taps.in_bounds) continue;
        const scalar_t* base = planes + (b * triplane::kPlanes + plane) * p.H * p.W * p.C + c;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx)
            if (taps.valid(dy, dx))
              acc += taps.weight(dy, dx) * static_cast<acc_t>(base[((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C]);
      }
      F[q * (l.C + 1) + c] = acc * third;
    }
  }
}

// out[q, j] = bias[j] + sum_i in[q, i] Wt[i, j] for q < P, j < n_out: Wt (n_in, width) row-major in
// shared memory, width a multiple of kUnitsPerThread and Wt, bias zero from n_out on; `in` a tile
// buffer with rows of n_in + 1. Thread per (q, group of units_per_thread j), q fastest: `in` read
// without bank conflicts, the group's weights as broadcast 16-byte vectors.
template <class Block, typename acc_t, typename Epilogue>
DP_INLINE void dense_tile_transposed(const Block& block, const acc_t* in, int64_t n_in, const acc_t* Wt,
                                     const acc_t* bias, int64_t n_out, int64_t width, int tile,
                                     const Epilogue& epilogue) {
  constexpr int kUnits = units_per_thread<acc_t>();
  // Weights per load: a 16-byte vector, or one where a thread has fewer units.
  constexpr int kLoad = kUnits < Vector16<acc_t>::kCount ? kUnits : Vector16<acc_t>::kCount;
  auto load = [](const acc_t* from, acc_t* to) {
    if constexpr (kLoad == Vector16<acc_t>::kCount) {
      const Vector16<acc_t> vector = load16(from);
      for (int e = 0; e < kLoad; ++e) to[e] = vector.v[e];
    } else {
      for (int e = 0; e < kLoad; ++e) to[e] = from[e];
    }
  };
  for (int64_t idx = block.thread(); idx < tile * (width / kUnits); idx += block.threads()) {
    const int q = static_cast<int>(idx % tile);
    const int64_t j0 = idx / tile * kUnits;
    acc_t sum[kUnits];
    for (int u = 0; u < kUnits; u += kLoad) load(bias + j0 + u, sum + u);
    const acc_t* row = in + q * (n_in + 1);
    for (int64_t i = 0; i < n_in; ++i) {
      const acc_t x = row[i];
      for (int u = 0; u < kUnits; u += kLoad) {
        acc_t w[kLoad];
        load(Wt + i * width + j0 + u, w);
        for (int e = 0; e < kLoad; ++e) sum[u + e] += x * w[e];
      }
    }
    for (int u = 0; u < kUnits; ++u)
      if (j0 + u < n_out) epilogue(q, j0 + u, sum[u]);
  }
}

// out[q, j] = sum_i in[q, i] W[j, i] for q < P, j < n_out: W (rows, width) row-major in shared memory
// (rows on 16-byte boundaries, width >= n_in, rows >= n_out rounded up to kUnitsPerThread), `in` a
// tile buffer with rows of n_in + 1. Thread per (q, group of units_per_thread j), q fastest: per step
// of inputs a thread reads its point's values one by one (no bank conflicts) and each of its units'
// weights as one broadcast 16-byte vector.
template <class Block, typename acc_t, typename Epilogue>
DP_INLINE void dense_tile_rows(const Block& block, const acc_t* in, int64_t n_in, const acc_t* W, int64_t n_out,
                               int64_t width, int tile, const Epilogue& epilogue) {
  constexpr int kUnits = units_per_thread<acc_t>(), kStep = Vector16<acc_t>::kCount;
  const int64_t groups = ceil_div(n_out, kUnits), vector_end = n_in / kStep * kStep;
  for (int64_t idx = block.thread(); idx < tile * groups; idx += block.threads()) {
    const int q = static_cast<int>(idx % tile);
    const int64_t j0 = idx / tile * kUnits;
    const acc_t* rows = W + j0 * width;  // the group's kUnits rows (padding rows past n_out)
    acc_t sum[kUnits];
    for (int u = 0; u < kUnits; ++u) sum[u] = 0;
    const acc_t* row = in + q * (n_in + 1);
    for (int64_t i = 0; i < vector_end; i += kStep) {
      acc_t x[kStep];
      for (int e = 0; e < kStep; ++e) x[e] = row[i + e];
      for (int u = 0; u < kUnits; ++u) {
        const Vector16<acc_t> w = load16(rows + u * width + i);
        for (int e = 0; e < kStep; ++e) sum[u] += x[e] * w.v[e];
      }
    }
    for (int64_t i = vector_end; i < n_in; ++i)
      for (int u = 0; u < kUnits; ++u) sum[u] += row[i] * rows[u * width + i];
    for (int u = 0; u < kUnits; ++u)
      if (j0 + u < n_out) epilogue(q, j0 + u, sum[u]);
  }
}

// A layer's weight and bias gradients over a tile's points [0, count): weight_sums[o n_in + i] +=
// sum_q G[q, o] X[q, i] and bias_sums[o] += sum_q G[q, o] for o < n_out, i < n_in; G and X tile
// buffers with rows of n_out + 1 and n_in + 1. The bias is input n_in, whose X is 1. A thread sums an
// E x E square of weights (E = weight_gradient_edge): outputs o0 .. o0 + E - 1 and inputs i0,
// i0 + groups, ... (groups = ceil((n_in + 1) / E)), thread t's square being (o0, i0) = (E (t / groups),
// t % groups). Per point a warp's lanes read consecutive inputs (no bank conflicts) and the values of
// a few groups of outputs (broadcasts, in different banks): 2 E loads for E^2 multiply-adds, where a
// thread per weight makes 2 for 1. Each weight's sum runs over the points in order, as a thread per weight's would.
template <class Block, typename acc_t>
DP_INLINE void weight_gradient_tile(const Block& block, const acc_t* G, int64_t n_out, const acc_t* X, int64_t n_in,
                                    int count, acc_t* weight_sums, acc_t* bias_sums) {
  constexpr int E = weight_gradient_edge<acc_t>();
  // int offsets: a tile's buffers are small (shared memory), and 64-bit ones cost the backward registers
  const int outputs = static_cast<int>(n_out), inputs = static_cast<int>(n_in);
  const int groups = (inputs + 1 + E - 1) / E, squares = (outputs + E - 1) / E * groups;
  for (int t = block.thread(); t < squares; t += block.threads()) {
    const int o0 = t / groups * E, i0 = t % groups;
    acc_t sum[E][E];
    for (int a = 0; a < E; ++a)
      for (int b = 0; b < E; ++b) sum[a][b] = 0;
    for (int q = 0; q < count; ++q) {
      const acc_t *g_row = G + q * (outputs + 1), *x_row = X + q * (inputs + 1);
      acc_t x[E];
      for (int b = 0; b < E; ++b) {
        const int i = i0 + b * groups;
        x[b] = i < inputs ? x_row[i] : acc_t(i == inputs ? 1 : 0);
      }
      for (int a = 0; a < E; ++a) {
        const acc_t g = o0 + a < outputs ? g_row[o0 + a] : acc_t(0);
        for (int b = 0; b < E; ++b) sum[a][b] += g * x[b];
      }
    }
    for (int a = 0; a < E; ++a) {
      for (int b = 0; b < E; ++b) {
        const int o = o0 + a, i = i0 + b * groups;
        if (o < outputs && i < inputs) weight_sums[o * inputs + i] += sum[a][b];
        if (o < outputs && i == inputs) bias_sums[o] += sum[a][b];
      }
    }
  }
}

// The forward program of block `block_index` of `blocks`, with `s` its shared memory
// (io.l.total elements of acc_t). (io by value: a reference to the kernel's parameter made nvcc put
// a copy of it on the stack for float16.)
template <class Block, typename scalar_t, typename acc_t>
DP_INLINE void forward_block(const Block& block, int64_t block_index, int64_t blocks, acc_t* s,
                             const ForwardIo<scalar_t> io) {
  const triplane::Problem& p = io.p;
  const Layout& l = io.l;
  load_weights_transposed(block, s, l, io.w1, io.b1, io.w2, io.b2);
  const int64_t tiles_per_element = ceil_div(p.N, l.tile);
  const int tiles = static_cast<int>(p.B * tiles_per_element);  // at most 2^30: tile_blocks checks
  for (int tile = static_cast<int>(block_index); tile < tiles; tile += static_cast<int>(blocks)) {
    const int64_t b = tile / tiles_per_element, first = tile % tiles_per_element * l.tile;
    const int count = tile_count(l.tile, first, p.N);
    block.sync();  // the weights are loaded, the previous tile's buffers are free
    sample_tile(block, io.planes, io.points, p, l, b, first, count, s + l.F);
    block.sync();
    acc_t* H = s + l.H;
    dense_tile_transposed(block, static_cast<const acc_t*>(s + l.F), l.C, s + l.w1, s + l.b1, l.K, l.K1, l.tile,
                          [&](int q, int64_t k, acc_t a) { H[q * (l.K + 1) + k] = softplus(a); });
    block.sync();
    scalar_t* out_tile = io.out + (b * p.N + first) * l.O;
    dense_tile_transposed(block, static_cast<const acc_t*>(H), l.K, s + l.w2, s + l.b2, l.O, l.O1, l.tile,
                          [&](int q, int64_t o, acc_t x) {
                            if (q < count) out_tile[q * l.O + o] = static_cast<scalar_t>(output_value(x, o));
                          });
  }
}

// The backward program of block `block_index` of `blocks`: recomputes each tile's forward, back-
// propagates through the MLP, adds the plane gradient atomically, writes the point gradients, and
// at the end writes the block's weight-gradient sums to io.partials[block_index].
template <class Block, typename scalar_t, typename acc_t>
DP_INLINE void backward_block(const Block& block, int64_t block_index, int64_t blocks, acc_t* s,
                              const BackwardIo<scalar_t, acc_t>& io) {
  const triplane::Problem& p = io.p;
  const Layout& l = io.l;
  acc_t *F = s + l.F, *A = s + l.A, *H = s + l.H, *GX = s + l.GX, *sums = s + l.sums;
  load_weights_transposed(block, s, l, io.w1, io.b1, io.w2, io.b2);
  for (int64_t i = block.thread(); i < l.weights; i += block.threads()) sums[i] = 0;
  const acc_t scale = static_cast<acc_t>(p.scale), third = acc_t(1) / acc_t(triplane::kPlanes);
  const acc_t dx_dpoint = triplane::pixel_per_point(p.W, scale) * third;
  const acc_t dy_dpoint = triplane::pixel_per_point(p.H, scale) * third;
  const int lane = block.thread() % block.lanes(), warps = block.threads() / block.lanes();
  const int64_t tiles_per_element = ceil_div(p.N, l.tile);
  const int tiles = static_cast<int>(p.B * tiles_per_element);  // at most 2^30: tile_blocks checks
  for (int tile = static_cast<int>(block_index); tile < tiles; tile += static_cast<int>(blocks)) {
    const int64_t b = tile / tiles_per_element, first = tile % tiles_per_element * l.tile;
    const int count = tile_count(l.tile, first, p.N);
    const scalar_t* grad_tile = io.grad_out + (b * p.N + first) * l.O;
    block.sync();
    sample_tile(block, io.planes, io.points, p, l, b, first, count, F);
    block.sync();
    // The forward again: A = F W1^T + b1, H = softplus(A); then GX, the raw outputs' gradient.
    dense_tile_transposed(block, static_cast<const acc_t*>(F), l.C, s + l.w1, s + l.b1, l.K, l.K1, l.tile,
                          [&](int q, int64_t k, acc_t a) {
                            A[q * (l.K + 1) + k] = a;
                            H[q * (l.K + 1) + k] = softplus(a);
                          });
    block.sync();
    dense_tile_transposed(block, static_cast<const acc_t*>(H), l.K, s + l.w2, s + l.b2, l.O, l.O1, l.tile,
                          [&](int q, int64_t o, acc_t x) {
                            const acc_t g = q < count ? static_cast<acc_t>(grad_tile[q * l.O + o]) : acc_t(0);
                            GX[q * (l.O + 1) + o] = q < count ? raw_gradient(x, g, o) : acc_t(0);
                          });
    block.sync();
    // gw2[o, k] += sum_q GX[q, o] H[q, k] and gb2; A <- GA = (GX W2) * softplus'(A). Neither reads
    // what the other writes.
    weight_gradient_tile(block, static_cast<const acc_t*>(GX), l.O, static_cast<const acc_t*>(H), l.K, count,
                         sums + l.gw2, sums + l.gb2);
    // GX W2: the staged w2 (K1, O1) holds W2's columns as rows.
    dense_tile_rows(block, static_cast<const acc_t*>(GX), l.O, s + l.w2, l.K, l.O1, l.tile,
                    [&](int q, int64_t k, acc_t sum) {
                      acc_t& a = A[q * (l.K + 1) + k];
                      a = sum * softplus_grad(a);
                    });
    block.sync();
    const acc_t* GA = A;
    // gw1[k, c] += sum_q GA[q, k] F[q, c] and gb1.
    weight_gradient_tile(block, GA, l.K, static_cast<const acc_t*>(F), l.C, count, sums, sums + l.gb1);
    block.sync();
    // F <- GF = GA W1: the features' gradient (the staged w1 (C1, K1) holds W1's columns as rows).
    dense_tile_rows(block, GA, l.K, s + l.w1, l.C, l.K1, l.tile,
                    [&](int q, int64_t c, acc_t sum) { F[q * (l.C + 1) + c] = sum; });
    block.sync();
    // Per point (a warp, lanes over channels): the plane gradient's atomic adds and the point gradient.
    for (int q = block.thread() / block.lanes(); q < count; q += warps) {
      const int64_t i = b * p.N + first + q;
      acc_t point[3];
      load_point(io.points, i, point);
      acc_t grad[3] = {0, 0, 0};
      for (int plane = 0; plane < triplane::kPlanes; ++plane) {
        const auto taps = triplane::plane_taps(point, p.axes, plane, scale, p.H, p.W);
        if (!taps.in_bounds && taps.finite) continue;  // the same for every lane of the warp
        const int64_t plane_offset = (b * triplane::kPlanes + plane) * p.H * p.W * p.C;
        acc_t d_dx = 0, d_dy = 0;
        for (int64_t c = lane; c < p.C && taps.in_bounds; c += block.lanes()) {
          const acc_t g = F[q * (l.C + 1) + c];
          acc_t v[2][2] = {{0, 0}, {0, 0}};
          for (int dy = 0; dy < 2; ++dy) {
            for (int dx = 0; dx < 2; ++dx) {
              if (!taps.valid(dy, dx)) continue;
              const int64_t at = plane_offset + ((taps.y0 + dy) * p.W + taps.x0 + dx) * p.C + c;
              v[dy][dx] = static_cast<acc_t>(io.planes[at]);
              if (io.grad_planes != nullptr) block.add(io.grad_planes + at, taps.weight(dy, dx) * third * g);
            }
          }
          acc_t cx, cy;
          triplane::bilinear_position_grad(taps, v[0][0], v[0][1], v[1][0], v[1][1], cx, cy);
          d_dx += g * cx;
          d_dy += g * cy;
        }
        d_dx = block.warp_sum(d_dx), d_dy = block.warp_sum(d_dy);
        if (!taps.finite) d_dx = d_dy = NAN;
        triplane::add_to_coordinate(grad, p.axes[2 * plane], d_dx * dx_dpoint);
        triplane::add_to_coordinate(grad, p.axes[2 * plane + 1], d_dy * dy_dpoint);
      }
      if (io.grad_points != nullptr && lane == 0)
        for (int k = 0; k < 3; ++k) io.grad_points[i * 3 + k] = static_cast<scalar_t>(grad[k]);
    }
  }
  block.sync();
  for (int64_t idx = block.thread(); idx < l.weights; idx += block.threads())
    io.partials[block_index * l.weights + idx] = sums[idx];
}

// Weight gradient e: the sum over blocks, in block order, of partials[block, e] (count per block).
template <typename acc_t>
DP_INLINE acc_t sum_partials(const acc_t* partials, int64_t blocks, int64_t count, int64_t e) {
  acc_t sum = 0;
  for (int64_t block = 0; block < blocks; ++block) sum += partials[block * count + e];
  return sum;
}

}  // namespace tiles
}  // namespace decoder
}  // namespace dreamportrait
