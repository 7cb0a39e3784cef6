// CPU implementation of the fused Muon step and of Newton-Schulz alone.
//
// All matrices of a call are processed together: one parallel elementwise pass for
// momentum + sum of squares over every matrix; then, chunk by chunk of each shape bucket in
// one reused workspace (NOTE: [Workspace budget] in muon_step_args.h), a parallel pass that
// fills the normalized U, fp32 batched matmuls for Newton-Schulz, and a parallel update pass.
//
// NOTE: [fp32 Newton-Schulz on CPU]
// torch.optim.Muon orthogonalizes in bf16. On CPU a bf16 matmul runs about 100x slower than
// an fp32 one (no bf16 GEMM microkernels on most x86 parts), so the CPU path iterates in fp32:
// faster *and* more accurate; the result differs from torch only by bf16 rounding. The ops'
// ns_dtype (NOTE: [Newton-Schulz dtype] in muon_step_args.h) is validated and then ignored here:
// bf16 and fp16 both iterate in fp32 on CPU, bit for bit the same.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "muon_step_args.h"

namespace muon_ext {
namespace {

// NOTE: [Deterministic reduction]
// The sum of squares of a matrix is accumulated over fixed element blocks (each in double,
// in index order), then the block sums are added in block order. Neither the thread count
// nor the scheduling changes the order of additions, so results are bit-reproducible.
constexpr int64_t kBlock = 1 << 15;

// A contiguous range of one matrix's elements: the unit of parallel work.
struct WorkItem {
  int64_t tensor;  // index into the op's lists
  int64_t matrix;  // index of the matrix inside the tensor's batch
  int64_t begin;   // element range [begin, end) within the matrix (row-major, param orientation)
  int64_t end;
  int64_t bucket_matrix;  // index of the matrix in its bucket's order (see Chunk)
  int64_t matrix_numel;   // elements per matrix of the tensor (the matrix starts at matrix * it)
};

// The fp32 buffers of one chunk's Newton-Schulz: X ping-pongs with x_next; the rest are m x m
// (standard: A, B; Gram: R, Z, Q, Q_next, T). Views into one workspace (NOTE: [Workspace
// budget]); an NsBuffers of its own for the newton_schulz op, which returns a fresh tensor anyway.
struct NsBuffers {
  at::Tensor x;  // (batch, m, n): U, normalized, then iterated
  at::Tensor x_next;
  std::vector<at::Tensor> square;  // (batch, m, m) each

  static int64_t num_square(bool gram) { return gram ? 5 : 2; }

  NsBuffers(int64_t batch, int64_t m, int64_t n, bool gram, const at::TensorOptions& opts)
      : NsBuffers(at::empty({bytes(batch, m, n, gram) / static_cast<int64_t>(sizeof(float))},
                            opts),
                  batch, m, n, gram) {}

  // Carves the buffers of a (batch, m, n) chunk out of the front of `workspace` (fp32).
  NsBuffers(const at::Tensor& workspace, int64_t batch, int64_t m, int64_t n, bool gram) {
    const int64_t xn = batch * m * n, an = batch * m * m;
    x = workspace.narrow(0, 0, xn).view({batch, m, n});
    x_next = workspace.narrow(0, xn, xn).view({batch, m, n});
    for (int64_t k = 0; k < num_square(gram); ++k) {
      square.push_back(workspace.narrow(0, 2 * xn + k * an, an).view({batch, m, m}));
    }
  }

