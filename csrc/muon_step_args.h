// Argument contract of the fused Muon ops, shared by the CPU and CUDA implementations.
//
// NOTE: [Matrix view]
// Every tensor handed to the ops is a contiguous 3-D batch (B, rows, cols) of independent
// matrices. The optimizer makes that view (2-D -> (1, r, c); 3-D expert stack -> as is;
// N-D conv -> (1, out, in*kh*kw)), so the ops never guess what a dimension means.
//
// NOTE: [Buckets]
// Newton-Schulz runs on the wide orientation (m <= n): a tall matrix (rows > cols) is
// transposed into the workspace. Matrices whose (m, n) agree form one bucket, whatever their
// orientation, and a bucket is orthogonalized with one batched matmul per product.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "workspace_chunks.h"

namespace muon_ext {

// NOTE: [Newton-Schulz algorithm]
// kStandard iterates X <- (aI + bA + cA²) X with A = X Xᵀ (torch's numerics). kGram (Gram
// Newton-Schulz) computes the same polynomial in exact arithmetic on the m x m Gram matrix:
// R = X Xᵀ, Q = I; per (a, b, c): Z = bR + cR², Q = QZ + aQ, R = Z(RZ + aR) + a(RZ + aR); at
// the end X = QX. After each iteration count listed in gram_restarts it restarts (X = QX,
// R = X Xᵀ, Q = I): half-precision R of a low-rank X has small negative eigenvalues that the
// recurrence blows up. About 8αm³ + 28m³ FLOPs for 5 iterations and one restart against
// 20αm³ + 10m³ (α = n / m), so it wins on wide buckets only. kAuto picks per bucket with a
// device-specific rule (see use_gram in the CPU and CUDA implementations).
// "gram" applies to buckets with n >= kGramMinAspect * m, the only ones where it saves FLOPs;
// square-ish buckets run standard even then: R = X Xᵀ squares their condition number, and in
// bf16 (CUDA) that loses them (NaN on 3x3 at 10 iterations in the host-emulation test).
enum class NsAlgorithm { kStandard, kGram, kAuto };
constexpr double kGramMinAspect = 1.5;

inline bool gram_shape_ok(int64_t m, int64_t n) {
  return static_cast<double>(n) >= kGramMinAspect * static_cast<double>(m);
}

// NOTE: [Newton-Schulz dtype]
// The element type the CUDA step iterates in (its workspace: X, the Gram R, Z, Q and T): bf16
// (kBFloat16, the default: torch's numerics) or fp16 (kFloat16: 3 more mantissa bits, a range
// up to 65504, which the normalized iterates never approach: Gram Newton-Schulz prefers it).
// Phase 2 normalizes in fp32 and casts only then, so a loss-scaled grad cannot overflow the
// cast. The GEMMs accumulate in fp32 either way. The CPU step iterates in fp32 whatever the
// choice (NOTE: [fp32 Newton-Schulz on CPU] in csrc/cpu/muon_step_cpu.cpp).
enum class NsDtype { kBFloat16, kFloat16 };

// Parses "bfloat16" / "float16"; the error names the argument.
NsDtype parse_ns_dtype(c10::string_view ns_dtype);

struct NsConfig {
  std::vector<double> coefficients;   // flat (a0, b0, c0, a1, b1, c1, ...)
  NsAlgorithm algorithm = NsAlgorithm::kStandard;
  std::vector<int64_t> gram_restarts;  // strictly increasing iteration counts >= 1
  NsDtype dtype = NsDtype::kBFloat16;  // NOTE: [Newton-Schulz dtype]
};

// Parses "standard" / "gram" / "auto" and ns_dtype, and checks gram_restarts; errors name the
// argument.
NsConfig make_ns_config(std::vector<double> coefficients, double eps,
                        c10::string_view ns_algorithm, at::IntArrayRef gram_restarts,
                        c10::string_view ns_dtype);

// NOTE: [NorMuon]
// With normuon_buffers (one float32 (B, rows) tensor per param view; an empty list turns it
// off) phase 4 normalizes each orthogonalized matrix O (rows x cols, the param's orientation,
// whatever orientation Newton-Schulz ran in) per row before the update:
//   q_i = sum_j O_ij^2;  v_i <- beta2 v_i + (1 - beta2) q_i / cols   (v: the buffer, fp32)
//   s_i = 1 / (sqrt(v_i) + eps);  f = ||O||_F / ||diag(s) O||_F = sqrt(sum q_i / sum s_i^2 q_i)
//   P = P (1 - lr wd) - lr scale f s_i O_ij
// (f = 0 for O = 0). f keeps the update's Frobenius norm, so the lr rule means what it means
// without NorMuon. The sums are over one matrix's rows, so the result does not depend on the
// chunking or on the other matrices of the call. With found_inf != 0, v does not change either.
struct MuonStepArgs {
  double momentum;
  bool nesterov;
  double weight_decay;
  double eps;
  std::vector<double> ns_coefficients;  // flat (a0, b0, c0, a1, b1, c1, ...)
  std::vector<double> update_scales;    // one per tensor
  double normuon_beta2 = 0.95;          // NOTE: [NorMuon]; used only with normuon_buffers
  double normuon_eps = 1e-8;
};

// One shape bucket: every matrix of the listed tensors is m x n after orientation (m <= n).
struct Bucket {
  int64_t m = 0;
  int64_t n = 0;
  std::vector<int64_t> tensors;  // indices into the op's tensor lists, in list order
  int64_t num_matrices = 0;      // sum of the tensors' batch sizes
};

// Chunks, ChunkPlan, kDefaultWorkspaceLimit: NOTE: [Workspace budget] in workspace_chunks.h.

// -1 means kDefaultWorkspaceLimit; anything else must be >= 1 byte.
int64_t resolve_workspace_limit(int64_t workspace_limit);

// Splits every bucket into balanced chunks whose scratch (count * bytes_per_matrix(m, n)) fits
// the limit, each chunk at least one matrix. Deterministic: shapes and the limit decide it.
ChunkPlan plan_chunks(const std::vector<Bucket>& buckets, int64_t workspace_limit,
                      const std::function<int64_t(int64_t m, int64_t n)>& bytes_per_matrix);

// Validates every argument of muon_step_ before anything is touched, so a rejected call
// changes nothing. Errors name the argument and the offending index.
// normuon_buffers: empty (NorMuon off) or one (B, rows) float32 tensor per param.
void check_muon_step_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    at::TensorList normuon_buffers,
    const at::Tensor& lr,
    const MuonStepArgs& args,
    const c10::optional<at::Tensor>& grad_scale,
    const c10::optional<at::Tensor>& found_inf,
    c10::DeviceType device_type);

