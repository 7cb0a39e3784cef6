// Phases 1, 2 and 4 of the fused Muon step: multi-matrix elementwise kernels (torch-free).
//
// Layout of the work (see NOTE: [Block -> (tensor, matrix, piece)] in multi_matrix_apply.cuh):
//   phase 1 (norm_partials_kernel): a block owns kNormChunk consecutive elements of one matrix,
//     updates the momentum there and writes one fp32 partial sum of U^2;
//   NorMuon (normuon_row_sums_kernel, normuon_scale_kernel): NOTE: [NorMuon on CUDA];
//   phase 2 (normalize_kernel) and phase 4 (write_back_kernel): a block owns kElemChunk
//     consecutive elements of a wide matrix (rows <= cols), or a strip of kTilesPerStrip
//     kTile x kTile tiles of a tall one, which it transposes through shared memory so that both
//     the row-major source and the row-major transposed destination are read/written coalesced.
// All sizes and indices are int64; fp32 opmath; each output is rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "multi_matrix_apply.cuh"
#include "muon_kernels.cuh"

namespace muon_ext {
namespace cuda {
namespace detail {
namespace {

constexpr DirectionSource kMomentumSource = DirectionSource::kMomentum;
constexpr WriteBack kApplyUpdate = WriteBack::kApplyUpdate;

// U of one element from the scaled-or-not gradient value g and the (new) momentum m.
template <DirectionSource kSource>
__device__ __forceinline__ float direction_of(float g, float m, const MomentumMath& math) {
  if constexpr (kSource == kMomentumSource) {
    return math.direction(math.scaled_grad(g), m);
  } else {
    return g;
  }
}

// ================================ phase 1 ================================

// Walks elements [0, len) of one chunk: M <- lerp(M, G', 1 - momentum) in place (kMomentum) and
// returns this thread's share of sum(U^2) (accumulated in a fixed order).
template <typename T, DirectionSource kSource>
struct MomentumNormFunctor {
  __device__ __forceinline__ float operator()(const T* __restrict__ g, float* __restrict__ m,
                                              int64_t len, const MomentumMath& math) const {
    constexpr bool kHasMomentum = kSource == kMomentumSource;
    float acc = 0.f;
    int64_t tail = 0;
    if (is_aligned<kILP>(g) && (!kHasMomentum || is_aligned<kILP>(m))) {
      const int64_t num_vec = len / kILP;
      for (int64_t v = threadIdx.x; v < num_vec; v += kBlockSize) {
        const AlignedVector<T, kILP> gv = load_vector<kILP>(g + v * kILP);
        if constexpr (kHasMomentum) {
          AlignedVector<float, kILP> mv = load_vector<kILP>(m + v * kILP);
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            const float gs = math.scaled_grad(to_float(gv.val[k]));
            mv.val[k] = math.next_momentum(mv.val[k], gs);
            const float u = math.direction(gs, mv.val[k]);
            acc += u * u;
          }
          store_vector(m + v * kILP, mv);
        } else {
#pragma unroll
          for (int k = 0; k < kILP; ++k) {
            const float u = to_float(gv.val[k]);
            acc += u * u;
          }
        }
      }
      tail = num_vec * kILP;
    }
    for (int64_t i = tail + threadIdx.x; i < len; i += kBlockSize) {
      if constexpr (kHasMomentum) {
        const float gs = math.scaled_grad(to_float(g[i]));
        const float mn = math.next_momentum(m[i], gs);
        m[i] = mn;
        const float u = math.direction(gs, mn);
        acc += u * u;
      } else {
        const float u = to_float(g[i]);
        acc += u * u;
      }
    }
    return acc;
  }
};

template <typename T, DirectionSource kSource>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    norm_partials_kernel(const __grid_constant__ SlotTable table,
                         const __grid_constant__ DeviceScalars scalars,
                         float* __restrict__ partials) {
  // NOTE: [found_inf] the flag is read on the device; a set flag returns before anything is
  // written (no masking with (1 - found_inf): inf * 0 is NaN). Uniform over the grid.
  if (found_inf_set(scalars)) return;
  const BlockPlace at = locate_block(table, Geometry::kNormChunks);
  const int slot = at.slot;
  const int64_t begin = at.matrix * at.numel + at.piece * kNormChunk;
  const int64_t remaining = at.numel - at.piece * kNormChunk;
  const int64_t len = remaining < kNormChunk ? remaining : kNormChunk;

  const T* g = static_cast<const T*>(table.src[slot]) + begin;
  float* m = kSource == kMomentumSource ? table.momentum[slot] + begin : nullptr;
  const MomentumMath math = make_momentum_math(scalars);
  const float acc = MomentumNormFunctor<T, kSource>{}(g, m, len, math);
  const float sum = block_sum(acc);
  // Partials of a tensor are laid out matrix-major like its blocks: partial_offset + local.
  if (threadIdx.x == 0) partials[table.partial_offset[slot] + at.local] = sum;
}

// ================================ phase 2 ================================

// x = U / denom, or exactly 0 when denom == 0 (an all-zero matrix with eps == 0, or a step
// skipped by found_inf: the workspace then holds zeros and Newton-Schulz stays finite).
struct Normalizer {
  float denom;
  bool zero;
  __device__ __forceinline__ float operator()(float u) const { return zero ? 0.f : u / denom; }
};

// Wide matrix (rows <= cols): X has U's layout, so element i of the chunk maps to element i.
template <typename T, typename W, DirectionSource kSource>
__device__ __forceinline__ void normalize_linear(const T* __restrict__ g,
                                                 const float* __restrict__ m,
                                                 W* __restrict__ x, int64_t len,
                                                 const MomentumMath& math, const Normalizer& norm) {
  constexpr bool kHasMomentum = kSource == kMomentumSource;
  int64_t tail = 0;
  if (is_aligned<kILP>(g) && is_aligned<kILP>(x) && (!kHasMomentum || is_aligned<kILP>(m))) {
    const int64_t num_vec = len / kILP;
    for (int64_t v = threadIdx.x; v < num_vec; v += kBlockSize) {
      const AlignedVector<T, kILP> gv = load_vector<kILP>(g + v * kILP);
      AlignedVector<float, kILP> mv{};
      if constexpr (kHasMomentum) mv = load_vector<kILP>(m + v * kILP);
      AlignedVector<W, kILP> xv;
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const float u = direction_of<kSource>(to_float(gv.val[k]), mv.val[k], math);
        xv.val[k] = from_float<W>(norm(u));  // fp32 quotient, then one rounding
      }
      store_vector(x + v * kILP, xv);
    }
    tail = num_vec * kILP;
  }
  for (int64_t i = tail + threadIdx.x; i < len; i += kBlockSize) {
    const float u = direction_of<kSource>(to_float(g[i]), kHasMomentum ? m[i] : 0.f, math);
    x[i] = from_float<W>(norm(u));
  }
}

// Tall matrix (rows > cols): U is rows x cols, X = Uᵀ / denom is cols x rows (row-major, ld =
// rows). The block covers U rows [strip * kStripRows, +kStripRows) x cols [j0, j0 + kTile).
// Per tile: thread (tx, ty) reads U[i0 + ty + 4k][j0 + tx] (64 consecutive elements of a U row
// per thread row) into tile[ty + 4k][tx], then writes X[j0 + ty + 4k][i0 + tx] =
// tile[tx][ty + 4k] (64 consecutive elements of an X row). The +1 padding makes the column read
// tile[tx][c] hit 32 different banks across a warp.
template <typename T, typename W, DirectionSource kSource>
__device__ __forceinline__ void normalize_tall(const T* __restrict__ g,
                                               const float* __restrict__ m,
                                               W* __restrict__ x, int64_t rows,
                                               int64_t cols, int64_t piece,
                                               const MomentumMath& math, const Normalizer& norm) {
  constexpr bool kHasMomentum = kSource == kMomentumSource;
  __shared__ float tile[kTile][kTile + 1];
  const int64_t tiles_per_strip_row = ceil_div(cols, kTile);
  const int64_t strip = piece / tiles_per_strip_row;
  const int64_t j0 = (piece - strip * tiles_per_strip_row) * kTile;
  const int tx = static_cast<int>(threadIdx.x) % kTile;
  const int ty = static_cast<int>(threadIdx.x) / kTile;
  for (int t = 0; t < kTilesPerStrip; ++t) {
    const int64_t i0 = strip * kStripRows + int64_t{t} * kTile;
    if (i0 >= rows) break;  // uniform across the block: no thread skips a __syncthreads
#pragma unroll 4
    for (int k = 0; k < kTileRowsPerThread; ++k) {
      const int r = ty + k * kTileThreadRows;
      const int64_t i = i0 + r;
      const int64_t j = j0 + tx;
      if (i < rows && j < cols) {
        const int64_t idx = i * cols + j;
        tile[r][tx] =
            norm(direction_of<kSource>(to_float(g[idx]), kHasMomentum ? m[idx] : 0.f, math));
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kTileRowsPerThread; ++k) {
      const int c = ty + k * kTileThreadRows;
      const int64_t j = j0 + c;   // row of X (a column of U), < cols = m
      const int64_t i = i0 + tx;  // column of X (a row of U), < rows = n
      if (j < cols && i < rows) x[j * rows + i] = from_float<W>(tile[tx][c]);
    }
    __syncthreads();  // the next tile overwrites `tile`
  }
}

template <typename T, typename W, DirectionSource kSource>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    normalize_kernel(const __grid_constant__ SlotTable table,
                     const __grid_constant__ DeviceScalars scalars,
                     const float* __restrict__ partials) {
  const BlockPlace at = locate_block(table, Geometry::kWalk);
  const int slot = at.slot;
  const int64_t rows = at.rows, cols = at.cols, numel = at.numel;
  const int64_t matrix = at.matrix, piece = at.piece;

  // NOTE: [Deterministic norm] every block of a matrix sums the same partials with the same
  // thread mapping and the same block_sum, so all of them get the bit-identical norm.
  Normalizer norm{0.f, true};
  if (!found_inf_set(scalars)) {  // uniform over the grid, so block_sum is reached by all
    const int64_t count = norm_chunks_per_matrix(rows, cols);
    const float* p = partials + table.partial_offset[slot] + matrix * count;
    float acc = 0.f;
    for (int64_t i = threadIdx.x; i < count; i += kBlockSize) acc += p[i];
    const float frob = sqrtf(block_sum(acc));
    // max(||U||, eps) as torch's clamp(min=eps): a NaN norm stays NaN (garbage in, visible out).
    norm.denom = frob < scalars.eps ? scalars.eps : frob;
    norm.zero = norm.denom == 0.f;
  }

  const int64_t offset = matrix * numel;  // X of matrix `matrix` also starts there (m n == r c)
  const T* g = static_cast<const T*>(table.src[slot]) + offset;
  const float* m = kSource == kMomentumSource ? table.momentum[slot] + offset : nullptr;
  W* x = static_cast<W*>(table.ns_x[slot]) + offset;
  const MomentumMath math = make_momentum_math(scalars);
  if (!is_tall(rows, cols)) {
    const int64_t begin = piece * kElemChunk;
    const int64_t remaining = numel - begin;
    normalize_linear<T, W, kSource>(g + begin, m != nullptr ? m + begin : nullptr, x + begin,
                                    remaining < kElemChunk ? remaining : kElemChunk, math, norm);
  } else {
    normalize_tall<T, W, kSource>(g, m, x, rows, cols, piece, math, norm);
  }
}

// ================================ phase 4 ================================

template <WriteBack kMode>
struct WriteBackMath {
  float decay;  // 1 - lr * weight_decay
  float step;   // lr * update_scale
  // The new dst value from the old one (unused for kCopy) and X.
  __device__ __forceinline__ float operator()(float p, float x) const {
    if constexpr (kMode == kApplyUpdate) {
      return p * decay - step * x;
    } else {
      return x;
    }
  }
};

// Row multipliers of phase 4: NorMuon's r_i for kRowScale (the update of row i is lr scale (r_i
// X_ij), as the CPU step computes it), nothing otherwise (the plain expression, bit for bit).
template <bool kRowScale>
struct RowScale {
  const float* r;  // the matrix's multipliers (kRowScale only)
  template <WriteBack kMode>
  __device__ __forceinline__ float apply(const WriteBackMath<kMode>& op, float p, float x,
                                         int64_t row) const {
    if constexpr (kRowScale) {
      return op(p, r[row] * x);
    } else {
      return op(p, x);
    }
  }
};

// Row of element e of a row-major matrix with `cols` columns (32-bit division where it fits:
// 64-bit division is a long instruction sequence, and phase 4 does this per element).
__device__ __forceinline__ int64_t row_of(int64_t e, int64_t cols) {
  if (e <= 0xffffffffll && cols <= 0xffffffffll) {
    return static_cast<int64_t>(static_cast<uint32_t>(e) / static_cast<uint32_t>(cols));
  }
  return e / cols;
}

// Elements [begin, begin + len) of a wide matrix (p and x point at element begin).
template <typename T, typename W, WriteBack kMode, bool kRowScale>
__device__ __forceinline__ void write_back_linear(T* __restrict__ p,
                                                  const W* __restrict__ x,
                                                  int64_t begin, int64_t len, int64_t cols,
                                                  const WriteBackMath<kMode>& op,
                                                  const RowScale<kRowScale>& rs) {
  constexpr bool kReadsDst = kMode == kApplyUpdate;
  int64_t tail = 0;
  if (is_aligned<kILP>(p) && is_aligned<kILP>(x)) {
    const int64_t num_vec = len / kILP;
    for (int64_t v = threadIdx.x; v < num_vec; v += kBlockSize) {
      const AlignedVector<W, kILP> xv = load_vector<kILP>(x + v * kILP);
      AlignedVector<T, kILP> pv;
      if constexpr (kReadsDst) pv = load_vector<kILP>(p + v * kILP);
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        const float old = kReadsDst ? to_float(pv.val[k]) : 0.f;
        const int64_t row = kRowScale ? row_of(begin + v * kILP + k, cols) : 0;
        pv.val[k] = from_float<T>(rs.apply(op, old, to_float(xv.val[k]), row));
      }
      store_vector(p + v * kILP, pv);
    }
    tail = num_vec * kILP;
  }
  for (int64_t i = tail + threadIdx.x; i < len; i += kBlockSize) {
    const float old = kReadsDst ? to_float(p[i]) : 0.f;
    const int64_t row = kRowScale ? row_of(begin + i, cols) : 0;
    p[i] = from_float<T>(rs.apply(op, old, to_float(x[i]), row));
  }
}

// Tall matrix: X is cols x rows (ld = rows). Thread (tx, ty) reads X[j0 + ty + 4k][i0 + tx]
// into tile[ty + 4k][tx] (coalesced along an X row), then updates P[i0 + ty + 4k][j0 + tx] with
// X[j0 + tx][i0 + ty + 4k] = tile[tx][ty + 4k] (coalesced along a P row).
template <typename T, typename W, WriteBack kMode, bool kRowScale>
__device__ __forceinline__ void write_back_tall(T* __restrict__ p,
                                                const W* __restrict__ x,
                                                int64_t rows, int64_t cols, int64_t piece,
                                                const WriteBackMath<kMode>& op,
                                                const RowScale<kRowScale>& rs) {
  constexpr bool kReadsDst = kMode == kApplyUpdate;
  __shared__ float tile[kTile][kTile + 1];
  const int64_t tiles_per_strip_row = ceil_div(cols, kTile);
  const int64_t strip = piece / tiles_per_strip_row;
  const int64_t j0 = (piece - strip * tiles_per_strip_row) * kTile;
  const int tx = static_cast<int>(threadIdx.x) % kTile;
  const int ty = static_cast<int>(threadIdx.x) / kTile;
  for (int t = 0; t < kTilesPerStrip; ++t) {
    const int64_t i0 = strip * kStripRows + int64_t{t} * kTile;
    if (i0 >= rows) break;  // uniform across the block
#pragma unroll 4
    for (int k = 0; k < kTileRowsPerThread; ++k) {
      const int c = ty + k * kTileThreadRows;
      const int64_t j = j0 + c;
      const int64_t i = i0 + tx;
      if (j < cols && i < rows) tile[c][tx] = to_float(x[j * rows + i]);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kTileRowsPerThread; ++k) {
      const int r = ty + k * kTileThreadRows;
      const int64_t i = i0 + r;
      const int64_t j = j0 + tx;
      if (i < rows && j < cols) {
        const int64_t idx = i * cols + j;
        const float old = kReadsDst ? to_float(p[idx]) : 0.f;
        p[idx] = from_float<T>(rs.apply(op, old, tile[tx][r], i));
      }
    }
    __syncthreads();
  }
}

template <typename T, typename W, WriteBack kMode, bool kRowScale>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    write_back_kernel(const __grid_constant__ SlotTable table,
                      const __grid_constant__ DeviceScalars scalars) {
  if (found_inf_set(scalars)) return;  // see NOTE: [found_inf]
  const BlockPlace at = locate_block(table, Geometry::kWalk);
  const int slot = at.slot;
  const int64_t rows = at.rows, cols = at.cols, numel = at.numel;
  const int64_t matrix = at.matrix, piece = at.piece;

  WriteBackMath<kMode> op{1.f, 0.f};
  if constexpr (kMode == kApplyUpdate) {
    // Weight decay uses the unadjusted lr (as torch.optim.Muon); the update uses lr * scale.
    const float lr = scalars.lr != nullptr ? *scalars.lr : scalars.lr_value;
    op.decay = 1.f - lr * scalars.weight_decay;
    op.step = lr * table.update_scale[slot];
  }
  const int64_t offset = matrix * numel;
  T* p = static_cast<T*>(table.dst[slot]) + offset;
  const W* x = static_cast<const W*>(table.ns_x[slot]) + offset;
  RowScale<kRowScale> rs{nullptr};
  if constexpr (kRowScale) rs.r = table.row_scale[slot] + matrix * normuon_row_stride(rows, cols);
  if (!is_tall(rows, cols)) {
    const int64_t begin = piece * kElemChunk;
    const int64_t remaining = numel - begin;
    write_back_linear<T, W, kMode, kRowScale>(p + begin, x + begin, begin,
                                              remaining < kElemChunk ? remaining : kElemChunk,
                                              cols, op, rs);
  } else {
    write_back_tall<T, W, kMode, kRowScale>(p, x, rows, cols, piece, op, rs);
  }
}

// ================================ NorMuon ================================

// NOTE: [NorMuon on CUDA]
// NorMuon (NOTE: [NorMuon] in csrc/muon_step_args.h) runs per chunk between Newton-Schulz and
// write-back, in two launches over the chunk's matrices, on the chunk's `row` region (n floats
// per matrix, NOTE: [Chunked step]):
//   normuon_row_sums_kernel  q_i = sum_j O_ij^2 of every row of O, the Newton-Schulz result read
//                            in the param's orientation: a wide matrix's row i is row i of X
//                            (a warp sums it: lanes stride the row, then warp_sum); a tall one's
//                            is column i of X (ld = rows: one thread sums it, j ascending, so a
//                            warp reads 32 consecutive elements of an X row per step).
//   normuon_scale_kernel     one block per matrix: v_i <- beta2 v_i + (1 - beta2) q_i / cols
//                            (stored), s_i = 1 / (sqrt(v_i) + eps) in place of q_i, block sums
//                            of q_i and s_i^2 q_i, f = sqrt(sum q / sum s^2 q) (0 when the
//                            denominator is 0), then r_i = f s_i in place of s_i.
// Phase 4 scales row i of the update by r_i. All sums are fp32 in a fixed order (no atomics) and
// per matrix, so the result is deterministic and does not depend on the chunking. The CPU step
// (normuon_pass in csrc/cpu/muon_step_cpu.cpp) sums in double: the two agree to fp32 rounding,
// far below the bf16 or fp16 error of O itself. A device found_inf != 0 returns before any
// write, so v keeps its value (and phase 4 returns too).

template <typename W>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    normuon_row_sums_kernel(const __grid_constant__ NorMuonTable table,
                            const __grid_constant__ DeviceScalars scalars) {
  if (found_inf_set(scalars)) return;  // see NOTE: [found_inf]
  const BlockPlace at = locate_block(table, Geometry::kRowSums);
  const int slot = at.slot;
  const int64_t rows = at.rows, cols = at.cols;
  const W* x = static_cast<const W*>(table.ns_x[slot]) + at.matrix * at.numel;
  float* q = table.row[slot] + at.matrix * normuon_row_stride(rows, cols);
  if (!is_tall(rows, cols)) {
    // X is rows x cols (ld = cols): warp w of the block sums row piece * warps + w.
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int64_t i = at.piece * kWarpsPerBlock + static_cast<int>(threadIdx.x) / kWarpSize;
    if (i >= rows) return;  // uniform over the warp, and no block-wide barrier follows
    const W* xi = x + i * cols;
    float acc = 0.f;
    for (int64_t j = lane; j < cols; j += kWarpSize) {
      const float o = to_float(xi[j]);
      acc += o * o;
    }
    acc = warp_sum(acc);
    if (lane == 0) q[i] = acc;
  } else {
    // X is cols x rows (ld = rows): O_ij = X[j][i].
    const int64_t i = at.piece * kBlockSize + threadIdx.x;
    if (i >= rows) return;
    float acc = 0.f;
    for (int64_t j = 0; j < cols; ++j) {
      const float o = to_float(x[j * rows + i]);
      acc += o * o;
    }
    q[i] = acc;
  }
}

__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm)
    normuon_scale_kernel(const __grid_constant__ NorMuonTable table,
                         const __grid_constant__ DeviceScalars scalars) {
  if (found_inf_set(scalars)) return;  // uniform over the grid; v is not touched
  const BlockPlace at = locate_block(table, Geometry::kMatrix);
  const int slot = at.slot;
  const int64_t rows = at.rows;
  const float cols = static_cast<float>(at.cols);
  float* v = table.v[slot] + at.matrix * rows;
  float* r = table.row[slot] + at.matrix * normuon_row_stride(rows, at.cols);
  float sum_q = 0.f, sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < rows; i += kBlockSize) {
    const float q = r[i];
    const float vi = scalars.normuon_beta2 * v[i] + scalars.normuon_one_minus_beta2 * (q / cols);
    v[i] = vi;
    const float s = 1.f / (sqrtf(vi) + scalars.normuon_eps);
    sum_q += q;
    sum_sq += s * s * q;
    r[i] = s;
  }
  sum_q = block_sum(sum_q);
  sum_sq = block_sum(sum_sq);
  const float f = sum_sq > 0.f ? sqrtf(sum_q / sum_sq) : 0.f;
  for (int64_t i = threadIdx.x; i < rows; i += kBlockSize) r[i] = f * r[i];  // own rows only
}

