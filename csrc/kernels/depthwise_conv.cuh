// Depthwise block kernels (design.md 3.1): the forward conv (training: store a and per-tile
// BatchNorm statistics of act(a); eval: the whole block in one pass) and the backward's main
// pass (dx = dy + dwconv^T(da) with da recomputed on the fly, plus dW/dB partials).
//
// Both conv kernels share the same machinery:
//   * a block owns an output tile of Tile::TH x Tile::TW positions for Tile::CB channels;
//   * the input it needs (tile + halo) is staged in shared memory as float, zero-padded
//     ("same" padding), with 16-byte vector loads along C on the channels_last path;
//   * each thread computes Tile::RW outputs of one row from a register window that slides
//     along W (conv_strip), accumulating in fp32;
//   * kernel rows are processed in chunks of plan.row_chunk rows when the whole halo tile
//     would not fit the shared-memory budget (large k); for k = 3, 5, 7, 9 the chunk is the
//     whole kernel and the loops are unrolled at compile time (template argument K_);
//   * an input-side prologue (p.pro_scale != nullptr, design.md 3.3) stages z = act(x) * s + t
//     instead of x (load_tile_prologue), outside the FMA loops, in kernels of its own
//     (depthwise_{forward,backward}_prologue_kernel: the same bodies with PRO = true), so that the
//     default kernels are the code they were before the prologue: a runtime switch at staging cost
//     them 0.1-1.3% in sm_90 instructions (ptxas schedules and allocates the whole function).
// The backward's transposed conv is the same correlation run over the da tile with the
// flipped weights: dx[h, w] = sum_{i,j} w[i, j] * da[h + pt - i, w + pl - j].
// The activation (ActFn, common.cuh) and the forward's training/eval epilogue are template arguments of
// the default kernels: each instance holds only the code it runs (launchers dispatch once, on the host).
#pragma once

#include <type_traits>

#include "common.cuh"

namespace cmk {

// ------------------------------------------------------------------ tile machinery

// Which outputs a thread computes: channel c (within the block) and RW outputs of row `row`
// starting at column `col0` (both within the tile).
struct ThreadSlot {
  int c, strip, row, col0;
};

template <class Tile>
__device__ __forceinline__ ThreadSlot thread_slot(int tid) {
  ThreadSlot s;
  if (Tile::kChannelsLast) {  // lanes = channels, then strips of consecutive rows (see smem_row_width)
    s.c = tid % Tile::CB;
    s.strip = tid / Tile::CB;
    s.row = s.strip % Tile::TH;
    s.col0 = (s.strip / Tile::TH) * Tile::RW;
  } else {  // lanes = strips of one channel plane, strip index fastest along W
    s.c = tid / Tile::STRIPS;
    s.strip = tid % Tile::STRIPS;
    s.row = s.strip / Tile::S;
    s.col0 = (s.strip % Tile::S) * Tile::RW;
  }
  return s;
}

// A [CB][rows][width] float array in shared memory (stored [rows][width][CS] for channels_last,
// so that the lanes of a warp, which differ in the channel, hit different banks; CS = CB + 1
// for the weight tile, see weight_tile_floats).
template <class Tile, int CS = Tile::CB>
struct SmemTile {
  float* base;
  int width, rows;
  __device__ __forceinline__ float& at(int c, int q, int v) const {
    return Tile::kChannelsLast ? base[(q * width + v) * CS + c] : base[(c * rows + q) * width + v];
  }
  // at(c, q, v) for q * width + v = tap (the weight tile, whose width is KW)
  __device__ __forceinline__ float& at_tap(int c, int tap) const {
    return Tile::kChannelsLast ? base[tap * CS + c] : base[c * rows * width + tap];
  }
};

// The weight tile's type: channel stride CB + 1 on the channels_last path.
template <class Tile>
using WeightTile = SmemTile<Tile, Tile::kChannelsLast ? Tile::CB + 1 : Tile::CB>;

struct TilePos {
  int n, h0, w0;
};

__device__ __forceinline__ TilePos tile_pos(const ConvPlan& plan, int64_t tile) {
  const int tw = static_cast<int>(tile % plan.tiles_w);
  const int64_t rest = tile / plan.tiles_w;
  const int th = static_cast<int>(rest % plan.tiles_h);
  const int n = static_cast<int>(rest / plan.tiles_h);
  return {n, th * plan.tile_h, tw * plan.tile_w};
}

// Values staged into the x tile.
template <typename T>
struct InputValue {
  const T* data;
  Strided4 s;
  __device__ __forceinline__ float scalar(int n, int c, int h, int w) const {
    return to_float(data[offset(s, n, c, h, w)]);
  }
  __device__ __forceinline__ void vector(int n, int c, int h, int w, float (&out)[Vec16<T>::N]) const {
    load_vec(data + offset(s, n, c, h, w), out);
  }
};

// Values staged into the da tiles: da = dg * act'(a), dg from dy and act(a) (design.md 3.1).
// The per-channel coefficients come from a [4][cb] table in shared memory (coef_dy, coef_g,
// mean, coef_const of channels c0 ..), filled once per block by load_coefficients.
template <typename T, class ActFn>
struct GradPreactValue {
  const DepthwiseParams& p;
  const float* coef;
  int c0, cb;
  ActFn act;
  // k0..k3: the channel's coef_dy, coef_g, mean, coef_const
  __device__ __forceinline__ float at(float dy, float a, float k0, float k1, float k2, float k3) const {
    const ActPair g = act.both(a);
    float dg = k0 * dy;
    if (p.batch_stats_grad) dg += k1 * (g.g - k2) + k3;
    return dg * g.dg;
  }
  __device__ __forceinline__ float at(int c, float dy, float a) const {
    const int k = c - c0;
    return at(dy, a, coef[k], coef[cb + k], coef[2 * cb + k], coef[3 * cb + k]);
  }
  __device__ __forceinline__ float scalar(int n, int c, int h, int w) const {
    const float dy = to_float(static_cast<const T*>(p.dy.data)[offset(p.dy, n, c, h, w)]);
    const float a = to_float(static_cast<const T*>(p.a.data)[offset(p.a, n, c, h, w)]);
    return at(c, dy, a);
  }
  __device__ __forceinline__ void vector(int n, int c, int h, int w, float (&out)[Vec16<T>::N]) const {
    float dy[Vec16<T>::N], a[Vec16<T>::N];
    load_vec(static_cast<const T*>(p.dy.data) + offset(p.dy, n, c, h, w), dy);
    load_vec(static_cast<const T*>(p.a.data) + offset(p.a, n, c, h, w), a);
    // the V channels' coefficients as float4 reads (c - c0 is a multiple of V; the plan aligns coef to 16 bytes)
    constexpr int V = Vec16<T>::N;
    static_assert(V % 4 == 0, "a vector is a whole number of float4");
    float k[4][V];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int q = 0; q < V; q += 4)
        *reinterpret_cast<float4*>(&k[r][q]) = *reinterpret_cast<const float4*>(coef + r * cb + (c - c0) + q);
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = at(dy[q], a[q], k[0][q], k[1][q], k[2][q], k[3][q]);
  }
};

