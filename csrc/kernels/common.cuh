// Device-side helpers shared by the depthwise-block kernels: dtype conversion, 16-byte vector
// loads, activations, the Chan combination of (count, mean, M2), and the few spots where the
// CPU emulator (csrc/emulate/emulate.h, tests only) replaces CUDA.
#pragma once

#include <cstdint>

#ifdef CMK_EMULATE
#include "../emulate/emulate.h"
#else
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "params.h"
#include "plan.h"

namespace cmk {

// ------------------------------------------------------------------ CUDA vs emulator

// `kernel` must be a plain name (a variable holding the kernel's address): template argument
// lists would split the macro's arguments.
#ifdef CMK_EMULATE
#define CMK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::cmk_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define CMK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef CMK_EMULATE
  return reinterpret_cast<T*>(::cmk_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char cmk_dynamic_smem[];
  return reinterpret_cast<T*>(cmk_dynamic_smem);
#endif
}

// Opt a kernel into more than 48 KB of dynamic shared memory; nullptr or the CUDA error text.
template <class Kernel>
inline const char* allow_smem(Kernel kernel, int64_t bytes) {
#ifdef CMK_EMULATE
  (void)kernel;
  (void)bytes;
  return nullptr;
#else
  if (bytes <= 48 * 1024) return nullptr;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
#endif
}

// The error of the latest launch, if any.
inline const char* launch_error() {
#ifdef CMK_EMULATE
  return nullptr;
#else
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
#endif
}

// ------------------------------------------------------------------ dtypes

template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) { return Num<T>::load(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) { return Num<T>::store(v); }
// The value a float takes once stored in T and read back.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// 16 bytes of T: one vector load (the caller guarantees 16-byte alignment).
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[Vec16<T>::N]) {
  const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(ptr);
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; ++k) out[k] = to_float(v.v[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[Vec16<T>::N]) {
  Vec16<T> v;
#pragma unroll
  for (int k = 0; k < Vec16<T>::N; ++k) v.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Vec16<T>*>(ptr) = v;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// a * b and a + b each rounded once (never contracted into an fma): the roundings of torch's
// elementwise ops, which the prologue's act(x) * s + t must reproduce.
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef CMK_EMULATE
  volatile float r = a * b;  // stored: the host compiler cannot contract it with the add
  return r;
#else
  return __fmul_rn(a, b);
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef CMK_EMULATE
  return a + b;
#else
  return __fadd_rn(a, b);
#endif
}

// n / d for 0 <= n < 2^30 (see FastDiv in plan.h).
__device__ __forceinline__ int divide(const FastDiv& f, int n) {
  return static_cast<int>((static_cast<uint64_t>(n) * f.mul) >> f.shift);
}

// Element offset of (n, c, h, w); 64-bit, tensors may exceed 2^31 elements.
__device__ __forceinline__ int64_t offset(const Strided4& t, int n, int c, int h, int w) {
  return n * t.sn + c * t.sc + h * t.sh + w * t.sw;
}

// ------------------------------------------------------------------ activations

constexpr float kRsqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhCoef = 0.044715f;

// The standard normal CDF of the exact GELU, branch-free in float32: the polynomials fitted in
// convmixer_kernels/ops/normal_cdf.py (the fit, its error against float64 and torch, and the same numbers
// in the Triton kernels; tests/test_normal_cdf.py checks these against it). ~25 SASS instructions per GELU
// on sm_90 where erff takes ~33 (a one-line test kernel, less a copy kernel's).
constexpr float kCdfSplit = 1.3f;  // |x| below: Phi = 1/2 + x * P(x^2)
constexpr float kCdfTail = 5.7f;    // |x| from here on: Phi = 0 or 1 in float32
constexpr float kCdfShift = 3.5f;  // between: Phi(-|x|) = 2^L(|x| - shift)
__device__ constexpr float kCdfSmall[6] = {0.3989422619342804f, -0.06648989766836166f, 0.009971076622605324f, -0.0011819625506177545f, 0.00010977806959999725f, -6.502261840068968e-06f};
__device__ constexpr float kCdfLarge[9] = {-12.069681167602539f, -5.412113666534424f, -0.6802788972854614f, -0.005650958977639675f, 0.0008001740206964314f, -0.00011017369251931086f, 1.4402268789126538e-05f, -1.7384899138050969e-06f, 1.4345530985337973e-07f};
constexpr float kNegHalfLog2e = -0.72134752044448170368f;  // exp(-x^2 / 2) = 2^(x^2 * this)

// 2^v as one MUFU.EX2 (ex2.approx.ftz: ~2 ulp; exp2f adds a denormal-range fix-up of ~4 instructions,
// and every result it would change here is below 2^-126, where the CDF's tail is already 0).
__device__ __forceinline__ float exp2_approx(float v) {
#ifdef CMK_EMULATE
  return std::exp2(v);
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#endif
}

template <int N>
__device__ __forceinline__ float horner(const float (&c)[N], float v) {
  float r = c[N - 1];
#pragma unroll
  for (int i = N - 2; i >= 0; --i) r = fmaf(r, v, c[i]);
  return r;
}

// t < bound ? x : 0 as one SETP + SELP, after x is computed. Written as `?:`, nvcc sank the tail's
// polynomial and MUFU into a branch around them (BSSY, BRA, BSYNC for every GELU on sm_90), a branch
// that is almost never taken and costs ~3 instructions each time.
__device__ __forceinline__ float below_or_zero(float t, float bound, float x) {
#ifdef CMK_EMULATE
  return t < bound ? x : 0.f;
#else
  float r;
  asm("{\n\t.reg .pred p;\n\tsetp.lt.f32 p, %1, %2;\n\tselp.f32 %0, %3, 0f00000000, p;\n\t}"
      : "=f"(r) : "f"(t), "f"(bound), "f"(x));
  return r;
#endif
}

// Phi(a) given s = a * a (the derivative reuses s).
__device__ __forceinline__ float normal_cdf(float a, float s) {
  const float small = fmaf(a, horner(kCdfSmall, s), 0.5f);
  const float t = fabsf(a);
  const float q = below_or_zero(t, kCdfTail, exp2_approx(horner(kCdfLarge, t - kCdfShift)));  // Phi(-|a|)
  return t < kCdfSplit ? small : (a > 0.f ? 1.f - q : q);
}

__device__ __forceinline__ float normal_pdf(float s) { return kRsqrt2Pi * exp2_approx(s * kNegHalfLog2e); }

__device__ __forceinline__ float act_forward(Act act, float a) {
  switch (act) {
    case Act::Relu:
      return a < 0.f ? 0.f : a;  // NaN propagates, as in torch.relu
    case Act::GeluTanh:
      return 0.5f * a * (1.f + tanhf(kSqrt2OverPi * (a + kTanhCoef * a * a * a)));
    default:
      return a * normal_cdf(a, a * a);
  }
}

// d act(a) / da, as torch's backward formulas compute it.
__device__ __forceinline__ float act_backward(Act act, float a) {
  switch (act) {
    case Act::Relu:
      return a > 0.f ? 1.f : 0.f;
    case Act::GeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (a + kTanhCoef * a * a * a));
      const float du = kSqrt2OverPi * (1.f + 3.f * kTanhCoef * a * a);
      return 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * du;
    }
    default: {
      const float s = a * a;
      return normal_cdf(a, s) + a * normal_pdf(s);
    }
  }
}