// ================================ host side ================================

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("muon_ext: launching ") + kernel + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

DeviceScalars to_device_scalars(const StepScalars& s) {
  DeviceScalars d{};
  d.lr = s.lr;
  d.grad_scale = s.grad_scale;
  d.found_inf = s.found_inf;
  d.lr_value = static_cast<float>(s.lr_value);
  d.grad_scale_value = static_cast<float>(s.grad_scale_value);
  d.momentum = static_cast<float>(s.momentum);
  d.one_minus_momentum = static_cast<float>(1.0 - s.momentum);  // computed in double, rounded once
  d.weight_decay = static_cast<float>(s.weight_decay);
  d.eps = static_cast<float>(s.eps);
  d.nesterov = s.nesterov ? 1 : 0;
  d.normuon_beta2 = static_cast<float>(s.normuon_beta2);
  d.normuon_one_minus_beta2 = static_cast<float>(1.0 - s.normuon_beta2);  // in double, rounded once
  d.normuon_eps = static_cast<float>(s.normuon_eps);
  return d;
}

int64_t checked_numel(const MatrixTensor& t) {
  if (t.batch < 0 || t.rows < 0 || t.cols < 0) {
    throw std::invalid_argument("muon_ext: negative tensor dimension");
  }
  return t.batch * t.rows * t.cols;
}

