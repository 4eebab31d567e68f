// CPU emulation of the few CUDA features the kernels use, so that tests without a GPU run the
// real kernel code (tests/test_cuda_ext.py builds csrc/ with -DCMK_EMULATE and g++).
//
// A launch runs its blocks one after the other; each block runs as blockDim std::threads that
// meet at a std::barrier for __syncthreads(). Dynamic shared memory is poisoned with NaN before
// every block, so a read of an element no thread wrote shows up in the results. A thread that
// passes fewer __syncthreads() than its block-mates (a barrier in divergent code) is an error.
// What this cannot find: data races (compute-sanitizer racecheck on a GPU does), warp-level
// behaviour, performance.
#pragma once

#include <barrier>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>  // dim3, uint3 (host definitions only; no CUDA runtime calls are made)

#undef __launch_bounds__
#define __launch_bounds__(...)

namespace cmk_emu {

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local unsigned char* block_smem = nullptr;
inline thread_local long barriers_passed = 0;

inline void syncthreads() {
  ++barriers_passed;
  block_barrier->arrive_and_wait();
}

inline unsigned char* dynamic_smem() { return block_smem; }

template <class... KernelArgs, class... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  std::vector<float> smem((smem_bytes + sizeof(float) - 1) / sizeof(float) + 4);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
        std::barrier<> barrier(nthreads);
        std::vector<long> passed(nthreads, 0);
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned t = 0; t < nthreads; ++t)
          threads.emplace_back([&, t] {
            thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            block_idx = uint3{bx, by, bz};
            block_dim = block;
            grid_dim = grid;
            block_barrier = &barrier;
            block_smem = reinterpret_cast<unsigned char*>(smem.data());
            barriers_passed = 0;
            kernel(args...);
            passed[t] = barriers_passed;
            barrier.arrive_and_drop();
          });
        for (auto& th : threads) th.join();
        for (unsigned t = 1; t < nthreads; ++t)
          if (passed[t] != passed[0])
            throw std::runtime_error("emulated block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                                     std::to_string(bz) + "): thread " + std::to_string(t) + " passed " +
                                     std::to_string(passed[t]) + " __syncthreads() but thread 0 passed " +
                                     std::to_string(passed[0]));
      }
}

}  // namespace cmk_emu

#define threadIdx (::cmk_emu::thread_idx)
#define blockIdx (::cmk_emu::block_idx)
#define blockDim (::cmk_emu::block_dim)
#define gridDim (::cmk_emu::grid_dim)
#define __syncthreads() ::cmk_emu::syncthreads()
