// C++ test of the torch-free CUDA kernels: a small multi-shape Muon step and newton_schulz
// against CPU loops in double precision.
//
// Exit codes (ctest): 0 pass, 1 fail, 77 skip (no usable CUDA device: cudaGetDeviceCount fails,
// e.g. cudaErrorInsufficientDriver on a machine without a driver, or reports 0 devices).
//
// Tolerances follow the project's ratio rule: the GPU result's error against the float64
// oracle must stay within 2x the error of a CPU emulation of the same half-precision algorithm
// (every GEMM input/output rounded to the workspace type, bf16 or fp16, as the GPU stores them)
// plus a small absolute term that is spelled out at each check. Set MUON_EXT_TEST_SEED to
// reproduce a run (the seed is printed).
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/kernels/muon_kernels.cuh"

namespace mk = muon_ext::cuda;

namespace {

constexpr int kSkip = 77;
int g_failures = 0;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

void check_cublas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(what) + ": " + cublasGetStatusName(st));
  }
}

void expect(bool ok, const std::string& what) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

// ---- element types on the host ----
size_t elem_size(mk::ElementType t) { return t == mk::ElementType::kFloat32 ? 4 : 2; }

const char* type_name(mk::ElementType t) {
  switch (t) {
    case mk::ElementType::kFloat32:
      return "float32";
    case mk::ElementType::kBFloat16:
      return "bfloat16";
    case mk::ElementType::kFloat16:
      return "float16";
  }
  return "?";
}

double load_elem(const std::vector<uint8_t>& buf, mk::ElementType t, size_t i) {
  switch (t) {
    case mk::ElementType::kFloat32: {
      float v;
      std::memcpy(&v, buf.data() + 4 * i, 4);
      return v;
    }
    case mk::ElementType::kBFloat16: {
      __nv_bfloat16 v;
      std::memcpy(&v, buf.data() + 2 * i, 2);
      return __bfloat162float(v);
    }
    case mk::ElementType::kFloat16: {
      __half v;
      std::memcpy(&v, buf.data() + 2 * i, 2);
      return __half2float(v);
    }
  }
  return 0.0;
}

void store_elem(std::vector<uint8_t>& buf, mk::ElementType t, size_t i, double value) {
  const float f = static_cast<float>(value);
  switch (t) {
    case mk::ElementType::kFloat32:
      std::memcpy(buf.data() + 4 * i, &f, 4);
      return;
    case mk::ElementType::kBFloat16: {
      const __nv_bfloat16 v = __float2bfloat16_rn(f);
      std::memcpy(buf.data() + 2 * i, &v, 2);
      return;
    }
    case mk::ElementType::kFloat16: {
      const __half v = __float2half_rn(f);
      std::memcpy(buf.data() + 2 * i, &v, 2);
      return;
    }
  }
}

double round_to(mk::ElementType t, double v) {
  std::vector<uint8_t> one(elem_size(t));
  store_elem(one, t, 0, v);
  return load_elem(one, t, 0);
}

// How a CPU reference stores its Newton-Schulz matrices: exactly (double), or rounded to the
// workspace type where the GPU stores them (`true` alone: bf16, the default workspace).
struct Storage {
  bool round;
  mk::NsType type;
  Storage(bool r, mk::NsType t = mk::NsType::kBFloat16) : round(r), type(t) {}  // NOLINT
  double operator()(double v) const {
    if (!round) return v;
    return round_to(type == mk::NsType::kFloat16 ? mk::ElementType::kFloat16
                                                 : mk::ElementType::kBFloat16,
                    v);
  }
};

const char* ns_type_name(mk::NsType t) {
  return t == mk::NsType::kFloat16 ? "fp16" : "bf16";
}

// One unit in the last place of |v| in type t (normal numbers; a floor for tiny values).
double ulp(mk::ElementType t, double v) {
  const int mantissa = t == mk::ElementType::kFloat32    ? 23
                       : t == mk::ElementType::kBFloat16 ? 7
                                                         : 10;
  const double a = std::max(std::fabs(v), 1e-30);
  return std::ldexp(1.0, std::ilogb(a) - mantissa);
}

// ---- device memory ----
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  template <typename V>
  void upload(const std::vector<V>& host) {
    check_cuda(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice),
               "upload");
  }
  template <typename V>
  std::vector<V> download() const {
    std::vector<V> host(bytes_ / sizeof(V));
    check_cuda(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "download");
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct Blas {
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t legacy = nullptr;
  DeviceBuffer lt_workspace{32u << 20};
  Blas() {
    check_cublas(cublasLtCreate(&lt), "cublasLtCreate");
    check_cublas(cublasCreate(&legacy), "cublasCreate");
  }
  ~Blas() {
    cublasLtDestroy(lt);
    cublasDestroy(legacy);
  }
  mk::BlasContext context(bool force_legacy) const {
    mk::BlasContext c;
    c.lt = lt;
    c.legacy = legacy;
    c.lt_workspace = lt_workspace.get();
    c.lt_workspace_bytes = lt_workspace.bytes();
    c.force_legacy = force_legacy;
    return c;
  }
};

// ---- CPU references ----
using Matrix = std::vector<double>;  // row-major

// The Newton-Schulz iterations on an m x n (m <= n) matrix in double; with an emulated storage
// every GEMM output is rounded to the workspace type as the GPU stores it (inputs are then
// rounded already).
Matrix ns_cpu(Matrix x, int64_t m, int64_t n, const std::vector<double>& coeffs,
              const Storage& storage) {
  auto maybe_round = [&](Matrix& z) {
    for (double& v : z) v = storage(v);
  };
  maybe_round(x);
  Matrix A(static_cast<size_t>(m * m)), B(static_cast<size_t>(m * m)),
      Y(static_cast<size_t>(m * n));
  for (size_t it = 0; it + 2 < coeffs.size(); it += 3) {
    const double a = coeffs[it], b = coeffs[it + 1], c = coeffs[it + 2];
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        double s = 0;
        for (int64_t k = 0; k < n; ++k) s += x[i * n + k] * x[j * n + k];
        A[i * m + j] = s;
      }
    }
    maybe_round(A);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < m; ++j) {
        double s = 0;
        for (int64_t k = 0; k < m; ++k) s += A[i * m + k] * A[k * m + j];
        B[i * m + j] = b * A[i * m + j] + c * s;
      }
    }
    maybe_round(B);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t k = 0; k < m; ++k) s += B[i * m + k] * x[k * n + j];
        Y[i * n + j] = a * x[i * n + j] + s;
      }
    }
    maybe_round(Y);
    x.swap(Y);
  }
  return x;
}

// C = alpha A B + beta D for row-major A (p x q), B (q x r), D (p x r).
Matrix matmul(const Matrix& A, const Matrix& B, int64_t p, int64_t q, int64_t r, double alpha = 1,
              double beta = 0, const Matrix* D = nullptr) {
  Matrix C(static_cast<size_t>(p * r));
  for (int64_t i = 0; i < p; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      double s = 0;
      for (int64_t k = 0; k < q; ++k) s += A[i * q + k] * B[k * r + j];
      C[i * r + j] = alpha * s + (D != nullptr ? beta * (*D)[i * r + j] : 0.0);
    }
  }
  return C;
}

