// The tiled schedule of the CUDA gated_cross_attention kernels, written once for the GPU and for
// a host emulation of it (csrc/cpu/tile_emulation.cpp, tested on CPU against the reference).
//
// A block of kThreads threads works on tiles held in shared memory:
//   forward   one (batch, head) and a few consecutive tiles of block_q query rows; per query
//             tile it loops over key tiles of block_k keys with an online softmax: S = Q K^T,
//             P = softmax step, O += P V (K and V are staged once when they fit one key tile).
//   backward  one (batch, head), one key tile and every splits-th query tile: per query tile
//             S = Q K^T and dP = dO V^T give P and dS; dV += P^T dO and dK += dS^T Q stay in shared
//             memory and are written once per block (a per-split partial, summed on the host in a
//             fixed order); dQ = dS K is written per (query tile, key tile) as a per-key-tile
//             partial. delta = tanh(g) dO . A per row (A: the attention before the gate) is
//             tanh(g) sum_j p_j dp_j: a block whose key tile holds every key (77 text tokens
//             do) forms it from its own P and dP; with several key tiles a first pass (the
//             forward's schedule with dO instead of an output) gives it.
// Tiles are zero-padded to multiples of 16 (WMMA fragments): rows past Lq or Lk, columns past D,
// and the keys the mask hides (so their values, even NaN, add nothing).
// A head dim whose tiles do not fit shared memory is split into column chunks of block_d: each
// block then owns one chunk of the outputs (O; dQ, dK, dV), forms S = Q K^T and dP = dO V^T from
// every chunk in turn (staged one at a time, in a fixed order, so each block of a tile gets the
// same S and P) and stages its own chunk of V (Q, dO, K) for the products that output it.
//
// The code here is generic over a Block (thread index, thread count, barrier) and a Gemm (the
// tile product: tensor cores or scalar FMA on the GPU, scalar loops on the host); the block
// programs forward_tile and backward_tile are the same code in both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "dreamportrait/attention_math.h"
#include "dreamportrait/common.h"

