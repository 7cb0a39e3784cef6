// Host-side planning of a step's device workspace (torch-free, no device work).
//
// NOTE: [Workspace layout]
// One allocation, every region 256-byte aligned (cuBLASLt's default operand alignment):
//   partials  float[num_partials]            phase 1 -> phase 2, one per kNormChunk of a matrix
//   per bucket k: X0_k, X1_k                 bf16[num_matrices_k * m_k * n_k] each (ping-pong)
//   gram, poly                               bf16[max_k num_matrices_k * m_k * m_k] each
// The X buffers are per bucket because phase 4 reads every bucket's result after all buckets
// have been orthogonalized; gram and poly are scratch of one bucket's iterations, and the
// buckets run one after the other on one stream, so one pair serves them all.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "multi_matrix_apply.cuh"
#include "muon_kernels.cuh"

namespace muon_ext {
namespace cuda {
namespace {

constexpr size_t kRegionAlignment = 256;

size_t align_up(size_t bytes) {
  return (bytes + kRegionAlignment - 1) / kRegionAlignment * kRegionAlignment;
}

void check_bucket(const std::vector<MatrixTensor>& tensors, const ShapeBucket& b, size_t index) {
  const std::string where = "muon_ext: bucket " + std::to_string(index);
  if (b.m < 1 || b.n < b.m) {
    throw std::invalid_argument(where + " must have 1 <= m <= n, got m=" + std::to_string(b.m) +
                                " n=" + std::to_string(b.n));
  }
  int64_t matrices = 0;
  for (int64_t ti : b.tensors) {
    if (ti < 0 || ti >= static_cast<int64_t>(tensors.size())) {
      throw std::invalid_argument(where + " lists tensor " + std::to_string(ti) +
                                  ", out of range");
    }
    const MatrixTensor& t = tensors[static_cast<size_t>(ti)];
    if (std::min(t.rows, t.cols) != b.m || std::max(t.rows, t.cols) != b.n || t.batch < 1) {
      throw std::invalid_argument(where + " (" + std::to_string(b.m) + " x " +
                                  std::to_string(b.n) + ") lists tensor " + std::to_string(ti) +
                                  " of shape (" + std::to_string(t.batch) + ", " +
                                  std::to_string(t.rows) + ", " + std::to_string(t.cols) + ")");
    }
    matrices += t.batch;
  }
  if (matrices != b.num_matrices) {
    throw std::invalid_argument(where + " says " + std::to_string(b.num_matrices) +
                                " matrices but its tensors hold " + std::to_string(matrices));
  }
}

}  // namespace

int64_t count_norm_partials(const std::vector<MatrixTensor>& tensors) {
  int64_t total = 0;
  for (const MatrixTensor& t : tensors) {
    if (t.batch <= 0 || t.rows <= 0 || t.cols <= 0) continue;  // empty: no blocks, no partials
    total += t.batch * detail::norm_chunks_per_matrix(t.rows, t.cols);
  }
  return total;
}

StepWorkspacePlan plan_step_workspace(const std::vector<MatrixTensor>& tensors,
                                      const std::vector<ShapeBucket>& buckets) {
  StepWorkspacePlan plan;
  size_t offset = 0;
  plan.num_partials = count_norm_partials(tensors);
  plan.partials_offset = offset;
  offset = align_up(offset + static_cast<size_t>(plan.num_partials) * sizeof(float));
  size_t gram_elems = 0;
  for (size_t k = 0; k < buckets.size(); ++k) {
    const ShapeBucket& b = buckets[k];
    check_bucket(tensors, b, k);
    const size_t x_bytes = static_cast<size_t>(b.num_matrices) * static_cast<size_t>(b.m) *
                           static_cast<size_t>(b.n) * sizeof(__nv_bfloat16);
    for (int which = 0; which < 2; ++which) {
      plan.x_offset[which].push_back(offset);
      offset = align_up(offset + x_bytes);
    }
    gram_elems = std::max(gram_elems, static_cast<size_t>(b.num_matrices) *
                                          static_cast<size_t>(b.m) * static_cast<size_t>(b.m));
  }
  plan.gram_offset = offset;
  offset = align_up(offset + gram_elems * sizeof(__nv_bfloat16));
  plan.poly_offset = offset;
  offset = align_up(offset + gram_elems * sizeof(__nv_bfloat16));
  plan.total_bytes = offset;
  return plan;
}

void bind_ns_buffers(std::vector<MatrixTensor>& tensors, const std::vector<ShapeBucket>& buckets,
                     const StepWorkspacePlan& plan, void* workspace, int which) {
  if (which != 0 && which != 1) throw std::invalid_argument("muon_ext: X buffer index must be 0/1");
  if (plan.x_offset[which].size() != buckets.size()) {
    throw std::invalid_argument("muon_ext: workspace plan does not match the buckets");
  }
  char* base = static_cast<char*>(workspace);
  for (size_t k = 0; k < buckets.size(); ++k) {
    const ShapeBucket& b = buckets[k];
    auto* x = reinterpret_cast<__nv_bfloat16*>(base + plan.x_offset[which][k]);
    int64_t first_matrix = 0;
    for (int64_t ti : b.tensors) {
      MatrixTensor& t = tensors[static_cast<size_t>(ti)];
      t.ns_x = x + first_matrix * b.m * b.n;
      first_matrix += t.batch;
    }
  }
}

NsBuffers bucket_ns_buffers(const StepWorkspacePlan& plan, size_t bucket, void* workspace) {
  if (bucket >= plan.x_offset[0].size()) {
    throw std::invalid_argument("muon_ext: bucket index out of range of the workspace plan");
  }
  char* base = static_cast<char*>(workspace);
  NsBuffers buffers;
  buffers.x[0] = reinterpret_cast<__nv_bfloat16*>(base + plan.x_offset[0][bucket]);
  buffers.x[1] = reinterpret_cast<__nv_bfloat16*>(base + plan.x_offset[1][bucket]);
  buffers.gram = reinterpret_cast<__nv_bfloat16*>(base + plan.gram_offset);
  buffers.poly = reinterpret_cast<__nv_bfloat16*>(base + plan.poly_offset);
  return buffers;
}

}  // namespace cuda
}  // namespace muon_ext
