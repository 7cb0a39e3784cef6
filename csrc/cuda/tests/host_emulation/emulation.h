// Host emulation of the CUDA execution model, just enough for muon_ext's elementwise kernels.
//
// NOTE: [Why a host emulation]
// CI and the development machines have no GPU. emulated_kernels.cpp compiles the real kernel
// sources (csrc/cuda/kernels/*.cu) as plain C++ after this header, and fake_cuda_blas.cpp
// stands in for the CUDA runtime, cuBLAS and cuBLASLt (documented column-major semantics,
// bf16 or fp16 storage, fp32 accumulation). test_muon_kernels.cpp then runs unchanged against
// that, so indexing, tiling, tails, vector paths, slot tables, found_inf, the workspace layout
// and the row-major <-> column-major GEMM mapping are all exercised without a device. What it
// cannot show: real cuBLAS(Lt) algorithm selection, memory-model/timing effects, performance.
//
// Model (details in emulated_kernels.cpp): blocks run one after another; the threads of a block
// are fibers on one OS thread, switching at barriers: __syncthreads waits for the block,
// __shfl_xor_sync exchanges through a barrier over the 32 lanes of a warp. __shared__ becomes
// `static`, which is block-shared because only one block runs at a time. A barrier that not
// every thread reaches aborts with a message (on a GPU it would hang or corrupt).
#pragma once

#define MUON_EXT_HOST_EMULATION 1
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>

namespace muon_emu {

struct Index3 {
  unsigned int x, y, z;
};

extern thread_local Index3 tls_thread_idx;
extern thread_local Index3 tls_block_idx;

void sync_block();
float shfl_xor(float v, int lane_mask);
// Runs body() as `blocks` blocks of `threads` threads, one block at a time.
void run_grid(int64_t blocks, int threads, const std::function<void()>& body);

}  // namespace muon_emu

#define threadIdx (::muon_emu::tls_thread_idx)
#define blockIdx (::muon_emu::tls_block_idx)
#define __syncthreads() ::muon_emu::sync_block()
#define __shfl_xor_sync(mask, value, lane_mask) ::muon_emu::shfl_xor((value), (lane_mask))
