// The depthwise block's small kernels and the dtype dispatch of every launcher (launch.h).
//
//   apply:        y = act(a) * scale + shift + x                     (training forward, step 3)
//   grad_reduce:  per position chunk, sum dy and sum dy * (act(a) - mean)   (backward, first pass)
//   combine:      BatchNorm partials [3, T, C] -> [3, C] (Chan), slices of tiles then a fixed tree
// The first two are elementwise over (position, channel): a block is a channel group times a
// chunk of kPositionsPerBlock positions; channels_last reads VEC channels per thread with
// 16-byte loads, NCHW reads one channel per warp with lanes along W.
#include "common.cuh"
#include "depthwise_instances.h"
#include "launch.h"

namespace cmk {

// ------------------------------------------------------------------ elementwise kernels

struct ElemWork {
  int slot, lane;
  int c0;        // first channel of the block
  int c;         // first channel of this thread (it has plan.vec of them)
  int64_t chunk; // position chunk = index of the reduction partial
  int pos_begin, pos_end;
};

__device__ __forceinline__ ElemWork elem_work(const DepthwiseParams& p, const ElementwisePlan& plan) {
  ElemWork wk;
  const int tid = threadIdx.x;
  wk.slot = p.channels_last ? tid % plan.slots : tid / plan.lanes;
  wk.lane = p.channels_last ? tid / plan.slots : tid % plan.lanes;
  wk.chunk = static_cast<int64_t>(blockIdx.x) % plan.tiles;
  wk.c0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) / plan.tiles) * plan.channels_per_block;
  wk.c = wk.c0 + wk.slot * plan.vec;
  const int positions = p.N * p.H * p.W;  // < 2^30 (checked by the binding): no int overflow below
  wk.pos_begin = static_cast<int>(wk.chunk) * plan.positions_per_block;
  wk.pos_end = imin(wk.pos_begin + plan.positions_per_block, positions);
  return wk;
}

struct Position {
  int n, h, w;
};

__device__ __forceinline__ Position position(const DepthwiseParams& p, const ElementwisePlan& plan, int pos) {
  const int n = divide(plan.div_hw, pos), hw = pos - n * (p.H * p.W);
  const int h = divide(plan.div_w, hw);
  return {n, h, hw - h * p.W};
}

// V channels per thread: V > 1 only on the channels_last path with vec_ok (then C % V == 0).
// ActFn: the activation, a compile-time StaticAct (common.cuh).
template <typename T, int V, class ActFn>
__global__ void __launch_bounds__(kElementwiseThreads)
    depthwise_apply_kernel(__grid_constant__ const DepthwiseParams p, __grid_constant__ const ElementwisePlan plan) {
  const ActFn act(p.act);
  const ElemWork wk = elem_work(p, plan);
  if (wk.c >= p.C) return;  // no barrier in this kernel
  const T* a = static_cast<const T*>(p.a.data);
  const T* x = static_cast<const T*>(p.x.data);
  T* y = static_cast<T*>(p.y.data);
  float s[V], t[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s[k] = p.scale[wk.c + k];
    t[k] = p.shift[wk.c + k];
  }
  for (int pos = wk.pos_begin + wk.lane; pos < wk.pos_end; pos += plan.lanes) {
    const Position q = position(p, plan, pos);
    if constexpr (V > 1) {
      float av[V], xv[V], yv[V];
      load_vec(a + offset(p.a, q.n, wk.c, q.h, q.w), av);
      load_vec(x + offset(p.x, q.n, wk.c, q.h, q.w), xv);
#pragma unroll
      for (int k = 0; k < V; ++k) yv[k] = act.forward(av[k]) * s[k] + t[k] + xv[k];
      store_vec(y + offset(p.y, q.n, wk.c, q.h, q.w), yv);
    } else {
      const float av = to_float(a[offset(p.a, q.n, wk.c, q.h, q.w)]);
      const float xv = to_float(x[offset(p.x, q.n, wk.c, q.h, q.w)]);
      y[offset(p.y, q.n, wk.c, q.h, q.w)] = from_float<T>(act.forward(av) * s[0] + t[0] + xv);
    }
  }
}

