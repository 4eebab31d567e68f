// Forward conv kernels for __nv_bfloat16 (all layouts, k = 3, 5, 7, 9 and the general path).
#include "depthwise_conv.cuh"
#include "depthwise_instances.h"

namespace cmk {
template const char* depthwise_forward_t<__nv_bfloat16>(const DepthwiseParams&, const ConvPlan&, bool, void*);
}  // namespace cmk
