// Device-side building blocks of the multi-matrix elementwise kernels (phases 1, 2 and 4).
// Torch-free; included only by .cu files of this directory.
//
// NOTE: [Slot tables by value]
// As in PyTorch's MultiTensorApply.cuh, the per-tensor metadata of a launch (pointers, shapes,
// where each tensor's blocks start) travels in a struct passed BY VALUE as a kernel argument.
// Nothing is copied host -> device before a launch, so the step can be captured in a CUDA graph
// and replayed. The struct is kept under the classic 4 KiB kernel-parameter limit (static_assert
// below); a list with more than kMaxSlots tensors, or more blocks than one grid holds, is split
// into several launches of the same kernel.
//
// NOTE: [Block -> (tensor, matrix, piece)]
// Unlike MultiTensorApply (one table entry per block), a slot here lists where its tensor's
// blocks start (block_start, a prefix sum); a block finds its slot by binary search over at
// most kMaxSlots entries (uniform across the block, broadcast reads of kernel parameters). The
// table is therefore O(tensors), not O(blocks), and a launch may cover any number of blocks.
// Inside a slot, local block ids run matrix-major: block = matrix * pieces_per_matrix + piece,
// so a piece never straddles two matrices of a 3-D stack (each matrix has its own norm).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "muon_kernels.cuh"