// The coefficient table of GradPreactValue (zero past the last channel).
template <class Tile>
__device__ void load_coefficients(const DepthwiseParams& p, float* coef, int c0) {
  for (int e = threadIdx.x; e < 4 * Tile::CB; e += Tile::THREADS) {
    const int which = e / Tile::CB, c = c0 + e % Tile::CB;
    const float* src = which == 0 ? p.coef_dy : which == 1 ? p.coef_g : which == 2 ? p.mean : p.coef_const;
    coef[e] = c < p.C ? src[c] : 0.f;
  }
}

// load_tile's NCHW staging a warp per (channel, row), lanes over columns: no per-element index divisions.
template <class Tile, class Fn>
__device__ __forceinline__ void load_tile_warp_rows(const DepthwiseParams& p, const SmemTile<Tile>& dst, int n, int c0,
                                                    int h_begin, int w_begin, int rows, int cols, const Fn& fn) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int cq = warp; cq < Tile::CB * rows; cq += Tile::THREADS / 32) {
    const int c = cq / rows, q = cq - c * rows;
    const int h = h_begin + q, cg = c0 + c;
    const bool row_ok = h >= 0 && h < p.H && cg < p.C;
    for (int v = lane; v < cols; v += 32) {
      const int w = w_begin + v;
      dst.at(c, q, v) = (row_ok && w >= 0 && w < p.W) ? fn.scalar(n, cg, h, w) : 0.f;
    }
  }
}

// dst.at(c, q, v) = fn(n, c0 + c, h_begin + q, w_begin + v) for q < rows, v < cols; zero outside
// the image (the conv's zero padding) and past the last channel. kVector: fn has a vector() form
// (16-byte loads of V channels).
template <class Tile, typename T, class Fn, bool kVector = true>
__device__ void load_tile(const DepthwiseParams& p, const SmemTile<Tile>& dst, int n, int c0, int h_begin,
                          int w_begin, int rows, int cols, const Fn& fn) {
  const int tid = threadIdx.x;
  if constexpr (Tile::kChannelsLast && kVector) {
    if (p.vec_ok) {  // 16-byte loads of V channels; the binding checked alignment and C % V == 0
      constexpr int V = Vec16<T>::N;
      constexpr int NV = Tile::CB / V;
      static_assert(Tile::CB % V == 0, "a channel block is a whole number of vectors");
      const int total = rows * cols * NV;
      for (int e = tid; e < total; e += Tile::THREADS) {
        const int cv = e % NV, pos = e / NV;
        const int q = pos / cols, v = pos % cols;
        const int h = h_begin + q, w = w_begin + v, c = c0 + cv * V;
        float vals[V];
        if (h >= 0 && h < p.H && w >= 0 && w < p.W && c < p.C) {
          fn.vector(n, c, h, w, vals);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) vals[k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < V; ++k) dst.at(cv * V + k, q, v) = vals[k];
      }
      return;
    }
  }
  if (Tile::kChannelsLast || cols % 32 != 0) {
    // channels_last: consecutive threads, consecutive channels (coalesced along C);
    // NCHW: consecutive threads, consecutive columns (coalesced along W, every lane busy)
    const int total = Tile::CB * rows * cols;
    for (int e = tid; e < total; e += Tile::THREADS) {
      int c, q, v;
      if (Tile::kChannelsLast) {
        c = e % Tile::CB;
        const int pos = e / Tile::CB;
        q = pos / cols;
        v = pos % cols;
      } else {
        v = e % cols;
        const int rest = e / cols;
        q = rest % rows;
        c = rest / rows;
      }
      const int h = h_begin + q, w = w_begin + v, cg = c0 + c;
      dst.at(c, q, v) = (h >= 0 && h < p.H && w >= 0 && w < p.W && cg < p.C) ? fn.scalar(n, cg, h, w) : 0.f;
    }
  } else {  // NCHW rows of whole warps (the x tile)
    load_tile_warp_rows<Tile>(p, dst, n, c0, h_begin, w_begin, rows, cols, fn);
  }
}

