// Op schemas (TORCH_LIBRARY) and the pybind11 `_C` module with build information.
//
// The implementations register per backend: csrc/cpu/ (CPU) and csrc/cuda/ (CUDA).
// Python wrappers and fake (meta) kernels live in muon_ext/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef MUON_EXT_WITH_CUDA
#include <cublas_api.h>
#include <cuda_runtime_api.h>
#endif

#ifndef MUON_EXT_BUILD_INFO_ARCHS
#define MUON_EXT_BUILD_INFO_ARCHS "none"
#endif

TORCH_LIBRARY(muon_ext, m) {
  // The whole Muon step for a list of matrices (see csrc/muon_step_args.h for the contract):
  //   M = lerp(M, G / grad_scale, 1 - momentum); U = nesterov ? lerp(G', M, momentum) : M
  //   X = NS(U / max(||U||_F, eps)) per matrix; P = P * (1 - lr * wd) - lr * scale_i * X
  // NorMuon (normuon_buffers non-empty): a per-row second moment after Newton-Schulz, see
  // NOTE: [NorMuon] in csrc/muon_step_args.h. With found_inf != 0 nothing changes. grads are
  // never written. Newton-Schulz runs per shape
  // bucket in chunks whose scratch fits workspace_limit bytes (csrc/muon_step_args.h).
  m.def(
      "muon_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor lr, float momentum, bool nesterov, float weight_decay, float eps, "
      "float[] ns_coefficients, float[] update_scales, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int workspace_limit=-1, str ns_algorithm=\"standard\", "
      "int[] gram_restarts=[2], Tensor(c!)[]? normuon_buffers=None, float normuon_beta2=0.95, "
      "float normuon_eps=1e-08, str ns_dtype=\"bfloat16\") -> ()");
  // The phases of muon_step_ as ops of their own, on packed buffers: see NOTE: [Phase ops] in
  // csrc/muon_step_args.h.
  m.def(
      "muon_momentum_(Tensor[] grads, Tensor(a!)[] momentum_buffers, float momentum, "
      "bool nesterov, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(b!)? out=None) "
      "-> ()");
  m.def(
      "muon_orthogonalize_(Tensor(a!) x, int[] shapes, float[] ns_coefficients, float eps, "
      "str ns_algorithm=\"standard\", int[] gram_restarts=[2], int workspace_limit=-1, "
      "str ns_dtype=\"bfloat16\") -> ()");
  m.def(
      "muon_update_(Tensor(a!)[] params, Tensor x, Tensor lr, float weight_decay, "
      "float[] update_scales, Tensor? found_inf=None) -> ()");
  m.def("muon_copy_blocks_(Tensor src, Tensor(a!) dst, int[] blocks) -> ()");
  m.def(
      "muon_normuon_(Tensor(a!) x, int[] shapes, Tensor(b!)[] normuon_v, float normuon_beta2, "
      "float normuon_eps, Tensor? found_inf=None) -> ()");
  // Bytes of scratch memory muon_step_ would allocate for these params (3-D views as for the
  // step) under `workspace_limit` (-1: the default; see NOTE: [Workspace budget]); `normuon`:
  // for a step with normuon_buffers (NorMuon's per-row regions, small: one float per row).
  m.def(
      "muon_step_workspace_bytes(Tensor[] params, int workspace_limit=-1, "
      "str ns_algorithm=\"standard\", bool normuon=False, str ns_dtype=\"bfloat16\") -> int");
  // Orthogonalization alone for a (B, rows, cols) batch: X / max(||X||_F, eps) per matrix,
  // then the Newton-Schulz iterations. Returns a new tensor of x's shape and dtype.
  // ns_algorithm / gram_restarts: NOTE: [Newton-Schulz algorithm] in csrc/muon_step_args.h;
  // ns_dtype ("bfloat16" / "float16", the CUDA iteration's type): NOTE: [Newton-Schulz dtype].
  m.def(
      "newton_schulz(Tensor x, float[] ns_coefficients, float eps, "
      "str ns_algorithm=\"standard\", int[] gram_restarts=[2], str ns_dtype=\"bfloat16\") "
      "-> Tensor");
}

