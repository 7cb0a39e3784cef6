// Phase 3 of the fused Muon step: batched Newton-Schulz on one shape bucket (torch-free).
//
// NOTE: [Row-major matrices in column-major BLAS]
// The workspace holds a bucket as `batch` contiguous ROW-major m x n matrices X (m <= n, ld n,
// batch stride m*n). cuBLAS(Lt) is COLUMN-major: the same bytes read column-major are Xᵀ, an
// n x m matrix with leading dimension n. Write Z_c for the column-major reading of a row-major
// buffer Z, so Z_c = Zᵀ. One iteration is, in row-major terms,
//     A  = X Xᵀ          (m x m)
//     B  = b A + c A A   (m x m)
//     X' = a X + B X     (m x n)
// and transposing each equation ((PQ)ᵀ = QᵀPᵀ) gives what cuBLAS computes on the column-major
// views, D = alpha op(A) op(B) + beta C with D of size M x N:
//   GEMM1  A_c  = X_cᵀ X_c           op(A) = T on X_c (stored n x m, ld n); op(B) = N on X_c;
//                                    M = m, N = m, K = n; D = gram (m x m, ld m); alpha 1, beta 0
//   GEMM2  B_c  = c A_c A_c + b A_c  op(A) = op(B) = N on gram (m x m, ld m); M = N = K = m;
//                                    C = gram, D = poly (m x m, ld m); alpha c, beta b
//   GEMM3  X'_c = X_c B_c + a X_c    op(A) = N on X_c (n x m, ld n); op(B) = N on poly (m x m,
//                                    ld m); M = n, N = m, K = m; C = X_c, D = X'_c (the other
//                                    ping-pong buffer, n x m, ld n); alpha 1, beta a
// Batch strides (elements): m*n for X buffers, m*m for gram and poly. No symmetry of A or B is
// assumed: GEMM2 and GEMM3 use them exactly as stored, which matches the reference
// (`baddbmm(A, A, A, beta=b, alpha=c)`, `baddbmm(X, B, X, beta=a)`) operation for operation.
// GEMM1 is the "TN" layout, the one bf16 tensor-core kernels like best.
//
// NOTE: [Why cuBLASLt]
// Legacy cuBLAS computes C = alpha op(A) op(B) + beta C in place (C may not alias A or B), so
// GEMM2 would need gram copied into poly first and GEMM3 X copied into X'. cublasLtMatmul takes
// a separate output D, so with C = gram / X and D = poly / X' the coefficients fold into
// alpha/beta: 3 GEMMs per iteration, no copy, no elementwise launch. If cuBLASLt's heuristic has
// no algorithm for a shape/alignment (or BlasContext::force_legacy), that GEMM alone falls back
// to cublasGemmStridedBatchedEx preceded by one cudaMemcpyAsync of C into D.
//
// NOTE: [Accumulation]
// A/B/C/D all of the workspace type (NsType: CUDA_R_16BF or CUDA_R_16F, NOTE: [Newton-Schulz
// dtype] in csrc/muon_step_args.h), CUBLAS_COMPUTE_32F, fp32 alpha/beta (host pointers). Split-K
// is restricted to CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE (INPLACE and OUTPUT_TYPE sum split-K
// partials in the 16-bit output type),
// and the legacy fallback sets CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION for the same
// reason. Heuristic results depend only on shapes, alignments, workspace size and device, so the
// algorithm (and the bits) are the same on every rerun.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>
#include <stdexcept>
#include <string>

#include "multi_matrix_apply.cuh"
#include "muon_kernels.cuh"