namespace muon_ext {
namespace cuda {
namespace detail {

// ---- launch geometry (named so host planning and device walks agree) ----
constexpr int kBlockSize = 256;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kBlockSize / kWarpSize;
// __launch_bounds__ minimum: caps registers at 64 (no spills on sm_80/sm_90 in any variant;
// left alone, ptxas aims at 32 registers and spills) while 1024 resident threads per SM keep
// enough 16-byte loads in flight to saturate HBM.
constexpr int kMinBlocksPerSm = 4;
// Elements per vector access: 4 fp32 = 16 bytes (momentum), 4 bf16/fp16 = 8 bytes.
constexpr int kILP = 4;
// Phase 1: elements per block; each block writes one fp32 partial sum of U^2.
constexpr int64_t kNormChunk = 32768;
// Phases 2 and 4, wide matrices (rows <= cols): elements per block of the linear walk.
constexpr int64_t kElemChunk = 16384;
// Phases 2 and 4, tall matrices (rows > cols): a block walks a strip of kTilesPerStrip square
// kTile x kTile tiles stacked along the rows, transposing through shared memory.
constexpr int kTile = 64;
constexpr int kTileThreadRows = kBlockSize / kTile;        // 4 rows of 64 threads
constexpr int kTileRowsPerThread = kTile / kTileThreadRows;  // 16 elements per thread per tile
constexpr int kTilesPerStrip = 4;
constexpr int64_t kStripRows = int64_t{kTile} * kTilesPerStrip;
// Tensors per launch (see NOTE: [Slot tables by value]).
constexpr int kMaxSlots = 48;
// Largest grid a launch may use (gridDim.x limit).
constexpr int64_t kMaxGridBlocks = 2147483647;

static_assert(kBlockSize % kTile == 0 && kTile % kTileThreadRows == 0, "tile geometry");
static_assert(kNormChunk % kILP == 0 && kElemChunk % kILP == 0, "chunks must hold whole vectors");

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ constexpr bool is_tall(int64_t rows, int64_t cols) { return rows > cols; }

// Phase 1 blocks (= partial sums) per matrix.
__host__ __device__ constexpr int64_t norm_chunks_per_matrix(int64_t rows, int64_t cols) {
  return ceil_div(rows * cols, kNormChunk);
}

// Phases 2 and 4 blocks per matrix: linear chunks (wide) or tile strips (tall).
__host__ __device__ constexpr int64_t walk_blocks_per_matrix(int64_t rows, int64_t cols) {
  return is_tall(rows, cols) ? ceil_div(rows, kStripRows) * ceil_div(cols, kTile)
                             : ceil_div(rows * cols, kElemChunk);
}

// NorMuon row sums: a warp per row of a wide matrix (a row of X, contiguous), a thread per row of
// a tall one (a column of X: consecutive threads read consecutive elements of an X row).
__host__ __device__ constexpr int64_t row_sum_blocks_per_matrix(int64_t rows, int64_t cols) {
  return is_tall(rows, cols) ? ceil_div(rows, kBlockSize) : ceil_div(rows, kWarpsPerBlock);
}

// How a launch cuts each matrix into blocks; the host lays a launch out with the same count the
// device decodes it with (blocks_per_matrix, both sides).
enum class Geometry {
  kNormChunks,  // phase 1: norm_chunks_per_matrix
  kWalk,        // phases 2 and 4: walk_blocks_per_matrix
  kRowSums,     // NorMuon row sums: row_sum_blocks_per_matrix
  kMatrix,      // NorMuon row multipliers: one block per matrix
};

__host__ __device__ constexpr int64_t blocks_per_matrix(Geometry g, int64_t rows, int64_t cols) {
  return g == Geometry::kNormChunks ? norm_chunks_per_matrix(rows, cols)
         : g == Geometry::kWalk     ? walk_blocks_per_matrix(rows, cols)
         : g == Geometry::kRowSums  ? row_sum_blocks_per_matrix(rows, cols)
                                    : 1;
}

// Entries of a matrix's NorMuon row-multiplier region: its larger dimension, so that the matrices
// of a bucket (m x n, either orientation) sit at a fixed stride n.
__host__ __device__ constexpr int64_t normuon_row_stride(int64_t rows, int64_t cols) {
  return rows > cols ? rows : cols;
}

// Per-launch metadata, passed by value (see the NOTEs above).
struct SlotTable {
  const void* src[kMaxSlots];       // grads / input
  float* momentum[kMaxSlots];       // nullptr for DirectionSource::kInput
  void* dst[kMaxSlots];             // params / output
  void* ns_x[kMaxSlots];            // bucket workspace (NsType), first matrix of the tensor
  int64_t rows[kMaxSlots];
  int64_t cols[kMaxSlots];
  int64_t partial_offset[kMaxSlots];  // index of the tensor's first phase-1 partial
  int64_t block_start[kMaxSlots + 1];  // prefix sum of blocks; [num_slots] == grid size
  float update_scale[kMaxSlots];
  // Phase 4 with NorMuon: row multipliers of the tensor's first matrix (normuon_row_stride per
  // matrix); nullptr: no row scaling.
  const float* row_scale[kMaxSlots];
  int32_t num_slots;
};

// Per-launch metadata of the NorMuon kernels (by value, like SlotTable).
struct NorMuonTable {
  const void* ns_x[kMaxSlots];           // Newton-Schulz result (NsType), first matrix
  float* v[kMaxSlots];                   // second moment, `rows` floats per matrix
  float* row[kMaxSlots];                 // workspace: q, then s, then f s (row stride per matrix)
  int64_t rows[kMaxSlots];
  int64_t cols[kMaxSlots];
  int64_t block_start[kMaxSlots + 1];
  int32_t num_slots;
};

// Scalars as the kernels see them (fp32 opmath).
struct DeviceScalars {
  const float* lr;
  const float* grad_scale;
  const float* found_inf;
  float lr_value;
  float grad_scale_value;
  float momentum;
  float one_minus_momentum;
  float weight_decay;
  float eps;
  int32_t nesterov;
  float normuon_beta2;
  float normuon_one_minus_beta2;
  float normuon_eps;
};

static_assert(sizeof(SlotTable) + sizeof(DeviceScalars) + sizeof(void*) <= 4096,
              "kernel arguments must fit the 4 KiB parameter space");
static_assert(sizeof(NorMuonTable) + sizeof(DeviceScalars) <= 4096,
              "kernel arguments must fit the 4 KiB parameter space");

// ---- element conversions (explicit: torch builds define __CUDA_NO_BFLOAT16_CONVERSIONS__) ----
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// ---- vector access ----
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

template <int N, typename T>
__device__ __forceinline__ AlignedVector<T, N> load_vector(const T* p) {
  return *reinterpret_cast<const AlignedVector<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vector(T* p, const AlignedVector<T, N>& v) {
  *reinterpret_cast<AlignedVector<T, N>*>(p) = v;
}

// ---- reductions ----
// NOTE: [Deterministic reductions]
// No float atomics anywhere: a block reduces with a fixed xor-butterfly inside each warp and a
// fixed pass over the warp sums, and partials are summed by the normalize phase in index order.
// The result depends only on the data and the launch geometry, never on scheduling, so reruns
// are bit-identical. (The xor butterfly leaves the same total in every lane: a + b == b + a.)
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block, returned to every thread. Must be reached by all threads of the block.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kWarpsPerBlock];
  __shared__ float total;
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kWarpsPerBlock ? warp_sums[lane] : 0.f;
    w = warp_sum(w);
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// ---- block -> slot ----
// Largest slot whose block_start <= block (block_start is strictly increasing: every slot
// holds at least one block).
template <typename Table>
__device__ __forceinline__ int find_slot(const Table& table, int64_t block) {
  int lo = 0;
  int hi = table.num_slots - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.block_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Where a block of a multi-matrix launch works: its slot, that tensor's matrix shape, and which
// matrix of the batch and which piece of it. `geometry` must be the one the host laid the launch
// out with (see for_each_launch in elementwise.cu).
struct BlockPlace {
  int slot;
  int64_t local;  // block index within its slot (phase 1: also the partial's index)
  int64_t rows;
  int64_t cols;
  int64_t numel;
  int64_t matrix;
  int64_t piece;
};

template <typename Table>
__device__ __forceinline__ BlockPlace locate_block(const Table& table, Geometry geometry) {
  BlockPlace at;
  const int64_t block = blockIdx.x;
  at.slot = find_slot(table, block);
  at.local = block - table.block_start[at.slot];
  at.rows = table.rows[at.slot];
  at.cols = table.cols[at.slot];
  at.numel = at.rows * at.cols;
  const int64_t pieces = blocks_per_matrix(geometry, at.rows, at.cols);
  at.matrix = at.local / pieces;
  at.piece = at.local - at.matrix * pieces;
  return at;
}

// Launches kernel<<<blocks, kBlockSize, 0, stream>>>(args...). The host-emulation test build
// (csrc/cuda/tests/host_emulation/) compiles these sources as plain C++ and supplies its own
// launch_kernel that runs the blocks on CPU threads; that is the only hook it needs.
#ifndef MUON_EXT_HOST_EMULATION
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), int64_t blocks, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<static_cast<unsigned int>(blocks), kBlockSize, 0, stream>>>(args...);
}
#endif

__device__ __forceinline__ bool found_inf_set(const DeviceScalars& s) {
  // NaN != 0 is true: a NaN flag also skips the step, as `float(found_inf) != 0` does in Python.
  return s.found_inf != nullptr && *s.found_inf != 0.f;
}

// ---- the math (fp32 opmath), shared by phases 1 and 2 so both see the same U ----
struct MomentumMath {
  float momentum;
  float one_minus_momentum;
  float grad_scale;
  bool nesterov;

  __device__ __forceinline__ float scaled_grad(float g) const { return g / grad_scale; }
  // M = lerp(M, G', 1 - momentum)
  __device__ __forceinline__ float next_momentum(float m, float g) const {
    return m + one_minus_momentum * (g - m);
  }
  // U = Nesterov ? lerp(G', M, momentum) : M
  __device__ __forceinline__ float direction(float g, float m) const {
    return nesterov ? g + momentum * (m - g) : m;
  }
};

__device__ __forceinline__ MomentumMath make_momentum_math(const DeviceScalars& s) {
  MomentumMath math;
  math.momentum = s.momentum;
  math.one_minus_momentum = s.one_minus_momentum;
  math.grad_scale = s.grad_scale != nullptr ? *s.grad_scale : s.grad_scale_value;
  math.nesterov = s.nesterov != 0;
  return math;
}

}  // namespace detail
}  // namespace cuda
}  // namespace muon_ext
