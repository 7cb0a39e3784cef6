// Host-side planning of a step's device workspace and the chunk-by-chunk driver of its phases
// (torch-free). See NOTE: [Chunked step] in muon_kernels.cuh for the layout.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "multi_matrix_apply.cuh"
#include "muon_kernels.cuh"
#include "workspace_chunks.h"

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

namespace {
// m x m buffers per chunk: A and B (standard), or R, Z, Q, Q' and T (Gram).
size_t square_buffers(bool gram) { return gram ? 5 : 2; }
}  // namespace

namespace {

size_t element_bytes(ElementType type) { return type == ElementType::kFloat32 ? 4 : 2; }

// Matrices [first, first + count) of bucket b as slices of the caller's tensors.
std::vector<MatrixTensor> chunk_slices(const std::vector<MatrixTensor>& tensors,
                                       const ShapeBucket& b, int64_t first, int64_t count,
                                       ElementType type) {
  std::vector<MatrixTensor> out;
  const size_t esize = element_bytes(type);
  int64_t tensor_first = 0;  // bucket index of the tensor's first matrix
  for (int64_t ti : b.tensors) {
    const MatrixTensor& t = tensors[static_cast<size_t>(ti)];
    const int64_t lo = std::max(first, tensor_first);
    const int64_t hi = std::min(first + count, tensor_first + t.batch);
    if (lo < hi) {
      const int64_t skip = lo - tensor_first;  // matrices of t before the slice
      const size_t elems = static_cast<size_t>(skip) * static_cast<size_t>(t.rows * t.cols);
      MatrixTensor s = t;
      s.src = t.src == nullptr ? nullptr : static_cast<const char*>(t.src) + elems * esize;
      s.momentum = t.momentum == nullptr ? nullptr : t.momentum + elems;
      s.dst = t.dst == nullptr ? nullptr : static_cast<char*>(t.dst) + elems * esize;
      s.normuon_v = t.normuon_v == nullptr ? nullptr : t.normuon_v + skip * t.rows;
      s.ns_x = nullptr;
      s.normuon_row = nullptr;
      s.batch = hi - lo;
      out.push_back(s);
    }
    tensor_first += t.batch;
  }
  return out;
}

}  // namespace

StepPlan plan_step(const std::vector<MatrixTensor>& tensors,
                   const std::vector<ShapeBucket>& buckets, ElementType type,
                   int64_t workspace_limit, const std::vector<bool>& gram, bool normuon,
                   NsType ns_type) {
  const int64_t limit = resolve_workspace_limit_or_throw(workspace_limit);
  if (!gram.empty() && gram.size() != buckets.size()) {
    throw std::invalid_argument("muon_ext: one Gram flag per bucket expected");
  }
  if (!normuon) {
    for (const MatrixTensor& t : tensors) {
      if (t.normuon_v != nullptr) {
        throw std::invalid_argument("muon_ext: a tensor has a NorMuon buffer but the step was "
                                    "planned without NorMuon");
      }
    }
  }
  auto uses_gram = [&](size_t k) { return !gram.empty() && gram[k]; };
  std::vector<int64_t> counts, bytes;
  for (size_t k = 0; k < buckets.size(); ++k) {
    const ShapeBucket& b = buckets[k];
    check_bucket(tensors, b, k);
    counts.push_back(b.num_matrices);
    // Per matrix, without padding: the limit below is reduced by the most padding a chunk has.
    bytes.push_back(static_cast<int64_t>(
        static_cast<size_t>(detail::norm_chunks_per_matrix(b.m, b.n)) * sizeof(float) +
        (2 * static_cast<size_t>(b.m * b.n) +
         square_buffers(uses_gram(k)) * static_cast<size_t>(b.m * b.m)) *
            kNsElementBytes +
        (normuon ? static_cast<size_t>(b.n) * sizeof(float) : 0)));
  }
  // At most 8 regions (partials, X0, X1, 2 or 5 square buffers), plus NorMuon's.
  const int64_t padding = (normuon ? 9 : 8) * static_cast<int64_t>(kRegionAlignment);
  const ChunkPlan chunks = split_into_chunks(counts, bytes, std::max<int64_t>(1, limit - padding));
  StepPlan plan;
  for (const Chunk& c : chunks.chunks) {
    const ShapeBucket& b = buckets[c.bucket];
    StepChunk sc;
    sc.bucket = c.bucket;
    sc.bucket_matrices = b.num_matrices;
    sc.m = b.m;
    sc.n = b.n;
    sc.count = c.count;
    sc.gram = uses_gram(c.bucket);
    sc.ns_type = ns_type;
    sc.tensors = chunk_slices(tensors, b, c.first, c.count, type);
    sc.num_partials = count_norm_partials(sc.tensors);
    const size_t x_bytes = static_cast<size_t>(c.count * b.m * b.n) * kNsElementBytes;
    const size_t g_bytes = static_cast<size_t>(c.count * b.m * b.m) * kNsElementBytes;
    // Regions in layout order (NOTE: [Chunked step]), each starting 256-byte aligned.
    size_t offset = align_up(static_cast<size_t>(sc.num_partials) * sizeof(float));
    auto region = [&offset](size_t bytes) {
      const size_t at = offset;
      offset = align_up(offset + bytes);
      return at;
    };
    sc.x_offset[0] = region(x_bytes);
    sc.x_offset[1] = region(x_bytes);
    sc.gram_offset = region(g_bytes);
    sc.poly_offset = region(g_bytes);
    if (sc.gram) {
      sc.q_offset[0] = region(g_bytes);
      sc.q_offset[1] = region(g_bytes);
      sc.t_offset = region(g_bytes);
    }
    sc.normuon = normuon;
    if (normuon) {
      sc.row_offset = region(static_cast<size_t>(c.count * b.n) * sizeof(float));
    }
    sc.bytes = offset;
    plan.workspace_bytes = std::max(plan.workspace_bytes, offset);
    plan.chunks.push_back(std::move(sc));
  }
  return plan;
}

