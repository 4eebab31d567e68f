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
//     whole kernel and the loops are unrolled at compile time (template argument K_).
// The backward's transposed conv is the same correlation run over the da tile with the
// flipped weights: dx[h, w] = sum_{i,j} w[i, j] * da[h + pt - i, w + pl - j].
#pragma once

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
  if (Tile::kChannelsLast) {  // lanes = channels
    s.c = tid % Tile::CB;
    s.strip = tid / Tile::CB;
  } else {  // lanes = strips of one channel plane, strip index fastest along W
    s.c = tid / Tile::STRIPS;
    s.strip = tid % Tile::STRIPS;
  }
  s.row = s.strip / Tile::S;
  s.col0 = (s.strip % Tile::S) * Tile::RW;
  return s;
}

// A [CB][rows][width] float array in shared memory (stored [rows][width][CB] for channels_last,
// so that the 32 lanes of a warp, which differ in the channel, hit 32 different banks).
template <class Tile>
struct SmemTile {
  float* base;
  int width, rows;
  __device__ __forceinline__ float& at(int c, int q, int v) const {
    return Tile::kChannelsLast ? base[(q * width + v) * Tile::CB + c] : base[(c * rows + q) * width + v];
  }
};

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
template <typename T>
struct GradPreactValue {
  const DepthwiseParams& p;
  __device__ __forceinline__ float at(int c, float dy, float a) const {
    float dg = p.coef_dy[c] * dy;
    if (p.batch_stats_grad) dg += p.coef_g[c] * (act_forward(p.act, a) - p.mean[c]) + p.coef_const[c];
    return dg * act_backward(p.act, a);
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
#pragma unroll
    for (int k = 0; k < Vec16<T>::N; ++k) out[k] = at(c + k, dy[k], a[k]);
  }
};