namespace muon_ext {
namespace cuda {
namespace {

cudaDataType_t blas_type(NsType type) {
  switch (type) {
    case NsType::kBFloat16:
      return CUDA_R_16BF;
    case NsType::kFloat16:
      return CUDA_R_16F;
  }
  throw std::invalid_argument("muon_ext newton_schulz: unsupported workspace element type");
}

std::string cublas_status_text(cublasStatus_t status) {
  return std::string(cublasGetStatusName(status)) + " (" + cublasGetStatusString(status) + ")";
}

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("muon_ext newton_schulz: ") + what +
                             " failed: " + cublas_status_text(status));
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("muon_ext newton_schulz: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

}  // namespace

// Owners of cuBLASLt descriptors (outside the anonymous namespace: LtGemm, which holds them, is
// named in muon_kernels.cuh).
struct LtDestroy {
  void operator()(cublasLtMatmulDescOpaque_t* p) const { cublasLtMatmulDescDestroy(p); }
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const { cublasLtMatrixLayoutDestroy(p); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using LtMatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, LtDestroy>;
using LtLayout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LtDestroy>;
using LtPreference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, LtDestroy>;

namespace {

// One strided-batched GEMM in column-major terms: D = alpha op(A) op(B) + beta C, D is M x N,
// the reduction dimension is K. ld_d == ld_c and stride_d == stride_c (D and C share a layout).
// Every operand has element type `type` (CUDA_R_16BF or CUDA_R_16F).
struct GemmShape {
  cublasOperation_t trans_a;
  cublasOperation_t trans_b;
  int64_t M;
  int64_t N;
  int64_t K;
  int64_t ld_a;
  int64_t ld_b;
  int64_t ld_c;
  int64_t stride_a;
  int64_t stride_b;
  int64_t stride_c;
  int64_t batch;
  cudaDataType_t type;

  // Dimensions of A and B as stored (before op), as cuBLASLt layouts describe them.
  int64_t a_rows() const { return trans_a == CUBLAS_OP_N ? M : K; }
  int64_t a_cols() const { return trans_a == CUBLAS_OP_N ? K : M; }
  int64_t b_rows() const { return trans_b == CUBLAS_OP_N ? K : N; }
  int64_t b_cols() const { return trans_b == CUBLAS_OP_N ? N : K; }
};

// Largest power of two <= 256 dividing v (cuBLASLt's alignment preferences are in bytes).
uint32_t alignment_of(uint64_t v) {
  uint32_t a = 256;
  while (a > 1 && v % a != 0) a /= 2;
  return a;
}

// Alignment every batch of an operand is guaranteed: its base pointers, its columns (ld) and
// its batch stride, in bytes.
uint32_t operand_alignment(std::initializer_list<const void*> bases, int64_t ld, int64_t stride) {
  uint32_t a = std::min(alignment_of(static_cast<uint64_t>(ld) * kNsElementBytes),
                        alignment_of(static_cast<uint64_t>(stride) * kNsElementBytes));
  for (const void* p : bases) a = std::min(a, alignment_of(reinterpret_cast<uintptr_t>(p)));
  return a;
}

LtLayout make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, int64_t batch,
                     int64_t stride) {
  cublasLtMatrixLayout_t raw = nullptr;
  check_cublas(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                          static_cast<uint64_t>(cols), ld),
               "cublasLtMatrixLayoutCreate");
  LtLayout layout(raw);
  const int32_t count = static_cast<int32_t>(batch);
  check_cublas(cublasLtMatrixLayoutSetAttribute(raw, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                sizeof(count)),
               "cublasLtMatrixLayoutSetAttribute(BATCH_COUNT)");
  check_cublas(cublasLtMatrixLayoutSetAttribute(raw, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                &stride, sizeof(stride)),
               "cublasLtMatrixLayoutSetAttribute(STRIDED_BATCH_OFFSET)");
  return layout;
}

}  // namespace

// A cuBLASLt GEMM: its descriptors and the heuristic's algorithm for one shape, batch and set of
// alignments. Immutable once built, so one instance serves every step and thread (cached by
// plan_newton_schulz; cublasLtMatmul only reads the descriptors).
class LtGemm {
 public:
  // align_*: bytes every pointer this GEMM will see for that operand is aligned to.
  LtGemm(const BlasContext& blas, const GemmShape& s, int64_t heuristic_batch, uint32_t align_a,
         uint32_t align_b, uint32_t align_c, uint32_t align_d) {
    cublasLtMatmulDesc_t desc = nullptr;
    check_cublas(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                 "cublasLtMatmulDescCreate");
    desc_.reset(desc);
    const int32_t trans_a = s.trans_a;
    const int32_t trans_b = s.trans_b;
    check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a,
                                                sizeof(trans_a)),
                 "cublasLtMatmulDescSetAttribute(TRANSA)");
    check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b,
                                                sizeof(trans_b)),
                 "cublasLtMatmulDescSetAttribute(TRANSB)");
    a_ = make_layout(s.type, s.a_rows(), s.a_cols(), s.ld_a, s.batch, s.stride_a);
    b_ = make_layout(s.type, s.b_rows(), s.b_cols(), s.ld_b, s.batch, s.stride_b);
    c_ = make_layout(s.type, s.M, s.N, s.ld_c, s.batch, s.stride_c);

    cublasLtMatmulPreference_t raw_pref = nullptr;
    check_cublas(cublasLtMatmulPreferenceCreate(&raw_pref), "cublasLtMatmulPreferenceCreate");
    LtPreference pref(raw_pref);
    const uint64_t workspace = blas.lt_workspace != nullptr ? blas.lt_workspace_bytes : 0;
    check_cublas(cublasLtMatmulPreferenceSetAttribute(
                     raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                     sizeof(workspace)),
                 "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
    // See NOTE: [Accumulation]: no-split-K algorithms always qualify; split-K only in fp32.
    const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    check_cublas(cublasLtMatmulPreferenceSetAttribute(
                     raw_pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction,
                     sizeof(reduction)),
                 "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)");
    const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    const uint32_t align_val[4] = {align_a, align_b, align_c, align_d};
    for (int i = 0; i < 4; ++i) {
      check_cublas(cublasLtMatmulPreferenceSetAttribute(raw_pref, align_attr[i], &align_val[i],
                                                        sizeof(align_val[i])),
                   "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");
    }

    // NOTE: [Chunk-independent algorithm]: ask the heuristic at `heuristic_batch` (the bucket's
    // matrix count, a property of the model), then run that algorithm at the chunk's batch if
    // cuBLASLt accepts it there. Every chunk of a bucket then uses the same algorithm whatever
    // the workspace limit, so chunking does not change a bit of the result.
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
    if (heuristic_batch != s.batch && heuristic_batch >= 1) {
      GemmShape q = s;
      q.batch = heuristic_batch;
      const LtLayout qa =
          make_layout(q.type, q.a_rows(), q.a_cols(), q.ld_a, q.batch, q.stride_a);
      const LtLayout qb =
          make_layout(q.type, q.b_rows(), q.b_cols(), q.ld_b, q.batch, q.stride_b);
      const LtLayout qc = make_layout(q.type, q.M, q.N, q.ld_c, q.batch, q.stride_c);
      status = cublasLtMatmulAlgoGetHeuristic(blas.lt, desc, qa.get(), qb.get(), qc.get(),
                                              qc.get(), raw_pref, 1, &result, &returned);
      if (status == CUBLAS_STATUS_SUCCESS && returned >= 1 &&
          result.state == CUBLAS_STATUS_SUCCESS) {
        cublasLtMatmulHeuristicResult_t checked{};
        if (cublasLtMatmulAlgoCheck(blas.lt, desc, a_.get(), b_.get(), c_.get(), c_.get(),
                                    &result.algo, &checked) == CUBLAS_STATUS_SUCCESS &&
            checked.state == CUBLAS_STATUS_SUCCESS &&
            checked.workspaceSize <= workspace) {
          algo_ = result.algo;
          ok_ = true;
          return;
        }
      }
      returned = 0;  // not usable at this batch: ask for this batch itself
    }
    status = cublasLtMatmulAlgoGetHeuristic(blas.lt, desc, a_.get(), b_.get(), c_.get(), c_.get(),
                                            raw_pref, 1, &result, &returned);
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) return;  // no algorithm: legacy fallback
    check_cublas(status, "cublasLtMatmulAlgoGetHeuristic");
    if (returned < 1 || result.state != CUBLAS_STATUS_SUCCESS) return;
    algo_ = result.algo;
    ok_ = true;
  }

  bool ok() const { return ok_; }

  void run(const BlasContext& blas, const void* A, const void* B, const void* C, void* D,
           float alpha, float beta, cudaStream_t stream) const {
    check_cublas(cublasLtMatmul(blas.lt, desc_.get(), &alpha, A, a_.get(), B, b_.get(), &beta, C,
                                c_.get(), D, c_.get(), &algo_, blas.lt_workspace,
                                blas.lt_workspace != nullptr ? blas.lt_workspace_bytes : 0,
                                stream),
                 "cublasLtMatmul");
  }

 private:
  LtMatmulDesc desc_;
  LtLayout a_;
  LtLayout b_;
  LtLayout c_;
  cublasLtMatmulAlgo_t algo_{};
  bool ok_ = false;
};