// Gram Newton-Schulz (NOTE: [Gram on CUDA]) on an m x n matrix, in double; with an emulated
// storage every stored matrix (R, Z, Q, T, X) is rounded to the workspace type where the GPU
// stores it.
Matrix gram_ns_cpu(Matrix x, int64_t m, int64_t n, const std::vector<double>& coeffs,
                   const std::vector<int64_t>& restarts, const Storage& storage) {
  auto rounded = [&](Matrix z) {
    for (double& v : z) v = storage(v);
    return z;
  };
  auto transpose = [](const Matrix& a, int64_t p, int64_t q) {
    Matrix t(a.size());
    for (int64_t i = 0; i < p; ++i) {
      for (int64_t j = 0; j < q; ++j) t[j * p + i] = a[i * q + j];
    }
    return t;
  };
  x = rounded(std::move(x));
  Matrix r = rounded(matmul(x, transpose(x, m, n), m, n, m));
  Matrix q;
  bool identity = true;
  const int64_t iterations = static_cast<int64_t>(coeffs.size() / 3);
  for (int64_t it = 0; it < iterations; ++it) {
    const double a = coeffs[3 * it], b = coeffs[3 * it + 1], c = coeffs[3 * it + 2];
    const Matrix z = rounded(matmul(r, r, m, m, m, c, b, &r));
    if (identity) {
      q = z;
      for (int64_t i = 0; i < m; ++i) q[i * m + i] += a;
      q = rounded(std::move(q));
      identity = false;
    } else {
      q = rounded(matmul(q, z, m, m, m, 1, a, &q));
    }
    const bool last = it + 1 == iterations;
    const bool restart =
        !last && std::find(restarts.begin(), restarts.end(), it + 1) != restarts.end();
    if (restart) {
      x = rounded(matmul(q, x, m, m, n));
      r = rounded(matmul(x, transpose(x, m, n), m, n, m));
      identity = true;
    } else if (!last) {
      const Matrix t = rounded(matmul(r, z, m, m, m, 1, a, &r));
      r = rounded(matmul(z, t, m, m, m, 1, a, &t));
    }
  }
  if (!identity) x = rounded(matmul(q, x, m, m, n));
  return x;
}

// Orthogonalized direction of one rows x cols matrix U (row-major), returned in U's orientation.
// `gram_restarts` non-null: Gram Newton-Schulz with those restarts.
Matrix orthogonalize_cpu(const Matrix& u, int64_t rows, int64_t cols,
                         const std::vector<double>& coeffs, double eps, const Storage& storage,
                         const std::vector<int64_t>* gram_restarts = nullptr) {
  double ss = 0;
  for (double v : u) ss += v * v;
  const double denom = std::max(std::sqrt(ss), eps);
  const bool tall = rows > cols;
  const int64_t m = std::min(rows, cols), n = std::max(rows, cols);
  Matrix x(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const double v = denom > 0 ? u[i * cols + j] / denom : 0.0;
      if (tall) {
        x[j * rows + i] = v;  // X = Uᵀ, m = cols rows of n = rows
      } else {
        x[i * cols + j] = v;
      }
    }
  }
  const Matrix y = gram_restarts != nullptr
                       ? gram_ns_cpu(std::move(x), m, n, coeffs, *gram_restarts, storage)
                       : ns_cpu(std::move(x), m, n, coeffs, storage);
  Matrix out(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = tall ? y[j * rows + i] : y[i * cols + j];
  }
  return out;
}

struct Shape {
  int64_t batch, rows, cols;
  int64_t numel() const { return batch * rows * cols; }
};

std::vector<mk::ShapeBucket> make_buckets(const std::vector<Shape>& shapes) {
  std::vector<mk::ShapeBucket> buckets;
  std::map<std::pair<int64_t, int64_t>, size_t> index;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Shape& s = shapes[i];
    if (s.numel() == 0) continue;
    const auto key = std::make_pair(std::min(s.rows, s.cols), std::max(s.rows, s.cols));
    auto [it, inserted] = index.emplace(key, buckets.size());
    if (inserted) {
      mk::ShapeBucket b;
      b.m = key.first;
      b.n = key.second;
      buckets.push_back(b);
    }
    mk::ShapeBucket& b = buckets[it->second];
    b.tensors.push_back(static_cast<int64_t>(i));
    b.num_matrices += s.batch;
  }
  return buckets;
}

// Runs the step exactly as the torch glue does (plan, prepare, run chunk by chunk), with the
// workspace poisoned (0xFF bytes: NaN in bf16, fp16 and fp32) so that an element no kernel wrote
// shows up as NaN.
void run_phases(const std::vector<mk::MatrixTensor>& tensors,
                const std::vector<mk::ShapeBucket>& buckets, mk::ElementType type,
                mk::DirectionSource source, mk::WriteBack mode, const mk::StepScalars& scalars,
                const std::vector<double>& coeffs, const mk::BlasContext& blas,
                cudaStream_t stream, int64_t workspace_limit = -1, bool gram = false,
                const std::vector<int64_t>& gram_restarts = {}, bool normuon = false,
                mk::NsType ns_type = mk::NsType::kBFloat16) {
  mk::StepPlan plan = mk::plan_step(tensors, buckets, type, workspace_limit,
                                    std::vector<bool>(buckets.size(), gram), normuon, ns_type);
  DeviceBuffer ws(plan.workspace_bytes);
  check_cuda(cudaMemsetAsync(ws.get(), 0xFF, ws.bytes(), stream), "poison workspace");
  const mk::PreparedStep prepared = mk::prepare_step(plan, ws.get(), blas);
  mk::run_step(plan, prepared, ws.get(), type, source, mode, scalars, coeffs.data(),
               static_cast<int64_t>(coeffs.size()), blas, stream, gram_restarts);
  check_cuda(cudaStreamSynchronize(stream), "step");
}

std::vector<double> jordan_coefficients(int steps) {
  std::vector<double> c;
  for (int i = 0; i < steps; ++i) c.insert(c.end(), {3.4445, -4.7750, 2.0315});
  return c;
}

// Awkward on purpose: 1xN, Nx1, primes, a tall and a wide matrix in one bucket, 3-D stacks,
// several chunks per matrix, a stacked matrix that starts unaligned (301*257 is odd), a tall
// matrix of several strips, and an empty tensor.
const std::vector<Shape> kShapes = {
    {1, 5, 7},    {2, 9, 4},     {1, 1, 13},  {1, 11, 1},  {3, 16, 16}, {1, 40, 130},
    {2, 130, 40}, {1, 0, 5},     {2, 301, 257}, {1, 600, 70}, {4, 3, 3},
};

struct StepData {
  std::vector<Shape> shapes;
  std::vector<std::vector<uint8_t>> params, grads;
  std::vector<std::vector<float>> moms;
  std::vector<std::vector<float>> vs;  // NorMuon's second moments (batch * rows each), or none
};

// `row_decades` > 0: the grad rows of each matrix are scaled from 1e-row_decades (first row) to 1
// (last), so that their second moments differ by twice as many decades (what NorMuon is for).
StepData random_step_data(std::mt19937_64& rng, mk::ElementType type, double grad_std,
                          const std::vector<Shape>& shapes = kShapes, double row_decades = 0.0) {
  std::normal_distribution<double> normal(0.0, 1.0);
  StepData d;
  d.shapes = shapes;
  for (const Shape& s : shapes) {
    const size_t n = static_cast<size_t>(s.numel());
    std::vector<uint8_t> p(n * elem_size(type)), g(n * elem_size(type));
    std::vector<float> m(n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t row = static_cast<int64_t>(i) / s.cols % s.rows;
      const double row_scale =
          s.rows > 1 ? std::pow(10.0, row_decades * (static_cast<double>(row) / (s.rows - 1) - 1))
                     : 1.0;
      store_elem(p, type, i, normal(rng));
      store_elem(g, type, i, grad_std * row_scale * normal(rng));
      m[i] = static_cast<float>(0.1 * row_scale * normal(rng));
    }
    d.params.push_back(std::move(p));
    d.grads.push_back(std::move(g));
    d.moms.push_back(std::move(m));
  }
  return d;
}