// The input-side prologue's staged value (design.md 3.3): z = act_pro(x) * pro_scale + pro_shift (float32
// math, the product and the sum each rounded as torch's elementwise ops round them, then rounded to T:
// what a materialized z would hold). load_tile's zero outside the image and past the last channel pads z
// with zeros, not with act(0) * s + t.
template <typename T>
struct PrologueValue {
  const DepthwiseParams& p;
  const T* x;
  __device__ __forceinline__ float scalar(int n, int c, int h, int w) const {
    const float g = act_forward(p.pro_act, to_float(x[offset(p.x, n, c, h, w)]));
    return round_to<T>(add_rn(mul_rn(g, p.pro_scale[c]), p.pro_shift[c]));
  }
};

// load_tile for the prologue: once per staged element, scalar loads; NCHW always a warp per (channel, row),
// whatever the tile's width (no per-element index divisions). Only the *_prologue_kernel instances
// (PRO = true) stage through it.
template <class Tile, typename T>
__device__ void load_tile_prologue(const DepthwiseParams& p, const SmemTile<Tile>& dst, int n, int c0, int h_begin,
                                   int w_begin, int rows, int cols) {
  const PrologueValue<T> z{p, static_cast<const T*>(p.x.data)};
  if constexpr (Tile::kChannelsLast) {
    load_tile<Tile, T, PrologueValue<T>, /*kVector=*/false>(p, dst, n, c0, h_begin, w_begin, rows, cols, z);
  } else {
    load_tile_warp_rows<Tile>(p, dst, n, c0, h_begin, w_begin, rows, cols, z);
  }
}

// dst.at(c, i, j) = weight of channel c0 + c at kernel row i0 + i, column j (i < kc); `flip`
// stores the chunk rotated by 180 degrees, w[i0 + kc - 1 - i][KW - 1 - j], for the backward.
// A channel's kc * KW taps of the chunk are contiguous in the [C, KH, KW] weight and so are the tile's
// (at_tap), so one index s over them serves both: consecutive lanes load consecutive taps (coalesced), and
// (c, s) steps by the thread count without a division per element (they cost ~35 instructions a tap).
template <class Tile, typename T>
__device__ void load_weights(const DepthwiseParams& p, const WeightTile<Tile>& dst, int c0, int i0, int kc, int KH,
                             int KW, bool flip) {
  const T* weight = static_cast<const T*>(p.weight) + (static_cast<int64_t>(c0) * KH + i0) * KW;
  const int taps = kc * KW, kk = KH * KW, dc = Tile::THREADS / taps, ds = Tile::THREADS - dc * taps;
  const int channels = imin(Tile::CB, p.C - c0);  // the block's real channels; the rest of the tile is zero
  const int last = flip ? taps - 1 : 0, sign = flip ? -1 : 1;
  for (int c = threadIdx.x / taps, s = threadIdx.x % taps; c < Tile::CB;) {
    dst.at_tap(c, last + sign * s) = c < channels ? to_float(weight[c * kk + s]) : 0.f;  // c * kk + s < CB * kk: int
    c += dc;
    s += ds;
    if (s >= taps) {
      s -= taps;
      ++c;
    }
  }
}

// acc[t] += sum_{j < nj} wts(c, i, j0 + j) * src(c, row + i, col0 + t + j0 + j): one block of up
// to kTapBlock taps of kernel row i (EXACT: nj == kTapBlock, no predicates). The tail block skips
// its missing taps, not multiplying them by zero: 0 * inf would turn into NaN.
template <class Tile, bool EXACT>
__device__ __forceinline__ void tap_block(float (&acc)[Tile::RW], const SmemTile<Tile>& src, const WeightTile<Tile>& wts,
                                          int c, int row, int col0, int i, int j0, int nj) {
  constexpr int RW = Tile::RW, JB = kTapBlock;
  float win[RW + JB - 1], wr[JB];
#pragma unroll
  for (int u = 0; u < RW + JB - 1; ++u) win[u] = EXACT || u < RW + nj - 1 ? src.at(c, row + i, col0 + j0 + u) : 0.f;
#pragma unroll
  for (int j = 0; j < JB; ++j) wr[j] = EXACT || j < nj ? wts.at(c, i, j0 + j) : 0.f;
#pragma unroll
  for (int j = 0; j < JB; ++j) {
    if (EXACT || j < nj) {
#pragma unroll
      for (int t = 0; t < RW; ++t) acc[t] = fmaf(wr[j], win[t + j], acc[t]);
    }
  }
}

// acc[t] += sum_{i < kc, j < KW} wts(c, i, j) * src(c, row + i, col0 + t + j) for t < RW: the
// stride-1 correlation of one strip, from a register window sliding along W.
template <class Tile, int K_>
__device__ __forceinline__ void conv_strip(float (&acc)[Tile::RW], const SmemTile<Tile>& src, const WeightTile<Tile>& wts,
                                           int c, int row, int col0, int kc, int KW) {
  constexpr int RW = Tile::RW;
  if constexpr (K_ > 0) {  // the whole K_ x K_ kernel in one chunk, fully unrolled
#pragma unroll
    for (int i = 0; i < K_; ++i) {
      float win[RW + K_ - 1], wr[K_];
#pragma unroll
      for (int u = 0; u < RW + K_ - 1; ++u) win[u] = src.at(c, row + i, col0 + u);
#pragma unroll
      for (int j = 0; j < K_; ++j) wr[j] = wts.at(c, i, j);
#pragma unroll
      for (int j = 0; j < K_; ++j)
#pragma unroll
        for (int t = 0; t < RW; ++t) acc[t] = fmaf(wr[j], win[t + j], acc[t]);
    }
  } else {  // any kernel: taps in blocks of kTapBlock, full blocks unpredicated, then the tail
    for (int i = 0; i < kc; ++i) {
      int j0 = 0;
      for (; j0 + kTapBlock <= KW; j0 += kTapBlock) tap_block<Tile, true>(acc, src, wts, c, row, col0, i, j0, kTapBlock);
      if (j0 < KW) tap_block<Tile, false>(acc, src, wts, c, row, col0, i, j0, KW - j0);
    }
  }
}

