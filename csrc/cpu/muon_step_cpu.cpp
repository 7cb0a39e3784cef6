// CPU implementation of the fused Muon step and of Newton-Schulz alone.
//
// All matrices of a call are processed together: one parallel elementwise pass for
// momentum + sum of squares, one ATen scale per bucket for the normalization, fp32 batched
// matmuls per shape bucket for Newton-Schulz, one parallel pass for the update.
//
// NOTE: [fp32 Newton-Schulz on CPU]
// torch.optim.Muon orthogonalizes in bf16. On CPU a bf16 matmul runs about 100x slower than
// an fp32 one (no bf16 GEMM microkernels on most x86 parts), so the CPU path iterates in fp32:
// faster *and* more accurate; the result differs from torch only by bf16 rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
  int64_t ws_matrix;  // index of the matrix inside its bucket workspace
  int64_t bucket;
};

// The fp32 buffers of one bucket's Newton-Schulz: X ping-pongs with x_next; a, b are Gram-sized.
struct NsBuffers {
  at::Tensor x;  // (batch, m, n): U, normalized, then iterated
  at::Tensor x_next;
  at::Tensor a;  // (batch, m, m)
  at::Tensor b;

  NsBuffers(int64_t batch, int64_t m, int64_t n, const at::TensorOptions& opts)
      : x(at::empty({batch, m, n}, opts)),
        x_next(at::empty({batch, m, n}, opts)),
        a(at::empty({batch, m, m}, opts)),
        b(at::empty({batch, m, m}, opts)) {}
};

struct BucketWork {
  Bucket bucket;
  NsBuffers ns;
};

// Iterates buf.x in fp32 and returns the buffer holding the result (x or x_next).
// The out-variants never alias their inputs: A, B and the two X buffers are distinct.
at::Tensor newton_schulz_fp32(NsBuffers& buf, const std::vector<double>& coeffs) {
  at::Tensor x = buf.x, x_next = buf.x_next, a = buf.a, b = buf.b;
  for (size_t k = 0; k + 2 < coeffs.size(); k += 3) {
    at::bmm_out(a, x, x.transpose(1, 2));                                      // A = X Xᵀ
    at::baddbmm_out(b, a, a, a, /*beta=*/coeffs[k + 1], /*alpha=*/coeffs[k + 2]);  // bA + cA²
    at::baddbmm_out(x_next, x, b, x, /*beta=*/coeffs[k], /*alpha=*/1.0);        // aX + BX
    std::swap(x, x_next);
  }
  return x;
}

// Scales every matrix of a (B, m, n) fp32 tensor by 1 / max(||X_b||_F, eps), given its norms.
void normalize_(at::Tensor& x, const std::vector<double>& norms, double eps) {
  std::vector<float> inv(norms.size());
  for (size_t i = 0; i < norms.size(); ++i) {
    // A zero matrix stays zero even with eps == 0 (0 / max(0, 0) would be NaN). A NaN norm
    // stays NaN (like the CUDA step and torch): NaN grads without found_inf must be visible.
    const double denom = std::isnan(norms[i]) ? norms[i] : std::max(norms[i], eps);
    inv[i] = denom == 0.0 ? 0.0f : static_cast<float>(1.0 / denom);
  }
  at::Tensor inv_t = at::from_blob(inv.data(), {static_cast<int64_t>(inv.size()), 1, 1},
                                   at::TensorOptions().dtype(at::kFloat))
                         .clone();
  x.mul_(inv_t);
}

template <typename scalar_t>
void momentum_pass(const std::vector<WorkItem>& items, at::TensorList grads,
                   at::TensorList momentum_buffers, const std::vector<BucketWork>& work, double beta,
                   bool nesterov, float inv_grad_scale, std::vector<double>& partial) {
  const float one_minus_beta = static_cast<float>(1.0 - beta);
  const float beta_f = static_cast<float>(beta);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& it = items[w];
      const at::Tensor& g_t = grads[it.tensor];
      const int64_t rows = g_t.size(1), cols = g_t.size(2), numel = rows * cols;
      const bool tall = rows > cols;
      const scalar_t* g = g_t.const_data_ptr<scalar_t>() + it.matrix * numel;
      float* mom = momentum_buffers[it.tensor].data_ptr<float>() + it.matrix * numel;
      float* ws = work[it.bucket].ns.x.data_ptr<float>() + it.ws_matrix * numel;
      double acc = 0.0;
      for (int64_t e = it.begin; e < it.end; ++e) {
        const float gf = static_cast<float>(g[e]) * inv_grad_scale;
        const float mf = mom[e] + one_minus_beta * (gf - mom[e]);
        mom[e] = mf;
        const float u = nesterov ? gf + beta_f * (mf - gf) : mf;
        // Tall matrices go to the workspace transposed: U[i][j] -> X[j][i] (X is cols x rows).
        const int64_t dst = tall ? (e % cols) * rows + e / cols : e;
        ws[dst] = u;
        acc += static_cast<double>(u) * static_cast<double>(u);
      }
      partial[w] = acc;
    }
  });
}