// dst.at(c, q, v) = fn(n, c0 + c, h_begin + q, w_begin + v) for q < rows, v < cols; zero outside
// the image (the conv's zero padding) and past the last channel.
template <class Tile, typename T, class Fn>
__device__ void load_tile(const DepthwiseParams& p, const SmemTile<Tile>& dst, int n, int c0, int h_begin,
                          int w_begin, int rows, int cols, const Fn& fn) {
  const int tid = threadIdx.x;
  if constexpr (Tile::kChannelsLast) {
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
  const int total = Tile::CB * rows * cols;
  for (int e = tid; e < total; e += Tile::THREADS) {
    int c, q, v;
    if (Tile::kChannelsLast) {  // consecutive threads: consecutive channels (coalesced along C)
      c = e % Tile::CB;
      const int pos = e / Tile::CB;
      q = pos / cols;
      v = pos % cols;
    } else {  // consecutive threads: consecutive columns (coalesced along W)
      v = e % cols;
      const int rest = e / cols;
      q = rest % rows;
      c = rest / rows;
    }
    const int h = h_begin + q, w = w_begin + v, cg = c0 + c;
    dst.at(c, q, v) = (h >= 0 && h < p.H && w >= 0 && w < p.W && cg < p.C) ? fn.scalar(n, cg, h, w) : 0.f;
  }
}

// dst.at(c, i, j) = weight of channel c0 + c at kernel row i0 + i, column j (i < kc); `flip`
// stores the chunk rotated by 180 degrees, w[i0 + kc - 1 - i][KW - 1 - j], for the backward.
template <class Tile, typename T>
__device__ void load_weights(const DepthwiseParams& p, const SmemTile<Tile>& dst, int c0, int i0, int kc, int KH,
                             int KW, bool flip) {
  const T* weight = static_cast<const T*>(p.weight);
  const int total = Tile::CB * kc * KW;
  for (int e = threadIdx.x; e < total; e += Tile::THREADS) {
    int c, i, j;
    if (Tile::kChannelsLast) {
      c = e % Tile::CB;
      const int rest = e / Tile::CB;
      j = rest % KW;
      i = rest / KW;
    } else {
      j = e % KW;
      const int rest = e / KW;
      i = rest % kc;
      c = rest / kc;
    }
    const int si = flip ? i0 + kc - 1 - i : i0 + i;
    const int sj = flip ? KW - 1 - j : j;
    const int cg = c0 + c;
    dst.at(c, i, j) = cg < p.C ? to_float(weight[(static_cast<int64_t>(cg) * KH + si) * KW + sj]) : 0.f;
  }
}

// acc[t] += sum_{i < kc, j < KW} wts(c, i, j) * src(c, row + i, col0 + t + j) for t < RW: the
// stride-1 correlation of one strip, from a register window sliding along W.
template <class Tile, int K_>
__device__ __forceinline__ void conv_strip(float (&acc)[Tile::RW], const SmemTile<Tile>& src, const SmemTile<Tile>& wts,
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
  } else {  // any kernel: taps in blocks of kTapBlock; the tail block skips its missing taps
    constexpr int JB = kTapBlock;
    for (int i = 0; i < kc; ++i) {
      for (int j0 = 0; j0 < KW; j0 += JB) {
        const int nj = imin(JB, KW - j0);
        float win[RW + JB - 1], wr[JB];
#pragma unroll
        for (int u = 0; u < RW + JB - 1; ++u) win[u] = u < RW + nj - 1 ? src.at(c, row + i, col0 + j0 + u) : 0.f;
#pragma unroll
        for (int j = 0; j < JB; ++j) wr[j] = j < nj ? wts.at(c, i, j0 + j) : 0.f;
#pragma unroll
        for (int j = 0; j < JB; ++j) {
          if (j < nj) {  // skipped, not multiplied by zero: 0 * inf would turn into NaN
#pragma unroll
            for (int t = 0; t < RW; ++t) acc[t] = fmaf(wr[j], win[t + j], acc[t]);
          }
        }
      }
    }
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

// training: a = dwconv(x) + b (stored in the activation dtype) and per-tile statistics of act(a);
// eval:     y = act(a) * scale + shift + x, the whole block in one pass.
template <class Tile, typename T, int K_>
__global__ void __launch_bounds__(Tile::THREADS)
    depthwise_forward_kernel(__grid_constant__ const DepthwiseParams p, __grid_constant__ const ConvPlan plan,
                             const bool training) {
  constexpr int RW = Tile::RW;
  const int KH = K_ > 0 ? K_ : p.KH;
  const int KW = K_ > 0 ? K_ : p.KW;
  const int KC = K_ > 0 ? K_ : plan.row_chunk;  // the plan picks K_ > 0 only when row_chunk == KH
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % plan.tiles;
  const int c0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) / plan.tiles) * Tile::CB;
  const TilePos tp = tile_pos(plan, tile);
  const ThreadSlot me = thread_slot<Tile>(threadIdx.x);

  float* smem = dynamic_smem<float>();
  const SmemTile<Tile> xs{smem, plan.smem_width, plan.rows_alloc};
  const SmemTile<Tile> ws{smem + plan.off_w, KW, plan.row_chunk};
  const InputValue<T> xval{static_cast<const T*>(p.x.data), p.x};

  float acc[RW];
#pragma unroll
  for (int t = 0; t < RW; ++t) acc[t] = 0.f;
  for (int i0 = 0; i0 < KH; i0 += KC) {
    const int kc = imin(KC, KH - i0);
    __syncthreads();  // nobody still reads the previous chunk
    load_tile<Tile, T>(p, xs, tp.n, c0, tp.h0 - p.pad_top + i0, tp.w0 - p.pad_left, Tile::TH + kc - 1,
                       Tile::TW + KW - 1, xval);
    load_weights<Tile, T>(p, ws, c0, i0, kc, KH, KW, false);
    __syncthreads();
    conv_strip<Tile, K_>(acc, xs, ws, me.c, me.row, me.col0, kc, KW);
  }

  const int c = c0 + me.c, h = tp.h0 + me.row, w0 = tp.w0 + me.col0;
  const bool row_ok = c < p.C && h < p.H;
  const float bias = (p.bias != nullptr && c < p.C) ? to_float(static_cast<const T*>(p.bias)[c]) : 0.f;
  if (training) {
    // Statistics of exactly the values the apply pass and the backward will see: act of the stored a.
    T* a_out = static_cast<T*>(p.a.data);
    float g[RW], sum = 0.f;
    int count = 0;
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      g[t] = 0.f;
      if (row_ok && w0 + t < p.W) {
        const T a = from_float<T>(acc[t] + bias);
        a_out[offset(p.a, tp.n, c, h, w0 + t)] = a;
        g[t] = act_forward(p.act, to_float(a));
        sum += g[t];
        ++count;
      }
    }
    Welford st{static_cast<float>(count), count > 0 ? sum / count : 0.f, 0.f};
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      if (row_ok && w0 + t < p.W) {
        const float d = g[t] - st.mean;
        st.m2 += d * d;
      }
    }
    write_tile_stats<Tile>(p, plan, smem + plan.off_stats, st, me, c0, tile);
  } else if (row_ok) {
    const T* x = static_cast<const T*>(p.x.data);
    T* y = static_cast<T*>(p.y.data);
    const float s = p.scale[c], sh = p.shift[c];
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      if (w0 + t < p.W) {
        const float a = round_to<T>(acc[t] + bias);
        const float res = to_float(x[offset(p.x, tp.n, c, h, w0 + t)]);
        y[offset(p.y, tp.n, c, h, w0 + t)] = from_float<T>(act_forward(p.act, a) * s + sh + res);
      }
    }
  }
}

// ------------------------------------------------------------------ backward