// Fills tables (SlotTable or NorMuonTable) in list order: the common fields here, the rest by
// fill(table, slot, tensor); calls launch(table, grid_blocks) for each full table.
template <typename Table, typename Fill, typename Launch>
void for_each_table(const std::vector<MatrixTensor>& tensors, Geometry geometry, Fill&& fill,
                    Launch&& launch) {
  Table table;
  std::memset(&table, 0, sizeof(table));
  int64_t blocks = 0;
  auto flush = [&]() {
    if (table.num_slots == 0) return;
    table.block_start[table.num_slots] = blocks;
    launch(table, blocks);
    std::memset(&table, 0, sizeof(table));
    blocks = 0;
  };
  for (const MatrixTensor& t : tensors) {
    if (checked_numel(t) == 0) continue;  // empty tensors are skipped
    const int64_t need = t.batch * blocks_per_matrix(geometry, t.rows, t.cols);
    if (need > kMaxGridBlocks) {
      throw std::invalid_argument("muon_ext: a tensor needs more CUDA blocks than one grid holds");
    }
    if (table.num_slots == kMaxSlots || blocks + need > kMaxGridBlocks) flush();
    const int s = table.num_slots++;
    table.rows[s] = t.rows;
    table.cols[s] = t.cols;
    table.block_start[s] = blocks;
    fill(table, s, t);
    blocks += need;
  }
  flush();
}

