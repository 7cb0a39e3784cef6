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

// NOTE: [Workspace budget]
// Newton-Schulz needs scratch space proportional to the matrices it iterates on. Holding every
// bucket's scratch at once makes a step's extra memory grow with the model (2.5x the params on
// CPU, ~4.9 bytes per param on CUDA), so each bucket is orthogonalized in chunks of whole
// matrices whose scratch fits `workspace_limit` bytes, and one allocation, sized for the
// largest chunk, is reused by every chunk. A matrix whose scratch alone exceeds the limit is a
// chunk of its own (the limit is then exceeded by exactly that matrix: it cannot be split).
//
// The default, 128 MiB, is chosen so that batching still pays: at 128 MiB a chunk of GPT-2-size
// matrices (768 x 768) holds 27 of them in bf16 (6 fp32) and the batched GEMMs of one chunk
// run for far longer than a launch costs, while 128 MiB is < 0.2% of an 80 GB GPU and below
// 0.25x the params of any model with more than 512 MiB of matrices.
constexpr int64_t kDefaultWorkspaceLimit = int64_t{128} << 20;

// Matrices [first, first + count) of bucket `bucket`, numbered in bucket order (the bucket's
// tensors in list order, each tensor's batch in order).
struct Chunk {
  size_t bucket = 0;
  int64_t first = 0;
  int64_t count = 0;
};

struct ChunkPlan {
  std::vector<Chunk> chunks;   // bucket by bucket, in order
  int64_t max_chunk_bytes = 0;  // scratch of the largest chunk: what the step allocates
};

// -1 means kDefaultWorkspaceLimit; anything else must be >= 1 byte.
int64_t resolve_workspace_limit(int64_t workspace_limit);

// Splits every bucket into balanced chunks whose scratch (count * bytes_per_matrix(m, n)) fits
// the limit, each chunk at least one matrix. Deterministic: shapes and the limit decide it.
ChunkPlan plan_chunks(const std::vector<Bucket>& buckets, int64_t workspace_limit,
                      const std::function<int64_t(int64_t m, int64_t n)>& bytes_per_matrix);

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