void check_ns_coefficients(const std::vector<double>& ns_coefficients, double eps);

// NOTE: [Phase ops]
// The step's phases are also ops of their own, so that a driver can put collectives between
// them (muon_ext/distributed.py) while muon_step_ runs the same passes in one call:
//   muon_momentum_(grads, momentum_buffers, momentum, nesterov, grad_scale, found_inf, out)
//       phase 1: M = lerp(M, G / s, 1 - beta), and U (Nesterov or M) packed into `out`
//   muon_orthogonalize_(x, shapes, ns_coefficients, eps, ns_algorithm, gram_restarts, limit,
//                       ns_dtype)
//       phase 2-3 in place: each matrix of x to NS(U / max(||U||_F, eps)), per shape bucket,
//       in workspace-sized chunks (NOTE: [Workspace budget])
//   muon_update_(params, x, lr, weight_decay, update_scales, found_inf)
//       phase 4: P = P (1 - lr wd) - lr scale_i X_i
//   muon_copy_blocks_(src, dst, blocks)
//       packing: strided 2-D blocks from one flat buffer to another (shards <-> whole matrices)
//   muon_normuon_(x, shapes, normuon_v, beta2, eps, found_inf)   (CPU; NOTE: [NorMuon])
//       between orthogonalize and update: v of each matrix updated, and x scaled in place row by
//       row to f s_i O, so that muon_update_ then applies what muon_step_'s phase 4 applies
// "Packed" means one contiguous 1-D float32 tensor holding tensor after tensor in list order,
// each row-major in its own shape (matrices in the param's orientation, never transposed).
// Momentum and update are elementwise and take tensors of any shape (a shard, a whole param);
// only orthogonalize needs matrix shapes: a flat list of (batch, rows, cols) triples that
// partitions x. Given the same inputs, the ops compute exactly what muon_step_ computes (the
// same float expressions, the same fixed-order norms), so a driver built on them reproduces the
// single-process step bit for bit. With found_inf != 0 momentum and update change nothing.

// Checks of muon_momentum_ (names every offending argument); returns the packed length.
int64_t check_momentum_args(at::TensorList grads, at::TensorList momentum_buffers,
                            double momentum, const c10::optional<at::Tensor>& grad_scale,
                            const c10::optional<at::Tensor>& found_inf,
                            const c10::optional<at::Tensor>& out, c10::DeviceType device_type);

// Checks of muon_orthogonalize_; returns x's segments as (batch, rows, cols) views.
std::vector<at::Tensor> orthogonalize_segments(const at::Tensor& x, at::IntArrayRef shapes,
                                               c10::DeviceType device_type);

// Checks of muon_normuon_ (one contiguous float32 tensor of batch * rows elements in
// normuon_v per (batch, rows, cols) triple); returns x's segments as orthogonalize_segments.
std::vector<at::Tensor> check_normuon_args(const at::Tensor& x, at::IntArrayRef shapes,
                                           at::TensorList normuon_v, double beta2, double eps,
                                           const c10::optional<at::Tensor>& found_inf,
                                           c10::DeviceType device_type);

// Checks of muon_update_.
void check_update_args(at::TensorList params, const at::Tensor& x, const at::Tensor& lr,
                       double weight_decay, at::ArrayRef<double> update_scales,
                       const c10::optional<at::Tensor>& found_inf, c10::DeviceType device_type);

// One strided 2-D block of muon_copy_blocks_: rows x width elements from src[src_offset +
// r * src_stride + c] to dst[dst_offset + r * dst_stride + c].
struct CopyBlock {
  int64_t src_offset, src_stride, dst_offset, dst_stride, rows, width;
};
constexpr int64_t kCopyBlockFields = 6;

// Checks of muon_copy_blocks_ (bounds included); returns the blocks.
std::vector<CopyBlock> check_copy_blocks_args(const at::Tensor& src, const at::Tensor& dst,
                                              at::IntArrayRef blocks,
                                              c10::DeviceType device_type);

// Offsets of each tensor in the packed layout of `tensors` (plus the total at the end).
std::vector<int64_t> packed_offsets(at::TensorList tensors);

// Groups non-empty tensors by (m, n), buckets in order of first appearance (deterministic).
std::vector<Bucket> make_buckets(at::TensorList params);

inline bool is_tall(const at::Tensor& t) { return t.size(1) > t.size(2); }

}  // namespace muon_ext
