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
#include <vector>

namespace muon_ext {

struct MuonStepArgs {
  double momentum;
  bool nesterov;
  double weight_decay;
  double eps;
  std::vector<double> ns_coefficients;  // flat (a0, b0, c0, a1, b1, c1, ...)
  std::vector<double> update_scales;    // one per tensor
};

// One shape bucket: every matrix of the listed tensors is m x n after orientation (m <= n).
struct Bucket {
  int64_t m = 0;
  int64_t n = 0;
  std::vector<int64_t> tensors;  // indices into the op's tensor lists, in list order
  int64_t num_matrices = 0;      // sum of the tensors' batch sizes
};

// Validates every argument of muon_step_ before anything is touched, so a rejected call
// changes nothing. Errors name the argument and the offending index.
void check_muon_step_args(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
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