// Blocks per SM the register budget must allow (ptxas then fits them without spills, checked
// with -Xptxas -v): the backward two 256-thread blocks (128 registers: its dW accumulators live
// across tiles); the forward 64 registers (the occupancy it had before the hint), except the
// float32 NCHW forward, whose 16-output vector epilogue spills at 64 (five blocks: 102; with six,
// 80 registers, the ReLU training instances spilled 16 B), and two
// channels_last forwards with three blocks (85): k = 9, whose 62.9 KB tile fits only three per SM
// anyway, and the general path's eval instances (8 B spilled at 64 where the kernel rows are chunked).
template <class Tile>
constexpr int kMinBlocks = 512 / Tile::THREADS;
template <class Tile, typename T, int K_, bool TRAINING>
constexpr int kForwardMinBlocks =
    (Tile::kChannelsLast ? (K_ == 9 || (K_ == 0 && !TRAINING) ? 768 : 1024) : sizeof(T) < 4 ? 1024 : 640) /
    Tile::THREADS;

// ------------------------------------------------------------------ strip epilogues
//
// A thread's RW outputs of one row: 16-byte vectors along W on the NCHW path when the binding
// allowed them (p.w_vec_ok: unit W stride, other strides and bases aligned) and the strip lies
// inside the map; element by element otherwise (channels_last: lanes over C already coalesce).
template <class Tile, typename T>
__device__ __forceinline__ bool strip_vectors(const DepthwiseParams& p, int w0) {
  static_assert(Tile::RW % Vec16<T>::N == 0, "a strip is a whole number of 16-byte vectors");
  return !Tile::kChannelsLast && p.w_vec_ok && w0 + Tile::RW <= p.W;
}

template <class Tile, typename T>
__device__ __forceinline__ void load_strip(const T* ptr, int64_t sw, int valid, bool vec, float (&out)[Tile::RW]) {
  constexpr int V = Vec16<T>::N;
  if (vec) {
#pragma unroll
    for (int k = 0; k < Tile::RW; k += V) load_vec(ptr + k, *reinterpret_cast<float(*)[V]>(&out[k]));
  } else {  // a pointer stepped by sw: `ptr[t * sw]` cost a 64-bit multiply-add per element
#pragma unroll
    for (int t = 0; t < Tile::RW; ++t, ptr += sw) out[t] = t < valid ? to_float(*ptr) : 0.f;
  }
}

template <class Tile, typename T>
__device__ __forceinline__ void store_strip(T* ptr, int64_t sw, int valid, bool vec, const float (&in)[Tile::RW]) {
  constexpr int V = Vec16<T>::N;
  if (vec) {
#pragma unroll
    for (int k = 0; k < Tile::RW; k += V) store_vec(ptr + k, *reinterpret_cast<const float(*)[V]>(&in[k]));
  } else {  // stepped as in load_strip
#pragma unroll
    for (int t = 0; t < Tile::RW; ++t, ptr += sw)
      if (t < valid) *ptr = from_float<T>(in[t]);
  }
}

// ------------------------------------------------------------------ forward

// Combine each channel's per-thread statistics over the block's strips with a fixed tree
// (deterministic) and write the tile's (count, mean, M2) to stats[0..2][tile][c].
template <class Tile>
__device__ void write_tile_stats(const DepthwiseParams& p, const ConvPlan& plan, float* red, Welford st,
                                 const ThreadSlot& me, int c0, int64_t tile) {
  static_assert((Tile::STRIPS & (Tile::STRIPS - 1)) == 0, "the tree needs a power-of-two number of strips");
  auto slot = [&](int strip) { return red + (strip * Tile::CB + me.c) * 3; };
  float* mine = slot(me.strip);
  mine[0] = st.n;
  mine[1] = st.mean;
  mine[2] = st.m2;
  for (int stride = Tile::STRIPS / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (me.strip < stride) {
      const float* other = slot(me.strip + stride);
      const Welford r = chan_combine(Welford{mine[0], mine[1], mine[2]}, Welford{other[0], other[1], other[2]});
      mine[0] = r.n;
      mine[1] = r.mean;
      mine[2] = r.m2;
    }
  }
  __syncthreads();
  const int c = c0 + me.c;
  if (me.strip == 0 && c < p.C) {
    const int64_t plane = plan.tiles * p.C, at = tile * p.C + c;
    p.stats[at] = mine[0];
    p.stats[plane + at] = mine[1];
    p.stats[2 * plane + at] = mine[2];
  }
}

// TRAINING: a = dwconv(x) + b (stored in the activation dtype) and per-tile statistics of act(a);
// eval:     y = act(a) * scale + shift + x, the whole block in one pass.
// Both are compile-time choices (separate instances), so a kernel holds only the epilogue it runs.
template <class Tile, typename T, int K_, bool PRO, class ActFn, bool TRAINING>
__device__ __forceinline__ void forward_body(const DepthwiseParams& p, const ConvPlan& plan) {
  constexpr int RW = Tile::RW;
  const ActFn act(p.act);
  const int KH = K_ > 0 ? K_ : p.KH;
  const int KW = K_ > 0 ? K_ : p.KW;
  const int KC = K_ > 0 ? K_ : plan.row_chunk;  // the plan picks K_ > 0 only when row_chunk == KH
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % plan.tiles;
  const int c0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) / plan.tiles) * Tile::CB;
  const TilePos tp = tile_pos(plan, tile);
  const ThreadSlot me = thread_slot<Tile>(threadIdx.x);

  float* smem = dynamic_smem<float>();
  const SmemTile<Tile> xs{smem, plan.smem_width, plan.rows_alloc};
  const WeightTile<Tile> ws{smem + plan.off_w, KW, plan.row_chunk};
  const InputValue<T> xval{static_cast<const T*>(p.x.data), p.x};

  float acc[RW];
