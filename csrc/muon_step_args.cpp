#include "muon_step_args.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>

namespace muon_ext {
namespace {

bool supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& device,
                         bool allow_cpu) {
  TORCH_CHECK(t.numel() == 1, "muon_step_: ", name, " must have exactly one element, got shape ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "muon_step_: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device || (allow_cpu && t.device().is_cpu()), "muon_step_: ", name,
              " must be on ", device, allow_cpu ? " or the CPU" : "", ", got ", t.device());
}

// In-place updates through shared storage would race (CUDA) or apply twice (CPU): every
// tensor the step writes (params, momentum) must own its storage among all the step's
// tensors; grads are only read, so grads may share storage with each other. O(n) with a map.
void check_no_aliasing(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                       at::TensorList normuon) {
  // storage -> (list name, index) of the first written tensor on it; names are built only for
  // the error message (this runs for every tensor of every step).
  std::unordered_map<const void*, std::pair<const char*, size_t>> written;
  written.reserve(params.size() + momentum.size());
  auto name = [](const std::pair<const char*, size_t>& at) {
    return std::string(at.first) + "[" + std::to_string(at.second) + "]";
  };
  auto claim = [&](at::TensorList list, const char* list_name) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      const void* storage = list[i].storage().unsafeGetStorageImpl();
      auto [it, inserted] = written.emplace(storage, std::make_pair(list_name, i));
      TORCH_CHECK(inserted, "muon_step_: ", name({list_name, i}), " and ", name(it->second),
                  " share storage; every tensor the step writes must have its own");
    }
  };
  claim(params, "params");
  claim(momentum, "momentum_buffers");
  claim(normuon, "normuon_buffers");
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    auto it = written.find(grads[i].storage().unsafeGetStorageImpl());
    TORCH_CHECK(it == written.end(), "muon_step_: grads[", i, "] and ", name(it->second),
                " share storage; grads are read while params and momentum are written");
  }
}

}  // namespace