template <typename T, int V, class ActFn>
__global__ void __launch_bounds__(kElementwiseThreads)
    depthwise_grad_reduce_kernel(__grid_constant__ const DepthwiseParams p, __grid_constant__ const ElementwisePlan plan) {
  const ActFn act(p.act);
  const ElemWork wk = elem_work(p, plan);
  float s1[V], s2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) s1[k] = s2[k] = 0.f;
  if (wk.c < p.C) {
    const T* dy = static_cast<const T*>(p.dy.data);
    const T* a = static_cast<const T*>(p.a.data);
    float mean[V];
#pragma unroll
    for (int k = 0; k < V; ++k) mean[k] = p.mean[wk.c + k];
    for (int pos = wk.pos_begin + wk.lane; pos < wk.pos_end; pos += plan.lanes) {
      const Position q = position(p, plan, pos);
      float dv[V], av[V];
      if constexpr (V > 1) {
        load_vec(dy + offset(p.dy, q.n, wk.c, q.h, q.w), dv);
        load_vec(a + offset(p.a, q.n, wk.c, q.h, q.w), av);
      } else {
        dv[0] = to_float(dy[offset(p.dy, q.n, wk.c, q.h, q.w)]);
        av[0] = to_float(a[offset(p.a, q.n, wk.c, q.h, q.w)]);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        s1[k] += dv[k];
        s2[k] += dv[k] * (act.forward(av[k]) - mean[k]);
      }
    }
  }
  // Sum the lanes of each channel in lane order (deterministic).
  float* red = dynamic_smem<float>();  // [lanes][channels_per_block][2]
  const int cpb = plan.channels_per_block;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float* r = red + (wk.lane * cpb + wk.slot * V + k) * 2;
    r[0] = s1[k];
    r[1] = s2[k];
  }
  __syncthreads();
  for (int ch = threadIdx.x; ch < cpb; ch += kElementwiseThreads) {
    float t1 = 0.f, t2 = 0.f;
    for (int l = 0; l < plan.lanes; ++l) {
      t1 += red[(l * cpb + ch) * 2];
      t2 += red[(l * cpb + ch) * 2 + 1];
    }
    const int c = wk.c0 + ch;
    if (c < p.C) {
      p.stats[wk.chunk * p.C + c] = t1;
      p.stats[(plan.tiles + wk.chunk) * p.C + c] = t2;
    }
  }
}

// Parallel fixed-order combine: a block owns 32 channels (lanes, coalesced) x kCombineSlices
// slices of consecutive tiles. Each slice combines its tiles in index order, then the slices
// merge pairwise left to right in a fixed tree: the order depends only on (tiles, C), so the
// result is deterministic, and T / 32 serial steps replace T.
constexpr int kCombineChannels = 32;
constexpr int kCombineSlices = 32;
constexpr int kCombineSmem = kCombineSlices * 3 * kCombineChannels * 4;

// chan_combine, exact when one side is empty (a slice with no tiles).
__device__ __forceinline__ Welford chan_merge(Welford a, Welford b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  return chan_combine(a, b);
}