#pragma unroll
  for (int t = 0; t < RW; ++t) acc[t] = 0.f;
  for (int i0 = 0; i0 < KH; i0 += KC) {
    const int kc = imin(KC, KH - i0);
    __syncthreads();  // nobody still reads the previous chunk
    if constexpr (PRO)  // the conv reads z = prologue(x)
      load_tile_prologue<Tile, T>(p, xs, tp.n, c0, tp.h0 - p.pad_top + i0, tp.w0 - p.pad_left, Tile::TH + kc - 1,
                                  Tile::TW + KW - 1);
    else
      load_tile<Tile, T>(p, xs, tp.n, c0, tp.h0 - p.pad_top + i0, tp.w0 - p.pad_left, Tile::TH + kc - 1,
                         Tile::TW + KW - 1, xval);
    load_weights<Tile, T>(p, ws, c0, i0, kc, KH, KW, false);
    __syncthreads();
    conv_strip<Tile, K_>(acc, xs, ws, me.c, me.row, me.col0, kc, KW);
  }

  const int c = c0 + me.c, h = tp.h0 + me.row, w0 = tp.w0 + me.col0;
  const bool row_ok = c < p.C && h < p.H;
  const float bias = (p.bias != nullptr && c < p.C) ? to_float(static_cast<const T*>(p.bias)[c]) : 0.f;
  const int valid = row_ok ? p.W - w0 : 0;  // outputs of the strip inside the map
  const bool vec = row_ok && strip_vectors<Tile, T>(p, w0);
  if constexpr (TRAINING) {
    // Statistics of exactly the values the apply pass and the backward will see: act of the stored a.
    // act is evaluated for every output of the strip (those past the map are finite: they come from the zero
    // padding) and the sums select the valid ones: no branch per output around act (each cost a BSSY/BRA/BSYNC).
    float a[RW], g[RW], sum = 0.f;
    const int count = imax(0, imin(valid, RW));
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      a[t] = round_to<T>(acc[t] + bias);
      g[t] = act.forward(a[t]);
      sum += t < count ? g[t] : 0.f;
    }
    if (row_ok) store_strip<Tile, T>(static_cast<T*>(p.a.data) + offset(p.a, tp.n, c, h, w0), p.a.sw, valid, vec, a);
    Welford st{static_cast<float>(count), count > 0 ? sum / count : 0.f, 0.f};
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      const float d = g[t] - st.mean;
      st.m2 += t < count ? d * d : 0.f;
    }
    write_tile_stats<Tile>(p, plan, smem + plan.off_stats, st, me, c0, tile);
  } else if (row_ok) {
    // y = act(a) * s + t + x. The residual x is the centre of the staged tile when the kernel ran in one pass
    // (the tile's rows are then those of chunk 0): read there, not from global memory, where the 16 scalar
    // channels_last loads and their 64-bit addresses, hoisted into the conv by ptxas, spilled 8-64 B.
    const float s = p.scale[c], sh = p.shift[c];
    float res[RW];
    if (K_ > 0 || KC >= KH) {
#pragma unroll
      for (int t = 0; t < RW; ++t) res[t] = xs.at(me.c, me.row + p.pad_top, me.col0 + t + p.pad_left);
    } else {
      load_strip<Tile, T>(static_cast<const T*>(p.x.data) + offset(p.x, tp.n, c, h, w0), p.x.sw, valid, vec, res);
    }
#pragma unroll
    for (int t = 0; t < RW; ++t) res[t] = act.forward(round_to<T>(acc[t] + bias)) * s + sh + res[t];
    store_strip<Tile, T>(static_cast<T*>(p.y.data) + offset(p.y, tp.n, c, h, w0), p.y.sw, valid, vec, res);
  }
}

template <class Tile, typename T, int K_, class ActFn, bool TRAINING>
__global__ void __launch_bounds__(Tile::THREADS, kForwardMinBlocks<Tile, T, K_, TRAINING>)
    depthwise_forward_kernel(__grid_constant__ const DepthwiseParams p, __grid_constant__ const ConvPlan plan) {
  forward_body<Tile, T, K_, false, ActFn, TRAINING>(p, plan);
}

// The same forward with the input-side prologue (p.pro_scale != nullptr; training only, the binding checks),
// launched by launch_forward_tile when the params carry one: the default kernel above holds no prologue code.
// Not the default path (ops/layer_stack.py's fold_plan): one instance per shape, the activations switched at run time.
template <class Tile, typename T, int K_>
__global__ void __launch_bounds__(Tile::THREADS, kForwardMinBlocks<Tile, T, K_, true>)
    depthwise_forward_prologue_kernel(__grid_constant__ const DepthwiseParams p, __grid_constant__ const ConvPlan plan) {
  forward_body<Tile, T, K_, true, RuntimeAct, true>(p, plan);
}

// ------------------------------------------------------------------ backward
//
// One da halo tile serves both outputs. With das(q, v) = da(h0 + pt - i0 - kc + 1 + q, w0 + pl - KW + 1 + v)
// (the rows that kernel rows [i0, i0 + kc) carry) and the flipped tap index (ii, jj) of kernel
// tap (i0 + kc - 1 - ii, KW - 1 - jj), for a tile position (r, v):
//   dx(r, v)   += w(i0 + kc - 1 - ii, KW - 1 - jj) * das(r + ii, v + jj)
//   dw(ii, jj) += x(r, v) * das(r + ii, v + jj)
// The second is design.md's dw = sum_p da(p) x(p + tap - pad) re-indexed over the x positions
// q = p + tap - pad, with da zero outside the map: x needs no halo and the whole kernel fits one
// pass for the channels_last tiles.