void check_ns_coefficients(const std::vector<double>& c, double eps) {
  TORCH_CHECK(!c.empty() && c.size() % 3 == 0,
              "ns_coefficients must hold (a, b, c) triples, one per Newton-Schulz iteration; got ",
              c.size(), " numbers");
  for (double v : c) {
    TORCH_CHECK(std::isfinite(v), "ns_coefficients must be finite, got ", v);
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
}

NsDtype parse_ns_dtype(c10::string_view ns_dtype) {
  if (ns_dtype == "bfloat16") return NsDtype::kBFloat16;
  TORCH_CHECK(ns_dtype == "float16", "ns_dtype must be 'bfloat16' or 'float16', got '",
              std::string(ns_dtype), "'");
  return NsDtype::kFloat16;
}

NsConfig make_ns_config(std::vector<double> coefficients, double eps,
                        c10::string_view ns_algorithm, at::IntArrayRef gram_restarts,
                        c10::string_view ns_dtype) {
  check_ns_coefficients(coefficients, eps);
  NsConfig c;
  c.dtype = parse_ns_dtype(ns_dtype);
  c.coefficients = std::move(coefficients);
  if (ns_algorithm == "standard") {
    c.algorithm = NsAlgorithm::kStandard;
  } else if (ns_algorithm == "gram") {
    c.algorithm = NsAlgorithm::kGram;
  } else if (ns_algorithm == "auto") {
    c.algorithm = NsAlgorithm::kAuto;
  } else {
    TORCH_CHECK(false, "ns_algorithm must be 'standard', 'gram' or 'auto', got '",
                std::string(ns_algorithm), "'");
  }
  int64_t previous = 0;
  for (int64_t r : gram_restarts) {
    TORCH_CHECK(r > previous, "gram_restarts must be strictly increasing iteration counts >= 1, "
                "got ", gram_restarts);
    previous = r;
  }
  c.gram_restarts = gram_restarts.vec();
  return c;
}

void check_muon_step_args(at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers, at::TensorList normuon_buffers,
                          const at::Tensor& lr,
                          const MuonStepArgs& args, const c10::optional<at::Tensor>& grad_scale,
                          const c10::optional<at::Tensor>& found_inf,
                          c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "muon_step_: grads has ", grads.size(), " tensors but params has ",
              n);
  TORCH_CHECK(momentum_buffers.size() == n, "muon_step_: momentum_buffers has ",
              momentum_buffers.size(), " tensors but params has ", n);
  TORCH_CHECK(args.update_scales.size() == n, "muon_step_: update_scales has ",
              args.update_scales.size(), " entries but params has ", n);
  TORCH_CHECK(std::isfinite(args.momentum) && args.momentum >= 0.0 && args.momentum < 1.0,
              "muon_step_: momentum must be in [0, 1), got ", args.momentum);
  TORCH_CHECK(std::isfinite(args.weight_decay) && args.weight_decay >= 0.0,
              "muon_step_: weight_decay must be a finite number >= 0, got ", args.weight_decay);
  check_ns_coefficients(args.ns_coefficients, args.eps);
  const bool normuon = !normuon_buffers.empty();
  TORCH_CHECK(!normuon || normuon_buffers.size() == n, "muon_step_: normuon_buffers has ",
              normuon_buffers.size(), " tensors but params has ", n, " (empty turns NorMuon off)");
  if (normuon) {
    TORCH_CHECK(std::isfinite(args.normuon_beta2) && args.normuon_beta2 >= 0.0 &&
                    args.normuon_beta2 < 1.0,
                "muon_step_: normuon_beta2 must be in [0, 1), got ", args.normuon_beta2);
    // eps > 0: a zero row keeps v = 0, and s = 1 / (0 + 0) would turn its zeros into NaN.
    TORCH_CHECK(std::isfinite(args.normuon_eps) && args.normuon_eps > 0.0,
                "muon_step_: normuon_eps must be a finite number > 0, got ", args.normuon_eps);
  }
  if (n == 0) return;

  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, "muon_step_: params[0] is on ", device,
              ", not on a ", device_type, " device");
  const at::ScalarType param_dtype = params[0].scalar_type();
  TORCH_CHECK(supported_param_dtype(param_dtype),
              "muon_step_: params must be float32, bfloat16 or float16, got ", param_dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = momentum_buffers[i];
    TORCH_CHECK(p.dim() == 3, "muon_step_: params[", i,
                "] must be a 3-D (batch, rows, cols) view, got shape ", p.sizes());
    TORCH_CHECK(p.scalar_type() == param_dtype, "muon_step_: params[", i, "] is ",
                p.scalar_type(), " but params[0] is ", param_dtype,
                "; call once per dtype");
    TORCH_CHECK(p.device() == device, "muon_step_: params[", i, "] is on ", p.device(),
                " but params[0] is on ", device);
    // The param's 3-D shape, or (the optimizer passes grads unviewed: NOTE: [Cached plan] in
    // muon_ext/optim.py) the N-D shape it views: not 3-D, the same numel and the same leading
    // rows (a 2-D (r, c) grad of a (1, r, c) view, a conv grad (out, ...) of (1, out, k)).
    const bool same_view = g.sizes() == p.sizes() ||
                           (g.dim() != 3 && g.dim() >= 1 && g.numel() == p.numel() &&
                            g.size(0) == p.size(0) * p.size(1));
    TORCH_CHECK(same_view, "muon_step_: grads[", i, "] has shape ", g.sizes(), " but params[", i,
                "] has shape ", p.sizes());
    TORCH_CHECK(m.sizes() == p.sizes(), "muon_step_: momentum_buffers[", i, "] has shape ",
                m.sizes(), " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(g.scalar_type() == param_dtype, "muon_step_: grads[", i, "] is ",
                g.scalar_type(), " but params are ", param_dtype);
    TORCH_CHECK(m.scalar_type() == at::kFloat, "muon_step_: momentum_buffers[", i,
                "] must be float32, got ", m.scalar_type());
    TORCH_CHECK(g.device() == device && m.device() == device, "muon_step_: grads[", i,
                "] and momentum_buffers[", i, "] must be on ", device);
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous(), "muon_step_: params[",
                i, "], grads[", i, "] and momentum_buffers[", i, "] must be contiguous");
    TORCH_CHECK(!g.is_sparse(), "muon_step_: grads[", i, "] is sparse; Muon needs dense grads");
    TORCH_CHECK(std::isfinite(args.update_scales[i]), "muon_step_: update_scales[", i,
                "] must be finite, got ", args.update_scales[i]);
    if (normuon) {
      const at::Tensor& v = normuon_buffers[i];
      TORCH_CHECK(v.dim() == 2 && v.size(0) == p.size(0) && v.size(1) == p.size(1),
                  "muon_step_: normuon_buffers[", i, "] has shape ", v.sizes(),
                  " but must be (batch, rows) = (", p.size(0), ", ", p.size(1), ") of params[", i,
                  "]");
      TORCH_CHECK(v.scalar_type() == at::kFloat, "muon_step_: normuon_buffers[", i,
                  "] must be float32, got ", v.scalar_type());
      TORCH_CHECK(v.device() == device, "muon_step_: normuon_buffers[", i, "] is on ", v.device(),
                  " but params[0] is on ", device);
      TORCH_CHECK(v.is_contiguous(), "muon_step_: normuon_buffers[", i, "] must be contiguous");
    }
  }
  check_no_aliasing(params, grads, momentum_buffers, normuon_buffers);
  check_scalar_tensor(lr, "lr", device, /*allow_cpu=*/true);
  if (grad_scale.has_value()) check_scalar_tensor(*grad_scale, "grad_scale", device, true);
  if (found_inf.has_value()) check_scalar_tensor(*found_inf, "found_inf", device, true);
}