__global__ void __launch_bounds__(kCombineChannels * kCombineSlices)
    batchnorm_combine_kernel(const float* __restrict__ partials, float* __restrict__ out, int64_t tiles, int C) {
  auto red = reinterpret_cast<float(*)[3][kCombineChannels]>(dynamic_smem<float>());  // [slices][3][channels]
  const int lane = static_cast<int>(threadIdx.x) % kCombineChannels;
  const int slice = static_cast<int>(threadIdx.x) / kCombineChannels;
  const int c = static_cast<int>(blockIdx.x) * kCombineChannels + lane;
  const int64_t plane = tiles * C;
  const int64_t per = (tiles + kCombineSlices - 1) / kCombineSlices;
  const int64_t t0 = slice * per, t1 = t0 + per < tiles ? t0 + per : tiles;
  Welford acc{0.f, 0.f, 0.f};
  if (c < C) {
#pragma unroll 4
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t at = t * C + c;
      const Welford w{partials[at], partials[plane + at], partials[2 * plane + at]};
      acc = t == t0 ? w : chan_combine(acc, w);
    }
  }
  red[slice][0][lane] = acc.n;
  red[slice][1][lane] = acc.mean;
  red[slice][2][lane] = acc.m2;
  for (int stride = 1; stride < kCombineSlices; stride *= 2) {
    __syncthreads();
    if (slice % (2 * stride) == 0) {
      const Welford r = chan_merge(Welford{red[slice][0][lane], red[slice][1][lane], red[slice][2][lane]},
                                   Welford{red[slice + stride][0][lane], red[slice + stride][1][lane],
                                           red[slice + stride][2][lane]});
      red[slice][0][lane] = r.n;
      red[slice][1][lane] = r.mean;
      red[slice][2][lane] = r.m2;
    }
  }
  if (slice == 0 && c < C) {
    out[c] = red[0][0][lane];
    out[C + c] = red[0][1][lane];
    out[2 * C + c] = red[0][2][lane];
  }
}

// ------------------------------------------------------------------ launchers

template <class Fn>
const char* dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32: return fn(float{});
    case DType::F16: return fn(__half{});
    case DType::BF16: return fn(__nv_bfloat16{});
  }
  return "unknown dtype code";
}

template <typename T, class ActFn>
const char* apply_t(const DepthwiseParams& p, const ElementwisePlan& plan, void* stream) {
  void (*kernel)(DepthwiseParams, ElementwisePlan) =
      plan.vec == 1 ? depthwise_apply_kernel<T, 1, ActFn> : depthwise_apply_kernel<T, Vec16<T>::N, ActFn>;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(kElementwiseThreads), 0, stream, p, plan);
  return launch_error();
}

template <typename T, class ActFn>
const char* grad_reduce_t(const DepthwiseParams& p, const ElementwisePlan& plan, void* stream) {
  void (*kernel)(DepthwiseParams, ElementwisePlan) = plan.vec == 1 ? depthwise_grad_reduce_kernel<T, 1, ActFn>
                                                                    : depthwise_grad_reduce_kernel<T, Vec16<T>::N, ActFn>;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.blocks)), dim3(kElementwiseThreads), plan.smem_bytes, stream, p,
             plan);
  return launch_error();
}

const char* depthwise_forward(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return depthwise_forward_t<decltype(tag)>(p, plan, training, stream); });
}

const char* depthwise_backward(const DepthwiseParams& p, const ConvPlan& plan, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) { return depthwise_backward_t<decltype(tag)>(p, plan, stream); });
}

const char* depthwise_apply(const DepthwiseParams& p, const ElementwisePlan& plan, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return dispatch_act(p.act, [&](auto act) { return apply_t<decltype(tag), typename decltype(act)::type>(p, plan, stream); });
  });
}

const char* depthwise_grad_reduce(const DepthwiseParams& p, const ElementwisePlan& plan, void* stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return dispatch_act(p.act, [&](auto act) {
      return grad_reduce_t<decltype(tag), typename decltype(act)::type>(p, plan, stream);
    });
  });
}

const char* batchnorm_combine(const float* partials, float* out, int64_t tiles, int C, void* stream) {
  void (*kernel)(const float*, float*, int64_t, int) = batchnorm_combine_kernel;
  CMK_LAUNCH(kernel, dim3(static_cast<unsigned>((C + kCombineChannels - 1) / kCombineChannels)),
             dim3(kCombineChannels * kCombineSlices), kCombineSmem, stream, partials, out, tiles, C);
  return launch_error();
}

}  // namespace cmk