  static int64_t bytes(int64_t batch, int64_t m, int64_t n, bool gram) {
    return static_cast<int64_t>(sizeof(float)) * batch * (2 * m * n + num_square(gram) * m * m);
  }
};

// NOTE: [Gram on CPU]
// "auto" takes Gram Newton-Schulz for a bucket whose aspect ratio n / m is at least
// kCpuGramMinAspect (and m >= kCpuGramMinRows, below which the GEMMs are too small for the FLOP
// count to decide). Chosen from `python -m muon_ext.bench step --algorithm standard gram` on the
// 2-core AMD EPYC of benchmarks/results/ (README, Gram table): at aspect 4 (512x2048,
// 768x3072) Gram took 0.71-0.79x the standard step, at aspect 2 (128x256, FLOP ratio 0.90) it
// was 0.86x in one run and 1.12x in the next, i.e. within the noise of a shared machine.
constexpr double kCpuGramMinAspect = 3.0;
constexpr int64_t kCpuGramMinRows = 64;

// NOTE: [Tiny matrices on CPU]
// For matrices of a few dozen elements an ATen bmm call costs far more than its arithmetic
// (about 10 us a call, 15 calls per standard step), which made the step of 500 4x4 params host-
// bound. And a matrix must get the same bits whatever chunk (batch) it is orthogonalized in, but
// for small m MKL's GEMMs are not batch-independent: a batch of one takes the plain GEMM, whose
// small-matrix kernels round differently (7x7 by 7x9, 11x11 by 11x45, 9x9 by 9x52; found by a
// sweep of shapes up to m = 100, none with m > 11 among them). Matrices with m <= kTinyRows
// therefore run standard Newton-Schulz in plain loops, one matrix at a time (fp32, sums in index
// order: the bits depend on the matrix alone), with either algorithm: Gram saves nothing there.
// X Xᵀ sums eight interleaved partial sums (vectorizable, combined in a fixed order); B X is
// vectorized along the rows of X. Per step this is as fast as the batched MKL path was for
// 64 x (12 x 768) and faster for 4x4 and (4 x 7168) (benchmarks/results/, engine targets).
constexpr int64_t kTinyRows = 12;

bool is_tiny(int64_t m, int64_t /*n*/) { return m <= kTinyRows; }

bool use_gram(const NsConfig& ns, int64_t m, int64_t n) {
  if (is_tiny(m, n)) return false;
  if (ns.algorithm == NsAlgorithm::kAuto) {
    return m >= kCpuGramMinRows && static_cast<double>(n) >= kCpuGramMinAspect * m;
  }
  return ns.algorithm == NsAlgorithm::kGram && gram_shape_ok(m, n);
}

// Scratch bytes of one m x n matrix on the CPU (fp32): X, X_next and the m x m buffers.
std::function<int64_t(int64_t, int64_t)> cpu_bytes_per_matrix(const NsConfig& ns) {
  return [&ns](int64_t m, int64_t n) { return NsBuffers::bytes(1, m, n, use_gram(ns, m, n)); };
}

// NOTE: [Chunk-independent GEMMs on CPU]
// ATen's CPU baddbmm forms beta C + alpha AB in another order for a batch of one than for a
// larger batch (9x9), so every product below is a plain bmm followed by an elementwise
// combination (per element, so independent of the batch); see also NOTE: [Tiny matrices on CPU].
// Standard Newton-Schulz: iterates buf.x in fp32 and returns the buffer holding the result.
// The out-variants never alias their inputs: A, B and the two X buffers are distinct.
at::Tensor standard_newton_schulz_fp32(NsBuffers& buf, const std::vector<double>& coeffs) {
  at::Tensor x = buf.x, x_next = buf.x_next, a = buf.square[0], b = buf.square[1];
  for (size_t k = 0; k + 2 < coeffs.size(); k += 3) {
    at::bmm_out(a, x, x.transpose(1, 2));                // A = X Xᵀ
    at::bmm_out(b, a, a);                                // A²
    b.mul_(coeffs[k + 2]).add_(a, coeffs[k + 1]);        // B = cA² + bA
    at::bmm_out(x_next, b, x).add_(x, coeffs[k]);        // X = BX + aX
    std::swap(x, x_next);
  }
  return x;
}

// Gram Newton-Schulz (NOTE: [Newton-Schulz algorithm]) in fp32. The a-terms are added after the
// products (never an explicit aI); Q = I is implicit until the first product (then Q = Z + aI, a
// diagonal add, no GEMM); R is not updated after the last iteration nor before a restart, which
// recomputes it.
at::Tensor gram_newton_schulz_fp32(NsBuffers& buf, const std::vector<double>& coeffs,
                                   const std::vector<int64_t>& restarts) {
  at::Tensor x = buf.x, x_next = buf.x_next;
  at::Tensor r = buf.square[0], z = buf.square[1], q = buf.square[2], q_next = buf.square[3],
             t = buf.square[4];
  const int64_t iterations = static_cast<int64_t>(coeffs.size() / 3);
  at::bmm_out(r, x, x.transpose(1, 2));  // R = X Xᵀ
  bool q_is_identity = true;
  for (int64_t it = 0; it < iterations; ++it) {
    const double a = coeffs[3 * it], b = coeffs[3 * it + 1], c = coeffs[3 * it + 2];
    at::bmm_out(z, r, r).mul_(c).add_(r, b);  // Z = cR² + bR
    if (q_is_identity) {
      q.copy_(z);
      q.diagonal(0, 1, 2).add_(a);  // Q = I (aI + Z)
      q_is_identity = false;
    } else {
      at::bmm_out(q_next, q, z).add_(q, a);  // Q = QZ + aQ
      std::swap(q, q_next);
    }
    const bool last = it + 1 == iterations;
    const bool restart =
        !last && std::find(restarts.begin(), restarts.end(), it + 1) != restarts.end();
    if (restart) {
      at::bmm_out(x_next, q, x);  // X = QX
      std::swap(x, x_next);
      at::bmm_out(r, x, x.transpose(1, 2));
      q_is_identity = true;
    } else if (!last) {
      at::bmm_out(t, r, z).add_(r, a);  // T = RZ + aR
      at::bmm_out(r, z, t).add_(t, a);  // R = ZT + aT
    }
  }
  if (!q_is_identity) {
    at::bmm_out(x_next, q, x);
    std::swap(x, x_next);
  }
  return x;
}

// One tiny matrix (NOTE: [Tiny matrices on CPU]), in place; scratch holds 2 m² + m n floats.
void tiny_newton_schulz_fp32(float* x, int64_t m, int64_t n, const std::vector<double>& coeffs,
                             float* scratch) {
  float* a = scratch;          // m x m
  float* b = a + m * m;        // m x m
  float* y = b + m * m;        // m x n
  for (size_t k = 0; k + 2 < coeffs.size(); k += 3) {
    const float ca = static_cast<float>(coeffs[k]), cb = static_cast<float>(coeffs[k + 1]),
                cc = static_cast<float>(coeffs[k + 2]);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = i; j < m; ++j) {  // A is symmetric: the same sum serves (i, j), (j, i)
        const float* xi = x + i * n;
        const float* xj = x + j * n;
        // Eight independent partial sums (vectorizable), combined in a fixed order.
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        int64_t l = 0;
        for (; l + 8 <= n; l += 8) {
          for (int k = 0; k < 8; ++k) acc[k] += xi[l + k] * xj[l + k];
        }
        float tail = 0.f;
        for (; l < n; ++l) tail += xi[l] * xj[l];
        const float sum =
            ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) +
            tail;
        a[i * m + j] = sum;
        a[j * m + i] = sum;
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        float acc = 0.f;
        for (int64_t l = 0; l < m; ++l) acc += a[i * m + l] * a[l * m + j];
        b[i * m + j] = cc * acc + cb * a[i * m + j];
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) y[i * n + j] = 0.f;
      for (int64_t l = 0; l < m; ++l) {
        const float bil = b[i * m + l];
        for (int64_t j = 0; j < n; ++j) y[i * n + j] += bil * x[l * n + j];
      }
      for (int64_t j = 0; j < n; ++j) y[i * n + j] += ca * x[i * n + j];
    }
    std::memcpy(x, y, static_cast<size_t>(m * n) * sizeof(float));
  }
}