struct StepConfig {
  double lr = 0.02, momentum = 0.95, weight_decay = 0.1, eps = 1e-7, grad_scale = 1.0;
  bool nesterov = true;
  bool lr_on_device = false;
  bool grad_scale_on_device = false;
  float found_inf = 0.f;  // > 0: pass a device found_inf flag with this value
  bool force_legacy = false;
  int64_t workspace_limit = -1;  // bytes; small values force many chunks
  bool gram = false;             // Gram Newton-Schulz for every bucket
  std::vector<int64_t> gram_restarts = {2};
  bool normuon = false;          // NorMuon with StepData::vs
  double normuon_beta2 = 0.95, normuon_eps = 1e-8;
  mk::NsType ns_type = mk::NsType::kBFloat16;  // the workspace type
};

struct StepResult {
  std::vector<std::vector<uint8_t>> params;
  std::vector<std::vector<float>> moms;
  std::vector<std::vector<uint8_t>> grads;  // read back to prove they are untouched
  std::vector<std::vector<float>> vs;       // NorMuon only
};

double update_scale(const Shape& s) {
  return std::sqrt(std::max(1.0, static_cast<double>(s.rows) / static_cast<double>(s.cols)));
}

// The direction U (Nesterov) of matrix b of tensor t in double, from the step's inputs.
Matrix direction_cpu(const StepData& d, size_t t, int64_t b, mk::ElementType type,
                     const StepConfig& cfg) {
  const Shape& s = d.shapes[t];
  const int64_t mat = s.rows * s.cols;
  Matrix u(static_cast<size_t>(mat));
  for (int64_t i = 0; i < mat; ++i) {
    const size_t e = static_cast<size_t>(b * mat + i);
    const double g = load_elem(d.grads[t], type, e) / cfg.grad_scale;
    const double m1 = d.moms[t][e] + (1.0 - cfg.momentum) * (g - d.moms[t][e]);
    u[static_cast<size_t>(i)] = g + cfg.momentum * (m1 - g);
  }
  return u;
}

StepResult run_gpu_step(const StepData& d, mk::ElementType type, const StepConfig& cfg,
                        const std::vector<double>& coeffs, const Blas& blas, cudaStream_t stream) {
  std::vector<DeviceBuffer> p, g, m, v;
  std::vector<mk::MatrixTensor> tensors;
  for (size_t i = 0; i < d.shapes.size(); ++i) {
    const Shape& s = d.shapes[i];
    p.emplace_back(d.params[i].size());
    g.emplace_back(d.grads[i].size());
    m.emplace_back(d.moms[i].size() * sizeof(float));
    if (cfg.normuon) v.emplace_back(d.vs[i].size() * sizeof(float));
    if (s.numel() > 0) {
      p.back().upload(d.params[i]);
      g.back().upload(d.grads[i]);
      m.back().upload(d.moms[i]);
      if (cfg.normuon) v.back().upload(d.vs[i]);
    }
    mk::MatrixTensor t;
    t.src = g.back().get();
    t.momentum = static_cast<float*>(m.back().get());
    t.dst = p.back().get();
    t.batch = s.batch;
    t.rows = s.rows;
    t.cols = s.cols;
    t.update_scale = static_cast<float>(update_scale(s));
    if (cfg.normuon) t.normuon_v = static_cast<float*>(v.back().get());
    tensors.push_back(t);
  }
  const float lr_f = static_cast<float>(cfg.lr);
  const float gs_f = static_cast<float>(cfg.grad_scale);
  DeviceBuffer lr_dev(sizeof(float)), gs_dev(sizeof(float)), inf_dev(sizeof(float));
  lr_dev.upload(std::vector<float>{lr_f});
  gs_dev.upload(std::vector<float>{gs_f});
  inf_dev.upload(std::vector<float>{cfg.found_inf});
  mk::StepScalars sc;
  sc.momentum = cfg.momentum;
  sc.weight_decay = cfg.weight_decay;
  sc.eps = cfg.eps;
  sc.nesterov = cfg.nesterov;
  sc.lr_value = cfg.lr;
  if (cfg.lr_on_device) sc.lr = static_cast<const float*>(lr_dev.get());
  sc.grad_scale_value = cfg.grad_scale;
  if (cfg.grad_scale_on_device) sc.grad_scale = static_cast<const float*>(gs_dev.get());
  if (cfg.found_inf != 0.f) sc.found_inf = static_cast<const float*>(inf_dev.get());
  sc.normuon_beta2 = cfg.normuon_beta2;
  sc.normuon_eps = cfg.normuon_eps;

  run_phases(tensors, make_buckets(d.shapes), type, mk::DirectionSource::kMomentum,
             mk::WriteBack::kApplyUpdate, sc, coeffs, blas.context(cfg.force_legacy), stream,
             cfg.workspace_limit, cfg.gram, cfg.gram_restarts, cfg.normuon, cfg.ns_type);
  StepResult r;
  for (size_t i = 0; i < d.shapes.size(); ++i) {
    r.params.push_back(p[i].download<uint8_t>());
    r.moms.push_back(m[i].download<float>());
    r.grads.push_back(g[i].download<uint8_t>());
    if (cfg.normuon) r.vs.push_back(v[i].download<float>());
  }
  return r;
}

// ---- the checks ----