// dW and dB of one tile for the kernel rows [i0, i0 + kc):
//   dw[c, i, j] += sum_{r, v} da(c, r, v) * x(c, r + i - pt, v + j - pl),   db[c] += sum_{r, v} da(c, r, v)
// over the tile's own positions (r, v). One work item = (channel, row group, tap block, kernel
// row); its partial in dw_part[group][row group] has exactly one writer, and the block visits its
// tiles in a fixed order, so the result is deterministic. xs holds the x rows from
// h0 - pt + i0; dac the tile's own da.
template <class Tile, int K_>
__device__ void weight_grad(const DepthwiseParams& p, const ConvPlan& plan, const SmemTile<Tile>& xs,
                            const SmemTile<Tile>& dac, int c0, int group, int i0, int kc, int KH, int KW,
                            bool first_tile) {
  constexpr int JB = K_ > 0 ? K_ : kTapBlock;
  const int JG = (KW + JB - 1) / JB;
  const int RG = plan.row_groups, RPG = Tile::TH / RG;
  const int items = Tile::CB * RG * JG * kc;
  const int last_col = Tile::TW + KW - 2;  // the x tile holds columns [0, TW + KW - 1)
  for (int it = threadIdx.x; it < items; it += Tile::THREADS) {
    const int c = it % Tile::CB;
    int rest = it / Tile::CB;
    const int rg = rest % RG;
    rest /= RG;
    const int jg = rest % JG, ii = rest / JG;
    const int j0 = jg * JB, nj = imin(JB, KW - j0);
    float dw[JB], db = 0.f;
#pragma unroll
    for (int j = 0; j < JB; ++j) dw[j] = 0.f;
    // x tile column of window slot j at step v; the tail block's missing taps (j >= nj) read a
    // clamped in-tile column and are never used.
    auto x_col = [&](int col) { return K_ > 0 ? col : imin(col, last_col); };
    for (int r = rg * RPG; r < (rg + 1) * RPG; ++r) {
      float win[JB];  // win[j] = x tile at (r + ii, v + j0 + j), sliding with v
#pragma unroll
      for (int j = 0; j < JB; ++j) win[j] = xs.at(c, r + ii, x_col(j0 + j));
#pragma unroll
      for (int v = 0; v < Tile::TW; ++v) {
        const float d = dac.at(c, r, v);
        db += d;
#pragma unroll
        for (int j = 0; j < JB; ++j)
          if (j < nj) dw[j] = fmaf(d, win[j], dw[j]);  // skipped, not multiplied: 0 * inf is NaN
        if (v + 1 < Tile::TW) {
#pragma unroll
          for (int j = 0; j + 1 < JB; ++j) win[j] = win[j + 1];
          win[JB - 1] = xs.at(c, r + ii, x_col(v + j0 + JB));
        }
      }
    }
    const int cg = c0 + c;
    if (cg < p.C) {
      const int64_t part = static_cast<int64_t>(group) * RG + rg;
      float* dst = p.dw_part + ((part * p.C + cg) * KH + (i0 + ii)) * KW + j0;
#pragma unroll
      for (int j = 0; j < JB; ++j)
        if (j < nj) dst[j] = first_tile ? dw[j] : dst[j] + dw[j];
      if (i0 + ii == 0 && jg == 0) {
        float* dbp = p.db_part + part * p.C + cg;
        *dbp = first_tile ? db : *dbp + db;
      }
    }
  }
}