// Iterates buf.x with the algorithm the config picks for this (m, n); returns the result buffer.
at::Tensor newton_schulz_fp32(NsBuffers& buf, const NsConfig& ns, bool gram) {
  const int64_t batch = buf.x.size(0), m = buf.x.size(1), n = buf.x.size(2);
  if (gram) return gram_newton_schulz_fp32(buf, ns.coefficients, ns.gram_restarts);
  if (!is_tiny(m, n)) return standard_newton_schulz_fp32(buf, ns.coefficients);
  float* x = buf.x.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(static_cast<size_t>(2 * m * m + m * n));
    for (int64_t i = lo; i < hi; ++i) {
      tiny_newton_schulz_fp32(x + i * m * n, m, n, ns.coefficients, scratch.data());
    }
  });
  return buf.x;
}

// 1 / max(||U||_F, eps) per matrix. A zero matrix stays zero even with eps == 0 (0 / max(0, 0)
// would be NaN). A NaN norm stays NaN (like the CUDA step and torch): NaN grads without
// found_inf must be visible.
float inverse_norm(double norm, double eps) {
  const double denom = std::isnan(norm) ? norm : std::max(norm, eps);
  return denom == 0.0 ? 0.0f : static_cast<float>(1.0 / denom);
}

// Scales every matrix of a (B, m, n) fp32 tensor by 1 / max(||X_b||_F, eps), given its norms.
void normalize_(at::Tensor& x, const std::vector<double>& norms, double eps) {
  std::vector<float> inv(norms.size());
  for (size_t i = 0; i < norms.size(); ++i) inv[i] = inverse_norm(norms[i], eps);
  at::Tensor inv_t = at::from_blob(inv.data(), {static_cast<int64_t>(inv.size()), 1, 1},
                                   at::TensorOptions().dtype(at::kFloat))
                         .clone();
  x.mul_(inv_t);
}

// The scalars every elementwise pass needs.
struct PassScalars {
  float one_minus_beta;
  float beta;
  bool nesterov;
  float inv_grad_scale;

  // U from the grad and the (already updated) momentum. Phase 1 and the chunk fill evaluate the
  // same expression on the same floats, so the norm of phase 1 is the norm of what is filled.
  float direction(float g, float m) const {
    const float gf = g * inv_grad_scale;
    return nesterov ? gf + beta * (m - gf) : m;
  }
};

// Phase 1: M = lerp(M, G / s, 1 - beta) and, unless `partial` is null, each item's sum of
// squares of U (in double, in index order: NOTE: [Deterministic reduction]). Writes only the
// momentum. `out` (optional, the momentum op, whose norms the orthogonalize op takes): U packed
// in list order, tensor t from out_offsets[t].
template <typename scalar_t, bool kNorms>
void momentum_pass(const std::vector<WorkItem>& items, at::TensorList grads,
                   at::TensorList momentum_buffers, const PassScalars& sc,
                   std::vector<double>* partial, float* out = nullptr,
                   const std::vector<int64_t>* out_offsets = nullptr) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& it = items[w];
      const int64_t base = it.matrix * it.matrix_numel;
      const scalar_t* g = grads[it.tensor].const_data_ptr<scalar_t>() + base;
      float* mom = momentum_buffers[it.tensor].data_ptr<float>() + base;
      float* u_out = out == nullptr ? nullptr : out + (*out_offsets)[it.tensor] + base;
      [[maybe_unused]] double acc = 0.0;
      for (int64_t e = it.begin; e < it.end; ++e) {
        const float gf = static_cast<float>(g[e]) * sc.inv_grad_scale;
        const float mf = mom[e] + sc.one_minus_beta * (gf - mom[e]);
        mom[e] = mf;
        const float u = sc.direction(static_cast<float>(g[e]), mf);
        if (u_out != nullptr) u_out[e] = u;
        if constexpr (kNorms) acc += static_cast<double>(u) * static_cast<double>(u);
      }
      if constexpr (kNorms) (*partial)[w] = acc;
    }
  });
}

