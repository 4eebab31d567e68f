// Forward conv kernels for float (all layouts, k = 3, 5, 7, 9 and the general path).
#include "depthwise_conv.cuh"
#include "depthwise_instances.h"

namespace cmk {
template const char* depthwise_forward_t<float>(const DepthwiseParams&, const ConvPlan&, bool, void*);
}  // namespace cmk