// A weight-gradient work item: channel, flipped kernel row of the chunk, tap block, row group.
// Channel fastest, then the kernel row: lanes that share a channel read different da rows.
struct DwItem {
  int c, ii, jg, rg;
};

template <class Tile>
__device__ __forceinline__ DwItem dw_item(int it, int kc, int JG) {
  DwItem d;
  d.c = it % Tile::CB;
  int rest = it / Tile::CB;
  d.ii = rest % kc;
  rest /= kc;
  d.jg = rest % JG;
  d.rg = rest / JG;
  return d;
}

// dw[j] += sum_{r in [r0, r1), v} xc(c, r, v) * das(c, r + ii, v + j0 + j) for j < nj (JB taps
// from a register window sliding along v; the tail block's missing taps read a clamped column
// and are skipped, not multiplied: 0 * inf is NaN).
template <class Tile, int JB, bool EXACT>
__device__ __forceinline__ void dw_accumulate(float (&dw)[JB], const SmemTile<Tile>& das, const SmemTile<Tile>& xc,
                                              int c, int ii, int j0, int nj, int r0, int r1, int last_col) {
  auto col = [&](int cc) { return EXACT ? cc : imin(cc, last_col); };
  for (int r = r0; r < r1; ++r) {
    float win[JB];
#pragma unroll
    for (int j = 0; j < JB; ++j) win[j] = das.at(c, r + ii, col(j0 + j));
#pragma unroll
    for (int v = 0; v < Tile::TW; ++v) {
      const float xv = xc.at(c, r, v);
#pragma unroll
      for (int j = 0; j < JB; ++j)
        if (EXACT || j < nj) dw[j] = fmaf(xv, win[j], dw[j]);
      if (v + 1 < Tile::TW) {
#pragma unroll
        for (int j = 0; j + 1 < JB; ++j) win[j] = win[j + 1];
        win[JB - 1] = das.at(c, r + ii, col(v + j0 + JB));
      }
    }
  }
}

// db += the tile's own da over rows [r0, r1): the centre of the halo, present in the chunk that
// holds kernel row pt (flipped row ii = i0 + kc - 1 - pt) at column offset KW - 1 - pl.
template <class Tile>
__device__ __forceinline__ float db_accumulate(float db, const SmemTile<Tile>& das, int c, int ii, int col0, int r0,
                                               int r1) {
  for (int r = r0; r < r1; ++r)
#pragma unroll
    for (int v = 0; v < Tile::TW; ++v) db += das.at(c, r + ii, col0 + v);
  return db;
}