// Phase 2 fill: X = U / max(||U||, eps) of a chunk's matrices into its workspace, tall
// matrices transposed (U[i][j] -> X[j][i], X is cols x rows). `shapes` are the 3-D views the
// items index (the params, or the orthogonalize op's segments); `direction(it)` gives the item's
// element accessor: `direction(it)(e)` is element e of its matrix of U.
template <typename Direction>
void fill_pass(const WorkItem* items, int64_t num_items, int64_t chunk_first,
               at::TensorList shapes, const std::vector<float>& inv_norm, float* ws,
               const Direction& direction) {
  at::parallel_for(0, num_items, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& it = items[w];
      const int64_t rows = shapes[it.tensor].size(1), cols = shapes[it.tensor].size(2);
      const bool tall = rows > cols;
      float* x = ws + (it.bucket_matrix - chunk_first) * it.matrix_numel;
      const float inv = inv_norm[it.bucket_matrix];
      const auto u = direction(it);
      for (int64_t e = it.begin; e < it.end; ++e) {
        const int64_t dst = tall ? (e % cols) * rows + e / cols : e;
        x[dst] = u(e) * inv;
      }
    }
  });
}

// NorMuon's per-matrix tail (NOTE: [NorMuon] in muon_step_args.h): from the row sums of squares
// q (one matrix's rows, in double) updates the matrix's v and writes the row multipliers
// f * s_i into r. Overwrites q. Shared by muon_step_ and muon_normuon_, so both compute the
// same floats.
void normuon_row_scales(std::vector<double>& q, float* v, int64_t cols, double beta2, double eps,
                        float* r) {
  const int64_t rows = static_cast<int64_t>(q.size());
  double sum_q = 0.0, sum_sq = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    v[i] = static_cast<float>(beta2 * v[i] + (1.0 - beta2) * (q[i] / cols));
    const double si = 1.0 / (std::sqrt(static_cast<double>(v[i])) + eps);
    sum_q += q[i];
    sum_sq += si * si * q[i];
    q[i] = si;  // q now holds s_i
  }
  const double f = sum_sq > 0.0 ? std::sqrt(sum_q / sum_sq) : 0.0;
  for (int64_t i = 0; i < rows; ++i) r[i] = static_cast<float>(f * q[i]);
}

// NorMuon (NOTE: [NorMuon] in muon_step_args.h) for a chunk's matrices: updates each row's v and
// writes the row multipliers f * s_i into row_scale (kNorMuonStride = the bucket's n floats per
// matrix, since a matrix has m or n rows depending on its orientation). Sums in double, over
// rows in index order (NOTE: [Deterministic reduction]); parallel over matrices.
void normuon_pass(const WorkItem* items, const std::vector<int64_t>& firsts, int64_t chunk_first,
                  int64_t count, int64_t stride, at::TensorList params,
                  at::TensorList normuon_buffers, const float* result, double beta2, double eps,
                  float* row_scale) {
  at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> q;
    for (int64_t k = lo; k < hi; ++k) {
      const WorkItem& it = items[firsts[chunk_first + k] - firsts[chunk_first]];
      const at::Tensor& p_t = params[it.tensor];
      const int64_t rows = p_t.size(1), cols = p_t.size(2);
      const float* x = result + k * rows * cols;  // X is rows x cols, or cols x rows when tall
      float* v = normuon_buffers[it.tensor].data_ptr<float>() + it.matrix * rows;
      q.assign(static_cast<size_t>(rows), 0.0);
      if (rows > cols) {
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < rows; ++i) {
            const double o = x[j * rows + i];
            q[i] += o * o;
          }
        }
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          double acc = 0.0;
          for (int64_t j = 0; j < cols; ++j) acc += static_cast<double>(x[i * cols + j]) * x[i * cols + j];
          q[i] = acc;
        }
      }
      normuon_row_scales(q, v, cols, beta2, eps, row_scale + k * stride);
    }
  });
}

// Phase 4: P = P (1 - lr wd) - lr scale X for a chunk's matrices, in fp32, rounded once. With
// row_scale (NorMuon), row i of a matrix is scaled by row_scale[matrix * stride + i] first.
template <typename scalar_t>
void update_pass(const WorkItem* items, int64_t num_items, int64_t chunk_first,
                 at::TensorList params, const float* result, double lr, double weight_decay,
                 const std::vector<double>& scales, const float* row_scale, int64_t stride) {
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  at::parallel_for(0, num_items, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& it = items[w];
      const at::Tensor& p_t = params[it.tensor];
      const int64_t rows = p_t.size(1), cols = p_t.size(2), numel = rows * cols;
      const bool tall = rows > cols;
      const float step = static_cast<float>(lr * scales[it.tensor]);
      scalar_t* p = p_t.data_ptr<scalar_t>() + it.matrix * numel;
      const float* x = result + (it.bucket_matrix - chunk_first) * numel;
      if (row_scale != nullptr) {
        const float* r = row_scale + (it.bucket_matrix - chunk_first) * stride;
        for (int64_t e = it.begin; e < it.end; ++e) {
          const int64_t src = tall ? (e % cols) * rows + e / cols : e;
          p[e] = static_cast<scalar_t>(static_cast<float>(p[e]) * decay -
                                       step * (r[e / cols] * x[src]));
        }
        continue;
      }
      for (int64_t e = it.begin; e < it.end; ++e) {
        const int64_t src = tall ? (e % cols) * rows + e / cols : e;
        p[e] = static_cast<scalar_t>(static_cast<float>(p[e]) * decay - step * x[src]);
      }
    }
  });
}