namespace dreamportrait {
namespace attention {
namespace tiles {

constexpr int kFragment = 16;  // every tile edge is a multiple of a WMMA fragment's
constexpr int kThreads = 128;  // four warps per block

// Tile sizes of one launch: block_q query rows and block_k keys (multiples of 16), the head
// dimension D rounded up to 16 and the columns of it a tile holds, block_d (a multiple of 16;
// dim when the head dim is not split).
struct Shape {
  int block_q, block_k, dim, block_d;
};

// The column chunks of the head dim, and the width of chunk c (the last may be narrower).
DP_INLINE int column_parts(const Shape& t) { return static_cast<int>(ceil_div(t.dim, t.block_d)); }
DP_INLINE int chunk_cols(const Shape& t, int c) {
  return t.dim - c * t.block_d < t.block_d ? t.dim - c * t.block_d : t.block_d;
}

// Row stride in elements of a tile with `cols` columns: 16 bytes of padding keep every row start
// 16-byte aligned (WMMA's ldm rule; 16-row steps are then 256-bit aligned) and shift consecutive
// rows by four banks.
DP_INLINE int row_stride(int cols, int element_bytes) { return cols + 16 / element_bytes; }

// Byte offsets of the buffers of one block's shared memory, each 128-byte aligned. (32-bit: the
// GPU keeps the offsets in uniform registers, of which it has few.)
struct Arena {
  uint32_t bytes = 0;
  DP_INLINE uint32_t take(size_t size) {
    const uint32_t at = bytes;
    bytes = static_cast<uint32_t>((bytes + size + 127) / 128 * 128);
    return at;
  }
};

// The forward's shared memory; e: element bytes of q, k, v; a: of the accumulation type.
//   q (block_q, block_d)  k, v (block_k, block_d)  s (block_q, block_k) scores, then weights, in
//   acc_t  p (block_q, block_k) weights in q's type (the P V operand)  o (block_q, block_d) acc_t
//   state, factor (block_q) per-row softmax and output factor  key_ok (block_k) attended keys
struct ForwardLayout {
  int ld_d, ld_k, ld_d_acc, ld_k_acc;
  uint32_t q, k, v, s, p, o, state, factor, key_ok, bytes;
};

template <typename acc_t>
DP_INLINE ForwardLayout forward_layout(const Shape& t, int e) {
  const int a = sizeof(acc_t);
  ForwardLayout l;
  l.ld_d = row_stride(t.block_d, e);
  l.ld_k = row_stride(t.block_k, e);
  l.ld_d_acc = row_stride(t.block_d, a);
  l.ld_k_acc = row_stride(t.block_k, a);
  Arena arena;
  l.q = arena.take(size_t(t.block_q) * l.ld_d * e);
  l.k = arena.take(size_t(t.block_k) * l.ld_d * e);
  l.v = arena.take(size_t(t.block_k) * l.ld_d * e);
  l.s = arena.take(size_t(t.block_q) * l.ld_k_acc * a);
  l.p = arena.take(size_t(t.block_q) * l.ld_k * e);
  l.o = arena.take(size_t(t.block_q) * l.ld_d_acc * a);
  l.state = arena.take(size_t(t.block_q) * sizeof(OnlineSoftmax<acc_t>));
  l.factor = arena.take(size_t(t.block_q) * a);
  l.key_ok = arena.take(size_t(t.block_k));
  l.bytes = arena.bytes;
  return l;
}

// The backward's shared memory:
//   k, v (block_k, block_d)  q, dout (block_q, block_d)  s, dp (block_q, block_k) acc_t, whose
//   space dq (block_q, block_d) acc_t reuses once P and dS are formed  p, ds (block_q, block_k) in
//   q's type  dk, dv (block_k, block_d) acc_t  lse, delta (block_q)  key_ok (block_k)
struct BackwardLayout {
  int ld_d, ld_k, ld_d_acc, ld_k_acc;
  uint32_t k, v, q, dout, s, dp, dq, p, ds, dk, dv, lse, delta, key_ok, bytes;
};

template <typename acc_t>
DP_INLINE BackwardLayout backward_layout(const Shape& t, int e) {
  const int a = sizeof(acc_t);
  BackwardLayout l;
  l.ld_d = row_stride(t.block_d, e);
  l.ld_k = row_stride(t.block_k, e);
  l.ld_d_acc = row_stride(t.block_d, a);
  l.ld_k_acc = row_stride(t.block_k, a);
  Arena arena;
  l.k = arena.take(size_t(t.block_k) * l.ld_d * e);
  l.v = arena.take(size_t(t.block_k) * l.ld_d * e);
  l.q = arena.take(size_t(t.block_q) * l.ld_d * e);
  l.dout = arena.take(size_t(t.block_q) * l.ld_d * e);
  const size_t scores = size_t(t.block_q) * l.ld_k_acc * a, dq = size_t(t.block_q) * l.ld_d_acc * a;
  l.s = l.dq = arena.take(2 * scores > dq ? 2 * scores : dq);
  l.dp = l.s + static_cast<uint32_t>(scores);
  l.p = arena.take(size_t(t.block_q) * l.ld_k * e);
  l.ds = arena.take(size_t(t.block_q) * l.ld_k * e);
  l.dk = arena.take(size_t(t.block_k) * l.ld_d_acc * a);
  l.dv = arena.take(size_t(t.block_k) * l.ld_d_acc * a);
  l.lse = arena.take(size_t(t.block_q) * a);
  l.delta = arena.take(size_t(t.block_q) * a);
  l.key_ok = arena.take(size_t(t.block_k));
  l.bytes = arena.bytes;
  return l;
}

// The tile sizes for a launch: keys per tile as many as the head has (rounded up to 16, at most
// 128), queries 64, 32 or 16, the largest combination of which two blocks fit an SM (half of the
// per-block `limit`, less the 1 KiB the system reserves per block), else one. The whole head dim
// in a tile when some combination fits; else it is split into the fewest column chunks that fit
// (splitting repeats the score products in every chunk's block, so it comes last). 16 x 16 x 16
// tiles take under 23 KiB in every type, so only a `limit` below that gets block_q 0.
template <typename acc_t>
inline Shape choose_shape(bool backward, int64_t Lk, int64_t D, int element_bytes, size_t limit) {
  constexpr size_t kReserved = 1024;
  const int dim = round_up(D > 0 ? D : 1, kFragment);
  const int most_keys = round_up(Lk < 1 ? 1 : (Lk > 128 ? 128 : Lk), kFragment);
  for (int parts = 1; parts <= dim / kFragment; ++parts) {
    const int block_d = round_up(ceil_div(dim, parts), kFragment);
    if (ceil_div(dim, block_d) != parts) continue;  // the same chunks as fewer parts
    for (const size_t budget : {limit / 2 > kReserved ? limit / 2 - kReserved : 0, limit}) {
      for (int block_k = most_keys; block_k >= kFragment; block_k -= kFragment) {
        for (const int block_q : {64, 32, 16}) {
          const Shape shape{block_q, block_k, dim, block_d};
          const size_t bytes = backward ? backward_layout<acc_t>(shape, element_bytes).bytes
                                        : forward_layout<acc_t>(shape, element_bytes).bytes;
          if (bytes <= budget) return shape;
        }
      }
    }
  }
  return {0, 0, dim, dim};
}

// ---- The tile product -----------------------------------------------------------------------
// C (M, N) = [C +] A (M, K) B (K, N), M, N, K multiples of 16. An operand is stored row-major
// (element (i, k) at [i * ld + k]) or column-major ([k * ld + i]): the transposes the kernels
// need (K^T, V^T, P^T, dS^T) are column-major views of row-major tiles.
struct RowMajor {
  static DP_INLINE int at(int row, int col, int ld) { return row * ld + col; }
};
struct ColMajor {
  static DP_INLINE int at(int row, int col, int ld) { return col * ld + row; }
};

// The exact product: threads own output elements (float32 without TF32, float64 on the GPU;
// every type on the host).
struct ScalarGemm {
  template <class LayoutA, class LayoutB, class Block, typename acc_t, typename in_t>
  static DP_INLINE void run(const Block& block, acc_t* c, int ldc, const in_t* a, int lda, const in_t* b, int ldb,
                            int M, int N, int K, bool accumulate) {
    for (int e = block.thread(); e < M * N; e += block.threads()) {
      const int i = e / N, j = e % N;
      acc_t sum = accumulate ? c[i * ldc + j] : acc_t(0);
      for (int k = 0; k < K; ++k)
        sum += static_cast<acc_t>(a[LayoutA::at(i, k, lda)]) * static_cast<acc_t>(b[LayoutB::at(k, j, ldb)]);
      c[i * ldc + j] = sum;
    }
  }
};

// ---- Per-row steps --------------------------------------------------------------------------

// Adds one key tile to a query row's online softmax. `s` holds the tile's products q . k_j and
// becomes scale * q . k_j; `p` receives the weights exp(score - new maximum) in the P V operand's
// type (0 for keys not attended). Returns the factor the row's accumulated output must be
// multiplied by (it was relative to the old maximum). A NaN score becomes the maximum, so NaN
// reaches every output of the row, as in OnlineSoftmax::add.
template <typename acc_t, typename p_t>
DP_INLINE acc_t softmax_tile_row(OnlineSoftmax<acc_t>& row, acc_t* s, p_t* p, const unsigned char* key_ok,
                                 int block_k, acc_t scale) {
  acc_t tile_max = -std::numeric_limits<acc_t>::infinity();
  bool any = false;
  for (int j = 0; j < block_k; ++j) {
    if (!key_ok[j]) continue;
    const acc_t score = scale * s[j];
    s[j] = score;
    if (score > tile_max || score != score) tile_max = score;
    any = true;
  }
  if (!any) {  // every key of the tile masked: the row is unchanged
    for (int j = 0; j < block_k; ++j) p[j] = p_t(0);
    return acc_t(1);
  }
  const acc_t new_max = (tile_max > row.max || tile_max != tile_max) ? tile_max : row.max;
  const acc_t rescale = row.any ? std::exp(row.max - new_max) : acc_t(0);
  acc_t sum = 0;
  for (int j = 0; j < block_k; ++j) {
    const acc_t weight = key_ok[j] ? std::exp(s[j] - new_max) : acc_t(0);
    p[j] = static_cast<p_t>(weight);
    sum += weight;
  }
  row.sum = row.sum * rescale + sum;
  row.max = new_max;
  row.any = true;
  return rescale;
}

// One query row of a (query tile, key tile) pair in the backward. From s_j = q . k_j (replaced by
// p_j), dp_j = dO . v_j and the row's log-sum-exp it forms the weights p_j and scale * ds_j,
// ds_j = p_j (tanh(g) dp_j - delta), in the products' type; 0 for keys not attended and for padding
// rows (lse -inf). delta is given (from the first pass), or, when the tile holds every key of the
// row (`delta_from_tile`), formed here: delta = tanh(g) sum_j p_j dp_j = tanh(g) dO . A. Returns
// sum_j p_j dp_j, which is then dO . A, the row's share of the gate's gradient.
template <typename acc_t, typename p_t>
DP_INLINE acc_t gradient_tile_row(acc_t* s, const acc_t* dp, p_t* p, p_t* ds, const unsigned char* key_ok,
                                  int block_k, acc_t scale, acc_t lse, acc_t gate_value, acc_t delta,
                                  bool delta_from_tile) {
  acc_t dot = 0;
  for (int j = 0; j < block_k; ++j) {
    const acc_t prob = key_ok[j] ? probability(scale * s[j], lse) : acc_t(0);
    s[j] = prob;
    if (prob != acc_t(0)) dot += prob * dp[j];
  }
  if (delta_from_tile) delta = gate_value * dot;
  for (int j = 0; j < block_k; ++j) {
    const acc_t prob = s[j];
    p[j] = static_cast<p_t>(prob);
    ds[j] = static_cast<p_t>(prob == acc_t(0) ? acc_t(0) : scale * score_grad(prob, gate_value * dp[j], delta));
  }
  return dot;
}

// ---- Staging --------------------------------------------------------------------------------

// 16 bytes, the widest load a thread makes.
struct alignas(16) Bytes16 {
  uint32_t words[4];
};

// dst (rows, cols) with row stride ld <- rows row0.. and columns col0.. of src (n_rows, D)
// row-major (col0 and cols multiples of 16). Rows past n_rows, columns past D and rows with
// row_ok[r] == 0 are zero. Consecutive threads take consecutive 16-byte pieces of a row when every
// row of src starts 16-byte aligned (D a multiple of 16 bytes' elements, src aligned), else
// consecutive elements: coalesced loads either way. (dst's rows are 16-byte aligned: cols is a
// multiple of 16 and ld adds 16 bytes.)
template <class Block, typename T>
DP_INLINE void stage_rows(const Block& block, T* dst, int ld, const T* src, int64_t row0, int64_t n_rows, int rows,
                          int D, int col0, int cols, const unsigned char* row_ok) {
  constexpr int kPiece = sizeof(Bytes16) / sizeof(T) > 0 ? int(sizeof(Bytes16) / sizeof(T)) : 1;
  if (D % kPiece == 0 && reinterpret_cast<uintptr_t>(src) % sizeof(Bytes16) == 0) {
    const int pieces = cols / kPiece;
    for (int e = block.thread(); e < rows * pieces; e += block.threads()) {
      const int r = e / pieces, d = e % pieces * kPiece;
      const bool inside = row0 + r < n_rows && col0 + d < D && (row_ok == nullptr || row_ok[r]);
      Bytes16 piece{{0, 0, 0, 0}};
#ifdef __CUDA_ARCH__
      if (inside) piece = *reinterpret_cast<const Bytes16*>(src + (row0 + r) * D + col0 + d);
      *reinterpret_cast<Bytes16*>(dst + r * ld + d) = piece;
#else
      if (inside) std::memcpy(&piece, src + (row0 + r) * D + col0 + d, sizeof(piece));
      std::memcpy(dst + r * ld + d, &piece, sizeof(piece));
#endif
    }
    return;
  }
  for (int e = block.thread(); e < rows * cols; e += block.threads()) {
    const int r = e / cols, d = e % cols;
    const bool inside = row0 + r < n_rows && col0 + d < D && (row_ok == nullptr || row_ok[r]);
    dst[r * ld + d] = inside ? src[(row0 + r) * D + col0 + d] : T(0);
  }
}

// dst (rows, cols) with row stride ld <- value(r, d), with 16-byte stores where dst's rows are
// 16-byte aligned.
template <class Block, typename T, class Value>
DP_INLINE void write_rows(const Block& block, T* dst, int rows, int cols, int ld, Value value) {
  constexpr int kPiece = sizeof(Bytes16) / sizeof(T) > 0 ? int(sizeof(Bytes16) / sizeof(T)) : 1;
  if (cols % kPiece == 0 && ld % kPiece == 0 && reinterpret_cast<uintptr_t>(dst) % sizeof(Bytes16) == 0) {
    const int pieces = cols / kPiece;
    for (int e = block.thread(); e < rows * pieces; e += block.threads()) {
      const int r = e / pieces, d = e % pieces * kPiece;
      T values[kPiece];
      for (int i = 0; i < kPiece; ++i) values[i] = value(r, d + i);
      Bytes16 piece;
      std::memcpy(&piece, values, sizeof(piece));
#ifdef __CUDA_ARCH__
      *reinterpret_cast<Bytes16*>(dst + int64_t(r) * ld + d) = piece;
#else
      std::memcpy(dst + int64_t(r) * ld + d, &piece, sizeof(piece));
#endif
    }
    return;
  }
  for (int e = block.thread(); e < rows * cols; e += block.threads())
    dst[int64_t(e / cols) * ld + e % cols] = value(e / cols, e % cols);
}

// key_ok[j]: whether key key0 + j exists and the mask row (null: attend to all) lets it be attended.
template <class Block>
DP_INLINE void stage_keys(const Block& block, unsigned char* key_ok, const bool* mask_row, int64_t key0, int64_t Lk,
                          int block_k) {
  for (int j = block.thread(); j < block_k; j += block.threads())
    key_ok[j] = key0 + j < Lk && (mask_row == nullptr || mask_row[key0 + j]);
}

// ---- Block programs -------------------------------------------------------------------------

// Pointers of a forward launch (contiguous tensors, layouts as in attention_math.h). With
// grad_out null it writes out (B, H, Lq, D) and lse (B, H, Lq); with grad_out set (the backward's
// first pass) it writes gate_dot = dO . A (parts, B, H, Lq) instead, each column chunk's share.
// A block takes tiles_per_block consecutive query tiles of one head and one column chunk.
template <typename scalar_t, typename acc_t>
struct ForwardIo {
  Problem p;
  Shape shape;
  int64_t query_tiles, tiles_per_block;
  const scalar_t *q, *k, *v, *gate;
  const bool* mask;
  const scalar_t* grad_out;
  scalar_t* out;
  acc_t *lse, *gate_dot;
};

DP_INLINE int64_t forward_blocks_per_head(int64_t query_tiles, int64_t tiles_per_block) {
  return ceil_div(query_tiles, tiles_per_block);
}

// Block `tile` = (bh * blocks per head + i) * parts + part: query tiles i * tiles_per_block, ...
// and column chunk `part` of the output. When the head's keys fit one key tile (77 text tokens
// do) and its columns one chunk, K and V are staged once for all of them. (Index arithmetic is
// 32-bit where it can be: a 64-bit division is a call on the GPU.)
template <class Gemm, class Block, typename scalar_t, typename acc_t>
DP_INLINE void forward_tile(const Block& block, unsigned char* smem, const ForwardIo<scalar_t, acc_t>& io, int tile) {
  const Problem& p = io.p;
  const Shape& t = io.shape;
  const ForwardLayout l = forward_layout<acc_t>(t, sizeof(scalar_t));
  scalar_t *q = reinterpret_cast<scalar_t*>(smem + l.q), *k = reinterpret_cast<scalar_t*>(smem + l.k),
           *v = reinterpret_cast<scalar_t*>(smem + l.v), *pw = reinterpret_cast<scalar_t*>(smem + l.p);
  acc_t *s = reinterpret_cast<acc_t*>(smem + l.s), *o = reinterpret_cast<acc_t*>(smem + l.o),
        *factor = reinterpret_cast<acc_t*>(smem + l.factor);
  OnlineSoftmax<acc_t>* state = reinterpret_cast<OnlineSoftmax<acc_t>*>(smem + l.state);
  unsigned char* key_ok = smem + l.key_ok;

  const int query_tiles = static_cast<int>(io.query_tiles), per_block = static_cast<int>(io.tiles_per_block);
  const int blocks_per_head = static_cast<int>(forward_blocks_per_head(io.query_tiles, io.tiles_per_block));
  const int parts = column_parts(t), part = tile % parts, col0 = part * t.block_d, cols = chunk_cols(t, part);
  const int heads = static_cast<int>(p.H), D = static_cast<int>(p.D);
  const int bh = tile / parts / blocks_per_head, b = bh / heads, h = bh % heads;
  const int first_tile = tile / parts % blocks_per_head * per_block;
  const int end_tile = first_tile + per_block < query_tiles ? first_tile + per_block : query_tiles;
  const bool* mask_row = p.has_mask ? io.mask + b * p.Lk : nullptr;
  const scalar_t* head_q = io.q + bh * p.Lq * p.D;
  const scalar_t* head_k = io.k + bh * p.Lk * p.D;
  const scalar_t* head_v = io.v + bh * p.Lk * p.D;
  const acc_t scale = static_cast<acc_t>(p.scale), gate_value = std::tanh(static_cast<acc_t>(io.gate[h]));
  const bool resident = p.Lk <= t.block_k && parts == 1;  // K and V staged once for every query tile

  if (resident) {
    stage_keys(block, key_ok, mask_row, 0, p.Lk, t.block_k);
    block.sync();
    stage_rows(block, k, l.ld_d, head_k, 0, p.Lk, t.block_k, D, 0, cols, key_ok);
    stage_rows(block, v, l.ld_d, head_v, 0, p.Lk, t.block_k, D, 0, cols, key_ok);
  }

  for (int query_tile = first_tile; query_tile < end_tile; ++query_tile) {
    const int64_t row0 = int64_t(query_tile) * t.block_q;
    block.sync();  // the previous query tile's epilogue has read q, o, state and factor
    if (parts == 1) stage_rows(block, q, l.ld_d, head_q, row0, p.Lq, t.block_q, D, 0, cols, nullptr);
    if (p.Lk == 0) {  // no key tile writes o
      for (int e = block.thread(); e < t.block_q * cols; e += block.threads())
        o[e / cols * l.ld_d_acc + e % cols] = acc_t(0);
    }
    for (int r = block.thread(); r < t.block_q; r += block.threads()) state[r] = OnlineSoftmax<acc_t>();

    for (int64_t key0 = 0; key0 < p.Lk; key0 += t.block_k) {
      if (!resident) {
        block.sync();  // the previous key tile's P V has read k, v and p
        stage_keys(block, key_ok, mask_row, key0, p.Lk, t.block_k);
        block.sync();
      }
      // S = Q K^T, chunk after chunk of the head dim (one chunk unless it is split).
      for (int c = 0; c < parts; ++c) {
        if (!resident) {
          if (c > 0) block.sync();  // the previous chunk's product has read q and k
          if (parts > 1) stage_rows(block, q, l.ld_d, head_q, row0, p.Lq, t.block_q, D, c * t.block_d,
                                    chunk_cols(t, c), nullptr);
          stage_rows(block, k, l.ld_d, head_k, key0, p.Lk, t.block_k, D, c * t.block_d, chunk_cols(t, c), key_ok);
        }
        block.sync();
        Gemm::template run<RowMajor, ColMajor>(block, s, l.ld_k_acc, q, l.ld_d, k, l.ld_d, t.block_q, t.block_k,
                                               chunk_cols(t, c), c > 0);
      }
      if (!resident) stage_rows(block, v, l.ld_d, head_v, key0, p.Lk, t.block_k, D, col0, cols, key_ok);
      block.sync();
      for (int r = block.thread(); r < t.block_q; r += block.threads())
        factor[r] = softmax_tile_row(state[r], s + r * l.ld_k_acc, pw + r * l.ld_k, key_ok, t.block_k, scale);
      block.sync();
      if (key0 > 0) {  // the first key tile's P V sets o instead of rescaling and adding to it
        for (int e = block.thread(); e < t.block_q * cols; e += block.threads())
          o[e / cols * l.ld_d_acc + e % cols] *= factor[e / cols];
        block.sync();
      }
      Gemm::template run<RowMajor, RowMajor>(block, o, l.ld_d_acc, pw, l.ld_k, v, l.ld_d, t.block_q, cols,
                                             t.block_k, key0 > 0);
    }
    block.sync();
    // o / sum is A, the attention before the gate; 0 for a row that attended to nothing.
    for (int r = block.thread(); r < t.block_q; r += block.threads())
      factor[r] = state[r].empty() ? acc_t(0) : acc_t(1) / state[r].sum;
    const int rows = p.Lq - row0 < t.block_q ? static_cast<int>(p.Lq - row0) : t.block_q;
    const int64_t first = bh * p.Lq + row0;  // global index of the tile's first row
    if (io.grad_out == nullptr) {
      block.sync();
      const int out_cols = D - col0 < cols ? D - col0 : cols;
      write_rows(block, io.out + first * p.D + col0, rows, out_cols, D, [&](int r, int d) {
        return static_cast<scalar_t>(gate_value * (o[r * l.ld_d_acc + d] * factor[r]));
      });
      if (part == 0)
        for (int r = block.thread(); r < rows; r += block.threads()) io.lse[first + r] = state[r].log_sum_exp();
    } else {
      // The backward's first pass: dO into q's space (no longer read), then one row per thread.
      stage_rows(block, q, l.ld_d, io.grad_out + bh * p.Lq * p.D, row0, p.Lq, t.block_q, D, col0, cols, nullptr);
      block.sync();
      for (int r = block.thread(); r < rows; r += block.threads()) {
        acc_t dot = 0;
        for (int d = 0; d < cols; ++d)
          dot += static_cast<acc_t>(q[r * l.ld_d + d]) * (o[r * l.ld_d_acc + d] * factor[r]);
        io.gate_dot[part * p.B * p.H * p.Lq + first + r] = dot;
      }
    }
  }
}

// Pointers of the backward's main launch. dq_partial (key_tiles, B, H, Lq, D), dk_partial and
// dv_partial (splits, B, H, Lk, D), all acc_t: summed over their first dimension on the host;
// each block writes its column chunk of them. With one key tile the blocks form delta themselves
// and write gate_dot = dO . A (B, H, Lq); with several, the first pass has given delta and gate_dot.
template <typename scalar_t, typename acc_t>
struct BackwardIo {
  Problem p;
  Shape shape;
  int64_t query_tiles, key_tiles, splits;
  const scalar_t *grad_out, *q, *k, *v, *gate;
  const bool* mask;
  const acc_t *lse, *delta;
  acc_t *dq_partial, *dk_partial, *dv_partial, *gate_dot;
};

// Block `tile` = ((bh * splits + split) * key_tiles + key tile) * parts + part: query tiles split,
// split + splits, ... and column chunk `part` of the gradients.
template <class Gemm, class Block, typename scalar_t, typename acc_t>
DP_INLINE void backward_tile(const Block& block, unsigned char* smem, const BackwardIo<scalar_t, acc_t>& io, int tile) {
  const Problem& p = io.p;
  const Shape& t = io.shape;
  const BackwardLayout l = backward_layout<acc_t>(t, sizeof(scalar_t));
  scalar_t *k = reinterpret_cast<scalar_t*>(smem + l.k), *v = reinterpret_cast<scalar_t*>(smem + l.v),
           *q = reinterpret_cast<scalar_t*>(smem + l.q), *dout = reinterpret_cast<scalar_t*>(smem + l.dout),
           *pw = reinterpret_cast<scalar_t*>(smem + l.p), *ds = reinterpret_cast<scalar_t*>(smem + l.ds);
  acc_t *s = reinterpret_cast<acc_t*>(smem + l.s), *dp = reinterpret_cast<acc_t*>(smem + l.dp),
        *dq = reinterpret_cast<acc_t*>(smem + l.dq), *dk = reinterpret_cast<acc_t*>(smem + l.dk),
        *dv = reinterpret_cast<acc_t*>(smem + l.dv), *lse = reinterpret_cast<acc_t*>(smem + l.lse),
        *delta = reinterpret_cast<acc_t*>(smem + l.delta);
  unsigned char* key_ok = smem + l.key_ok;

  const int key_tiles = static_cast<int>(io.key_tiles), splits = static_cast<int>(io.splits);
  const int parts = column_parts(t), part = tile % parts, col0 = part * t.block_d, cols = chunk_cols(t, part);
  const int heads = static_cast<int>(p.H), D = static_cast<int>(p.D);
  const int index = tile / parts, key_tile = index % key_tiles, split = index / key_tiles % splits;
  const int bh = index / key_tiles / splits, b = bh / heads, h = bh % heads;
  const int out_cols = D - col0 < cols ? D - col0 : cols;  // the chunk's columns of the gradients
  const int64_t key0 = int64_t(key_tile) * t.block_k;
  const acc_t scale = static_cast<acc_t>(p.scale), gate_value = std::tanh(static_cast<acc_t>(io.gate[h]));
  const bool one_key_tile = key_tiles == 1;
  const scalar_t *head_q = io.q + bh * p.Lq * p.D, *head_dout = io.grad_out + bh * p.Lq * p.D,
                 *head_k = io.k + bh * p.Lk * p.D, *head_v = io.v + bh * p.Lk * p.D;

  stage_keys(block, key_ok, p.has_mask ? io.mask + b * p.Lk : nullptr, key0, p.Lk, t.block_k);
  block.sync();
  if (parts == 1) {  // K and V once for every query tile
    stage_rows(block, k, l.ld_d, head_k, key0, p.Lk, t.block_k, D, 0, cols, key_ok);
    stage_rows(block, v, l.ld_d, head_v, key0, p.Lk, t.block_k, D, 0, cols, key_ok);
  }
  for (int e = block.thread(); e < t.block_k * cols; e += block.threads()) {
    const int at = e / cols * l.ld_d_acc + e % cols;
    dk[at] = dv[at] = acc_t(0);
  }

  const int query_tiles = static_cast<int>(io.query_tiles);
  for (int query_tile = split; query_tile < query_tiles; query_tile += splits) {
    const int64_t row0 = int64_t(query_tile) * t.block_q, first = bh * p.Lq + row0;
    block.sync();  // the previous tile's products and dq copy are done
    for (int r = block.thread(); r < t.block_q; r += block.threads()) {
      const bool inside = row0 + r < p.Lq;
      lse[r] = inside ? io.lse[first + r] : -std::numeric_limits<acc_t>::infinity();
      delta[r] = inside && !one_key_tile ? io.delta[first + r] : acc_t(0);
    }
    // S = Q K^T and dP = dO V^T, chunk after chunk of the head dim; the last chunk staged stays for
    // the gradient products when it is the block's own.
    for (int c = 0; c < parts; ++c) {
      const int c0 = c * t.block_d, width = chunk_cols(t, c);
      if (c > 0) block.sync();  // the previous chunk's products have read q, dout, k and v
      stage_rows(block, q, l.ld_d, head_q, row0, p.Lq, t.block_q, D, c0, width, nullptr);
      stage_rows(block, dout, l.ld_d, head_dout, row0, p.Lq, t.block_q, D, c0, width, nullptr);
      if (parts > 1) {
        stage_rows(block, k, l.ld_d, head_k, key0, p.Lk, t.block_k, D, c0, width, key_ok);
        stage_rows(block, v, l.ld_d, head_v, key0, p.Lk, t.block_k, D, c0, width, key_ok);
      }
      block.sync();
      Gemm::template run<RowMajor, ColMajor>(block, s, l.ld_k_acc, q, l.ld_d, k, l.ld_d, t.block_q, t.block_k, width,
                                             c > 0);
      Gemm::template run<RowMajor, ColMajor>(block, dp, l.ld_k_acc, dout, l.ld_d, v, l.ld_d, t.block_q, t.block_k,
                                             width, c > 0);
    }
    if (part != parts - 1) {  // the block's own chunk of Q, dO and K
      block.sync();
      stage_rows(block, q, l.ld_d, head_q, row0, p.Lq, t.block_q, D, col0, cols, nullptr);
      stage_rows(block, dout, l.ld_d, head_dout, row0, p.Lq, t.block_q, D, col0, cols, nullptr);
      stage_rows(block, k, l.ld_d, head_k, key0, p.Lk, t.block_k, D, col0, cols, key_ok);
    }
    block.sync();
    for (int r = block.thread(); r < t.block_q; r += block.threads()) {
      const acc_t dot = gradient_tile_row(s + r * l.ld_k_acc, dp + r * l.ld_k_acc, pw + r * l.ld_k, ds + r * l.ld_k,
                                          key_ok, t.block_k, scale, lse[r], gate_value, delta[r], one_key_tile);
      if (one_key_tile && part == 0 && row0 + r < p.Lq) io.gate_dot[first + r] = dot;
    }
    block.sync();
    Gemm::template run<ColMajor, RowMajor>(block, dv, l.ld_d_acc, pw, l.ld_k, dout, l.ld_d, t.block_k, cols,
                                           t.block_q, true);
    Gemm::template run<ColMajor, RowMajor>(block, dk, l.ld_d_acc, ds, l.ld_k, q, l.ld_d, t.block_k, cols, t.block_q,
                                           true);
    Gemm::template run<RowMajor, RowMajor>(block, dq, l.ld_d_acc, ds, l.ld_k, k, l.ld_d, t.block_q, cols, t.block_k,
                                           false);
    block.sync();
    const int rows = p.Lq - row0 < t.block_q ? static_cast<int>(p.Lq - row0) : t.block_q;
    write_rows(block, io.dq_partial + (key_tile * p.B * p.H * p.Lq + first) * p.D + col0, rows, out_cols, D,
               [&](int r, int d) { return dq[r * l.ld_d_acc + d]; });
  }
  block.sync();
  // dV = tanh(g) sum_i p_i dO_i: the gate is applied once here rather than to every dO tile.
  const int keys = p.Lk - key0 < t.block_k ? static_cast<int>(p.Lk - key0) : t.block_k;
  const int64_t at = ((split * p.B * p.H + bh) * p.Lk + key0) * p.D + col0;
  write_rows(block, io.dk_partial + at, keys, out_cols, D, [&](int r, int d) { return dk[r * l.ld_d_acc + d]; });
  write_rows(block, io.dv_partial + at, keys, out_cols, D,
             [&](int r, int d) { return gate_value * dv[r * l.ld_d_acc + d]; });
}

// Query splits of the backward: enough blocks for `target_blocks` (a few per SM), at most one
// split per query tile.
DP_INLINE int64_t backward_splits(int64_t query_tiles, int64_t key_tiles, int64_t heads, int64_t target_blocks) {
  const int64_t per_split = key_tiles * heads;
  const int64_t splits = per_split > 0 ? ceil_div(target_blocks, per_split) : 1;
  return splits < 1 ? 1 : (splits > query_tiles ? (query_tiles > 0 ? query_tiles : 1) : splits);
}

}  // namespace tiles
}  // namespace attention
}  // namespace dreamportrait