// dx = dy + dwconv^T(da) and the dW/dB partials, da = dg * act'(a) recomputed from dy and a
// (never stored). Block = (channel block, group of consecutive tiles, visited in order).
// Partials: dw_part [group][row group][KH][KW][C] (channel fastest: coalesced), db_part
// [group][row group][C]; each element has one writer, so the result is deterministic.
//   register path (K_ > 0, or DW_REGS > 0 with a one-pass plan of at most DW_REGS items per
//           thread): each thread keeps its items' dW/dB in registers over all tiles of its group
//           and writes them once at the end;
//   otherwise (chunked kernels): per tile, each item adds its partial into dw_part (first tile:
//           stores).
template <class Tile, typename T, int K_, int DW_REGS, bool PRO, class ActFn>
__device__ __forceinline__ void backward_body(const DepthwiseParams& p, const ConvPlan& plan) {
  constexpr int RW = Tile::RW;
  constexpr int JB = K_ > 0 ? K_ : kTapBlock;
  // compile-time item layout of K_ > 0 (the plan computes the same row groups)
  constexpr int RG_K = K_ > 0 ? dw_row_groups(Tile::CB, Tile::TH, 1, K_, Tile::THREADS) : 1;
  constexpr int ITEMS_K = Tile::CB * RG_K * (K_ > 0 ? K_ : 1);
  constexpr bool REG = K_ > 0 || DW_REGS > 0;
  constexpr int MAXIT = K_ > 0 ? (ITEMS_K + Tile::THREADS - 1) / Tile::THREADS : (DW_REGS > 0 ? DW_REGS : 1);
  const int KH = K_ > 0 ? K_ : p.KH;
  const int KW = K_ > 0 ? K_ : p.KW;
  const int KC = K_ > 0 ? K_ : plan.row_chunk;
  const int group = static_cast<int>(blockIdx.x % plan.groups);
  const int c0 = static_cast<int>(blockIdx.x / plan.groups) * Tile::CB;
  const int64_t t_begin = static_cast<int64_t>(group) * plan.tiles_per_group;
  const int64_t t_end = t_begin + plan.tiles_per_group < plan.tiles ? t_begin + plan.tiles_per_group : plan.tiles;
  const ThreadSlot me = thread_slot<Tile>(threadIdx.x);
  const bool one_pass = KC >= KH;

  float* smem = dynamic_smem<float>();
  const SmemTile<Tile> das{smem + plan.off_da, plan.smem_width, plan.rows_alloc};
  const WeightTile<Tile> ws{smem + plan.off_w, KW, plan.row_chunk};
  const SmemTile<Tile> xc{smem + plan.off_dac, plan.dac_width, Tile::TH};
  const InputValue<T> xval{static_cast<const T*>(p.x.data), p.x};
  float* coef = smem + plan.off_coef;
  const GradPreactValue<T, ActFn> daval{p, coef, c0, Tile::CB, ActFn(p.act)};
  const int RG = K_ > 0 ? RG_K : plan.row_groups, RPG = Tile::TH / RG;
  const int JG = K_ > 0 ? 1 : (KW + JB - 1) / JB;
  const int reg_items = Tile::CB * RG * JG * KH;  // register path: one pass
  const int last_col = Tile::TW + KW - 2;  // the da tile holds columns [0, TW + KW - 1)

  float dwr[MAXIT][JB], dbr[MAXIT];  // register path only
#pragma unroll
  for (int s = 0; s < MAXIT; ++s) {
    dbr[s] = 0.f;
#pragma unroll
    for (int j = 0; j < JB; ++j) dwr[s][j] = 0.f;
  }
  if (one_pass) load_weights<Tile, T>(p, ws, c0, 0, KH, KH, KW, true);  // hoisted: every tile uses all of it
  load_coefficients<Tile>(p, coef, c0);  // visible after the first tile's barrier

  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const TilePos tp = tile_pos(plan, tile);
    __syncthreads();  // nobody still reads the previous tile
    if constexpr (PRO)  // dw = sum da * z (dx does not read the x tile)
      load_tile_prologue<Tile, T>(p, xc, tp.n, c0, tp.h0, tp.w0, Tile::TH, Tile::TW);
    else
      load_tile<Tile, T>(p, xc, tp.n, c0, tp.h0, tp.w0, Tile::TH, Tile::TW, xval);
    float acc[RW];
#pragma unroll
    for (int t = 0; t < RW; ++t) acc[t] = 0.f;
    for (int i0 = 0; i0 < KH; i0 += KC) {
      const int kc = imin(KC, KH - i0);
      if (i0 > 0) __syncthreads();  // nobody still reads the previous chunk
      load_tile<Tile, T>(p, das, tp.n, c0, tp.h0 + p.pad_top - i0 - kc + 1, tp.w0 + p.pad_left - KW + 1,
                         Tile::TH + kc - 1, Tile::TW + KW - 1, daval);
      if (!one_pass) load_weights<Tile, T>(p, ws, c0, i0, kc, KH, KW, true);
      __syncthreads();
      conv_strip<Tile, K_>(acc, das, ws, me.c, me.row, me.col0, kc, KW);
      const int db_ii = i0 + kc - 1 - p.pad_top;  // the chunk's flipped row of kernel row pt, if it has it
      const int db_col = KW - 1 - p.pad_left;
      if constexpr (REG) {
#pragma unroll
        for (int s = 0; s < MAXIT; ++s) {
          const int it = threadIdx.x + s * Tile::THREADS;
          if (it < reg_items) {
            const DwItem d = dw_item<Tile>(it, KH, JG);
            const int j0 = d.jg * JB, nj = imin(JB, KW - j0);
            if (K_ > 0 || nj == JB)  // full tap block: no predicates, no clamps
              dw_accumulate<Tile, JB, true>(dwr[s], das, xc, d.c, d.ii, j0, nj, d.rg * RPG, (d.rg + 1) * RPG, last_col);
            else
              dw_accumulate<Tile, JB, false>(dwr[s], das, xc, d.c, d.ii, j0, nj, d.rg * RPG, (d.rg + 1) * RPG, last_col);
            if (d.ii == db_ii && d.jg == 0)
              dbr[s] = db_accumulate<Tile>(dbr[s], das, d.c, d.ii, db_col, d.rg * RPG, (d.rg + 1) * RPG);
          }
        }
      } else {
        const int items = Tile::CB * RG * JG * kc;
        for (int it = threadIdx.x; it < items; it += Tile::THREADS) {
          const DwItem d = dw_item<Tile>(it, kc, JG);
          const int j0 = d.jg * JB, nj = imin(JB, KW - j0);
          float dw[JB];
#pragma unroll
          for (int j = 0; j < JB; ++j) dw[j] = 0.f;
          if (nj == JB)
            dw_accumulate<Tile, JB, true>(dw, das, xc, d.c, d.ii, j0, nj, d.rg * RPG, (d.rg + 1) * RPG, last_col);
          else
            dw_accumulate<Tile, JB, false>(dw, das, xc, d.c, d.ii, j0, nj, d.rg * RPG, (d.rg + 1) * RPG, last_col);
          const int cg = c0 + d.c;
          if (cg < p.C) {
            const bool first = tile == t_begin;
            const int64_t part = static_cast<int64_t>(group) * RG + d.rg;
            const int ti = i0 + kc - 1 - d.ii;
#pragma unroll
            for (int j = 0; j < JB; ++j) {
              if (j < nj) {
                float* dst = p.dw_part + ((part * KH + ti) * KW + (KW - 1 - j0 - j)) * p.C + cg;
                *dst = first ? dw[j] : *dst + dw[j];
              }
            }
            if (d.ii == db_ii && d.jg == 0) {
              float* dbp = p.db_part + part * p.C + cg;
              const float db = db_accumulate<Tile>(0.f, das, d.c, d.ii, db_col, d.rg * RPG, (d.rg + 1) * RPG);
              *dbp = first ? db : *dbp + db;
            }
          }
        }
      }
    }
    const int c = c0 + me.c, h = tp.h0 + me.row, w0 = tp.w0 + me.col0;
    if (c < p.C && h < p.H) {
      const int valid = p.W - w0;
      const bool vec = strip_vectors<Tile, T>(p, w0);
      float d[RW];
      load_strip<Tile, T>(static_cast<const T*>(p.dy.data) + offset(p.dy, tp.n, c, h, w0), p.dy.sw, valid, vec, d);
#pragma unroll
      for (int t = 0; t < RW; ++t) d[t] += acc[t];
      store_strip<Tile, T>(static_cast<T*>(p.dx.data) + offset(p.dx, tp.n, c, h, w0), p.dx.sw, valid, vec, d);
    }
  }
  if constexpr (REG) {  // written once per block, lanes over channels
#pragma unroll
    for (int s = 0; s < MAXIT; ++s) {
      const int it = threadIdx.x + s * Tile::THREADS;
      if (it < reg_items) {
        const DwItem d = dw_item<Tile>(it, KH, JG);
        const int j0 = d.jg * JB, nj = imin(JB, KW - j0);
        const int cg = c0 + d.c;
        if (cg < p.C) {
          const int64_t part = static_cast<int64_t>(group) * RG + d.rg;
          const int ti = KH - 1 - d.ii;
#pragma unroll
          for (int j = 0; j < JB; ++j)
            if (j < nj) p.dw_part[((part * KH + ti) * KW + (KW - 1 - j0 - j)) * p.C + cg] = dwr[s][j];
          if (d.ii == KH - 1 - p.pad_top && d.jg == 0) p.db_part[part * p.C + cg] = dbr[s];
        }
      }
    }
  }
}