// The parallel work of a call: every matrix cut into kBlock-element items, bucket by bucket in
// bucket order, so a chunk's items are one contiguous run.
struct StepItems {
  std::vector<WorkItem> items;
  std::vector<std::vector<int64_t>> matrix_first_item;  // per bucket: first item of each matrix,
                                                        // plus one past the end
};

StepItems make_items(at::TensorList params, const std::vector<Bucket>& buckets) {
  StepItems s;
  for (const Bucket& b : buckets) {
    std::vector<int64_t> firsts;
    int64_t bucket_matrix = 0;
    for (int64_t t : b.tensors) {
      const int64_t numel = params[t].size(1) * params[t].size(2);
      for (int64_t mat = 0; mat < params[t].size(0); ++mat, ++bucket_matrix) {
        firsts.push_back(static_cast<int64_t>(s.items.size()));
        for (int64_t begin = 0; begin < numel; begin += kBlock) {
          s.items.push_back(
              WorkItem{t, mat, begin, std::min(numel, begin + kBlock), bucket_matrix, numel});
        }
      }
    }
    firsts.push_back(static_cast<int64_t>(s.items.size()));
    s.matrix_first_item.push_back(std::move(firsts));
  }
  return s;
}

// NorMuon's row multipliers: the bucket's n floats per matrix of the largest chunk (bounded by
// the chunk, like the workspace, at most 1 / (2m) of the chunk's X buffers).
int64_t normuon_row_floats(const ChunkPlan& plan, const std::vector<Bucket>& buckets) {
  int64_t floats = 0;
  for (const Chunk& c : plan.chunks) floats = std::max(floats, c.count * buckets[c.bucket].n);
  return floats;
}

// Bytes the step allocates: the largest chunk's scratch plus the per-item partial sums, plus
// NorMuon's row multipliers when it is on.
int64_t planned_bytes(const ChunkPlan& plan, int64_t num_items, int64_t row_floats) {
  return plan.max_chunk_bytes + num_items * static_cast<int64_t>(sizeof(double)) +
         row_floats * static_cast<int64_t>(sizeof(float));
}

// NOTE: [Fault injection]
// MUON_EXT_TEST_FAIL_BEFORE_WRITE=1 makes the step throw after everything that can fail has been
// done (plan, allocations) and before the first write: tests use it to show that a failed step
// changes nothing. Read per call (getenv is cheap next to a step).
void maybe_inject_failure(const char* op) {
  const char* v = std::getenv("MUON_EXT_TEST_FAIL_BEFORE_WRITE");
  TORCH_CHECK(v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0, op,
              ": failure injected before the first write (MUON_EXT_TEST_FAIL_BEFORE_WRITE)");
}