NsBuffers chunk_ns_buffers(const StepChunk& chunk, void* workspace) {
  char* base = static_cast<char*>(workspace);
  NsBuffers buffers;
  buffers.type = chunk.ns_type;
  buffers.x[0] = base + chunk.x_offset[0];
  buffers.x[1] = base + chunk.x_offset[1];
  buffers.gram = base + chunk.gram_offset;
  buffers.poly = base + chunk.poly_offset;
  if (chunk.gram) {
    buffers.q[0] = base + chunk.q_offset[0];
    buffers.q[1] = base + chunk.q_offset[1];
    buffers.t = base + chunk.t_offset;
  }
  return buffers;
}

void bind_chunk_ns_buffers(StepChunk& chunk, void* workspace, int which) {
  if (which != 0 && which != 1) throw std::invalid_argument("muon_ext: X buffer index must be 0/1");
  char* x = static_cast<char*>(workspace) + chunk.x_offset[which];
  auto* row = chunk.normuon ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                       chunk.row_offset)
                            : nullptr;
  int64_t first_matrix = 0;
  for (MatrixTensor& t : chunk.tensors) {
    t.ns_x = x + static_cast<size_t>(first_matrix * chunk.m * chunk.n) * kNsElementBytes;
    t.normuon_row = row == nullptr ? nullptr : row + first_matrix * chunk.n;
    first_matrix += t.batch;
  }
}

PreparedStep prepare_step(const StepPlan& plan, void* workspace, const BlasContext& blas) {
  if (plan.workspace_bytes > 0 && workspace == nullptr) {
    throw std::invalid_argument("muon_ext: null step workspace");
  }
  PreparedStep prepared;
  prepared.gemm.reserve(plan.chunks.size());
  for (const StepChunk& c : plan.chunks) {
    prepared.gemm.push_back(
        plan_newton_schulz(c.count, c.m, c.n, chunk_ns_buffers(c, workspace), blas,
                           c.bucket_matrices));
  }
  return prepared;
}

void run_step(StepPlan& plan, const PreparedStep& prepared, void* workspace, ElementType type,
              DirectionSource source, WriteBack mode, const StepScalars& scalars,
              const double* coefficients, int64_t num_coefficients, const BlasContext& blas,
              cudaStream_t stream, const std::vector<int64_t>& gram_restarts) {
  if (prepared.gemm.size() != plan.chunks.size()) {
    throw std::invalid_argument("muon_ext: prepared GEMM plans do not match the step plan");
  }
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    StepChunk& c = plan.chunks[i];
    auto* partials = reinterpret_cast<float*>(workspace);  // offset 0 of every chunk's layout
    launch_norm_partials(c.tensors, type, source, scalars, partials, stream);
    bind_chunk_ns_buffers(c, workspace, 0);
    launch_normalize(c.tensors, type, source, scalars, partials, stream, c.ns_type);
    const NsBuffers buffers = chunk_ns_buffers(c, workspace);
    const int result =
        c.gram ? gram_newton_schulz_batched(c.count, c.m, c.n, coefficients, num_coefficients,
                                            gram_restarts, buffers, blas, stream,
                                            &prepared.gemm[i])
               : newton_schulz_batched(c.count, c.m, c.n, coefficients, num_coefficients,
                                       buffers, blas, stream, &prepared.gemm[i]);
    bind_chunk_ns_buffers(c, workspace, result);
    if (c.normuon) {  // NOTE: [NorMuon on CUDA]
      launch_normuon(c.tensors, scalars, stream, c.ns_type);
    }
    launch_write_back(c.tensors, type, mode, scalars, stream, c.ns_type);
  }
}

}  // namespace cuda
}  // namespace muon_ext
