// CUDA implementations of muon_ext::muon_step_ and muon_ext::newton_schulz: the torch glue.
//
// This file checks arguments (csrc/muon_step_args.h), turns tensors into the raw pointer tables
// of the torch-free kernels (csrc/cuda/kernels/muon_kernels.cuh), takes the current stream, the
// cuBLAS/cuBLASLt handles and the cuBLASLt workspace from PyTorch, allocates the step workspace
// from the caching allocator, and brackets each phase with an NVTX range.
//
// NOTE: [No host sync]
// lr, grad_scale and found_inf on the device are read by the kernels; nothing here copies a
// device value to the host, so a step can be captured in a CUDA graph. A CPU lr / grad_scale /
// found_inf is read here (a CPU read, not a sync); a CPU found_inf != 0 returns before any work.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <nvtx3/nvToolsExt.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cuda/kernels/muon_kernels.cuh"
#include "muon_step_args.h"

// torch >= 2.8 shares one cuBLAS(Lt) workspace per (handle, stream) and exposes it.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MUON_EXT_TORCH_LT_WORKSPACE 1
#else
#define MUON_EXT_TORCH_LT_WORKSPACE 0
#endif

namespace muon_ext {
namespace {

namespace mk = muon_ext::cuda;

class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// Runs one call into the torch-free layer, turning its std exceptions into c10::Error (a
// readable RuntimeError in Python, with the op name in front).
template <typename F>
void run_phase(const char* op, F&& f) {
  try {
    f();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, op, " (CUDA): ", e.what());
  }
}

mk::ElementType element_type(at::ScalarType t) {
  if (t == at::kBFloat16) return mk::ElementType::kBFloat16;
  if (t == at::kHalf) return mk::ElementType::kFloat16;
  TORCH_CHECK(t == at::kFloat, "muon_ext: unsupported dtype ", t,
              " (float32, bfloat16 or float16 expected)");
  return mk::ElementType::kFloat32;
}

// A 1-element tensor as the kernels take it: a device fp32 pointer (kept alive by `keep`), or
// nullptr with the value read on the host when the tensor is on the CPU.
const float* device_scalar(const at::Tensor& t, at::Tensor& keep, double& host_value) {
  if (t.device().is_cpu()) {
    host_value = t.item<double>();
    return nullptr;
  }
  keep = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);  // device-side cast, no sync
  return keep.data_ptr<float>();
}

// Which GEMM path phase 3 takes: MUON_EXT_NS_BACKEND=cublas forces legacy cuBLAS (tests use it
// to exercise the fallback); unset or "cublaslt" is the normal cuBLASLt path.
bool force_legacy_blas() {
  const char* v = std::getenv("MUON_EXT_NS_BACKEND");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "cublaslt") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "cublas") == 0,
              "MUON_EXT_NS_BACKEND must be 'cublaslt' (default) or 'cublas', got '", v, "'");
  return true;
}

// The BLAS side of phase 3, all borrowed from PyTorch for the current device and stream.
struct BlasResources {
  mk::BlasContext ctx;
  at::Tensor own_lt_workspace;  // only for torch < 2.8
};

BlasResources blas_resources([[maybe_unused]] const at::TensorOptions& options, bool force_legacy) {
  BlasResources r;
  r.ctx.lt = at::cuda::getCurrentCUDABlasLtHandle();
  r.ctx.legacy = at::cuda::getCurrentCUDABlasHandle();  // also binds it to the current stream
#if MUON_EXT_TORCH_LT_WORKSPACE
  r.ctx.lt_workspace = at::cuda::getCUDABlasLtWorkspace();
  r.ctx.lt_workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
#else
  // cuBLAS' recommendation: 32 MiB on Hopper and newer, 4 MiB before.
  const int64_t bytes =
      (at::cuda::getCurrentDeviceProperties()->major >= 9 ? 32 : 4) * 1024 * 1024;
  r.own_lt_workspace = at::empty({bytes}, options.dtype(at::kByte));
  r.ctx.lt_workspace = r.own_lt_workspace.data_ptr();
  r.ctx.lt_workspace_bytes = static_cast<size_t>(bytes);
#endif
  r.ctx.force_legacy = force_legacy;
  return r;
}

// Which buckets run Gram Newton-Schulz on CUDA (NOTE: [Gram on CUDA] in newton_schulz.cu).
// "auto" is standard here: its thresholds are chosen from measurements, and none has been made
// on a GPU yet.
std::vector<bool> cuda_gram_buckets(const NsConfig& ns, const std::vector<mk::ShapeBucket>& b) {
  std::vector<bool> gram(b.size(), false);
  for (size_t k = 0; k < b.size(); ++k) {
    gram[k] = ns.algorithm == NsAlgorithm::kGram && gram_shape_ok(b[k].m, b[k].n);
  }
  return gram;
}