// Slot tables of phases 1, 2 and 4. Partial offsets advance by each tensor's phase-1 block count
// whatever the geometry, so phases 1 and 2 agree on where a matrix's partials are.
template <typename Launch>
void for_each_launch(const std::vector<MatrixTensor>& tensors, Geometry geometry,
                     Launch&& launch) {
  int64_t partial_offset = 0;
  auto fill = [&](SlotTable& table, int s, const MatrixTensor& t) {
    table.src[s] = t.src;
    table.momentum[s] = t.momentum;
    table.dst[s] = t.dst;
    table.ns_x[s] = t.ns_x;
    table.partial_offset[s] = partial_offset;
    table.update_scale[s] = t.update_scale;
    table.row_scale[s] = t.normuon_row;
    partial_offset += t.batch * norm_chunks_per_matrix(t.rows, t.cols);
  };
  for_each_table<SlotTable>(tensors, geometry, fill, launch);
}

// Calls f(T{}) with T the CUDA element type of `type`.
template <typename F>
void dispatch_element_type(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kFloat32:
      f(float{});
      return;
    case ElementType::kBFloat16:
      f(__nv_bfloat16{});
      return;
    case ElementType::kFloat16:
      f(__half{});
      return;
  }
  throw std::invalid_argument("muon_ext: unsupported element type");
}