void check_step_against_reference(std::mt19937_64& rng, mk::ElementType type, bool nesterov,
                                  bool force_legacy, const Blas& blas, cudaStream_t stream) {
  std::printf("step: params %s, nesterov %d, %s\n", type_name(type), nesterov ? 1 : 0,
              force_legacy ? "legacy cuBLAS" : "cuBLASLt");
  const StepData d = random_step_data(rng, type, 1.0);
  StepConfig cfg;
  cfg.nesterov = nesterov;
  cfg.force_legacy = force_legacy;
  cfg.lr_on_device = true;
  cfg.grad_scale = 4.0;  // a power of two: G / 4 is exact, so the reference sees the same G'
  cfg.grad_scale_on_device = true;
  const std::vector<double> coeffs = jordan_coefficients(5);
  const StepResult r = run_gpu_step(d, type, cfg, coeffs, blas, stream);
  const double lr = static_cast<float>(cfg.lr);  // the kernels see lr as fp32

  for (size_t t = 0; t < kShapes.size(); ++t) {
    const Shape& s = kShapes[t];
    const std::string name = "tensor " + std::to_string(t) + " (" + std::to_string(s.batch) +
                             "x" + std::to_string(s.rows) + "x" + std::to_string(s.cols) + ")";
    if (s.numel() == 0) {
      expect(r.params[t].empty() && r.moms[t].empty(), name + " empty: untouched");
      continue;
    }
    expect(r.grads[t] == d.grads[t], name + " grads unchanged");
    const int64_t mat = s.rows * s.cols;
    double mom_err = 0, err_gpu = 0, err_emul = 0, atol2 = 0, update_norm2 = 0;
    bool finite = true;
    for (int64_t b = 0; b < s.batch; ++b) {
      Matrix u(static_cast<size_t>(mat));
      std::vector<double> m_ref(static_cast<size_t>(mat));
      for (int64_t i = 0; i < mat; ++i) {
        const size_t e = static_cast<size_t>(b * mat + i);
        const double g = load_elem(d.grads[t], type, e) / cfg.grad_scale;
        const double m0 = d.moms[t][e];
        const double m1 = m0 + (1.0 - cfg.momentum) * (g - m0);
        m_ref[static_cast<size_t>(i)] = m1;
        u[static_cast<size_t>(i)] = nesterov ? g + cfg.momentum * (m1 - g) : m1;
        const double got = r.moms[t][e];
        // fp32 momentum: a few fp32 roundings of values of magnitude max(|m0|, |g|).
        mom_err = std::max(mom_err, std::fabs(got - m1) /
                                        (1e-6 * (std::fabs(m0) + std::fabs(g)) + 1e-30));
      }
      const Matrix x_ref = orthogonalize_cpu(u, s.rows, s.cols, coeffs, cfg.eps, false);
      const Matrix x_emul = orthogonalize_cpu(u, s.rows, s.cols, coeffs, cfg.eps, true);
      const double scale = update_scale(s);
      for (int64_t i = 0; i < mat; ++i) {
        const size_t e = static_cast<size_t>(b * mat + i);
        const double p0 = load_elem(d.params[t], type, e);
        const double p_ref = p0 * (1.0 - lr * cfg.weight_decay) - lr * scale * x_ref[i];
        const double p_emul = round_to(type, p0 * (1.0 - lr * cfg.weight_decay) -
                                                 lr * scale * x_emul[i]);
        const double got = load_elem(r.params[t], type, e);
        finite = finite && std::isfinite(got);
        err_gpu += (got - p_ref) * (got - p_ref);
        err_emul += (p_emul - p_ref) * (p_emul - p_ref);
        // The final rounding to the param dtype may land on either neighbour of the exact
        // value, independently of the emulation's rounding: one ulp per element.
        atol2 += ulp(type, p_ref) * ulp(type, p_ref);
        update_norm2 += (lr * scale * x_ref[i]) * (lr * scale * x_ref[i]);
      }
    }
    err_gpu = std::sqrt(err_gpu);
    err_emul = std::sqrt(err_emul);
    // atol: (1) the final rounding to the param dtype may land on either neighbour of the exact
    // value independently of the emulation's rounding: one ulp of P per element; (2) the GPU and
    // the emulation both round X to bf16, and after fp32 vs double accumulation a near-tie may
    // go either way: 2^-9 (half a bf16 ulp, relative) of the update's norm.
    const double atol = std::sqrt(atol2) + std::ldexp(std::sqrt(update_norm2), -9);
    expect(mom_err <= 1.0, name + " momentum within a few fp32 ulps");
    expect(finite, name + " params finite");
    char buf[256];
    std::snprintf(buf, sizeof(buf), " params: |gpu-ref|=%.3e <= 2*|emul-ref|=%.3e + atol %.3e",
                  err_gpu, 2 * err_emul, atol);
    expect(err_gpu <= 2 * err_emul + atol, name + buf);
  }
}

void check_newton_schulz_schedule(std::mt19937_64& rng, const char* schedule,
                                  const std::vector<double>& coeffs, bool force_legacy,
                                  const Blas& blas, cudaStream_t stream) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const std::vector<Shape> shapes = {{3, 17, 29}, {2, 64, 64}, {1, 200, 33}, {1, 1, 9}};
  for (const Shape& s : shapes) {
    const size_t n = static_cast<size_t>(s.numel());
    std::vector<float> x(n);
    for (float& v : x) v = static_cast<float>(normal(rng));
    DeviceBuffer in(n * 4), out(n * 4);
    in.upload(x);
    check_cuda(cudaMemset(out.get(), 0xFF, n * 4), "poison out");
    mk::MatrixTensor t;
    t.src = in.get();
    t.dst = out.get();
    t.batch = s.batch;
    t.rows = s.rows;
    t.cols = s.cols;
    mk::StepScalars sc;
    sc.eps = 1e-7;
    run_phases({t}, make_buckets({s}), mk::ElementType::kFloat32, mk::DirectionSource::kInput,
               mk::WriteBack::kCopy, sc, coeffs, blas.context(force_legacy), stream);
    const std::vector<float> y = out.download<float>();
    const int64_t mat = s.rows * s.cols;
    double err_gpu = 0, err_emul = 0, norm_ref = 0;
    bool finite = true;
    for (int64_t b = 0; b < s.batch; ++b) {
      Matrix u(x.begin() + b * mat, x.begin() + (b + 1) * mat);
      const Matrix ref = orthogonalize_cpu(u, s.rows, s.cols, coeffs, 1e-7, false);
      const Matrix emul = orthogonalize_cpu(u, s.rows, s.cols, coeffs, 1e-7, true);
      for (int64_t i = 0; i < mat; ++i) {
        const double got = y[static_cast<size_t>(b * mat + i)];
        finite = finite && std::isfinite(got);
        err_gpu += (got - ref[i]) * (got - ref[i]);
        err_emul += (emul[i] - ref[i]) * (emul[i] - ref[i]);
        norm_ref += ref[i] * ref[i];
      }
    }
    err_gpu = std::sqrt(err_gpu);
    err_emul = std::sqrt(err_emul);
    // atol: 2^-9 of ||X||, half a bf16 ulp in relative terms: the GPU and the emulation both
    // round X to bf16, but ties of that rounding may fall differently after fp32 vs double
    // accumulation.
    const double atol = std::ldexp(std::sqrt(norm_ref), -9);
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "%s %ldx%ldx%ld: finite=%d |gpu-ref|=%.3e <= 2*|emul-ref|=%.3e + %.3e",
                  schedule, static_cast<long>(s.batch), static_cast<long>(s.rows),
                  static_cast<long>(s.cols), finite ? 1 : 0, err_gpu, 2 * err_emul, atol);
    expect(finite && err_gpu <= 2 * err_emul + atol, buf);
  }
}