void muon_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const at::Tensor& lr, double momentum, bool nesterov, double weight_decay,
                   double eps, at::ArrayRef<double> ns_coefficients,
                   at::ArrayRef<double> update_scales, const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf, int64_t workspace_limit,
                   c10::string_view ns_algorithm, at::IntArrayRef gram_restarts,
                   const c10::optional<at::TensorList>& normuon_list, double normuon_beta2,
                   double normuon_eps, c10::string_view ns_dtype) {
  // None and [] both turn NorMuon off.
  const at::TensorList normuon_buffers = normuon_list.has_value() ? *normuon_list : at::TensorList();
  const MuonStepArgs args{momentum,       nesterov,           weight_decay, eps,
                          ns_coefficients.vec(), update_scales.vec(), normuon_beta2, normuon_eps};
  const NsConfig ns =
      make_ns_config(ns_coefficients.vec(), eps, ns_algorithm, gram_restarts, ns_dtype);
  check_muon_step_args(params, grads, momentum_buffers, normuon_buffers, lr, args, grad_scale,
                       found_inf, c10::DeviceType::CPU);
  resolve_workspace_limit(workspace_limit);
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // skip: nothing changes
  const double lr_value = lr.item<double>();
  const PassScalars sc{
      static_cast<float>(1.0 - momentum), static_cast<float>(momentum), nesterov,
      grad_scale.has_value() ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.0f};

  // Plan the call and allocate everything before anything is written, so a failure here
  // (an allocation, a bad plan) leaves params and momentum untouched.
  const std::vector<Bucket> buckets = make_buckets(params);
  const ChunkPlan plan = plan_chunks(buckets, workspace_limit, cpu_bytes_per_matrix(ns));
  const StepItems s = make_items(params, buckets);
  std::vector<double> partial(s.items.size(), 0.0);
  const at::Tensor workspace =
      at::empty({plan.max_chunk_bytes / static_cast<int64_t>(sizeof(float))},
                params[0].options().dtype(at::kFloat));
  std::vector<std::vector<float>> inv_norms(buckets.size());
  for (size_t k = 0; k < buckets.size(); ++k) inv_norms[k].resize(buckets[k].num_matrices);
  const bool normuon = !normuon_buffers.empty();
  std::vector<float> row_scale(
      static_cast<size_t>(normuon ? normuon_row_floats(plan, buckets) : 0));
  maybe_inject_failure("muon_step_");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(),
                                  "muon_step_cpu", [&] {
    momentum_pass<scalar_t, true>(s.items, grads, momentum_buffers, sc, &partial);
    for (size_t k = 0; k < buckets.size(); ++k) {
      const std::vector<int64_t>& firsts = s.matrix_first_item[k];
      for (int64_t i = 0; i < buckets[k].num_matrices; ++i) {
        double sum = 0.0;  // block sums in block order: NOTE: [Deterministic reduction]
        for (int64_t w = firsts[i]; w < firsts[i + 1]; ++w) sum += partial[w];
        inv_norms[k][i] = inverse_norm(std::sqrt(sum), eps);
      }
    }
    // Phases 2-4 chunk by chunk in one reused workspace (NOTE: [Workspace budget]). Every
    // matrix's GEMMs are the same whatever the chunk, so chunking does not change results.
    for (const Chunk& c : plan.chunks) {
      const Bucket& b = buckets[c.bucket];
      const std::vector<int64_t>& firsts = s.matrix_first_item[c.bucket];
      const WorkItem* items = s.items.data() + firsts[c.first];
      const int64_t num_items = firsts[c.first + c.count] - firsts[c.first];
      const bool gram = use_gram(ns, b.m, b.n);
      NsBuffers buf(workspace, c.count, b.m, b.n, gram);
      fill_pass(items, num_items, c.first, params, inv_norms[c.bucket], buf.x.data_ptr<float>(),
                [&](const WorkItem& it) {
                  const int64_t base = it.matrix * it.matrix_numel;
                  const scalar_t* g = grads[it.tensor].const_data_ptr<scalar_t>() + base;
                  const float* mom = momentum_buffers[it.tensor].const_data_ptr<float>() + base;
                  return [g, mom, &sc](int64_t e) {
                    return sc.direction(static_cast<float>(g[e]), mom[e]);
                  };
                });
      const at::Tensor result = newton_schulz_fp32(buf, ns, gram);
      if (normuon) {
        normuon_pass(items, firsts, c.first, c.count, b.n, params, normuon_buffers,
                     result.const_data_ptr<float>(), normuon_beta2, normuon_eps,
                     row_scale.data());
      }
      update_pass<scalar_t>(items, num_items, c.first, params, result.const_data_ptr<float>(),
                            lr_value, weight_decay, args.update_scales,
                            normuon ? row_scale.data() : nullptr, b.n);
    }
  });
}

int64_t muon_step_workspace_bytes_cpu(at::TensorList params, int64_t workspace_limit,
                                      c10::string_view ns_algorithm, bool normuon,
                                      c10::string_view ns_dtype) {
  const NsConfig ns = make_ns_config({1.0, 0.0, 0.0}, 0.0, ns_algorithm, {}, ns_dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].dim() == 3, "muon_step_workspace_bytes: params[", i,
                "] must be a 3-D (batch, rows, cols) view, got shape ", params[i].sizes());
  }
  const std::vector<Bucket> buckets = make_buckets(params);
  const ChunkPlan plan = plan_chunks(buckets, workspace_limit, cpu_bytes_per_matrix(ns));
  return planned_bytes(plan, static_cast<int64_t>(make_items(params, buckets).items.size()),
                       normuon ? normuon_row_floats(plan, buckets) : 0);
}

at::Tensor newton_schulz_cpu(const at::Tensor& x, at::ArrayRef<double> ns_coefficients,
                             double eps, c10::string_view ns_algorithm,
                             at::IntArrayRef gram_restarts, c10::string_view ns_dtype) {
  TORCH_CHECK(x.dim() == 3, "newton_schulz: x must be a 3-D (batch, rows, cols) tensor, got shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "newton_schulz: x must be floating point, got ",
              x.scalar_type());
  const NsConfig ns =
      make_ns_config(ns_coefficients.vec(), eps, ns_algorithm, gram_restarts, ns_dtype);
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const bool tall = x.size(1) > x.size(2);
  const at::Tensor wide = tall ? x.transpose(1, 2) : x;
  const bool gram = use_gram(ns, wide.size(1), wide.size(2));
  NsBuffers buf(wide.size(0), wide.size(1), wide.size(2), gram, x.options().dtype(at::kFloat));
  buf.x.copy_(wide);
  at::Tensor norms_t = at::linalg_vector_norm(buf.x.to(at::kDouble), 2, {1, 2}, false, c10::nullopt);
  std::vector<double> norms(norms_t.const_data_ptr<double>(),
                            norms_t.const_data_ptr<double>() + norms_t.numel());
  normalize_(buf.x, norms, eps);
  at::Tensor out = newton_schulz_fp32(buf, ns, gram);
  if (tall) out = out.transpose(1, 2);
  // A fresh tensor: `out` is a view into the scratch (which it would keep alive, at an offset).
  at::Tensor result = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  result.copy_(out);
  return result;
}