template <typename scalar_t>
void update_pass(const std::vector<WorkItem>& items, at::TensorList params,
                 const std::vector<BucketWork>& work, const std::vector<at::Tensor>& results,
                 double lr, double weight_decay, const std::vector<double>& scales) {
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const WorkItem& it = items[w];
      const at::Tensor& p_t = params[it.tensor];
      const int64_t rows = p_t.size(1), cols = p_t.size(2), numel = rows * cols;
      const bool tall = rows > cols;
      const float step = static_cast<float>(lr * scales[it.tensor]);
      scalar_t* p = p_t.data_ptr<scalar_t>() + it.matrix * numel;
      const float* x = results[it.bucket].const_data_ptr<float>() + it.ws_matrix * numel;
      for (int64_t e = it.begin; e < it.end; ++e) {
        const int64_t src = tall ? (e % cols) * rows + e / cols : e;
        p[e] = static_cast<scalar_t>(static_cast<float>(p[e]) * decay - step * x[src]);
      }
    }
  });
}

void muon_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   const at::Tensor& lr, double momentum, bool nesterov, double weight_decay,
                   double eps, at::ArrayRef<double> ns_coefficients,
                   at::ArrayRef<double> update_scales, const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf) {
  const MuonStepArgs args{momentum, nesterov, weight_decay, eps, ns_coefficients.vec(),
                          update_scales.vec()};
  check_muon_step_args(params, grads, momentum_buffers, lr, args, grad_scale, found_inf,
                       c10::DeviceType::CPU);
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // skip: nothing changes
  const double lr_value = lr.item<double>();
  const float inv_grad_scale =
      grad_scale.has_value() ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.0f;

  // Plan the call: buckets, their workspaces (allocated before anything is written, so an
  // allocation failure leaves params and momentum untouched), and the parallel work items.
  std::vector<BucketWork> work;
  std::vector<WorkItem> items;
  std::vector<std::pair<int64_t, int64_t>> matrix_range;  // per workspace matrix: its items
  const auto fp32 = params[0].options().dtype(at::kFloat);
  for (Bucket& b : make_buckets(params)) {
    BucketWork bw{b, NsBuffers(b.num_matrices, b.m, b.n, fp32)};
    int64_t ws = 0;
    for (int64_t t : b.tensors) {
      const int64_t numel = params[t].size(1) * params[t].size(2);
      for (int64_t mat = 0; mat < params[t].size(0); ++mat, ++ws) {
        const int64_t first = static_cast<int64_t>(items.size());
        for (int64_t begin = 0; begin < numel; begin += kBlock) {
          items.push_back(WorkItem{t, mat, begin, std::min(numel, begin + kBlock), ws,
                                   static_cast<int64_t>(work.size())});
        }
        matrix_range.emplace_back(first, static_cast<int64_t>(items.size()));
      }
    }
    work.push_back(std::move(bw));
  }
  std::vector<double> partial(items.size(), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(),
                                  "muon_step_cpu_momentum", [&] {
                                    momentum_pass<scalar_t>(items, grads, momentum_buffers, work,
                                                            momentum, nesterov, inv_grad_scale,
                                                            partial);
                                  });

  std::vector<at::Tensor> results;
  size_t next_matrix = 0;
  for (BucketWork& bw : work) {
    std::vector<double> norms(bw.bucket.num_matrices);
    for (double& norm : norms) {
      const auto [first, last] = matrix_range[next_matrix++];
      double sum = 0.0;
      for (int64_t w = first; w < last; ++w) sum += partial[w];
      norm = std::sqrt(sum);
    }
    normalize_(bw.ns.x, norms, eps);
    results.push_back(newton_schulz_fp32(bw.ns, args.ns_coefficients));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(),
                                  "muon_step_cpu_update", [&] {
                                    update_pass<scalar_t>(items, params, work, results, lr_value,
                                                          weight_decay, args.update_scales);
                                  });
}

at::Tensor newton_schulz_cpu(const at::Tensor& x, at::ArrayRef<double> ns_coefficients,
                             double eps) {
  TORCH_CHECK(x.dim() == 3, "newton_schulz: x must be a 3-D (batch, rows, cols) tensor, got shape ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "newton_schulz: x must be floating point, got ",
              x.scalar_type());
  const std::vector<double> coeffs = ns_coefficients.vec();
  check_ns_coefficients(coeffs, eps);
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const bool tall = x.size(1) > x.size(2);
  const at::Tensor wide = tall ? x.transpose(1, 2) : x;
  NsBuffers buf(wide.size(0), wide.size(1), wide.size(2), x.options().dtype(at::kFloat));
  buf.x.copy_(wide);
  at::Tensor norms_t = at::linalg_vector_norm(buf.x.to(at::kDouble), 2, {1, 2}, false, c10::nullopt);
  std::vector<double> norms(norms_t.const_data_ptr<double>(),
                            norms_t.const_data_ptr<double>() + norms_t.numel());
  normalize_(buf.x, norms, eps);
  at::Tensor out = newton_schulz_fp32(buf, coeffs);
  if (tall) out = out.transpose(1, 2);
  return out.to(x.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(muon_ext, CPU, m) {
  m.impl("muon_step_", &muon_step_cpu);
  m.impl("newton_schulz", &newton_schulz_cpu);
}

}  // namespace muon_ext
