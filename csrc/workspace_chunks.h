// Splitting shape buckets into workspace-sized chunks: plain C++, no torch and no CUDA header,
// so the CPU step (csrc/cpu), the torch glue and the torch-free CUDA kernels (csrc/cuda/kernels)
// all plan their workspace with the same code.
//
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
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace muon_ext {

constexpr int64_t kDefaultWorkspaceLimit = int64_t{128} << 20;

// Matrices [first, first + count) of bucket `bucket`, numbered in bucket order (the bucket's
// tensors in list order, each tensor's batch in order).
struct Chunk {
  size_t bucket = 0;
  int64_t first = 0;
  int64_t count = 0;
};

struct ChunkPlan {
  std::vector<Chunk> chunks;    // bucket by bucket, in order
  int64_t max_chunk_bytes = 0;  // scratch of the largest chunk: what the step allocates
};

// -1 means kDefaultWorkspaceLimit; anything else must be >= 1 byte. Throws std::invalid_argument.
inline int64_t resolve_workspace_limit_or_throw(int64_t workspace_limit) {
  if (workspace_limit == -1) return kDefaultWorkspaceLimit;
  if (workspace_limit < 1) {
    throw std::invalid_argument(
        "workspace_limit must be a number of bytes >= 1, or -1 for the default (" +
        std::to_string(kDefaultWorkspaceLimit) + "), got " + std::to_string(workspace_limit));
  }
  return workspace_limit;
}

// Splits bucket k (num_matrices[k] matrices of bytes_per_matrix[k] scratch bytes each) into
// balanced chunks that fit the limit, each at least one matrix. Deterministic: the sizes and the
// limit decide it, so a rerun (and the CPU and the CUDA step, given the same sizes) chunk alike.
inline ChunkPlan split_into_chunks(const std::vector<int64_t>& num_matrices,
                                   const std::vector<int64_t>& bytes_per_matrix,
                                   int64_t workspace_limit) {
  if (num_matrices.size() != bytes_per_matrix.size()) {
    throw std::invalid_argument("split_into_chunks: one byte count per bucket expected");
  }
  const int64_t limit = resolve_workspace_limit_or_throw(workspace_limit);
  ChunkPlan plan;
  for (size_t k = 0; k < num_matrices.size(); ++k) {
    const int64_t total = num_matrices[k];
    if (total <= 0) continue;
    const int64_t per = std::max<int64_t>(1, bytes_per_matrix[k]);
    const int64_t fit = std::max<int64_t>(1, std::min(total, limit / per));
    // Balanced: ceil(N / fit) chunks of nearly equal size (never above `fit`), so the last
    // chunk is not a lone small batch.
    const int64_t num_chunks = (total + fit - 1) / fit;
    const int64_t base = total / num_chunks, extra = total % num_chunks;
    int64_t first = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = base + (c < extra ? 1 : 0);
      plan.chunks.push_back(Chunk{k, first, count});
      plan.max_chunk_bytes = std::max(plan.max_chunk_bytes, count * per);
      first += count;
    }
  }
  return plan;
}

}  // namespace muon_ext