// Calls f(W{}) with W the CUDA element type of the Newton-Schulz workspace.
template <typename F>
void dispatch_ns_type(NsType type, F&& f) {
  switch (type) {
    case NsType::kBFloat16:
      f(__nv_bfloat16{});
      return;
    case NsType::kFloat16:
      f(__half{});
      return;
  }
  throw std::invalid_argument("muon_ext: unsupported Newton-Schulz element type");
}

// Which pointers a phase dereferences; a null one is a caller bug, reported before any launch.
struct Needs {
  bool src;
  bool momentum;
  bool ns_x;
  bool dst;
  bool normuon = false;  // normuon_v and normuon_row
};

void check_tensors(const std::vector<MatrixTensor>& tensors, const Needs& needs) {
  for (const MatrixTensor& t : tensors) {
    if (checked_numel(t) == 0) continue;
    if ((needs.src && t.src == nullptr) || (needs.momentum && t.momentum == nullptr) ||
        (needs.ns_x && t.ns_x == nullptr) || (needs.dst && t.dst == nullptr) ||
        (needs.normuon && (t.normuon_v == nullptr || t.normuon_row == nullptr))) {
      throw std::invalid_argument(
          "muon_ext: a tensor entry lacks a pointer this phase needs (src, momentum, ns_x, dst, "
          "normuon_v or normuon_row)");
    }
  }
}

}  // namespace
}  // namespace detail