void check_newton_schulz(std::mt19937_64& rng, bool force_legacy, const Blas& blas,
                         cudaStream_t stream) {
  std::printf("newton_schulz (fp32 in/out, %s)\n", force_legacy ? "legacy cuBLAS" : "cuBLASLt");
  // Jordan x5 ends in ping-pong buffer 1; jordan x4 + 2 x (2, -1.5, 0.5) (deepseek_v4's polish)
  // ends in buffer 0: both read-back paths are covered. (polar_express as listed, without a
  // safety factor, passes sigma ~ 2 in its middle iterations and can diverge in bf16 even on
  // random inputs, the bf16 emulation included: no use as a yardstick.)
  std::vector<double> polished = jordan_coefficients(4);
  polished.insert(polished.end(), {2.0, -1.5, 0.5, 2.0, -1.5, 0.5});
  for (const auto& [name, coeffs] : {std::make_pair("jordan x5", jordan_coefficients(5)),
                                     std::make_pair("jordan x4 + polish x2", polished)}) {
    check_newton_schulz_schedule(rng, name, coeffs, force_legacy, blas, stream);
  }
}
void check_determinism_and_skip(std::mt19937_64& rng, const Blas& blas, cudaStream_t stream) {
  std::printf("determinism, lr on device vs host, found_inf, zero grads\n");
  const mk::ElementType type = mk::ElementType::kBFloat16;
  const StepData d = random_step_data(rng, type, 1.0);
  const std::vector<double> coeffs = jordan_coefficients(5);
  StepConfig cfg;
  const StepResult a = run_gpu_step(d, type, cfg, coeffs, blas, stream);
  const StepResult b = run_gpu_step(d, type, cfg, coeffs, blas, stream);
  expect(a.params == b.params && a.moms == b.moms, "two runs are bit-identical");
  StepConfig dev = cfg;
  dev.lr_on_device = true;
  const StepResult c = run_gpu_step(d, type, dev, coeffs, blas, stream);
  expect(a.params == c.params && a.moms == c.moms, "lr on device == lr on host, bit for bit");

  // found_inf set, with inf and NaN in the grads: nothing may change.
  StepData bad = d;
  store_elem(bad.grads[0], type, 0, INFINITY);
  store_elem(bad.grads[4], type, 3, NAN);
  StepConfig skip = cfg;
  skip.found_inf = 1.f;
  const StepResult s = run_gpu_step(bad, type, skip, coeffs, blas, stream);
  expect(s.params == bad.params && s.moms == bad.moms, "found_inf=1 leaves params and momentum");
  skip.found_inf = NAN;
  const StepResult s2 = run_gpu_step(bad, type, skip, coeffs, blas, stream);
  expect(s2.params == bad.params && s2.moms == bad.moms, "found_inf=NaN also skips the step");

  // Zero grads and zero momentum: U = 0, X = 0, P = P * (1 - lr wd) exactly (fp32 opmath).
  StepData zero = d;
  for (auto& g : zero.grads) std::fill(g.begin(), g.end(), 0);  // +0 in every dtype
  for (auto& m : zero.moms) std::fill(m.begin(), m.end(), 0.f);
  for (const double eps : {1e-7, 0.0}) {
    StepConfig zc = cfg;
    zc.eps = eps;
    const StepResult z = run_gpu_step(zero, type, zc, coeffs, blas, stream);
    bool ok = true;
    const double decay = 1.0 - static_cast<double>(static_cast<float>(cfg.lr)) *
                                   static_cast<double>(static_cast<float>(cfg.weight_decay));
    for (size_t t = 0; t < kShapes.size(); ++t) {
      for (size_t i = 0; i < static_cast<size_t>(kShapes[t].numel()); ++i) {
        const double want = load_elem(zero.params[t], type, i) * decay;
        const double got = load_elem(z.params[t], type, i);
        // X == 0, so P only decays; the one rounding to bf16 (after an fp32 product whose
        // contraction into an FMA is the compiler's choice) is within one bf16 ulp.
        ok = ok && std::isfinite(got) && std::fabs(got - want) <= ulp(type, want);
      }
    }
    expect(ok, std::string("zero grads: no NaN, P = P * (1 - lr wd) to one ulp, eps = ") +
                   (eps == 0.0 ? "0" : "1e-7"));
  }
}

// Tensor entries with shapes and no pointers: enough for planning (plan_step reads no data).
std::vector<mk::MatrixTensor> shape_only_tensors(const std::vector<Shape>& shapes) {
  std::vector<mk::MatrixTensor> tensors;
  for (const Shape& s : shapes) {
    mk::MatrixTensor t;
    t.batch = s.batch;
    t.rows = s.rows;
    t.cols = s.cols;
    tensors.push_back(t);
  }
  return tensors;
}

// NOTE: [Chunked step]: any workspace limit gives the same bits. The limits force, in turn: a few
// chunks per bucket; a 3-D stack split across chunks; one matrix per chunk, with the 600x70 and
// 301x257 matrices each bigger than the limit on their own. Also: the plan honours the limit
// wherever one matrix fits, and a second identical step queries no cuBLASLt heuristic.
void check_chunking(std::mt19937_64& rng, bool force_legacy, const Blas& blas,
                    cudaStream_t stream) {
  std::printf("chunked step (%s)\n", force_legacy ? "legacy cuBLAS" : "cuBLASLt");
  const mk::ElementType type = mk::ElementType::kBFloat16;
  const StepData d = random_step_data(rng, type, 1.0);
  const std::vector<double> coeffs = jordan_coefficients(5);
  StepConfig cfg;
  cfg.force_legacy = force_legacy;
  const StepResult whole = run_gpu_step(d, type, cfg, coeffs, blas, stream);
  const std::vector<mk::MatrixTensor> shapes_only = shape_only_tensors(kShapes);
  const std::vector<mk::ShapeBucket> buckets = make_buckets(kShapes);
  const size_t one_chunk = mk::plan_step(shapes_only, buckets, type, -1).chunks.size();
  expect(one_chunk == buckets.size(), "default limit: one chunk per bucket at these sizes");
  for (const int64_t limit : {int64_t{200000}, int64_t{20000}, int64_t{1}}) {
    const mk::StepPlan plan = mk::plan_step(shapes_only, buckets, type, limit);
    bool fits = true;
    for (const mk::StepChunk& c : plan.chunks) {
      fits = fits && (c.count == 1 || c.bytes <= static_cast<size_t>(limit));
    }
    StepConfig chunked = cfg;
    chunked.workspace_limit = limit;
    const int64_t queries_before = mk::lt_gemm_plans_built();
    const StepResult r = run_gpu_step(d, type, chunked, coeffs, blas, stream);
    const int64_t queries_first = mk::lt_gemm_plans_built() - queries_before;
    const StepResult again = run_gpu_step(d, type, chunked, coeffs, blas, stream);
    const int64_t queries_second = mk::lt_gemm_plans_built() - queries_before - queries_first;
    const std::string where = "limit " + std::to_string(limit) + " B, " +
                              std::to_string(plan.chunks.size()) + " chunks";
    expect(plan.chunks.size() > one_chunk, where + ": more chunks than buckets");
    expect(fits, where + ": every chunk of two or more matrices fits the limit");
    expect(r.params == whole.params && r.moms == whole.moms,
           where + ": params and momentum bit-identical to one chunk per bucket");
    expect(again.params == r.params && queries_second == 0,
           where + ": the second step reuses every cached GEMM plan (" +
               std::to_string(queries_first) + " queries, then " +
               std::to_string(queries_second) + ")");
  }
}