// The workspace element type of NOTE: [Newton-Schulz dtype].
mk::NsType ns_type(const NsConfig& ns) {
  return ns.dtype == NsDtype::kFloat16 ? mk::NsType::kFloat16 : mk::NsType::kBFloat16;
}

// NOTE: [Fault injection] (csrc/cpu/muon_step_cpu.cpp): MUON_EXT_TEST_FAIL_BEFORE_WRITE=1 throws
// after everything that can fail is done and before the first write.
void maybe_inject_failure(const char* op) {
  const char* v = std::getenv("MUON_EXT_TEST_FAIL_BEFORE_WRITE");
  TORCH_CHECK(v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0, op,
              ": failure injected before the first write (MUON_EXT_TEST_FAIL_BEFORE_WRITE)");
}

// The whole step after the scalars are known: plan the chunks, allocate the workspace, take the
// BLAS handles and workspace, build (or find cached) the GEMM plans -- everything that can fail
// -- and only then run the phases, chunk by chunk (NOTE: [Chunked step] in muon_kernels.cuh).
// A failure before run_step leaves params and momentum untouched.
void plan_and_run(const char* op, const std::vector<mk::MatrixTensor>& tensors,
                  const std::vector<mk::ShapeBucket>& buckets, mk::ElementType type,
                  mk::DirectionSource source, mk::WriteBack mode, const mk::StepScalars& scalars,
                  const NsConfig& ns, int64_t workspace_limit, bool force_legacy,
                  const at::TensorOptions& options, cudaStream_t stream, bool normuon = false) {
  mk::StepPlan plan;
  run_phase(op, [&] {
    plan = mk::plan_step(tensors, buckets, type, workspace_limit, cuda_gram_buckets(ns, buckets),
                         normuon, ns_type(ns));
  });
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, options.dtype(at::kByte));
  void* ws = workspace.data_ptr();
  const BlasResources blas = blas_resources(options, force_legacy);
  mk::PreparedStep prepared;
  run_phase(op, [&] { prepared = mk::prepare_step(plan, ws, blas.ctx); });
  maybe_inject_failure(op);
  NvtxRange range("muon_ext::step");
  run_phase(op, [&] {
    mk::run_step(plan, prepared, ws, type, source, mode, scalars, ns.coefficients.data(),
                 static_cast<int64_t>(ns.coefficients.size()), blas.ctx, stream,
                 ns.gram_restarts);
  });
}

// Non-empty tensors of `params` (muon_step_'s 3-D views) as the kernels take them, and the
// buckets re-indexed into that list. `grads` / `momentum_buffers` / `normuon_buffers` may be
// empty (planning only; NorMuon off).
struct KernelTensors {
  std::vector<mk::MatrixTensor> tensors;
  std::vector<mk::ShapeBucket> buckets;
};

KernelTensors kernel_tensors(at::TensorList params, at::TensorList grads,
                             at::TensorList momentum_buffers, at::TensorList normuon_buffers,
                             at::ArrayRef<double> update_scales,
                             const std::vector<Bucket>& buckets) {
  KernelTensors k;
  std::vector<int64_t> compact(params.size(), -1);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    compact[i] = static_cast<int64_t>(k.tensors.size());
    mk::MatrixTensor t;
    if (!grads.empty()) t.src = grads[i].data_ptr();
    if (!momentum_buffers.empty()) t.momentum = momentum_buffers[i].data_ptr<float>();
    if (!normuon_buffers.empty()) t.normuon_v = normuon_buffers[i].data_ptr<float>();
    t.dst = p.data_ptr();
    t.batch = p.size(0);
    t.rows = p.size(1);
    t.cols = p.size(2);
    if (!update_scales.empty()) t.update_scale = static_cast<float>(update_scales[i]);
    k.tensors.push_back(t);
  }
  k.buckets.reserve(buckets.size());
  for (const Bucket& b : buckets) {
    mk::ShapeBucket sb;
    sb.m = b.m;
    sb.n = b.n;
    sb.num_matrices = b.num_matrices;
    for (int64_t i : b.tensors) sb.tensors.push_back(compact[static_cast<size_t>(i)]);
    k.buckets.push_back(std::move(sb));
  }
  return k;
}