void launch_norm_partials(const std::vector<MatrixTensor>& tensors, ElementType type,
                          DirectionSource source, const StepScalars& scalars, float* partials,
                          cudaStream_t stream) {
  using namespace detail;
  const bool momentum = source == DirectionSource::kMomentum;
  check_tensors(tensors, Needs{true, momentum, false, false});
  if (count_norm_partials(tensors) > 0 && partials == nullptr) {
    throw std::invalid_argument("muon_ext: null partials buffer");
  }
  const DeviceScalars ds = to_device_scalars(scalars);
  dispatch_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    for_each_launch(tensors, Geometry::kNormChunks, [&](const SlotTable& table, int64_t blocks) {
      if (source == DirectionSource::kMomentum) {
        launch_kernel(norm_partials_kernel<T, DirectionSource::kMomentum>, blocks, stream, table,
                      ds, partials);
      } else {
        launch_kernel(norm_partials_kernel<T, DirectionSource::kInput>, blocks, stream, table, ds,
                      partials);
      }
      check_launch("norm_partials_kernel");
    });
  });
}

void launch_normalize(const std::vector<MatrixTensor>& tensors, ElementType type,
                      DirectionSource source, const StepScalars& scalars, const float* partials,
                      cudaStream_t stream, NsType ns_type) {
  using namespace detail;
  const bool momentum = source == DirectionSource::kMomentum;
  check_tensors(tensors, Needs{true, momentum, true, false});
  const DeviceScalars ds = to_device_scalars(scalars);
  dispatch_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_ns_type(ns_type, [&](auto ns_tag) {
      using W = decltype(ns_tag);
      for_each_launch(tensors, Geometry::kWalk, [&](const SlotTable& table, int64_t blocks) {
        if (source == DirectionSource::kMomentum) {
          launch_kernel(normalize_kernel<T, W, DirectionSource::kMomentum>, blocks, stream, table,
                        ds, partials);
        } else {
          launch_kernel(normalize_kernel<T, W, DirectionSource::kInput>, blocks, stream, table,
                        ds, partials);
        }
        check_launch("normalize_kernel");
      });
    });
  });
}

