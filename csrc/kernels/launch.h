// Host entry points of the depthwise-block kernels, called by the binding (csrc/binding.cpp).
//
// Plain C++ (no CUDA, no torch headers). Each returns nullptr on success or the CUDA error
// text; `stream` is the cudaStream_t to launch on.
#pragma once

#include <cstdint>

#include "params.h"
#include "plan.h"

namespace cmk {

// training: writes p.a and the statistics partials p.stats [3, plan.tiles, C];
// eval: writes p.y = act(dwconv(x) + b) * scale + shift + x.
const char* depthwise_forward(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream);

// Writes p.dx = dy + dwconv^T(da) and the partials p.dw_part [plan.groups, plan.row_groups, C, KH, KW],
// p.db_part [plan.groups, plan.row_groups, C].
const char* depthwise_backward(const DepthwiseParams& p, const ConvPlan& plan, void* stream);

// p.y = act(a) * scale + shift + x.
const char* depthwise_apply(const DepthwiseParams& p, const ElementwisePlan& plan, void* stream);

// p.stats [2, plan.tiles, C] = per position chunk: (sum dy, sum dy * (act(a) - mean)).
const char* depthwise_grad_reduce(const DepthwiseParams& p, const ElementwisePlan& plan, void* stream);

// out [3, C] = the per-tile (count, mean, M2) of partials [3, tiles, C] combined (Chan) in a fixed order:
// slices of consecutive tiles, then a fixed pairwise tree over the slices (deterministic).
const char* batchnorm_combine(const float* partials, float* out, int64_t tiles, int C, void* stream);

}  // namespace cmk