std::vector<int64_t> packed_offsets(at::TensorList tensors) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) offsets[i + 1] = offsets[i] + tensors[i].numel();
  return offsets;
}

namespace {

// A packed buffer (NOTE: [Phase ops]): 1-D, contiguous, float32 (CUDA: also bf16 / fp16 where
// `any_float`), on the ops' device, `numel` elements.
void check_packed(const at::Tensor& t, const char* op, const char* name, int64_t numel,
                  const at::Device* device, c10::DeviceType device_type, bool any_float) {
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " is on ", t.device(),
              ", not on a ", device_type, " device");
  TORCH_CHECK(device == nullptr || t.device() == *device, op, ": ", name, " is on ", t.device(),
              " but the tensors are on ", *device);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D (packed) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (any_float && supported_param_dtype(t.scalar_type())),
              op, ": ", name, " must be float32", any_float ? " (or bfloat16 / float16)" : "",
              ", got ", t.scalar_type());
  TORCH_CHECK(numel < 0 || t.numel() == numel, op, ": ", name, " has ", t.numel(),
              " elements but the tensors hold ", numel);
}

void check_optional_scalar(const c10::optional<at::Tensor>& t, const char* op, const char* name,
                           const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be a 1-element floating-point tensor, got ", t->scalar_type(), " of shape ",
              t->sizes());
  TORCH_CHECK(t->device() == device || t->device().is_cpu(), op, ": ", name, " must be on ",
              device, " or the CPU, got ", t->device());
}

// No written tensor overlaps another of the op's tensors. The phase ops take contiguous
// tensors only, so disjoint element ranges of one storage (row blocks of one param, as the
// distributed step passes them: NOTE: [Distributed matrix blocks] in muon_ext/distributed.py)
// may be written by one call; any overlap is refused.
void check_own_storage(const char* op, std::initializer_list<std::pair<const char*, at::TensorList>> written,
                       std::initializer_list<std::pair<const char*, at::TensorList>> read) {
  struct Range {
    int64_t begin, end;  // bytes within the storage
    const char* name;
    size_t index;
  };
  std::unordered_map<const void*, std::vector<Range>> owner;
  const auto range_of = [](const at::Tensor& t) {
    const int64_t item = static_cast<int64_t>(t.element_size());
    const int64_t begin = t.storage_offset() * item;
    return std::make_pair(begin, begin + t.numel() * item);
  };
  for (const auto& [name, list] : written) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      const auto [begin, end] = range_of(list[i]);
      std::vector<Range>& ranges = owner[list[i].storage().unsafeGetStorageImpl()];
      for (const Range& r : ranges) {
        TORCH_CHECK(end <= r.begin || r.end <= begin, op, ": ", name, "[", i, "] and ", r.name,
                    "[", r.index, "] share storage; every tensor the op writes must have its own");
      }
      ranges.push_back(Range{begin, end, name, i});
    }
  }
  for (const auto& [name, list] : read) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      auto it = owner.find(list[i].storage().unsafeGetStorageImpl());
      if (it == owner.end()) continue;
      const auto [begin, end] = range_of(list[i]);
      for (const Range& r : it->second) {
        TORCH_CHECK(end <= r.begin || r.end <= begin, op, ": ", name, "[", i, "] and ", r.name,
                    "[", r.index, "] share storage; what the op reads must not be written");
      }
    }
  }
}

}  // namespace