namespace {

int checked_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) {
    throw std::invalid_argument(std::string("muon_ext newton_schulz: ") + what + " = " +
                                std::to_string(v) + " does not fit the legacy cuBLAS API");
  }
  return static_cast<int>(v);
}

// Restores a cuBLAS handle's math and pointer modes on scope exit (the handle is PyTorch's).
class LegacyModeGuard {
 public:
  explicit LegacyModeGuard(cublasHandle_t h) : handle_(h) {
    check_cublas(cublasGetMathMode(h, &math_), "cublasGetMathMode");
    check_cublas(cublasGetPointerMode(h, &pointer_), "cublasGetPointerMode");
    check_cublas(cublasSetMathMode(h, static_cast<cublasMath_t>(
                                          CUBLAS_DEFAULT_MATH |
                                          CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
                 "cublasSetMathMode");
    check_cublas(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  }
  ~LegacyModeGuard() {
    cublasSetMathMode(handle_, math_);
    cublasSetPointerMode(handle_, pointer_);
  }
  LegacyModeGuard(const LegacyModeGuard&) = delete;
  LegacyModeGuard& operator=(const LegacyModeGuard&) = delete;

 private:
  cublasHandle_t handle_;
  cublasMath_t math_ = CUBLAS_DEFAULT_MATH;
  cublasPointerMode_t pointer_ = CUBLAS_POINTER_MODE_HOST;
};

// The fallback (see NOTE: [Why cuBLASLt]): legacy cuBLAS accumulates into its output, so D
// starts as a copy of C. Our C/D buffers are contiguous batches (stride_c == ld_c * N).
void legacy_gemm(const BlasContext& blas, const GemmShape& s, const void* A, const void* B,
                 const void* C, void* D, float alpha, float beta, cudaStream_t stream) {
  if (blas.legacy == nullptr) {
    throw std::runtime_error(
        "muon_ext newton_schulz: cuBLASLt has no algorithm for this GEMM and no cuBLAS handle "
        "was given for the fallback");
  }
  if (C != D && beta != 0.f) {
    const size_t bytes = static_cast<size_t>(s.batch) * static_cast<size_t>(s.stride_c) *
                         kNsElementBytes;
    check_cuda(cudaMemcpyAsync(D, C, bytes, cudaMemcpyDeviceToDevice, stream),
               "cudaMemcpyAsync (legacy GEMM addend)");
  }
  cudaStream_t current = nullptr;
  check_cublas(cublasGetStream(blas.legacy, &current), "cublasGetStream");
  if (current != stream) check_cublas(cublasSetStream(blas.legacy, stream), "cublasSetStream");
  LegacyModeGuard modes(blas.legacy);
  check_cublas(
      cublasGemmStridedBatchedEx(
          blas.legacy, s.trans_a, s.trans_b, checked_int(s.M, "M"), checked_int(s.N, "N"),
          checked_int(s.K, "K"), &alpha, A, s.type, checked_int(s.ld_a, "lda"), s.stride_a,
          B, s.type, checked_int(s.ld_b, "ldb"), s.stride_b, &beta, D, s.type,
          checked_int(s.ld_c, "ldc"), s.stride_c, checked_int(s.batch, "batch"),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmStridedBatchedEx");
}

// The three GEMM shapes of one bucket's iteration. See NOTE: [Row-major matrices in column-major
// BLAS] for every number here.
struct IterationShapes {
  GemmShape gram, poly, update;
};

IterationShapes iteration_shapes(int64_t batch, int64_t m, int64_t n, NsType ns_type) {
  const int64_t mn = m * n;
  const int64_t mm = m * m;
  const cudaDataType_t t = blas_type(ns_type);
  return IterationShapes{
      GemmShape{CUBLAS_OP_T, CUBLAS_OP_N, /*M=*/m, /*N=*/m, /*K=*/n, /*ld_a=*/n, /*ld_b=*/n,
                /*ld_c=*/m, /*stride_a=*/mn, /*stride_b=*/mn, /*stride_c=*/mm, batch, t},
      GemmShape{CUBLAS_OP_N, CUBLAS_OP_N, /*M=*/m, /*N=*/m, /*K=*/m, /*ld_a=*/m, /*ld_b=*/m,
                /*ld_c=*/m, /*stride_a=*/mm, /*stride_b=*/mm, /*stride_c=*/mm, batch, t},
      GemmShape{CUBLAS_OP_N, CUBLAS_OP_N, /*M=*/n, /*N=*/m, /*K=*/m, /*ld_a=*/n, /*ld_b=*/m,
                /*ld_c=*/n, /*stride_a=*/mn, /*stride_b=*/mm, /*stride_c=*/mn, batch, t}};
}

// Grid of the elementwise Gram kernel: a grid-stride loop over at most this many blocks.
constexpr int64_t kIdentityGridBlocks = 1024;

// NOTE: [GEMM plan cache]
// The heuristic's answer depends only on the handle (hence the device), the GEMM's shape, batch
// and element type (bf16 or fp16), the operands' alignments and the workspace size, so it is
// cached under exactly that key:
// a training loop queries the heuristic on its first step and never again. Entries are
// immutable and shared; the cache is bounded (cleared past kMaxCachedGemms entries, a safety
// net for shape-changing workloads: live plans keep their entries alive).
constexpr size_t kMaxCachedGemms = 4096;

struct GemmCache {
  std::mutex mutex;
  std::map<std::vector<int64_t>, std::shared_ptr<const LtGemm>> entries;
  int64_t queries = 0;
};

GemmCache& gemm_cache() {
  static GemmCache* cache = new GemmCache();  // never destroyed: usable during process exit
  return *cache;
}

std::shared_ptr<const LtGemm> cached_gemm(const BlasContext& blas, const GemmShape& s,
                                          int64_t heuristic_batch, uint32_t align_a, uint32_t align_b, uint32_t align_c,
                                          uint32_t align_d) {
  const uint64_t workspace = blas.lt_workspace != nullptr ? blas.lt_workspace_bytes : 0;
  const std::vector<int64_t> key{
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(blas.lt)), static_cast<int64_t>(workspace),
      s.trans_a, s.trans_b, s.M, s.N, s.K, s.ld_a, s.ld_b, s.ld_c, s.stride_a, s.stride_b,
      s.stride_c, s.batch, static_cast<int64_t>(s.type), heuristic_batch, align_a, align_b,
      align_c, align_d};
  GemmCache& cache = gemm_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto it = cache.entries.find(key);
    if (it != cache.entries.end()) return it->second;
  }
  // Built outside the lock (the heuristic can take a while); a racing thread builds the same.
  auto gemm = std::make_shared<const LtGemm>(blas, s, heuristic_batch, align_a, align_b, align_c,
                                             align_d);
  std::lock_guard<std::mutex> lock(cache.mutex);
  ++cache.queries;
  if (cache.entries.size() >= kMaxCachedGemms) cache.entries.clear();
  return cache.entries.emplace(key, std::move(gemm)).first->second;
}

// One GEMM through its cuBLASLt plan, or the legacy fallback when there is none.
void run_gemm(const BlasContext& blas, const LtGemm* lt, const GemmShape& s, const void* A,
              const void* B, const void* C, void* D, float alpha, float beta,
              cudaStream_t stream) {
  if (lt != nullptr && lt->ok()) {
    lt->run(blas, A, B, C, D, alpha, beta, stream);
  } else {
    legacy_gemm(blas, s, A, B, C, D, alpha, beta, stream);
  }
}

// dst = src + a I for a batch of row-major m x m matrices of the workspace type W (bf16 or
// fp16): in fp32, rounded to W once. This
// is what the GEMM Q Z + a Q gives for Q = I (fp32 accumulation, one rounding), without the
// GEMM; it is not the unstable "a I folded into a half-precision Z" (NOTE: [Gram on CUDA]).
template <typename W>
__global__ void __launch_bounds__(detail::kBlockSize)
    add_scaled_identity_kernel(W* __restrict__ dst, const W* __restrict__ src,
                               int64_t total, int64_t m, float a) {
  const int64_t stride = static_cast<int64_t>(detail::kBlockSize) * kIdentityGridBlocks;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * detail::kBlockSize + threadIdx.x;
       i < total; i += stride) {
    const int64_t within = i % (m * m);
    const float v = detail::to_float(src[i]) + (within / m == within % m ? a : 0.f);
    dst[i] = detail::from_float<W>(v);
  }
}

void launch_add_scaled_identity(NsType type, void* dst, const void* src, int64_t batch,
                                int64_t m, float a, cudaStream_t stream) {
  const int64_t total = batch * m * m;
  const int64_t blocks =
      std::min<int64_t>(kIdentityGridBlocks, detail::ceil_div(total, detail::kBlockSize));
  if (type == NsType::kFloat16) {
    detail::launch_kernel(add_scaled_identity_kernel<__half>, blocks, stream,
                          static_cast<__half*>(dst), static_cast<const __half*>(src), total, m, a);
  } else {
    detail::launch_kernel(add_scaled_identity_kernel<__nv_bfloat16>, blocks, stream,
                          static_cast<__nv_bfloat16*>(dst),
                          static_cast<const __nv_bfloat16*>(src), total, m, a);
  }
  check_cuda(cudaGetLastError(), "add_scaled_identity_kernel launch");
}

}  // namespace

int64_t lt_gemm_plans_built() {
  GemmCache& cache = gemm_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return cache.queries;
}

NsGemmPlan plan_newton_schulz(int64_t batch, int64_t m, int64_t n, const NsBuffers& buffers,
                              const BlasContext& blas, int64_t heuristic_batch) {
  // The checks phase 3 would make, made here, before the step's first write (prepare_step).
  if (batch < 1 || batch > INT32_MAX || heuristic_batch > INT32_MAX || m < 1 || n < m) {
    throw std::invalid_argument("muon_ext newton_schulz: need 1 <= batch <= 2^31-1 and "
                                "1 <= m <= n, got batch=" + std::to_string(batch) +
                                " m=" + std::to_string(m) + " n=" + std::to_string(n));
  }
  if (blas.lt == nullptr && blas.legacy == nullptr) {
    throw std::invalid_argument("muon_ext newton_schulz: no cuBLASLt or cuBLAS handle");
  }
  const IterationShapes s = iteration_shapes(batch, m, n, buffers.type);
  // A GEMM without a cuBLASLt algorithm takes legacy cuBLAS, whose API is 32-bit.
  auto require_legacy = [&](const GemmShape& g) {
    if (blas.legacy == nullptr) {
      throw std::runtime_error(
          "muon_ext newton_schulz: cuBLASLt has no algorithm for this GEMM and no cuBLAS handle "
          "was given for the fallback");
    }
    for (int64_t v : {g.M, g.N, g.K, g.ld_a, g.ld_b, g.ld_c, g.batch}) checked_int(v, "dimension");
  };
  NsGemmPlan plan;
  if (blas.force_legacy || blas.lt == nullptr) {  // every GEMM takes the legacy path
    for (const GemmShape* g : {&s.gram, &s.poly, &s.update}) require_legacy(*g);
    return plan;
  }
  // One alignment for every m x m buffer: Gram NS runs the same m x m GEMM plan on R, Z, Q and
  // T in turn (null buffers, absent for standard NS, constrain nothing).
  const uint32_t x_align = operand_alignment({buffers.x[0], buffers.x[1]}, n, m * n);
  const uint32_t sq = operand_alignment(
      {buffers.gram, buffers.poly, buffers.q[0], buffers.q[1], buffers.t}, m, m * m);
  if (heuristic_batch < 1) heuristic_batch = batch;
  plan.gram = cached_gemm(blas, s.gram, heuristic_batch, x_align, x_align, sq, sq);
  plan.poly = cached_gemm(blas, s.poly, heuristic_batch, sq, sq, sq, sq);
  plan.update = cached_gemm(blas, s.update, heuristic_batch, x_align, sq, x_align, x_align);
  if (!plan.gram->ok()) require_legacy(s.gram);
  if (!plan.poly->ok()) require_legacy(s.poly);
  if (!plan.update->ok()) require_legacy(s.update);
  return plan;
}

int newton_schulz_batched(int64_t batch, int64_t m, int64_t n, const double* coefficients,
                          int64_t num_coefficients, const NsBuffers& buffers,
                          const BlasContext& blas, cudaStream_t stream,
                          const NsGemmPlan* plan) {
  if (batch < 1 || batch > INT32_MAX || m < 1 || n < m) {
    throw std::invalid_argument("muon_ext newton_schulz: need 1 <= batch <= 2^31-1 and "
                                "1 <= m <= n, got batch=" + std::to_string(batch) +
                                " m=" + std::to_string(m) + " n=" + std::to_string(n));
  }
  if (coefficients == nullptr || num_coefficients < 3 || num_coefficients % 3 != 0) {
    throw std::invalid_argument("muon_ext newton_schulz: coefficients must be (a, b, c) triples");
  }
  if (buffers.x[0] == nullptr || buffers.x[1] == nullptr || buffers.gram == nullptr ||
      buffers.poly == nullptr) {
    throw std::invalid_argument("muon_ext newton_schulz: null workspace buffer");
  }
  if (blas.lt == nullptr && blas.legacy == nullptr) {
    throw std::invalid_argument("muon_ext newton_schulz: no cuBLASLt or cuBLAS handle");
  }

  const IterationShapes shapes = iteration_shapes(batch, m, n, buffers.type);
  const GemmShape& gram_shape = shapes.gram;
  const GemmShape& poly_shape = shapes.poly;
  const GemmShape& update_shape = shapes.update;
  const NsGemmPlan gemms = plan != nullptr ? *plan : plan_newton_schulz(batch, m, n, buffers, blas);
  const LtGemm* gram_gemm = gemms.gram.get();
  const LtGemm* poly_gemm = gemms.poly.get();
  const LtGemm* update_gemm = gemms.update.get();
  auto gemm = [&](const LtGemm* lt, const GemmShape& s, const void* A, const void* B,
                  const void* C, void* D, float alpha, float beta) {
    run_gemm(blas, lt, s, A, B, C, D, alpha, beta, stream);
  };

  int cur = 0;
  for (int64_t it = 0; it < num_coefficients / 3; ++it) {
    const float a = static_cast<float>(coefficients[3 * it + 0]);
    const float b = static_cast<float>(coefficients[3 * it + 1]);
    const float c = static_cast<float>(coefficients[3 * it + 2]);
    void* x = buffers.x[cur];
    void* x_next = buffers.x[1 - cur];
    // A = X Xᵀ
    gemm(gram_gemm, gram_shape, x, x, buffers.gram, buffers.gram, 1.f, 0.f);
    // B = c A A + b A
    gemm(poly_gemm, poly_shape, buffers.gram, buffers.gram, buffers.gram, buffers.poly, c,
         b);
    // X' = B X + a X  (column-major: X_c B_c + a X_c)
    gemm(update_gemm, update_shape, x, buffers.poly, x, x_next, 1.f, a);
    cur = 1 - cur;
  }
  return cur;
}

// NOTE: [Gram on CUDA]
// Gram Newton-Schulz (NOTE: [Newton-Schulz algorithm] in csrc/muon_step_args.h) on the same
// buffers (bf16 or fp16) and GEMM plans as the standard iteration. In row-major terms, per
// (a, b, c):
//   Z  = c R R + b R          the poly GEMM (A = B = C = R, D = Z), as B = cAA + bA
//   Q' = Q Z + a Q            m x m x m; column-major D_c = Z_c Q_c + a Q_c (A = Z, B = Q)
//   T  = R Z + a R            column-major D_c = Z_c R_c + a R_c     (A = Z, B = R, C = R)
//   R  = Z T + a T            column-major D_c = T_c Z_c + a T_c     (A = T, B = Z, C = T)
// (every m x m product Y = P S + a C reads column-major as Y_c = S_c P_c + a C_c: the poly
// shape, NN, ld m), and at the end (and at each restart) X' = Q X, the update GEMM with
// beta 0; R = X Xᵀ is the gram GEMM. The a-terms stay in beta. Q = I is not stored: the first
// product after a (re)start is Q = Z + a I (add_scaled_identity_kernel). R is not updated after
// the last iteration nor before a restart. The iterates are of the workspace type like the
// standard path's: bf16, or fp16, which the published recipe prefers for Gram (8x finer
// rounding). fp16's range (65504) holds them: X, R, Z and T stay O(1) (X is normalized in fp32
// before the cast), and Q's eigenvalue on a singular value s of X is p(s) / s, at most the
// product of the a's since the last (re)start (under 2e4 for eight jordan iterations). Restarts
// (after iteration 2 by default) re-measure R from X, which keeps the negative eigenvalues that
// half-precision rounding gives R of a low-rank X from growing by a² per update.
int gram_newton_schulz_batched(int64_t batch, int64_t m, int64_t n, const double* coefficients,
                               int64_t num_coefficients, const std::vector<int64_t>& restarts,
                               const NsBuffers& buffers, const BlasContext& blas,
                               cudaStream_t stream, const NsGemmPlan* plan) {
  if (batch < 1 || batch > INT32_MAX || m < 1 || n < m) {
    throw std::invalid_argument("muon_ext gram newton_schulz: need 1 <= batch <= 2^31-1 and "
                                "1 <= m <= n, got batch=" + std::to_string(batch) +
                                " m=" + std::to_string(m) + " n=" + std::to_string(n));
  }
  if (coefficients == nullptr || num_coefficients < 3 || num_coefficients % 3 != 0) {
    throw std::invalid_argument("muon_ext newton_schulz: coefficients must be (a, b, c) triples");
  }
  if (buffers.x[0] == nullptr || buffers.x[1] == nullptr || buffers.gram == nullptr ||
      buffers.poly == nullptr || buffers.q[0] == nullptr || buffers.q[1] == nullptr ||
      buffers.t == nullptr) {
    throw std::invalid_argument("muon_ext gram newton_schulz: null workspace buffer");
  }
  if (blas.lt == nullptr && blas.legacy == nullptr) {
    throw std::invalid_argument("muon_ext newton_schulz: no cuBLASLt or cuBLAS handle");
  }
  const IterationShapes shapes = iteration_shapes(batch, m, n, buffers.type);
  const NsGemmPlan gemms = plan != nullptr ? *plan : plan_newton_schulz(batch, m, n, buffers, blas);
  auto square = [&](const void* A, const void* B, const void* C, void* D, float alpha,
                    float beta) {  // column-major D = alpha A B + beta C, all m x m
    run_gemm(blas, gemms.poly.get(), shapes.poly, A, B, C, D, alpha, beta, stream);
  };
  void* r = buffers.gram;
  void* z = buffers.poly;
  void* t = buffers.t;
  void* q = buffers.q[0];
  void* q_next = buffers.q[1];
  int cur = 0;
  auto apply_q = [&] {  // X' = Q X: column-major X'_c = X_c Q_c
    run_gemm(blas, gemms.update.get(), shapes.update, buffers.x[cur], q, buffers.x[1 - cur],
             buffers.x[1 - cur], 1.f, 0.f, stream);
    cur = 1 - cur;
  };
  auto measure_r = [&] {  // R = X Xᵀ
    run_gemm(blas, gemms.gram.get(), shapes.gram, buffers.x[cur], buffers.x[cur], r, r, 1.f, 0.f,
             stream);
  };
  measure_r();
  bool q_is_identity = true;
  const int64_t iterations = num_coefficients / 3;
  for (int64_t it = 0; it < iterations; ++it) {
    const float a = static_cast<float>(coefficients[3 * it + 0]);
    const float b = static_cast<float>(coefficients[3 * it + 1]);
    const float c = static_cast<float>(coefficients[3 * it + 2]);
    square(r, r, r, z, c, b);  // Z = c R R + b R
    if (q_is_identity) {
      launch_add_scaled_identity(buffers.type, q, z, batch, m, a, stream);  // Q = Z + a I
      q_is_identity = false;
    } else {
      square(z, q, q, q_next, 1.f, a);  // Q' = Q Z + a Q
      std::swap(q, q_next);
    }
    const bool last = it + 1 == iterations;
    const bool restart =
        !last && std::find(restarts.begin(), restarts.end(), it + 1) != restarts.end();
    if (restart) {
      apply_q();
      measure_r();
      q_is_identity = true;
    } else if (!last) {
      square(z, r, r, t, 1.f, a);  // T = R Z + a R
      square(t, z, t, r, 1.f, a);  // R = Z T + a T
    }
  }
  if (!q_is_identity) apply_q();
  return cur;
}

}  // namespace cuda
}  // namespace muon_ext