void launch_normuon(const std::vector<MatrixTensor>& tensors, const StepScalars& scalars,
                    cudaStream_t stream, NsType ns_type) {
  using namespace detail;
  check_tensors(tensors, Needs{false, false, true, false, true});
  const DeviceScalars ds = to_device_scalars(scalars);
  auto fill = [](NorMuonTable& table, int s, const MatrixTensor& t) {
    table.ns_x[s] = t.ns_x;
    table.v[s] = t.normuon_v;
    table.row[s] = t.normuon_row;
  };
  // Every row sum is written before any multiplier is computed: the launches are in stream order.
  dispatch_ns_type(ns_type, [&](auto ns_tag) {
    using W = decltype(ns_tag);
    for_each_table<NorMuonTable>(tensors, Geometry::kRowSums, fill,
                                 [&](const NorMuonTable& table, int64_t blocks) {
                                   launch_kernel(normuon_row_sums_kernel<W>, blocks, stream, table,
                                                 ds);
                                   check_launch("normuon_row_sums_kernel");
                                 });
  });
  for_each_table<NorMuonTable>(tensors, Geometry::kMatrix, fill,
                               [&](const NorMuonTable& table, int64_t blocks) {
                                 launch_kernel(normuon_scale_kernel, blocks, stream, table, ds);
                                 check_launch("normuon_scale_kernel");
                               });
}