// ---------------------------------------------------------------------------------------------
// The phases as ops of their own (NOTE: [Phase ops] in muon_step_args.h), built from the passes
// muon_step_cpu runs, so that they compute the same floats.

// Tensors of any shape as work items: each tensor one "matrix" of its numel elements, cut into
// kBlock-element items.
std::vector<WorkItem> flat_items(at::TensorList tensors) {
  std::vector<WorkItem> items;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kBlock) {
      items.push_back(WorkItem{static_cast<int64_t>(t), 0, begin, std::min(numel, begin + kBlock),
                               0, numel});
    }
  }
  return items;
}

// Host value of a CPU scalar tensor, or `fallback` when absent.
double host_scalar(const c10::optional<at::Tensor>& t, double fallback) {
  return t.has_value() ? t->item<double>() : fallback;
}

void muon_momentum_cpu(at::TensorList grads, at::TensorList momentum_buffers, double momentum,
                       bool nesterov, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf,
                       const c10::optional<at::Tensor>& out) {
  check_momentum_args(grads, momentum_buffers, momentum, grad_scale, found_inf, out,
                      c10::DeviceType::CPU);
  if (grads.empty() || host_scalar(found_inf, 0.0) != 0.0) return;
  const PassScalars sc{static_cast<float>(1.0 - momentum), static_cast<float>(momentum), nesterov,
                       static_cast<float>(1.0 / host_scalar(grad_scale, 1.0))};
  const std::vector<WorkItem> items = flat_items(grads);
  const std::vector<int64_t> offsets = packed_offsets(grads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grads[0].scalar_type(),
                                  "muon_momentum_cpu", [&] {
    momentum_pass<scalar_t, false>(items, grads, momentum_buffers, sc, nullptr,
                                   out.has_value() ? out->data_ptr<float>() : nullptr, &offsets);
  });
}

void muon_orthogonalize_cpu(const at::Tensor& x, at::IntArrayRef shapes,
                            at::ArrayRef<double> ns_coefficients, double eps,
                            c10::string_view ns_algorithm, at::IntArrayRef gram_restarts,
                            int64_t workspace_limit, c10::string_view ns_dtype) {
  const NsConfig ns =
      make_ns_config(ns_coefficients.vec(), eps, ns_algorithm, gram_restarts, ns_dtype);
  const std::vector<at::Tensor> views = orthogonalize_segments(x, shapes, c10::DeviceType::CPU);
  resolve_workspace_limit(workspace_limit);
  const std::vector<Bucket> buckets = make_buckets(views);
  if (buckets.empty()) return;
  const ChunkPlan plan = plan_chunks(buckets, workspace_limit, cpu_bytes_per_matrix(ns));
  const StepItems s = make_items(views, buckets);
  const at::Tensor workspace =
      at::empty({plan.max_chunk_bytes / static_cast<int64_t>(sizeof(float))}, x.options());
  maybe_inject_failure("muon_orthogonalize_");

  // The norms as muon_step_'s phase 1 takes them: per kBlock item in double, in index order,
  // then item sums in order (NOTE: [Deterministic reduction]).
  const auto u_of = [&](const WorkItem& it) {
    return views[it.tensor].const_data_ptr<float>() + it.matrix * it.matrix_numel;
  };
  std::vector<double> partial(s.items.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(s.items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& it = s.items[w];
      const float* u = u_of(it);
      double acc = 0.0;
      for (int64_t e = it.begin; e < it.end; ++e) {
        acc += static_cast<double>(u[e]) * static_cast<double>(u[e]);
      }
      partial[w] = acc;
    }
  });
  for (const Chunk& c : plan.chunks) {
    const Bucket& b = buckets[c.bucket];
    const std::vector<int64_t>& firsts = s.matrix_first_item[c.bucket];
    std::vector<float> inv_norms(static_cast<size_t>(b.num_matrices));
    for (int64_t i = c.first; i < c.first + c.count; ++i) {
      double sum = 0.0;
      for (int64_t w = firsts[i]; w < firsts[i + 1]; ++w) sum += partial[w];
      inv_norms[i] = inverse_norm(std::sqrt(sum), eps);
    }
    const WorkItem* items = s.items.data() + firsts[c.first];
    const int64_t num_items = firsts[c.first + c.count] - firsts[c.first];
    const bool gram = use_gram(ns, b.m, b.n);
    NsBuffers buf(workspace, c.count, b.m, b.n, gram);
    fill_pass(items, num_items, c.first, views, inv_norms, buf.x.data_ptr<float>(),
              [&](const WorkItem& it) {
                const float* u = u_of(it);
                return [u](int64_t e) { return u[e]; };
              });
    const float* result = newton_schulz_fp32(buf, ns, gram).const_data_ptr<float>();
    // Back into x in the param's orientation (the chunk's matrices were all read by the fill).
    at::parallel_for(0, num_items, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const WorkItem& it = items[w];
        const int64_t rows = views[it.tensor].size(1), cols = views[it.tensor].size(2);
        const bool tall = rows > cols;
        float* u = views[it.tensor].data_ptr<float>() + it.matrix * it.matrix_numel;
        const float* r = result + (it.bucket_matrix - c.first) * it.matrix_numel;
        for (int64_t e = it.begin; e < it.end; ++e) {
          u[e] = r[tall ? (e % cols) * rows + e / cols : e];
        }
      }
    });
  }
}