// act(a) and act'(a) together: the same expressions as act_forward and act_backward (bitwise
// equal results) with the normal CDF / tanh evaluated once.
struct ActPair {
  float g, dg;
};

__device__ __forceinline__ ActPair act_both(Act act, float a) {
  switch (act) {
    case Act::Relu:
      return {a < 0.f ? 0.f : a, a > 0.f ? 1.f : 0.f};
    case Act::GeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (a + kTanhCoef * a * a * a));
      const float du = kSqrt2OverPi * (1.f + 3.f * kTanhCoef * a * a);
      return {0.5f * a * (1.f + t), 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * du};
    }
    default: {
      const float s = a * a;
      const float cdf = normal_cdf(a, s);
      return {a * cdf, cdf + a * normal_pdf(s)};
    }
  }
}

// The activation as a kernel template argument. The default kernels are compiled once per activation
// (StaticAct<A>): act_forward / act_both fold the switch away, so a per-element loop holds only the
// activation it runs (with the runtime switch, every loop body held all three: in sm_90 SASS the channels_last
// bf16 apply loop was 627 instructions per 8 elements, 327 with GELU alone). The *_prologue_kernel instances,
// not the default path, keep the runtime switch (RuntimeAct) rather than tripling their instances.
template <Act A>
struct StaticAct {
  __device__ __forceinline__ explicit StaticAct(Act) {}
  __device__ __forceinline__ float forward(float a) const { return act_forward(A, a); }
  __device__ __forceinline__ ActPair both(float a) const { return act_both(A, a); }
};

struct RuntimeAct {
  Act act;
  __device__ __forceinline__ explicit RuntimeAct(Act a) : act(a) {}
  __device__ __forceinline__ float forward(float a) const { return act_forward(act, a); }
  __device__ __forceinline__ ActPair both(float a) const { return act_both(act, a); }
};

template <class ActFn>
struct ActTag {
  using type = ActFn;
};

// fn(ActTag<StaticAct<act>>) for the runtime activation code: the launchers' one dispatch.
template <class Fn>
const char* dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::Gelu: return fn(ActTag<StaticAct<Act::Gelu>>{});
    case Act::GeluTanh: return fn(ActTag<StaticAct<Act::GeluTanh>>{});
    case Act::Relu: return fn(ActTag<StaticAct<Act::Relu>>{});
  }
  return "unknown activation code";
}

// ------------------------------------------------------------------ statistics

struct Welford {
  float n, mean, m2;
};

// Chan's combination, written as ops/batchnorm.py:finalize_reference writes it.
__device__ __forceinline__ Welford chan_combine(Welford a, Welford b) {
  const float n = a.n + b.n;
  const float safe_n = n > 0.f ? n : 1.f;
  const float delta = b.mean - a.mean;
  Welford r;
  r.n = n;
  r.mean = a.mean + delta * b.n / safe_n;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * b.n / safe_n;
  return r;
}

}  // namespace cmk