void muon_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const at::Tensor& lr, double momentum, bool nesterov, double weight_decay,
                    double eps, at::ArrayRef<double> ns_coefficients,
                    at::ArrayRef<double> update_scales,
                    const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf, int64_t workspace_limit,
                    c10::string_view ns_algorithm, at::IntArrayRef gram_restarts,
                    const c10::optional<at::TensorList>& normuon_list, double normuon_beta2,
                    double normuon_eps, c10::string_view ns_dtype) {
  // None and [] both turn NorMuon off.
  const at::TensorList normuon_buffers = normuon_list.has_value() ? *normuon_list : at::TensorList();
  resolve_workspace_limit(workspace_limit);  // a bad limit is rejected before any work
  const NsConfig ns =
      make_ns_config(ns_coefficients.vec(), eps, ns_algorithm, gram_restarts, ns_dtype);
  MuonStepArgs args{momentum,
                    nesterov,
                    weight_decay,
                    eps,
                    std::vector<double>(ns_coefficients.begin(), ns_coefficients.end()),
                    std::vector<double>(update_scales.begin(), update_scales.end()),
                    normuon_beta2,
                    normuon_eps};
  // Also checks normuon_buffers: (B, rows) float32, contiguous, on the params' device, no aliasing.
  check_muon_step_args(params, grads, momentum_buffers, normuon_buffers, lr, args, grad_scale,
                       found_inf, c10::DeviceType::CUDA);
  const bool force_legacy = force_legacy_blas();  // a bad value is rejected before any work
  if (params.empty()) return;

  const std::vector<Bucket> buckets = make_buckets(params);
  if (buckets.empty()) return;  // only empty tensors

  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const at::TensorOptions options = params[0].options();

  mk::StepScalars scalars;
  scalars.momentum = momentum;
  scalars.weight_decay = weight_decay;
  scalars.eps = eps;
  scalars.nesterov = nesterov;
  at::Tensor lr_keep, grad_scale_keep, found_inf_keep;
  if (found_inf.has_value()) {
    double flag = 0.0;
    scalars.found_inf = device_scalar(*found_inf, found_inf_keep, flag);
    if (scalars.found_inf == nullptr && flag != 0.0) return;  // CPU flag set: skip the step
  }
  scalars.lr = device_scalar(lr, lr_keep, scalars.lr_value);
  if (grad_scale.has_value()) {
    scalars.grad_scale = device_scalar(*grad_scale, grad_scale_keep, scalars.grad_scale_value);
  }
  const bool normuon = !normuon_buffers.empty();
  scalars.normuon_beta2 = normuon_beta2;
  scalars.normuon_eps = normuon_eps;

  const KernelTensors k = kernel_tensors(params, grads, momentum_buffers, normuon_buffers,
                                         update_scales, buckets);
  plan_and_run("muon_step_", k.tensors, k.buckets, element_type(params[0].scalar_type()),
               mk::DirectionSource::kMomentum, mk::WriteBack::kApplyUpdate, scalars, ns,
               workspace_limit, force_legacy, options, stream, normuon);
}

// The bytes muon_step_ would allocate for these params (shapes and dtype only: nothing is read).
// `normuon`: the step runs with normuon_buffers (its chunks then hold the row multipliers).
int64_t muon_step_workspace_bytes_cuda(at::TensorList params, int64_t workspace_limit,
                                       c10::string_view ns_algorithm, bool normuon,
                                       c10::string_view ns_dtype) {
  const NsConfig ns = make_ns_config({1.0, 0.0, 0.0}, 0.0, ns_algorithm, {}, ns_dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].dim() == 3, "muon_step_workspace_bytes: params[", i,
                "] must be a 3-D (batch, rows, cols) view, got shape ", params[i].sizes());
  }
  resolve_workspace_limit(workspace_limit);
  if (params.empty()) return 0;
  const std::vector<Bucket> buckets = make_buckets(params);
  const KernelTensors k = kernel_tensors(params, {}, {}, {}, {}, buckets);
  mk::StepPlan plan;
  run_phase("muon_step_workspace_bytes", [&] {
    plan = mk::plan_step(k.tensors, k.buckets, element_type(params[0].scalar_type()),
                         workspace_limit, cuda_gram_buckets(ns, k.buckets), normuon,
                         ns_type(ns));
  });
  return static_cast<int64_t>(plan.workspace_bytes);
}