namespace {

py::dict build_info() {
  py::dict d;
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                       "." + std::to_string(TORCH_VERSION_PATCH);
  d["with_cuda"] =
#ifdef MUON_EXT_WITH_CUDA
      true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string((CUDART_VERSION % 1000) / 10);
  d["cublas_version"] = std::to_string(CUBLAS_VER_MAJOR) + "." + std::to_string(CUBLAS_VER_MINOR) +
                        "." + std::to_string(CUBLAS_VER_PATCH);
#else
      false;
  d["cuda_version"] = py::none();
  d["cublas_version"] = py::none();
#endif
  d["cuda_archs"] = MUON_EXT_BUILD_INFO_ARCHS;
#ifdef NDEBUG
  d["debug"] = false;
#else
  d["debug"] = true;
#endif
  return d;
}

// FNV-1a over 64-bit words, for the host-side cache keys below.
struct WordHash {
  uint64_t value = 1469598103934665603ull;
  void mix(uint64_t word) { value = (value ^ word) * 1099511628211ull; }
  // A tensor's data pointer, shape, dtype and device: a `p.data = ...` swap changes it, even to
  // a view of the same storage. A DTensor is a wrapper with no storage: only its global shape,
  // dtype and device count (the distributed step keys its layout by the local tensors).
  void mix(const at::Tensor& t) {
    mix(reinterpret_cast<uintptr_t>(t.has_storage() ? t.data_ptr() : nullptr));
    mix(static_cast<uint64_t>(t.dim()));
    for (const int64_t size : t.sizes()) {
      mix(static_cast<uint64_t>(size));
    }
    mix(static_cast<uint64_t>(t.scalar_type()) |
        (static_cast<uint64_t>(static_cast<uint8_t>(t.device().type())) << 8) |
        (static_cast<uint64_t>(static_cast<uint8_t>(t.device().index())) << 16));
  }
  int64_t result() const { return static_cast<int64_t>(value >> 1); }
};

// The per-step host facts of a group's params (NOTE: [Cached plan] in muon_ext/optim.py), in one
// C++ pass instead of several attribute reads per param in Python (reading `p.grad` of a
// DTensor costs about half a microsecond in Python): each param's grad (None where it has none),
// the index of the first grad whose shape, dtype or device differs from its param's or that is
// sparse (-1: none), and a hash of which params have grads and of those params' data pointers,
// shapes, dtypes and devices.
py::tuple step_facts(const std::vector<at::Tensor>& params) {
  py::list grads(params.size());
  int64_t bad = -1;
  WordHash hash;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = p.grad();
    hash.mix(static_cast<uint64_t>(g.defined()));
    if (!g.defined()) {
      grads[i] = py::none();
      continue;
    }
    if (bad < 0 && (g.is_sparse() || g.sizes() != p.sizes() || g.scalar_type() != p.scalar_type() ||
                    g.device() != p.device())) {
      bad = static_cast<int64_t>(i);
    }
    hash.mix(p);
    grads[i] = py::cast(g);
  }
  return py::make_tuple(std::move(grads), bad, hash.result());
}

// A hash of tensors' data pointers, shapes, dtypes and devices (the distributed step's layout
// key, over its params' local tensors).
int64_t tensors_hash(const std::vector<at::Tensor>& tensors) {
  WordHash hash;
  for (const at::Tensor& t : tensors) {
    hash.mix(t);
  }
  return hash.result();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "muon_ext compiled core: registers torch.ops.muon_ext.* and reports build info";
  // What muon_ext/_extension.py expects (bumped when a binding's signature changes): a stale
  // in-place build is reported as such instead of failing inside a step.
  m.attr("abi_version") = 2;
  m.def("build_info", &build_info, "How this extension was built (torch, CUDA, cuBLAS, archs)");
  m.def("step_facts", &step_facts,
        "(each param's grad or None, index of the first grad not matching its param or -1, "
        "hash of which params have grads and of their data pointers, shapes, dtypes and "
        "devices)");
  m.def("tensors_hash", &tensors_hash,
        "hash of the tensors' data pointers, shapes, dtypes and devices");
}