void launch_write_back(const std::vector<MatrixTensor>& tensors, ElementType type, WriteBack mode,
                       const StepScalars& scalars, cudaStream_t stream, NsType ns_type) {
  using namespace detail;
  check_tensors(tensors, Needs{false, false, true, true});
  // Row multipliers (NorMuon): all tensors or none, and only for the update.
  size_t scaled = 0, non_empty = 0;
  for (const MatrixTensor& t : tensors) {
    if (checked_numel(t) == 0) continue;
    ++non_empty;
    scaled += t.normuon_row != nullptr ? 1 : 0;
  }
  const bool row_scale = scaled > 0;
  if (row_scale && (scaled != non_empty || mode != WriteBack::kApplyUpdate)) {
    throw std::invalid_argument(
        "muon_ext: row multipliers (normuon_row) must be given for every tensor of an update "
        "write-back, or for none");
  }
  const DeviceScalars ds = to_device_scalars(scalars);
  dispatch_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_ns_type(ns_type, [&](auto ns_tag) {
      using W = decltype(ns_tag);
      for_each_launch(tensors, Geometry::kWalk, [&](const SlotTable& table, int64_t blocks) {
        if (row_scale) {
          launch_kernel(write_back_kernel<T, W, WriteBack::kApplyUpdate, true>, blocks, stream,
                        table, ds);
        } else if (mode == WriteBack::kApplyUpdate) {
          launch_kernel(write_back_kernel<T, W, WriteBack::kApplyUpdate, false>, blocks, stream,
                        table, ds);
        } else {
          launch_kernel(write_back_kernel<T, W, WriteBack::kCopy, false>, blocks, stream, table,
                        ds);
        }
        check_launch("write_back_kernel");
      });
    });
  });
}

}  // namespace cuda
}  // namespace muon_ext
