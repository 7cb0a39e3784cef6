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

struct NsConfig {
  std::vector<double> coefficients;   // flat (a0, b0, c0, a1, b1, c1, ...)
  NsAlgorithm algorithm = NsAlgorithm::kStandard;
  std::vector<int64_t> gram_restarts;  // strictly increasing iteration counts >= 1
};

// Parses "standard" / "gram" / "auto" and checks gram_restarts; errors name the argument.
NsConfig make_ns_config(std::vector<double> coefficients, double eps,
                        c10::string_view ns_algorithm, at::IntArrayRef gram_restarts);

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

// Groups non-empty tensors by (m, n), buckets in order of first appearance (deterministic).
std::vector<Bucket> make_buckets(at::TensorList params);

inline bool is_tall(const at::Tensor& t) { return t.size(1) > t.size(2); }

}  // namespace muon_ext