int64_t check_momentum_args(at::TensorList grads, at::TensorList momentum_buffers,
                            double momentum, const c10::optional<at::Tensor>& grad_scale,
                            const c10::optional<at::Tensor>& found_inf,
                            const c10::optional<at::Tensor>& out, c10::DeviceType device_type) {
  const char* op = "muon_momentum_";
  const size_t n = grads.size();
  TORCH_CHECK(momentum_buffers.size() == n, op, ": momentum_buffers has ",
              momentum_buffers.size(), " tensors but grads has ", n);
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0.0 && momentum < 1.0, op,
              ": momentum must be in [0, 1), got ", momentum);
  if (n == 0) {
    if (out.has_value()) TORCH_CHECK(out->numel() == 0, op, ": out must be empty for no tensors");
    return 0;
  }
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": grads[0] is on ", device, ", not on a ",
              device_type, " device");
  const at::ScalarType dtype = grads[0].scalar_type();
  TORCH_CHECK(supported_param_dtype(dtype), op, ": grads must be float32, bfloat16 or float16, got ",
              dtype);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& m = momentum_buffers[i];
    TORCH_CHECK(g.scalar_type() == dtype, op, ": grads[", i, "] is ", g.scalar_type(),
                " but grads[0] is ", dtype, "; call once per dtype");
    TORCH_CHECK(!g.is_sparse(), op, ": grads[", i, "] is sparse; Muon needs dense grads");
    TORCH_CHECK(g.device() == device && m.device() == device, op, ": grads[", i,
                "] and momentum_buffers[", i, "] must be on ", device);
    TORCH_CHECK(m.scalar_type() == at::kFloat, op, ": momentum_buffers[", i,
                "] must be float32, got ", m.scalar_type());
    TORCH_CHECK(g.numel() == m.numel(), op, ": grads[", i, "] has ", g.numel(),
                " elements but momentum_buffers[", i, "] has ", m.numel());
    TORCH_CHECK(g.is_contiguous() && m.is_contiguous(), op, ": grads[", i,
                "] and momentum_buffers[", i, "] must be contiguous");
    total += g.numel();
  }
  if (out.has_value()) {
    check_packed(*out, op, "out", total, &device, device_type, /*any_float=*/false);
    check_own_storage(op, {{"momentum_buffers", momentum_buffers}, {"out", at::TensorList(*out)}},
                      {{"grads", grads}});
  } else {
    check_own_storage(op, {{"momentum_buffers", momentum_buffers}}, {{"grads", grads}});
  }
  check_optional_scalar(grad_scale, op, "grad_scale", device);
  check_optional_scalar(found_inf, op, "found_inf", device);
  return total;
}