template <class Tile, typename T, int K_, int DW_REGS, class ActFn>
__global__ void __launch_bounds__(Tile::THREADS, kMinBlocks<Tile>)
    depthwise_backward_kernel(__grid_constant__ const DepthwiseParams p, __grid_constant__ const ConvPlan plan) {
  backward_body<Tile, T, K_, DW_REGS, false, ActFn>(p, plan);
}

// The same backward with the input-side prologue (p.pro_scale != nullptr): its weight gradient reads z.
template <class Tile, typename T, int K_, int DW_REGS>
__global__ void __launch_bounds__(Tile::THREADS, kMinBlocks<Tile>)
    depthwise_backward_prologue_kernel(__grid_constant__ const DepthwiseParams p,
                                       __grid_constant__ const ConvPlan plan) {
  backward_body<Tile, T, K_, DW_REGS, true, RuntimeAct>(p, plan);
}

// ------------------------------------------------------------------ launchers

using ConvKernel = void (*)(DepthwiseParams, ConvPlan);

template <class Tile, typename T, int K_, class ActFn>
constexpr ConvKernel forward_kernel(bool prologue, bool training) {
  return prologue   ? depthwise_forward_prologue_kernel<Tile, T, K_>
         : training ? depthwise_forward_kernel<Tile, T, K_, ActFn, true>
                    : depthwise_forward_kernel<Tile, T, K_, ActFn, false>;
}

template <class Tile, typename T, class ActFn>
const char* launch_forward_tile(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream) {
  ConvKernel kernel = nullptr;
  const bool pro = p.pro_scale != nullptr;
  switch (plan.kernel_k) {
    case 3: kernel = forward_kernel<Tile, T, 3, ActFn>(pro, training); break;
    case 5: kernel = forward_kernel<Tile, T, 5, ActFn>(pro, training); break;
    case 7: kernel = forward_kernel<Tile, T, 7, ActFn>(pro, training); break;
    case 9: kernel = forward_kernel<Tile, T, 9, ActFn>(pro, training); break;
    default: kernel = forward_kernel<Tile, T, 0, ActFn>(pro, training); break;
  }
  if (const char* err = allow_smem(kernel, plan.smem_bytes)) return err;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(plan.threads), plan.smem_bytes, stream, p, plan);
  return launch_error();
}

template <class Tile, typename T, int K_, int DW_REGS, class ActFn>
constexpr ConvKernel backward_kernel(bool prologue) {
  return prologue ? depthwise_backward_prologue_kernel<Tile, T, K_, DW_REGS>
                  : depthwise_backward_kernel<Tile, T, K_, DW_REGS, ActFn>;
}

template <class Tile, typename T, class ActFn>
const char* launch_backward_tile(const DepthwiseParams& p, const ConvPlan& plan, void* stream) {
  const bool pro = p.pro_scale != nullptr;
  ConvKernel kernel = backward_kernel<Tile, T, 0, 0, ActFn>(pro);
  if constexpr (kDwRegItems<Tile> > 0)
    if (plan.dw_in_registers) kernel = backward_kernel<Tile, T, 0, kDwRegItems<Tile>, ActFn>(pro);
  if constexpr (!std::is_same<Tile, ClBackwardLargeTile>::value) {  // the large tile only runs large kernels
    switch (plan.kernel_k) {
      case 3: kernel = backward_kernel<Tile, T, 3, 0, ActFn>(pro); break;
      case 5: kernel = backward_kernel<Tile, T, 5, 0, ActFn>(pro); break;
      case 7: kernel = backward_kernel<Tile, T, 7, 0, ActFn>(pro); break;
      case 9: kernel = backward_kernel<Tile, T, 9, 0, ActFn>(pro); break;
      default: break;
    }
  }
  if (const char* err = allow_smem(kernel, plan.smem_bytes)) return err;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(plan.threads), plan.smem_bytes, stream, p, plan);
  return launch_error();
}

template <typename T>
const char* depthwise_forward_t(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream) {
  return dispatch_act(p.act, [&](auto act) {
    using A = typename decltype(act)::type;
    return p.channels_last ? launch_forward_tile<ClForwardTile, T, A>(p, plan, training, stream)
                           : launch_forward_tile<NchwForwardTile, T, A>(p, plan, training, stream);
  });
}

template <typename T>
const char* depthwise_backward_t(const DepthwiseParams& p, const ConvPlan& plan, void* stream) {
  return dispatch_act(p.act, [&](auto act) {
    using A = typename decltype(act)::type;
    if (!p.channels_last) return launch_backward_tile<NchwBackwardTile, T, A>(p, plan, stream);
    return plan.large_tile ? launch_backward_tile<ClBackwardLargeTile, T, A>(p, plan, stream)
                           : launch_backward_tile<ClBackwardTile, T, A>(p, plan, stream);
  });
}

}  // namespace cmk
