// The dtype instantiations of the conv launchers, defined in depthwise_{fwd,bwd}_<dtype>.cu
// (one file each, so that builds compile them in parallel).
#pragma once

#include "params.h"
#include "plan.h"

namespace cmk {

template <typename T>
const char* depthwise_forward_t(const DepthwiseParams& p, const ConvPlan& plan, bool training, void* stream);

template <typename T>
const char* depthwise_backward_t(const DepthwiseParams& p, const ConvPlan& plan, void* stream);

}  // namespace cmk