std::vector<at::Tensor> orthogonalize_segments(const at::Tensor& x, at::IntArrayRef shapes,
                                               c10::DeviceType device_type) {
  const char* op = "muon_orthogonalize_";
  check_packed(x, op, "x", -1, nullptr, device_type, device_type != c10::DeviceType::CPU);
  TORCH_CHECK(shapes.size() % 3 == 0, op,
              ": shapes must hold (batch, rows, cols) triples, got ", shapes.size(), " numbers");
  std::vector<at::Tensor> views;
  views.reserve(shapes.size() / 3);
  int64_t offset = 0;
  for (size_t k = 0; k < shapes.size(); k += 3) {
    const int64_t b = shapes[k], r = shapes[k + 1], c = shapes[k + 2];
    TORCH_CHECK(b >= 0 && r >= 0 && c >= 0, op, ": shapes[", k / 3, "] = (", b, ", ", r, ", ", c,
                ") has a negative size");
    const int64_t numel = b * r * c;
    TORCH_CHECK(offset + numel <= x.numel(), op, ": shapes describe more than the ", x.numel(),
                " elements of x");
    views.push_back(x.narrow(0, offset, numel).view({b, r, c}));
    offset += numel;
  }
  TORCH_CHECK(offset == x.numel(), op, ": shapes describe ", offset, " elements but x has ",
              x.numel());
  return views;
}

std::vector<at::Tensor> check_normuon_args(const at::Tensor& x, at::IntArrayRef shapes,
                                           at::TensorList normuon_v, double beta2, double eps,
                                           const c10::optional<at::Tensor>& found_inf,
                                           c10::DeviceType device_type) {
  const char* op = "muon_normuon_";
  std::vector<at::Tensor> views = orthogonalize_segments(x, shapes, device_type);
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(normuon_v.size() == views.size(), op, ": normuon_v has ", normuon_v.size(),
              " tensors but shapes has ", views.size(), " triples");
  TORCH_CHECK(std::isfinite(beta2) && beta2 >= 0.0 && beta2 < 1.0, op,
              ": normuon_beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, op, ": normuon_eps must be > 0, got ", eps);
  for (size_t k = 0; k < views.size(); ++k) {
    const at::Tensor& v = normuon_v[k];
    TORCH_CHECK(v.device() == x.device() && v.scalar_type() == at::kFloat && v.is_contiguous(), op,
                ": normuon_v[", k, "] must be a contiguous float32 tensor on ", x.device(),
                ", got ", v.scalar_type(), " on ", v.device());
    TORCH_CHECK(v.numel() == views[k].size(0) * views[k].size(1), op, ": normuon_v[", k,
                "] has ", v.numel(), " elements but its matrices have ",
                views[k].size(0) * views[k].size(1), " rows");
  }
  check_own_storage(op, {{"normuon_v", normuon_v}, {"x", at::TensorList(x)}}, {});
  check_optional_scalar(found_inf, op, "found_inf", x.device());
  return views;
}

void check_update_args(at::TensorList params, const at::Tensor& x, const at::Tensor& lr,
                       double weight_decay, at::ArrayRef<double> update_scales,
                       const c10::optional<at::Tensor>& found_inf, c10::DeviceType device_type) {
  const char* op = "muon_update_";
  const size_t n = params.size();
  TORCH_CHECK(update_scales.size() == n, op, ": update_scales has ", update_scales.size(),
              " entries but params has ", n);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, op,
              ": weight_decay must be a finite number >= 0, got ", weight_decay);
  TORCH_CHECK(lr.numel() == 1 && at::isFloatingType(lr.scalar_type()), op,
              ": lr must be a 1-element floating-point tensor, got shape ", lr.sizes());
  if (n == 0) {
    TORCH_CHECK(x.numel() == 0, op, ": x must be empty for no params");
    return;
  }
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": params[0] is on ", device, ", not on a ",
              device_type, " device");
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(supported_param_dtype(dtype), op,
              ": params must be float32, bfloat16 or float16, got ", dtype);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", dtype, "; call once per dtype");
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device);
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    TORCH_CHECK(std::isfinite(update_scales[i]), op, ": update_scales[", i,
                "] must be finite, got ", update_scales[i]);
    total += p.numel();
  }
  check_packed(x, op, "x", total, &device, device_type, device_type != c10::DeviceType::CPU);
  check_own_storage(op, {{"params", params}}, {{"x", at::TensorList(x)}});
  TORCH_CHECK(lr.device() == device || lr.device().is_cpu(), op, ": lr must be on ", device,
              " or the CPU, got ", lr.device());
  check_optional_scalar(found_inf, op, "found_inf", device);
}