// Everything phase 3 could fail on is checked by prepare_step, before the step's first write:
// with no BLAS handle at all, preparing throws (and run_step, which writes, is never reached).
void check_prepare_fails_before_writing() {
  std::printf("prepare_step checks before the first write\n");
  const mk::StepPlan plan = mk::plan_step(shape_only_tensors(kShapes), make_buckets(kShapes),
                                          mk::ElementType::kFloat32, -1);
  DeviceBuffer ws(plan.workspace_bytes);
  bool threw = false;
  try {
    mk::prepare_step(plan, ws.get(), mk::BlasContext{});
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  expect(threw, "no cuBLAS(Lt) handle: prepare_step throws std::invalid_argument");
}

// NOTE: [Gram on CUDA]: the bf16 Gram step against the float64 standard reference, under the
// ratio rule of check_step_against_reference: within 2x the error of a CPU emulation of the same
// bf16 Gram algorithm (every stored matrix rounded to bf16) plus the same atol. Also: chunking
// leaves its bits alone, and it is another computation (its bits differ from standard's).
// The emulation's own error is printed next to the standard step's: in bf16, Gram loses to
// standard on square-ish matrices (R = X Xᵀ squares the condition number), which is why "auto"
// never picks it there.
// Errors of tensor t of a step's params against the float64 reference (standard Newton-Schulz
// in double), next to those of the CPU emulation of the GPU's algorithm (`storage`; Gram with
// `emul_restarts` when non-null), measured as check_step_against_reference measures them. atol:
// one ulp of P per element, and 2^-9 of the update's norm (half a bf16 ulp, relative: near-ties
// of the rounding of X that fp32 and double accumulation may round either way).
struct TensorErrors {
  double gpu = 0, emul = 0, atol = 0;
  bool finite = true;
  // The ratio rule; an emulation that itself is not finite (Gram on a square-ish matrix in half
  // precision) is no yardstick, and such a tensor passes whatever the GPU gives.
  bool ok() const {
    const bool emul_finite = std::isfinite(emul);
    return (finite || !emul_finite) && (!emul_finite || gpu <= 2 * emul + atol);
  }
};

TensorErrors tensor_errors(const StepData& d, size_t t, mk::ElementType type,
                           const StepConfig& cfg, const std::vector<double>& coeffs,
                           const StepResult& r, const Storage& storage,
                           const std::vector<int64_t>* emul_restarts) {
  const Shape& s = d.shapes[t];
  const int64_t mat = s.rows * s.cols;
  const double lr = static_cast<float>(cfg.lr);  // the kernels see lr as fp32
  double err_gpu = 0, err_emul = 0, atol2 = 0, update_norm2 = 0;
  TensorErrors e;
  for (int64_t b = 0; b < s.batch; ++b) {
    const Matrix u = direction_cpu(d, t, b, type, cfg);
    const Matrix x_ref = orthogonalize_cpu(u, s.rows, s.cols, coeffs, cfg.eps, false);
    const Matrix x_emul =
        orthogonalize_cpu(u, s.rows, s.cols, coeffs, cfg.eps, storage, emul_restarts);
    const double scale = update_scale(s);
    for (int64_t i = 0; i < mat; ++i) {
      const size_t k = static_cast<size_t>(b * mat + i);
      const double p0 = load_elem(d.params[t], type, k);
      const double p_ref = p0 * (1.0 - lr * cfg.weight_decay) - lr * scale * x_ref[i];
      const double p_emul =
          round_to(type, p0 * (1.0 - lr * cfg.weight_decay) - lr * scale * x_emul[i]);
      const double got = load_elem(r.params[t], type, k);
      e.finite = e.finite && std::isfinite(got);
      err_gpu += (got - p_ref) * (got - p_ref);
      err_emul += (p_emul - p_ref) * (p_emul - p_ref);
      atol2 += ulp(type, p_ref) * ulp(type, p_ref);
      update_norm2 += (lr * scale * x_ref[i]) * (lr * scale * x_ref[i]);
    }
  }
  e.gpu = std::sqrt(err_gpu);
  e.emul = std::sqrt(err_emul);
  e.atol = std::sqrt(atol2) + std::ldexp(std::sqrt(update_norm2), -9);
  return e;
}

// Reports one tensor's errors under the ratio rule, next to another run's error (`other`).
void expect_ratio(const std::string& what, const TensorErrors& e, const char* other,
                  double other_err) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), ": |gpu-ref|=%.3e <= 2*|emul-ref|=%.3e + %.3e (%s: %.3e)",
                e.gpu, 2 * e.emul, e.atol, other, other_err);
  expect(e.ok(), what + buf);
}

void check_gram(std::mt19937_64& rng, bool force_legacy, const Blas& blas, cudaStream_t stream) {
  std::printf("gram step (%s)\n", force_legacy ? "legacy cuBLAS" : "cuBLASLt");
  const mk::ElementType type = mk::ElementType::kFloat32;
  const StepData d = random_step_data(rng, type, 1.0);
  for (const int steps : {5, 10}) {
    const std::vector<double> coeffs = jordan_coefficients(steps);
    StepConfig cfg;
    cfg.force_legacy = force_legacy;
    const StepResult standard = run_gpu_step(d, type, cfg, coeffs, blas, stream);
    StepConfig gcfg = cfg;
    gcfg.gram = true;
    gcfg.gram_restarts = steps == 5 ? std::vector<int64_t>{2} : std::vector<int64_t>{2, 5, 8};
    const StepResult gram = run_gpu_step(d, type, gcfg, coeffs, blas, stream);
    StepConfig chunked = gcfg;
    chunked.workspace_limit = 20000;
    const StepResult gram_chunked = run_gpu_step(d, type, chunked, coeffs, blas, stream);
    expect(gram_chunked.params == gram.params, std::to_string(steps) +
                                                   " iterations: chunked Gram bit-identical");
    expect(gram.params != standard.params, std::to_string(steps) +
                                               " iterations: Gram differs from standard in bits");
    for (size_t t = 0; t < kShapes.size(); ++t) {
      if (kShapes[t].numel() == 0) continue;
      const TensorErrors e =
          tensor_errors(d, t, type, cfg, coeffs, gram, true, &gcfg.gram_restarts);
      const double err_std = tensor_errors(d, t, type, cfg, coeffs, standard, true, nullptr).gpu;
      expect_ratio(std::to_string(steps) + " it. Gram, tensor " + std::to_string(t), e,
                   "standard step", err_std);
    }
  }
}

// NOTE: [Newton-Schulz dtype]: the fp16 workspace, standard and Gram, against the float64
// standard reference under the ratio rule, with an emulation that rounds every stored matrix to
// fp16 (the bf16 workspace's error is printed next to it); any chunking gives the same bits; fp16
// is another computation than bf16 (its bits differ). Loss-scaled grads (x65536, what a
// GradScaler hands over for fp16 training): with grad_scale 65536 the step gives the bits of
// the unscaled step, and with grad_scale 1 (U itself ~65536x, far past fp16's 65504) the result
// is finite and within the ratio rule, because phase 2 divides by the norm in fp32 before the
// cast.
void check_ns_dtype(std::mt19937_64& rng, bool force_legacy, const Blas& blas,
                    cudaStream_t stream) {
  std::printf("fp16 Newton-Schulz workspace (%s)\n",
              force_legacy ? "legacy cuBLAS" : "cuBLASLt");
  const mk::ElementType type = mk::ElementType::kFloat32;
  const StepData d = random_step_data(rng, type, 1.0);
  const std::vector<double> coeffs = jordan_coefficients(5);
  const std::vector<int64_t> restarts = {2};
  for (const bool gram : {false, true}) {
    const char* algo = gram ? "gram" : "standard";
    StepConfig cfg;
    cfg.force_legacy = force_legacy;
    cfg.gram = gram;
    cfg.gram_restarts = restarts;
    const StepResult bf16 = run_gpu_step(d, type, cfg, coeffs, blas, stream);
    cfg.ns_type = mk::NsType::kFloat16;
    const StepResult fp16 = run_gpu_step(d, type, cfg, coeffs, blas, stream);
    StepConfig chunked = cfg;
    chunked.workspace_limit = 20000;
    const StepResult fp16_chunked = run_gpu_step(d, type, chunked, coeffs, blas, stream);
    expect(fp16_chunked.params == fp16.params && fp16_chunked.moms == fp16.moms,
           std::string(algo) + " fp16: chunked step bit-identical");
    expect(fp16.params != bf16.params, std::string(algo) + " fp16: differs from bf16 in bits");
    const std::vector<int64_t>* emul_restarts = gram ? &restarts : nullptr;
    for (size_t t = 0; t < kShapes.size(); ++t) {
      if (kShapes[t].numel() == 0) continue;
      const TensorErrors e = tensor_errors(d, t, type, cfg, coeffs, fp16,
                                           Storage(true, mk::NsType::kFloat16), emul_restarts);
      const double err_bf16 =
          tensor_errors(d, t, type, cfg, coeffs, bf16, true, emul_restarts).gpu;
      expect_ratio(std::string(algo) + " fp16, tensor " + std::to_string(t), e,
                   "bf16 workspace", err_bf16);
    }

    // Loss-scaled grads. 65536 is a power of two: G / 65536 is exact, so U is the same.
    StepData scaled = d;
    for (size_t t = 0; t < kShapes.size(); ++t) {
      for (size_t i = 0; i < static_cast<size_t>(kShapes[t].numel()); ++i) {
        store_elem(scaled.grads[t], type, i, 65536.0 * load_elem(d.grads[t], type, i));
      }
    }
    StepConfig unscale = cfg;
    unscale.grad_scale = 65536.0;
    unscale.grad_scale_on_device = true;
    const StepResult r_unscale = run_gpu_step(scaled, type, unscale, coeffs, blas, stream);
    expect(r_unscale.params == fp16.params && r_unscale.moms == fp16.moms,
           std::string(algo) + " fp16: grads x65536 with grad_scale 65536 give the unscaled bits");
    const StepResult r_big = run_gpu_step(scaled, type, cfg, coeffs, blas, stream);
    bool all_ok = true;
    double worst = 0;
    for (size_t t = 0; t < kShapes.size(); ++t) {
      if (kShapes[t].numel() == 0) continue;
      const TensorErrors e = tensor_errors(scaled, t, type, cfg, coeffs, r_big,
                                           Storage(true, mk::NsType::kFloat16), emul_restarts);
      all_ok = all_ok && e.ok() && e.finite;
      worst = std::max(worst, e.gpu / (2 * e.emul + e.atol));
    }
    char buf[160];
    std::snprintf(buf, sizeof(buf),
                  "%s fp16: grads x65536 with grad_scale 1 (U ~ 65536x): finite, ratio rule "
                  "(worst |gpu-ref| / bound = %.3f)",
                  algo, worst);
    expect(all_ok, buf);
  }
}

