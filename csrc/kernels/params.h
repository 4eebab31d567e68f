// Parameters of the depthwise-block kernels, shared by the CUDA kernels and the host binding.
//
// Plain C++ (no CUDA, no torch headers): the binding fills these structs from at::Tensors,
// the launchers in depthwise_*.cu read them. Every tensor is described by its data pointer and
// its element strides over the logical [N, C, H, W] shape, so any memory layout is accepted;
// the layout only picks the thread mapping (and whether 16-byte vector loads are legal).
#pragma once

#include <cstdint>

namespace cmk {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Same order as ACTIVATION_CODES in convmixer_kernels/ops/depthwise_block_cuda.py.
enum class Act : int { Gelu = 0, GeluTanh = 1, Relu = 2 };

// A logical [N, C, H, W] tensor: data pointer and strides in elements.
struct Strided4 {
  void* data = nullptr;
  int64_t sn = 0, sc = 0, sh = 0, sw = 0;
};

struct DepthwiseParams {
  // ---- geometry (the binding checks N*H*W < 2^30 and C < 2^31: positions and extents are int)
  int N = 0, C = 0, H = 0, W = 0;
  int KH = 0, KW = 0;
  int pad_top = 0, pad_left = 0;  // "same" padding: the rest goes to bottom/right
  DType dtype = DType::F32;
  Act act = Act::Gelu;
  bool channels_last = false;  // thread mapping: lanes over channels (true) or along W (false)
  bool vec_ok = false;         // every tensor the kernel loads allows 16-byte loads along C
  bool w_vec_ok = false;       // NCHW: every tensor the conv epilogues touch allows 16-byte accesses along W

  // ---- tensors in the activation dtype
  Strided4 x;   // block input
  Strided4 a;   // pre-activation a = dwconv(x) + b (written by the training forward, read by backward)
  Strided4 y;   // block output
  Strided4 dy;  // gradient of y
  Strided4 dx;  // gradient of x
  const void* weight = nullptr;  // [C, KH, KW], contiguous
  const void* bias = nullptr;    // [C] or nullptr

  // ---- per-channel float32 vectors [C]
  const float* scale = nullptr;  // BatchNorm affine: y = act(a) * scale + shift + x
  const float* shift = nullptr;
  const float* mean = nullptr;   // backward: the mean that normalized act(a)
  // backward: dg = coef_dy * dy + coef_g * (act(a) - mean) + coef_const, da = dg * act'(a)
  const float* coef_dy = nullptr;
  const float* coef_g = nullptr;
  const float* coef_const = nullptr;
  bool batch_stats_grad = false;  // false: dg = coef_dy * dy (eval-mode backward, affine only)

  // ---- input-side prologue (design.md 3.3; training forward and backward): where the conv kernels
  // read x they read z = act_pro(x) * pro_scale[c] + pro_shift[c] (float32 math, rounded to the
  // activation dtype), applied once per element staged into shared memory; the zero padding stays
  // zero (it pads z). nullptr: no prologue, x is read as it is.
  const float* pro_scale = nullptr;  // [C] or nullptr
  const float* pro_shift = nullptr;  // [C], set together with pro_scale
  Act pro_act = Act::Gelu;

  // ---- float32 outputs
  float* stats = nullptr;    // forward training: [3, tiles, C] (count, mean, M2 of act(a)); reduce: [2, tiles, C]
  float* dw_part = nullptr;  // backward: [groups, row_groups, KH, KW, C] (channel fastest)
  float* db_part = nullptr;  // backward: [groups, row_groups, C]
};

}  // namespace cmk