at::Tensor newton_schulz_cuda(const at::Tensor& x, at::ArrayRef<double> ns_coefficients,
                              double eps, c10::string_view ns_algorithm,
                              at::IntArrayRef gram_restarts, c10::string_view ns_dtype) {
  const std::vector<double> coefficients(ns_coefficients.begin(), ns_coefficients.end());
  const NsConfig ns = make_ns_config(coefficients, eps, ns_algorithm, gram_restarts, ns_dtype);
  const bool force_legacy = force_legacy_blas();
  TORCH_CHECK(x.is_cuda(), "newton_schulz: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "newton_schulz: x must be a 3-D (batch, rows, cols) tensor, got shape ",
              x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "newton_schulz: x must be float32, bfloat16 or float16, got ", dtype);

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (input.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  mk::MatrixTensor t;
  t.src = input.data_ptr();
  t.dst = out.data_ptr();
  t.batch = input.size(0);
  t.rows = input.size(1);
  t.cols = input.size(2);
  std::vector<mk::MatrixTensor> tensors{t};
  mk::ShapeBucket bucket;
  bucket.m = std::min(t.rows, t.cols);
  bucket.n = std::max(t.rows, t.cols);
  bucket.tensors = {0};
  bucket.num_matrices = t.batch;
  const std::vector<mk::ShapeBucket> buckets{bucket};

  mk::StepScalars scalars;
  scalars.eps = eps;
  plan_and_run("newton_schulz", tensors, buckets, element_type(dtype), mk::DirectionSource::kInput,
               mk::WriteBack::kCopy, scalars, ns, /*workspace_limit=*/-1, force_legacy,
               input.options(), stream);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The phases as ops of their own (NOTE: [Phase ops] in muon_step_args.h).
//
// NOTE: [CUDA phase ops]
// muon_orthogonalize_ runs the same chunked kernels and cuBLASLt GEMMs as muon_step_'s phases
// 2-3. Momentum, update and block copies are compositions of ATen ops on the current stream
// (multi-tensor _foreach kernels where ATen has them), not kernels of ours: they are elementwise
// and bandwidth-bound, the distributed step's collectives dominate next to them, and a device
// found_inf is honoured with at::where (a selection, never a multiplication by 1 - found_inf,
// since inf * 0 is NaN), so nothing is read on the host. Their temporaries hold one copy of
// the call's tensors in fp32 (a bucket, in the distributed step), all made before the first
// write, so a failed allocation changes nothing.

// found_inf as a device bool tensor (nullopt: no flag); a CPU flag is read on the host.
c10::optional<at::Tensor> device_flag(const c10::optional<at::Tensor>& found_inf,
                                      const at::Device& device, bool& skip) {
  skip = false;
  if (!found_inf.has_value()) return c10::nullopt;
  if (found_inf->device().is_cpu()) {
    skip = found_inf->item<double>() != 0.0;
    return c10::nullopt;
  }
  return found_inf->to(device).reshape({}).ne(0);
}

void muon_momentum_cuda(at::TensorList grads, at::TensorList momentum_buffers, double momentum,
                        bool nesterov, const c10::optional<at::Tensor>& grad_scale,
                        const c10::optional<at::Tensor>& found_inf,
                        const c10::optional<at::Tensor>& out) {
  check_momentum_args(grads, momentum_buffers, momentum, grad_scale, found_inf, out,
                      c10::DeviceType::CUDA);
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  bool skip = false;
  const c10::optional<at::Tensor> flag = device_flag(found_inf, grads[0].device(), skip);
  if (skip) return;
  NvtxRange range("muon_ext::momentum");
  std::vector<at::Tensor> g;
  g.reserve(grads.size());
  for (const at::Tensor& t : grads) g.push_back(t.to(at::kFloat));
  if (grad_scale.has_value()) {
    const at::Tensor inv = grad_scale->to(grads[0].device(), at::kFloat).reciprocal();
    at::_foreach_mul_(g, inv);
  }
  // M' = lerp(M, G', 1 - beta) and U, computed aside (every allocation before the first write,
  // so a failure changes nothing; and a set flag keeps M).
  std::vector<at::Tensor> m = at::_foreach_lerp(momentum_buffers, g, 1.0 - momentum);
  std::vector<at::Tensor> u = nesterov ? at::_foreach_lerp(g, m, momentum) : m;
  if (flag.has_value()) {
    for (size_t i = 0; i < m.size(); ++i) m[i] = at::where(*flag, momentum_buffers[i], m[i]);
  }
  const std::vector<int64_t> offsets = packed_offsets(grads);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    if (out.has_value()) out->narrow(0, offsets[i], grads[i].numel()).view(u[i].sizes()).copy_(u[i]);
    momentum_buffers[i].copy_(m[i]);
  }
}

void muon_update_cuda(at::TensorList params, const at::Tensor& x, const at::Tensor& lr,
                      double weight_decay, at::ArrayRef<double> update_scales,
                      const c10::optional<at::Tensor>& found_inf) {
  check_update_args(params, x, lr, weight_decay, update_scales, found_inf, c10::DeviceType::CUDA);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  bool skip = false;
  const c10::optional<at::Tensor> flag = device_flag(found_inf, device, skip);
  if (skip) return;
  NvtxRange range("muon_ext::update");
  // fp64 on the host for a CPU lr (as muon_step_ does), fp32 on the device otherwise.
  const bool host_lr = lr.device().is_cpu();
  const double lr_value = host_lr ? lr.item<double>() : 0.0;
  const at::Tensor lr_dev = host_lr ? at::Tensor() : lr.to(at::kFloat).reshape({});
  const std::vector<int64_t> offsets = packed_offsets(params);
  // Every new value computed aside first (all allocations before the first write).
  std::vector<at::Tensor> next(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    const at::Tensor xi = x.narrow(0, offsets[i], p.numel()).view(p.sizes()).to(at::kFloat);
    if (host_lr) {
      next[i] = p.to(at::kFloat)
                    .mul(static_cast<float>(1.0 - lr_value * weight_decay))
                    .sub_(xi, static_cast<float>(lr_value * update_scales[i]));
    } else {
      next[i] = p.to(at::kFloat)
                    .mul(1.0 - lr_dev * weight_decay)
                    .sub_(xi * (lr_dev * update_scales[i]));
    }
    next[i] = next[i].to(p.scalar_type());
    if (flag.has_value()) next[i] = at::where(*flag, p, next[i]);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (next[i].defined()) params[i].copy_(next[i]);
  }
}

void muon_orthogonalize_cuda(const at::Tensor& x, at::IntArrayRef shapes,
                             at::ArrayRef<double> ns_coefficients, double eps,
                             c10::string_view ns_algorithm, at::IntArrayRef gram_restarts,
                             int64_t workspace_limit, c10::string_view ns_dtype) {
  const NsConfig ns =
      make_ns_config(ns_coefficients.vec(), eps, ns_algorithm, gram_restarts, ns_dtype);
  const bool force_legacy = force_legacy_blas();
  const std::vector<at::Tensor> views = orthogonalize_segments(x, shapes, c10::DeviceType::CUDA);
  resolve_workspace_limit(workspace_limit);
  const std::vector<Bucket> buckets = make_buckets(views);
  if (buckets.empty()) return;
  const c10::cuda::CUDAGuard guard(x.device());
  // In place: each chunk reads its matrices (phases 1-2) before it writes them (phase 4).
  KernelTensors k = kernel_tensors(views, {}, {}, {}, {}, buckets);
  for (mk::MatrixTensor& t : k.tensors) t.src = t.dst;
  mk::StepScalars scalars;
  scalars.eps = eps;
  plan_and_run("muon_orthogonalize_", k.tensors, k.buckets, element_type(x.scalar_type()),
               mk::DirectionSource::kInput, mk::WriteBack::kCopy, scalars, ns, workspace_limit,
               force_legacy, x.options(), at::cuda::getCurrentCUDAStream().stream());
}

void muon_copy_blocks_cuda(const at::Tensor& src, const at::Tensor& dst, at::IntArrayRef blocks) {
  const std::vector<CopyBlock> bs =
      check_copy_blocks_args(src, dst, blocks, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(src.device());
  for (const CopyBlock& b : bs) {
    dst.as_strided({b.rows, b.width}, {b.dst_stride, 1}, b.dst_offset)
        .copy_(src.as_strided({b.rows, b.width}, {b.src_stride, 1}, b.src_offset));
  }
}

}  // namespace
}  // namespace muon_ext

TORCH_LIBRARY_IMPL(muon_ext, CUDA, m) {
  m.impl("muon_momentum_", TORCH_FN(muon_ext::muon_momentum_cuda));
  m.impl("muon_orthogonalize_", TORCH_FN(muon_ext::muon_orthogonalize_cuda));
  m.impl("muon_update_", TORCH_FN(muon_ext::muon_update_cuda));
  m.impl("muon_copy_blocks_", TORCH_FN(muon_ext::muon_copy_blocks_cuda));
  m.impl("muon_step_", TORCH_FN(muon_ext::muon_step_cuda));
  m.impl("newton_schulz", TORCH_FN(muon_ext::newton_schulz_cuda));
  m.impl("muon_step_workspace_bytes", TORCH_FN(muon_ext::muon_step_workspace_bytes_cuda));
}