void muon_update_cpu(at::TensorList params, const at::Tensor& x, const at::Tensor& lr,
                     double weight_decay, at::ArrayRef<double> update_scales,
                     const c10::optional<at::Tensor>& found_inf) {
  check_update_args(params, x, lr, weight_decay, update_scales, found_inf, c10::DeviceType::CPU);
  if (params.empty() || host_scalar(found_inf, 0.0) != 0.0) return;
  const double lr_value = lr.item<double>();
  const float decay = static_cast<float>(1.0 - lr_value * weight_decay);
  const std::vector<WorkItem> items = flat_items(params);
  const std::vector<int64_t> offsets = packed_offsets(params);
  const float* xs = x.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(),
                                  "muon_update_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t w = lo; w < hi; ++w) {
        const WorkItem& it = items[w];
        // The same expression as update_pass (NOTE: [Phase ops]: the same floats).
        const float step = static_cast<float>(lr_value * update_scales[it.tensor]);
        scalar_t* p = params[it.tensor].data_ptr<scalar_t>();
        const float* xt = xs + offsets[it.tensor];
        for (int64_t e = it.begin; e < it.end; ++e) {
          p[e] = static_cast<scalar_t>(static_cast<float>(p[e]) * decay - step * xt[e]);
        }
      }
    });
  });
}

void muon_copy_blocks_cpu(const at::Tensor& src, const at::Tensor& dst, at::IntArrayRef blocks) {
  const std::vector<CopyBlock> bs = check_copy_blocks_args(src, dst, blocks, c10::DeviceType::CPU);
  const int64_t item = static_cast<int64_t>(src.element_size());
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, static_cast<int64_t>(bs.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const CopyBlock& b = bs[k];
      for (int64_t r = 0; r < b.rows; ++r) {
        std::memcpy(d + (b.dst_offset + r * b.dst_stride) * item,
                    s + (b.src_offset + r * b.src_stride) * item,
                    static_cast<size_t>(b.width * item));
      }
    }
  });
}

// muon_normuon_ (NOTE: [Phase ops]): NorMuon on orthogonalized matrices packed in x, in the
// param's orientation. The row sums of squares run over columns in index order, as normuon_pass
// takes them from either orientation, and each element becomes float(f s_i) * O_ij, the factor
// muon_step_'s update_pass applies: muon_update_ on the result then writes muon_step_'s floats.
void muon_normuon_cpu(const at::Tensor& x, at::IntArrayRef shapes, at::TensorList normuon_v,
                      double beta2, double eps, const c10::optional<at::Tensor>& found_inf) {
  const std::vector<at::Tensor> views =
      check_normuon_args(x, shapes, normuon_v, beta2, eps, found_inf, c10::DeviceType::CPU);
  if (host_scalar(found_inf, 0.0) != 0.0) return;  // v keeps its value, as in muon_step_
  std::vector<std::pair<int64_t, int64_t>> matrices;  // (segment, matrix)
  for (size_t k = 0; k < views.size(); ++k) {
    if (views[k].size(1) == 0 || views[k].size(2) == 0) continue;
    for (int64_t b = 0; b < views[k].size(0); ++b) matrices.emplace_back(k, b);
  }
  at::parallel_for(0, static_cast<int64_t>(matrices.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> q;
    std::vector<float> r;
    for (int64_t w = lo; w < hi; ++w) {
      const auto [k, b] = matrices[w];
      const int64_t rows = views[k].size(1), cols = views[k].size(2);
      float* o = views[k].data_ptr<float>() + b * rows * cols;
      float* v = normuon_v[k].data_ptr<float>() + b * rows;
      q.assign(static_cast<size_t>(rows), 0.0);
      r.resize(static_cast<size_t>(rows));
      for (int64_t i = 0; i < rows; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < cols; ++j) {
          acc += static_cast<double>(o[i * cols + j]) * o[i * cols + j];
        }
        q[i] = acc;
      }
      normuon_row_scales(q, v, cols, beta2, eps, r.data());
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) o[i * cols + j] = r[i] * o[i * cols + j];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(muon_ext, CPU, m) {
  m.impl("muon_momentum_", &muon_momentum_cpu);
  m.impl("muon_orthogonalize_", &muon_orthogonalize_cpu);
  m.impl("muon_update_", &muon_update_cpu);
  m.impl("muon_copy_blocks_", &muon_copy_blocks_cpu);
  m.impl("muon_normuon_", &muon_normuon_cpu);
  m.impl("muon_step_", &muon_step_cpu);
  m.impl("newton_schulz", &newton_schulz_cpu);
  m.impl("muon_step_workspace_bytes", &muon_step_workspace_bytes_cpu);
}

}  // namespace muon_ext