std::vector<CopyBlock> check_copy_blocks_args(const at::Tensor& src, const at::Tensor& dst,
                                              at::IntArrayRef blocks,
                                              c10::DeviceType device_type) {
  const char* op = "muon_copy_blocks_";
  TORCH_CHECK(src.device().type() == device_type && src.device() == dst.device(), op,
              ": src and dst must be on one ", device_type, " device, got ", src.device(), " and ",
              dst.device());
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && src.is_contiguous() && dst.is_contiguous(), op,
              ": src and dst must be contiguous 1-D tensors, got shapes ", src.sizes(), " and ",
              dst.sizes());
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": src is ", src.scalar_type(),
              " but dst is ", dst.scalar_type());
  TORCH_CHECK(dst.numel() == 0 || src.numel() == 0 ||
                  src.storage().unsafeGetStorageImpl() != dst.storage().unsafeGetStorageImpl(),
              op, ": src and dst share storage");
  TORCH_CHECK(blocks.size() % kCopyBlockFields == 0, op,
              ": blocks must hold (src_offset, src_stride, dst_offset, dst_stride, rows, width) "
              "6-tuples, got ", blocks.size(), " numbers");
  std::vector<CopyBlock> out;
  out.reserve(blocks.size() / kCopyBlockFields);
  for (size_t k = 0; k < blocks.size(); k += kCopyBlockFields) {
    const CopyBlock b{blocks[k], blocks[k + 1], blocks[k + 2], blocks[k + 3], blocks[k + 4],
                      blocks[k + 5]};
    const size_t index = k / kCopyBlockFields;
    TORCH_CHECK(b.src_offset >= 0 && b.dst_offset >= 0 && b.rows >= 0 && b.width >= 0 &&
                    b.src_stride >= 0 && b.dst_stride >= 0,
                op, ": blocks[", index, "] has a negative entry");
    if (b.rows == 0 || b.width == 0) continue;
    TORCH_CHECK(b.rows == 1 || (b.src_stride >= b.width && b.dst_stride >= b.width), op,
                ": blocks[", index, "]: a stride is smaller than the width ", b.width,
                " (rows would overlap)");
    const int64_t src_end = b.src_offset + (b.rows - 1) * b.src_stride + b.width;
    const int64_t dst_end = b.dst_offset + (b.rows - 1) * b.dst_stride + b.width;
    TORCH_CHECK(src_end <= src.numel() && dst_end <= dst.numel(), op, ": blocks[", index,
                "] reaches element ", std::max(src_end, dst_end) - 1, " beyond src (", src.numel(),
                ") or dst (", dst.numel(), ")");
    out.push_back(b);
  }
  return out;
}

std::vector<Bucket> make_buckets(at::TensorList params) {
  std::vector<Bucket> buckets;
  std::map<std::pair<int64_t, int64_t>, size_t> index;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;  // empty tensors (B, r or c == 0) are skipped
    const int64_t m = std::min(p.size(1), p.size(2));
    const int64_t nn = std::max(p.size(1), p.size(2));
    auto [it, inserted] = index.emplace(std::make_pair(m, nn), buckets.size());
    if (inserted) buckets.push_back(Bucket{m, nn, {}, 0});
    Bucket& b = buckets[it->second];
    b.tensors.push_back(static_cast<int64_t>(i));
    b.num_matrices += p.size(0);
  }
  return buckets;
}

int64_t resolve_workspace_limit(int64_t workspace_limit) {
  int64_t limit = 0;
  try {
    limit = resolve_workspace_limit_or_throw(workspace_limit);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());  // a c10::Error: a ValueError-like RuntimeError in Python
  }
  return limit;
}

ChunkPlan plan_chunks(const std::vector<Bucket>& buckets, int64_t workspace_limit,
                      const std::function<int64_t(int64_t m, int64_t n)>& bytes_per_matrix) {
  std::vector<int64_t> counts, bytes;
  for (const Bucket& b : buckets) {
    counts.push_back(b.num_matrices);
    bytes.push_back(bytes_per_matrix(b.m, b.n));
  }
  return split_into_chunks(counts, bytes, resolve_workspace_limit(workspace_limit));
}

}  // namespace muon_ext