// dx = dy + dwconv^T(da) and the dW/dB partials, da = dg * act'(a) recomputed from dy and a
// (never stored). Block = (channel block, group of consecutive tiles).
template <class Tile, typename T, int K_>
__global__ void __launch_bounds__(Tile::THREADS) depthwise_backward_kernel(__grid_constant__ const DepthwiseParams p,
                                                                           __grid_constant__ const ConvPlan plan) {
  constexpr int RW = Tile::RW;
  const int KH = K_ > 0 ? K_ : p.KH;
  const int KW = K_ > 0 ? K_ : p.KW;
  const int KC = K_ > 0 ? K_ : plan.row_chunk;
  const int group = static_cast<int>(blockIdx.x % plan.groups);
  const int c0 = static_cast<int>(blockIdx.x / plan.groups) * Tile::CB;
  const int64_t t_begin = static_cast<int64_t>(group) * plan.tiles_per_group;
  const int64_t t_end = t_begin + plan.tiles_per_group < plan.tiles ? t_begin + plan.tiles_per_group : plan.tiles;
  const ThreadSlot me = thread_slot<Tile>(threadIdx.x);

  float* smem = dynamic_smem<float>();
  const SmemTile<Tile> xs{smem, plan.smem_width, plan.rows_alloc};
  const SmemTile<Tile> das{smem + plan.off_da, plan.smem_width, plan.rows_alloc};
  const SmemTile<Tile> ws{smem + plan.off_w, KW, plan.row_chunk};
  const SmemTile<Tile> dac{smem + plan.off_dac, plan.dac_width, Tile::TH};
  const InputValue<T> xval{static_cast<const T*>(p.x.data), p.x};
  const GradPreactValue<T> daval{p};

  for (int64_t tile = t_begin; tile < t_end; ++tile) {
    const TilePos tp = tile_pos(plan, tile);
    __syncthreads();  // nobody still reads the previous tile's da
    load_tile<Tile, T>(p, dac, tp.n, c0, tp.h0, tp.w0, Tile::TH, Tile::TW, daval);
    float acc[RW];
#pragma unroll
    for (int t = 0; t < RW; ++t) acc[t] = 0.f;
    for (int i0 = 0; i0 < KH; i0 += KC) {
      const int kc = imin(KC, KH - i0);
      __syncthreads();  // nobody still reads the previous chunk
      load_tile<Tile, T>(p, xs, tp.n, c0, tp.h0 - p.pad_top + i0, tp.w0 - p.pad_left, Tile::TH + kc - 1,
                         Tile::TW + KW - 1, xval);
      // da rows that kernel rows [i0, i0 + kc) carry to the tile's dx rows
      load_tile<Tile, T>(p, das, tp.n, c0, tp.h0 + p.pad_top - i0 - kc + 1, tp.w0 + p.pad_left - KW + 1,
                         Tile::TH + kc - 1, Tile::TW + KW - 1, daval);
      load_weights<Tile, T>(p, ws, c0, i0, kc, KH, KW, true);
      __syncthreads();
      conv_strip<Tile, K_>(acc, das, ws, me.c, me.row, me.col0, kc, KW);
      weight_grad<Tile, K_>(p, plan, xs, dac, c0, group, i0, kc, KH, KW, tile == t_begin);
    }
    const int c = c0 + me.c, h = tp.h0 + me.row, w0 = tp.w0 + me.col0;
    if (c < p.C && h < p.H) {
      const T* dy = static_cast<const T*>(p.dy.data);
      T* dx = static_cast<T*>(p.dx.data);
#pragma unroll
      for (int t = 0; t < RW; ++t) {
        if (w0 + t < p.W)
          dx[offset(p.dx, tp.n, c, h, w0 + t)] = from_float<T>(to_float(dy[offset(p.dy, tp.n, c, h, w0 + t)]) + acc[t]);
      }
    }
  }
}

// ------------------------------------------------------------------ launchers

template <class Tile, typename T>
const char* launch_forward_tile(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream) {
  void (*kernel)(DepthwiseParams, ConvPlan, bool) = nullptr;
  switch (plan.kernel_k) {
    case 3: kernel = depthwise_forward_kernel<Tile, T, 3>; break;
    case 5: kernel = depthwise_forward_kernel<Tile, T, 5>; break;
    case 7: kernel = depthwise_forward_kernel<Tile, T, 7>; break;
    case 9: kernel = depthwise_forward_kernel<Tile, T, 9>; break;
    default: kernel = depthwise_forward_kernel<Tile, T, 0>; break;
  }
  if (const char* err = allow_smem(kernel, plan.smem_bytes)) return err;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(plan.threads), plan.smem_bytes, stream, p, plan,
             training);
  return launch_error();
}

template <class Tile, typename T>
const char* launch_backward_tile(const DepthwiseParams& p, const ConvPlan& plan, void* stream) {
  void (*kernel)(DepthwiseParams, ConvPlan) = nullptr;
  switch (plan.kernel_k) {
    case 3: kernel = depthwise_backward_kernel<Tile, T, 3>; break;
    case 5: kernel = depthwise_backward_kernel<Tile, T, 5>; break;
    case 7: kernel = depthwise_backward_kernel<Tile, T, 7>; break;
    case 9: kernel = depthwise_backward_kernel<Tile, T, 9>; break;
    default: kernel = depthwise_backward_kernel<Tile, T, 0>; break;
  }
  if (const char* err = allow_smem(kernel, plan.smem_bytes)) return err;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(plan.threads), plan.smem_bytes, stream, p, plan);
  return launch_error();
}

template <typename T>
const char* depthwise_forward_t(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream) {
  return p.channels_last ? launch_forward_tile<ClForwardTile, T>(p, plan, training, stream)
                         : launch_forward_tile<NchwForwardTile, T>(p, plan, training, stream);
}

template <typename T>
const char* depthwise_backward_t(const DepthwiseParams& p, const ConvPlan& plan, void* stream) {
  return p.channels_last ? launch_backward_tile<ClBackwardTile, T>(p, plan, stream)
                         : launch_backward_tile<NchwBackwardTile, T>(p, plan, stream);
}

}  // namespace cmk
