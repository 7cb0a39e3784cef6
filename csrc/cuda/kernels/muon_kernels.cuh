// Torch-free CUDA implementation of the fused Muon step: the public host API.
//
// Everything here takes raw device pointers, a cudaStream_t and cuBLAS/cuBLASLt handles; no
// torch header is included anywhere under csrc/cuda/kernels/, so these files compile in seconds
// and CMakeLists.txt builds them (and their C++ test) without PyTorch. The torch glue lives in
// csrc/cuda/muon_step_cuda.cpp. This header holds host declarations only, so a plain C++
// translation unit (g++) can include it.
//
// A step is four phases, each a handful of launches on one stream, in this order:
//   1. launch_norm_partials   momentum + Nesterov, per-chunk partial sums of U^2 (fp32)
//   2. launch_normalize       X = cast(U / max(||U||_F, eps)) into the bucket workspace (the
//                             quotient in fp32, then one rounding to the workspace type, bf16 or
//                             fp16: NsType), transposed for tall matrices so every bucket is
//                             m x n with m <= n
//   3. newton_schulz_batched  per bucket, 3 strided-batched GEMMs per (a, b, c) iteration
//      launch_normuon         NorMuon only: per-row second moment and row multipliers r_i
//   4. launch_write_back      P = P (1 - lr wd) - lr scale r_i X (r_i = 1 without NorMuon; a
//                             plain cast for newton_schulz)
// Phases 1 and 2 must receive the same tensor list (the partial-sum layout is derived from it).
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace muon_ext {
namespace cuda {

// Element type of params / grads (muon_step_) or of the input / output (newton_schulz).
enum class ElementType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Element type of the Newton-Schulz workspace (X, A/B, the Gram R/Z/Q/T): the GEMM operands.
// Both are 2 bytes, so the workspace layout does not depend on it. Phase 2 normalizes in fp32
// and then casts, so a loss-scaled U (|U| ~ 65536 x the gradient) never meets fp16's range.
enum class NsType : int32_t { kBFloat16 = 0, kFloat16 = 1 };
constexpr size_t kNsElementBytes = 2;  // bytes of one workspace element, either type

// Where the direction U of phases 1-2 comes from.
enum class DirectionSource : int32_t {
  kMomentum = 0,  // muon_step_: M = lerp(M, G / grad_scale, 1 - momentum); U = Nesterov(G', M) or M
  kInput = 1,     // newton_schulz: U = X (src), no momentum
};

// What phase 4 writes into dst.
enum class WriteBack : int32_t {
  kApplyUpdate = 0,  // muon_step_: P = P (1 - lr wd) - lr update_scale X
  kCopy = 1,         // newton_schulz: out = cast(X)
};

// One tensor of the op's lists: `batch` contiguous row-major rows x cols matrices.
// Tensors with zero elements must not be passed (the launchers skip them anyway).
struct MatrixTensor {
  const void* src = nullptr;      // grads (muon_step_; never written) or x (newton_schulz)
  float* momentum = nullptr;      // fp32 momentum buffer (muon_step_), nullptr for newton_schulz
  void* dst = nullptr;            // params (muon_step_; read, written) or the output
  void* ns_x = nullptr;  // first matrix of this tensor in its bucket's X buffer (m x n, NsType)
  int64_t batch = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  float update_scale = 0.f;  // lr multiplier of this tensor (phase 4, kApplyUpdate)
  // NorMuon (NOTE: [NorMuon on CUDA]): the fp32 second moment v of this tensor's first matrix,
  // `rows` floats per matrix (read, written); nullptr: NorMuon off.
  float* normuon_v = nullptr;
  // NorMuon: the row multipliers of this tensor's first matrix in the chunk's workspace (max(rows,
  // cols) floats per matrix), bound per chunk like ns_x; nullptr: phase 4 scales no row.
  float* normuon_row = nullptr;
};

// Scalars of a step. lr / grad_scale / found_inf are either device pointers to one fp32 value
// (read in the kernels, never on the host: no sync, CUDA-graph safe) or nullptr, in which case
// the *_value field is used (a CPU tensor read by the caller). found_inf == nullptr means "no
// overflow"; a device found_inf != 0 makes phases 1 and 4 return at once (nothing changes).
struct StepScalars {
  const float* lr = nullptr;
  double lr_value = 0.0;
  const float* grad_scale = nullptr;
  double grad_scale_value = 1.0;
  const float* found_inf = nullptr;
  double momentum = 0.0;
  double weight_decay = 0.0;
  double eps = 0.0;
  bool nesterov = false;
  double normuon_beta2 = 0.0;  // NorMuon (launch_normuon) only
  double normuon_eps = 0.0;
};

// A shape bucket: every matrix of the listed tensors is m x n after orientation (m <= n).
// `tensors` index into the MatrixTensor vector handed to the planning functions below.
struct ShapeBucket {
  int64_t m = 0;
  int64_t n = 0;
  std::vector<int64_t> tensors;
  int64_t num_matrices = 0;
};

// NOTE: [Chunked step]
// A step runs its shape buckets chunk by chunk (NOTE: [Workspace budget] in workspace_chunks.h):
// all four phases for one chunk of whole matrices, then the next chunk, in one reused workspace.
// Each matrix goes through exactly the same launches and GEMMs whatever the chunking (its
// partials, its normalization, its batched GEMMs, its write-back are per matrix), so the result
// is bit-identical for any workspace limit. Phase 1 per chunk also bounds the partial sums.
//
// A chunk's tensors are slices of the caller's: matrices [first, first + count) of a bucket may
// start inside a 3-D tensor and end inside another; each slice's pointers are offset to its first
// matrix. Layout of the workspace for one chunk (regions 256-byte aligned, cuBLASLt's default
// operand alignment; the allocation is the largest chunk's layout):
//   partials  float[num_partials]     phase 1 -> phase 2, one per kNormChunk of a matrix
//   X0, X1    w[count * m * n]        ping-pong Newton-Schulz iterates
//   gram      w[count * m * m]        A = X Xᵀ (Gram NS: R)
//   poly      w[count * m * m]        B = b A + c A A (Gram NS: Z)
//   q0, q1, t w[count * m * m]        Gram NS only: the ping-pong Q and T
// (w: the step's NsType, bf16 or fp16, 2 bytes either way)
//   row       float[count * n]        NorMuon only: per matrix, its row sums of squares q_i, then
//                                     s_i, then the row multipliers f s_i, in place (a matrix
//                                     has m or n rows depending on its orientation: n per matrix)
struct StepChunk {
  size_t bucket = 0;
  int64_t bucket_matrices = 0;  // of the whole bucket: the batch the GEMM heuristic is asked at
  int64_t m = 0;
  int64_t n = 0;
  int64_t count = 0;                 // matrices in the chunk
  bool gram = false;                  // Gram Newton-Schulz (NOTE: [Gram on CUDA]) for this bucket
  NsType ns_type = NsType::kBFloat16;  // element type of X and the m x m buffers
  std::vector<MatrixTensor> tensors;  // the chunk's slices of the caller's tensors, bucket order
  int64_t num_partials = 0;
  size_t x_offset[2] = {0, 0};
  size_t gram_offset = 0;
  size_t poly_offset = 0;
  size_t q_offset[2] = {0, 0};  // Gram only
  size_t t_offset = 0;          // Gram only
  bool normuon = false;         // NorMuon runs on this chunk (launch_normuon)
  size_t row_offset = 0;        // NorMuon only
  size_t bytes = 0;  // end of this chunk's layout
};

struct StepPlan {
  std::vector<StepChunk> chunks;
  size_t workspace_bytes = 0;  // max over chunks of StepChunk::bytes: the one allocation
};

// Buffers of one bucket's Newton-Schulz iterations (all of element type `type`, contiguous
// strided batches).
struct NsBuffers {
  NsType type = NsType::kBFloat16;
  void* x[2] = {nullptr, nullptr};  // num_matrices * m * n each; x[0] holds the input
  void* gram = nullptr;             // num_matrices * m * m: A = X Xᵀ (Gram: R)
  void* poly = nullptr;             // num_matrices * m * m: B = b A + c A A (Gram: Z)
  // Gram Newton-Schulz only (num_matrices * m * m each): the ping-pong Q and T = RZ + aR.
  void* q[2] = {nullptr, nullptr};
  void* t = nullptr;
};

// BLAS context of phase 3. `lt` and `lt_workspace` drive the cuBLASLt path; `legacy` is the
// fallback for a GEMM that cuBLASLt's heuristic has no algorithm for (and force_legacy makes
// every GEMM take it, for tests). The legacy handle's stream is set to the call's stream only if
// it differs (re-setting it would drop a workspace installed with cublasSetWorkspace).
struct BlasContext {
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t legacy = nullptr;
  void* lt_workspace = nullptr;
  size_t lt_workspace_bytes = 0;
  bool force_legacy = false;
};

// ---- planning (host only, no device work) ----

// Number of fp32 partial sums phase 1 writes for this list.
int64_t count_norm_partials(const std::vector<MatrixTensor>& tensors);

// Splits the buckets into chunks whose workspace fits `workspace_limit` bytes (-1: the default;
// a single matrix bigger than the limit is a chunk of its own) and lays each chunk out. Throws
// std::invalid_argument when a tensor does not match its bucket's (m, n) or the limit is bad.
// `gram[k]`: bucket k runs Gram Newton-Schulz (empty: none does). `normuon`: every chunk gets
// the NorMuon region and runs launch_normuon (then every non-empty tensor needs normuon_v; a
// tensor with normuon_v and normuon == false is refused). `ns_type`: the workspace's element
// type (every chunk's; the byte counts are the same for both).
StepPlan plan_step(const std::vector<MatrixTensor>& tensors,
                   const std::vector<ShapeBucket>& buckets, ElementType type,
                   int64_t workspace_limit, const std::vector<bool>& gram = {},
                   bool normuon = false, NsType ns_type = NsType::kBFloat16);

// The buffers of one chunk in a workspace laid out by plan_step; binds every slice's ns_x to its
// first matrix in X buffer `which` (0 or 1), and with NorMuon its normuon_row to its first
// matrix's row multipliers.
NsBuffers chunk_ns_buffers(const StepChunk& chunk, void* workspace);
void bind_chunk_ns_buffers(StepChunk& chunk, void* workspace, int which);

// The cuBLASLt algorithms of one bucket's three GEMMs (see newton_schulz.cu), chosen by the
// heuristic once per (handle, shape, batch, alignment, workspace size) and cached process-wide:
// steps after the first query nothing. Empty (all null): every GEMM takes the legacy path.
class LtGemm;
struct NsGemmPlan {
  std::shared_ptr<const LtGemm> gram;
  std::shared_ptr<const LtGemm> poly;
  std::shared_ptr<const LtGemm> update;
};

// Builds (or finds in the cache) the GEMM plans for `batch` m x n matrices in `buffers` (of
// element type buffers.type, part of the cache key), with
// the algorithms the heuristic picks for `heuristic_batch` matrices when cuBLASLt accepts them
// at `batch` (the step passes the bucket's matrix count, so that every chunking of a bucket runs
// the same algorithm; < 1 means `batch`). Throws std::runtime_error on a cuBLASLt failure: call
// it before anything is written.
NsGemmPlan plan_newton_schulz(int64_t batch, int64_t m, int64_t n, const NsBuffers& buffers,
                              const BlasContext& blas, int64_t heuristic_batch = -1);

// GEMM plans built so far by plan_newton_schulz in this process (cache misses, each one or two
// heuristic queries); tests use it to show that a second step queries nothing.
int64_t lt_gemm_plans_built();

// Everything a step can fail on before its first write, done: one GEMM plan per chunk.
struct PreparedStep {
  std::vector<NsGemmPlan> gemm;
};
PreparedStep prepare_step(const StepPlan& plan, void* workspace, const BlasContext& blas);

// Runs the four phases chunk by chunk (NOTE: [Chunked step]). `workspace` holds
// plan.workspace_bytes; `prepared` comes from prepare_step on the same plan and workspace.
// `gram_restarts`: the restart iteration counts of Gram chunks (NOTE: [Gram on CUDA]).
void run_step(StepPlan& plan, const PreparedStep& prepared, void* workspace, ElementType type,
              DirectionSource source, WriteBack mode, const StepScalars& scalars,
              const double* coefficients, int64_t num_coefficients, const BlasContext& blas,
              cudaStream_t stream, const std::vector<int64_t>& gram_restarts = {});

// ---- phases (asynchronous on `stream`; throw std::runtime_error on a failed launch) ----

// Phase 1: one launch per group of up to kMaxSlots tensors (see multi_matrix_apply.cuh).
void launch_norm_partials(const std::vector<MatrixTensor>& tensors, ElementType type,
                          DirectionSource source, const StepScalars& scalars, float* partials,
                          cudaStream_t stream);

// Phase 2: writes every tensor's ns_x (which must point into X buffer 0 of its bucket), of
// element type ns_type: the quotient U / max(||U||, eps) in fp32, then one rounding.
void launch_normalize(const std::vector<MatrixTensor>& tensors, ElementType type,
                      DirectionSource source, const StepScalars& scalars, const float* partials,
                      cudaStream_t stream, NsType ns_type = NsType::kBFloat16);

// Phase 3: runs num_coefficients / 3 iterations on `batch` m x n matrices starting in
// buffers.x[0]; returns the index (0 or 1) of the buffer holding the result, i.e.
// (num_coefficients / 3) % 2. `coefficients` is the flat host list (a0, b0, c0, a1, ...).
// `plan` from plan_newton_schulz for the same batch, shape and buffers; nullptr plans here.
int newton_schulz_batched(int64_t batch, int64_t m, int64_t n, const double* coefficients,
                          int64_t num_coefficients, const NsBuffers& buffers,
                          const BlasContext& blas, cudaStream_t stream,
                          const NsGemmPlan* plan = nullptr);

// Phase 3, Gram Newton-Schulz (NOTE: [Gram on CUDA] in newton_schulz.cu): the same polynomial
// as newton_schulz_batched in exact arithmetic, on the m x m Gram matrix; needs buffers.q and
// buffers.t. Restarts after each iteration count in `restarts` (ascending). Returns the X buffer
// (0 or 1) holding the result.
int gram_newton_schulz_batched(int64_t batch, int64_t m, int64_t n, const double* coefficients,
                               int64_t num_coefficients, const std::vector<int64_t>& restarts,
                               const NsBuffers& buffers, const BlasContext& blas,
                               cudaStream_t stream, const NsGemmPlan* plan = nullptr);

// NorMuon, between phases 3 and 4 (NOTE: [NorMuon on CUDA] in elementwise.cu): per matrix O
// (every tensor's ns_x, the buffer Newton-Schulz returned, read in the param's orientation):
// q_i = sum_j O_ij^2 into normuon_row, v_i <- beta2 v_i + (1 - beta2) q_i / cols in normuon_v,
// s_i = 1 / (sqrt(v_i) + eps), and normuon_row[i] = f s_i with f = sqrt(sum q_i / sum s_i^2 q_i)
// (0 when the denominator is 0). Deterministic (fixed-order fp32 sums, no atomics); a device
// found_inf != 0 changes nothing (v included). Every non-empty tensor needs ns_x, normuon_v and
// normuon_row.
void launch_normuon(const std::vector<MatrixTensor>& tensors, const StepScalars& scalars,
                    cudaStream_t stream, NsType ns_type = NsType::kBFloat16);

// Phase 4: reads every tensor's ns_x (which must point at the buffer newton_schulz_batched
// returned) with the transposition undone, and writes dst. A tensor with normuon_row (kApplyUpdate
// only) has row i of its update scaled by normuon_row[i]: P = P (1 - lr wd) - lr scale (r_i X).
// ns_x is read as ns_type.
void launch_write_back(const std::vector<MatrixTensor>& tensors, ElementType type, WriteBack mode,
                       const StepScalars& scalars, cudaStream_t stream,
                       NsType ns_type = NsType::kBFloat16);

}  // namespace cuda
}  // namespace muon_ext
