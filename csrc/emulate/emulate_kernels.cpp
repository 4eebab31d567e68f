// Every kernel source of csrc/kernels/, compiled as host C++ for the CPU emulator (tests only).
// CMK_EMULATE makes common.cuh pull in emulate.h instead of the CUDA runtime.
#ifndef CMK_EMULATE
#error "emulate_kernels.cpp is built only with -DCMK_EMULATE (see csrc/emulate/build.py)"
#endif

#include "../kernels/depthwise_fwd_f32.cu"
#include "../kernels/depthwise_fwd_f16.cu"
#include "../kernels/depthwise_fwd_bf16.cu"
#include "../kernels/depthwise_bwd_f32.cu"
#include "../kernels/depthwise_bwd_f16.cu"
#include "../kernels/depthwise_bwd_bf16.cu"
#include "../kernels/depthwise_launch.cu"