// NorMuon's row multipliers of one rows x cols matrix O (row-major, the param's orientation), in
// double, straight from NOTE: [NorMuon]: updates v (rows entries) and returns r_i = f s_i.
std::vector<double> normuon_rows_cpu(const Matrix& o, int64_t rows, int64_t cols,
                                     std::vector<double>& v, double beta2, double eps) {
  std::vector<double> r(static_cast<size_t>(rows));
  double sum_q = 0, sum_sq = 0;
  for (int64_t i = 0; i < rows; ++i) {
    double q = 0;
    for (int64_t j = 0; j < cols; ++j) q += o[i * cols + j] * o[i * cols + j];
    v[i] = beta2 * v[i] + (1 - beta2) * q / static_cast<double>(cols);
    r[i] = 1.0 / (std::sqrt(v[i]) + eps);
    sum_q += q;
    sum_sq += r[i] * r[i] * q;
  }
  const double f = sum_sq > 0 ? std::sqrt(sum_q / sum_sq) : 0.0;
  for (double& x : r) x *= f;
  return r;
}

// NOTE: [NorMuon on CUDA]: the step with NorMuon against a float64 reference of the formula
// (Newton-Schulz in double, then normuon_rows_cpu), under the ratio rule of
// check_step_against_reference: within 2x the error of the bf16 reference implementation (the
// same formula on the bf16-emulated Newton-Schulz result, params rounded once) plus the same
// atol. v (fp32 on the device) likewise, normwise per tensor. Shapes: a tall and a wide matrix
// in one bucket, 3-D stacks of both orientations, a tall matrix of more than kBlockSize rows, a
// wide one of more than kBlockSize rows, rows whose vectors straddle row ends, one row, one
// column, an empty tensor; grad rows over 4 decades; v from zero and from earlier values. Also:
// any chunking (chunk boundaries inside 3-D stacks, one matrix per chunk) gives the same bits,
// found_inf changes nothing (v included), and zero grads give P = P (1 - lr wd), no NaN.
void check_normuon(std::mt19937_64& rng, mk::ElementType type, bool force_legacy,
                   const Blas& blas, cudaStream_t stream,
                   mk::NsType ns_type = mk::NsType::kBFloat16) {
  std::printf("normuon step: params %s, %s workspace, %s\n", type_name(type),
              ns_type_name(ns_type), force_legacy ? "legacy cuBLAS" : "cuBLASLt");
  const std::vector<Shape> shapes = {{1, 24, 72}, {1, 72, 24},   {3, 16, 40},  {2, 40, 16},
                                     {1, 300, 70}, {1, 260, 280}, {1, 5, 7},    {2, 7, 11},
                                     {1, 1, 13},  {1, 11, 1},    {1, 0, 5}};
  StepData d = random_step_data(rng, type, 1.0, shapes, /*row_decades=*/4.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (const Shape& s : shapes) {
    std::vector<float> v(static_cast<size_t>(s.batch * s.rows));
    for (size_t i = 0; i < v.size(); ++i) {  // every 5th row from zero, the rest over 4 decades
      v[i] = i % 5 == 0 ? 0.f
                        : static_cast<float>(std::fabs(normal(rng)) *
                                             std::pow(10.0, -4.0 + 4.0 * uniform(rng)) /
                                             static_cast<double>(s.cols));
    }
    d.vs.push_back(std::move(v));
  }
  const std::vector<double> coeffs = jordan_coefficients(5);
  StepConfig cfg;
  cfg.force_legacy = force_legacy;
  cfg.normuon = true;
  cfg.lr_on_device = true;
  cfg.ns_type = ns_type;
  const StepResult r = run_gpu_step(d, type, cfg, coeffs, blas, stream);
  const double lr = static_cast<float>(cfg.lr);

  for (size_t t = 0; t < shapes.size(); ++t) {
    const Shape& s = shapes[t];
    const std::string name = "tensor " + std::to_string(t) + " (" + std::to_string(s.batch) +
                             "x" + std::to_string(s.rows) + "x" + std::to_string(s.cols) + ")";
    if (s.numel() == 0) {
      expect(r.params[t].empty() && r.vs[t].empty(), name + " empty: untouched");
      continue;
    }
    const int64_t mat = s.rows * s.cols;
    double err_gpu = 0, err_emul = 0, atol2 = 0, update_norm2 = 0;
    double v_err_gpu = 0, v_err_emul = 0, v_atol2 = 0, v_new2 = 0;
    bool finite = true;
    for (int64_t b = 0; b < s.batch; ++b) {
      const Matrix u = direction_cpu(d, t, b, type, cfg);
      const Matrix o_ref = orthogonalize_cpu(u, s.rows, s.cols, coeffs, cfg.eps, false);
      const Matrix o_emul =
          orthogonalize_cpu(u, s.rows, s.cols, coeffs, cfg.eps, Storage(true, ns_type));
      std::vector<double> v_ref(d.vs[t].begin() + b * s.rows, d.vs[t].begin() + (b + 1) * s.rows);
      std::vector<double> v_emul = v_ref;
      const std::vector<double> r_ref =
          normuon_rows_cpu(o_ref, s.rows, s.cols, v_ref, cfg.normuon_beta2, cfg.normuon_eps);
      const std::vector<double> r_emul =
          normuon_rows_cpu(o_emul, s.rows, s.cols, v_emul, cfg.normuon_beta2, cfg.normuon_eps);
      const double scale = update_scale(s);
      for (int64_t i = 0; i < mat; ++i) {
        const size_t e = static_cast<size_t>(b * mat + i);
        const int64_t row = i / s.cols;
        const double p0 = load_elem(d.params[t], type, e);
        const double step_ref = lr * scale * r_ref[row] * o_ref[i];
        const double p_ref = p0 * (1.0 - lr * cfg.weight_decay) - step_ref;
        const double p_emul = round_to(type, p0 * (1.0 - lr * cfg.weight_decay) -
                                                 lr * scale * r_emul[row] * o_emul[i]);
        const double got = load_elem(r.params[t], type, e);
        finite = finite && std::isfinite(got);
        err_gpu += (got - p_ref) * (got - p_ref);
        err_emul += (p_emul - p_ref) * (p_emul - p_ref);
        atol2 += ulp(type, p_ref) * ulp(type, p_ref);
        update_norm2 += step_ref * step_ref;
      }
      for (int64_t i = 0; i < s.rows; ++i) {
        const double got = r.vs[t][static_cast<size_t>(b * s.rows + i)];
        const double v0 = d.vs[t][static_cast<size_t>(b * s.rows + i)];
        const double v_emul_f32 = static_cast<float>(v_emul[i]);  // v is stored in fp32
        finite = finite && std::isfinite(got);
        v_err_gpu += (got - v_ref[i]) * (got - v_ref[i]);
        v_err_emul += (v_emul_f32 - v_ref[i]) * (v_emul_f32 - v_ref[i]);
        // fp32 arithmetic and storage of v: a few fp32 ulps per entry.
        v_atol2 += 16 * ulp(mk::ElementType::kFloat32, v_ref[i]) *
                   ulp(mk::ElementType::kFloat32, v_ref[i]);
        v_new2 += (v_ref[i] - cfg.normuon_beta2 * v0) * (v_ref[i] - cfg.normuon_beta2 * v0);
      }
    }
    // atol of the params as in check_step_against_reference: one ulp of P per element, and 2^-9
    // of the update's norm for bf16 near-ties of X that fp32 and double accumulation round
    // differently.
    const double atol = std::sqrt(atol2) + std::ldexp(std::sqrt(update_norm2), -9);
    // v: 4 fp32 ulps per entry, and the same near-ties: q_i is quadratic in X, so 2^-8 of the
    // new part (1 - beta2) q_i / cols.
    const double v_atol = std::sqrt(v_atol2) + std::ldexp(std::sqrt(v_new2), -8);
    expect(finite, name + " params and v finite");
    char buf[256];
    std::snprintf(buf, sizeof(buf), " params: |gpu-ref|=%.3e <= 2*|emul-ref|=%.3e + atol %.3e",
                  std::sqrt(err_gpu), 2 * std::sqrt(err_emul), atol);
    expect(std::sqrt(err_gpu) <= 2 * std::sqrt(err_emul) + atol, name + buf);
    std::snprintf(buf, sizeof(buf), " v: |gpu-ref|=%.3e <= 2*|emul-ref|=%.3e + atol %.3e",
                  std::sqrt(v_err_gpu), 2 * std::sqrt(v_err_emul), v_atol);
    expect(std::sqrt(v_err_gpu) <= 2 * std::sqrt(v_err_emul) + v_atol, name + buf);
  }

  // Chunking: the limits give several chunks per bucket with boundaries inside the 3-D stacks,
  // then one matrix per chunk.
  const std::vector<mk::MatrixTensor> shapes_only = shape_only_tensors(shapes);
  const std::vector<mk::ShapeBucket> buckets = make_buckets(shapes);
  for (const int64_t limit : {int64_t{12000}, int64_t{1}}) {
    const mk::StepPlan plan = mk::plan_step(shapes_only, buckets, type, limit, {}, true, ns_type);
    bool splits_stack = false;  // a chunk boundary inside a 3-D stack
    for (const mk::StepChunk& c : plan.chunks) {
      for (size_t k = 0; k < c.tensors.size(); ++k) {
        for (size_t ti = 0; ti < shapes.size(); ++ti) {
          splits_stack = splits_stack || (shapes[ti].batch > 1 && c.tensors[k].batch < shapes[ti].batch &&
                                          c.tensors[k].rows == shapes[ti].rows &&
                                          c.tensors[k].cols == shapes[ti].cols);
        }
      }
    }
    StepConfig chunked = cfg;
    chunked.workspace_limit = limit;
    const StepResult c = run_gpu_step(d, type, chunked, coeffs, blas, stream);
    const std::string where = "limit " + std::to_string(limit) + " B, " +
                              std::to_string(plan.chunks.size()) + " chunks";
    expect(plan.chunks.size() > buckets.size() && splits_stack,
           where + ": several chunks per bucket, a 3-D stack split between chunks");
    expect(c.params == r.params && c.vs == r.vs && c.moms == r.moms,
           where + ": params, momentum and v bit-identical to one chunk per bucket");
  }

  // found_inf: nothing changes, v included.
  StepConfig skip = cfg;
  skip.found_inf = 1.f;
  const StepResult sk = run_gpu_step(d, type, skip, coeffs, blas, stream);
  expect(sk.params == d.params && sk.moms == d.moms && sk.vs == d.vs,
         "found_inf=1 leaves params, momentum and v");

  // Zero grads and momentum: O = 0, so q = 0, f = 0: P = P (1 - lr wd) to one ulp, v = beta2 v.
  StepData zero = d;
  for (auto& g : zero.grads) std::fill(g.begin(), g.end(), 0);
  for (auto& m : zero.moms) std::fill(m.begin(), m.end(), 0.f);
  const StepResult z = run_gpu_step(zero, type, cfg, coeffs, blas, stream);
  bool ok = true;
  const double decay = 1.0 - static_cast<double>(static_cast<float>(cfg.lr)) *
                                 static_cast<double>(static_cast<float>(cfg.weight_decay));
  for (size_t t = 0; t < shapes.size(); ++t) {
    for (size_t i = 0; i < static_cast<size_t>(shapes[t].numel()); ++i) {
      const double want = load_elem(zero.params[t], type, i) * decay;
      const double got = load_elem(z.params[t], type, i);
      ok = ok && std::isfinite(got) && std::fabs(got - want) <= ulp(type, want);
    }
    for (size_t i = 0; i < zero.vs[t].size(); ++i) {
      const double want = cfg.normuon_beta2 * zero.vs[t][i];
      ok = ok && std::fabs(z.vs[t][i] - want) <= 2 * ulp(mk::ElementType::kFloat32, want);
    }
  }
  expect(ok, "zero grads: no NaN, P = P * (1 - lr wd) to one ulp, v = beta2 v");
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("SKIP: no usable CUDA device (cudaGetDeviceCount: %s, count %d)\n",
                err != cudaSuccess ? cudaGetErrorName(err) : "cudaSuccess", count);
    return kSkip;
  }
  uint64_t seed = static_cast<uint64_t>(
      std::chrono::high_resolution_clock::now().time_since_epoch().count());
  if (const char* env = std::getenv("MUON_EXT_TEST_SEED")) seed = std::strtoull(env, nullptr, 10);
  std::printf("MUON_EXT_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  try {
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    {
      const Blas blas;
      for (const mk::ElementType type :
           {mk::ElementType::kFloat32, mk::ElementType::kBFloat16, mk::ElementType::kFloat16}) {
        for (const bool nesterov : {true, false}) {
          check_step_against_reference(rng, type, nesterov, false, blas, stream);
        }
      }
      check_step_against_reference(rng, mk::ElementType::kFloat32, true, true, blas, stream);
      check_newton_schulz(rng, false, blas, stream);
      check_newton_schulz(rng, true, blas, stream);
      check_determinism_and_skip(rng, blas, stream);
      check_chunking(rng, false, blas, stream);
      check_chunking(rng, true, blas, stream);
      check_gram(rng, false, blas, stream);
      check_gram(rng, true, blas, stream);
      check_normuon(rng, mk::ElementType::kFloat32, false, blas, stream);
      check_normuon(rng, mk::ElementType::kBFloat16, true, blas, stream);
      check_ns_dtype(rng, false, blas, stream);
      check_ns_dtype(rng, true, blas, stream);
      check_normuon(rng, mk::ElementType::kFloat32, false, blas, stream, mk::NsType::kFloat16);
      check_prepare_fails_before_writing();
    }
    check_cuda(cudaStreamDestroy(stream), "cudaStreamDestroy");
  } catch (const std::exception& e) {
    std::printf("ERROR: %s\n", e.what());
    return 1;
  }
  std::printf("%s: %d failure(s)\n", g_failures == 0 ? "PASSED" : "FAILED", g_failures);
  return g_failures == 0 ? 0 : 1;
}
