// Stand-ins for the CUDA runtime, cuBLAS and cuBLASLt entry points that muon_ext's kernels and
// their test call, for the host emulation (see NOTE: [Why a host emulation] in emulation.h).
//
// "Device" memory is host memory. The GEMMs implement the documented column-major semantics
// D = alpha op(A) op(B) + beta C (C not read when beta == 0) on bf16 or fp16 storage (all four
// operands of one type, rounded to it on store) with fp32 accumulation, and they check what
// real cuBLAS(Lt) requires or leaves undefined, failing with
// CUBLAS_STATUS_INVALID_VALUE instead of computing garbage: consistent layout dimensions,
// ld >= rows, equal batch counts, promised operand alignments actually met by every batch,
// outputs that do not overlap inputs (C == D exactly is allowed for cuBLASLt; legacy cuBLAS
// writes C in place and C must not overlap A or B), host pointer mode, and (legacy) that the
// caller disallowed reduced-precision split-K reductions.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

int g_handle_storage[4];
cudaStream_t g_legacy_stream = nullptr;
cublasMath_t g_math_mode = CUBLAS_DEFAULT_MATH;
cublasPointerMode_t g_pointer_mode = CUBLAS_POINTER_MODE_HOST;

// Field slots inside cuBLASLt's semi-opaque descriptor structs (uint64_t data[...]).
enum LayoutField { kType, kRows, kCols, kLd, kBatch, kStride };
enum DescField { kTransA, kTransB, kCompute, kScale };
enum PrefField { kWorkspace, kReductionMask, kAlignA, kAlignB, kAlignC, kAlignD };
constexpr uint64_t kAlgoMagic = 0x6d756f6e5f656d75ull;  // "muon_emu"

int64_t signed_field(uint64_t v) { return static_cast<int64_t>(v); }

// The 16-bit storage types a GEMM may take (all four operands the same).
bool supported_type(uint64_t type) { return type == CUDA_R_16BF || type == CUDA_R_16F; }

// Every supported type is 2 bytes.
constexpr size_t kElementBytes = 2;

struct Operand {
  const void* p;
  int64_t rows;  // as stored (column-major)
  int64_t cols;
  int64_t ld;
  int64_t stride;
  cudaDataType type;

  // Element at offset `i` (elements) from p, widened to fp32.
  float at(int64_t i) const {
    return type == CUDA_R_16F ? __half2float(static_cast<const __half*>(p)[i])
                              : __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  const void* batch_ptr(int64_t n) const {
    return static_cast<const char*>(p) + static_cast<size_t>(n * stride) * kElementBytes;
  }
};

// Rounds v to `type` (round to nearest even) into d[i].
void store(void* d, cudaDataType type, int64_t i, float v) {
  if (type == CUDA_R_16F) {
    static_cast<__half*>(d)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(d)[i] = __float2bfloat16_rn(v);
  }
}

bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a);
  const auto y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

size_t extent_bytes(const Operand& o, int64_t batch) {
  // Last element of the last batch, plus one.
  return static_cast<size_t>((batch - 1) * o.stride + (o.cols - 1) * o.ld + o.rows) *
         kElementBytes;
}

// D(b) = alpha op(A(b)) op(B(b)) + beta C(b), column-major, fp32 accumulation, one rounding.
void gemm_cpu(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
              const Operand& A, const Operand& B, float beta, const Operand& C, void* D,
              int64_t ld_d, int64_t stride_d, int64_t batch) {
  std::vector<float> a(static_cast<size_t>(M * K)), b(static_cast<size_t>(N * K)),
      out(static_cast<size_t>(M * N));
  for (int64_t n = 0; n < batch; ++n) {
    const int64_t oa = n * A.stride;
    const int64_t ob = n * B.stride;
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        // op(A)(i, k): A(i, k) at i + k*lda, or A(k, i) at k + i*lda when transposed.
        a[static_cast<size_t>(i * K + k)] = A.at(oa + (trans_a ? k + i * A.ld : i + k * A.ld));
      }
    }
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t k = 0; k < K; ++k) {
        // op(B)(k, j): B(k, j) at k + j*ldb, or B(j, k) at j + k*ldb when transposed.
        b[static_cast<size_t>(j * K + k)] = B.at(ob + (trans_b ? j + k * B.ld : k + j * B.ld));
      }
    }
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t i = 0; i < M; ++i) {
        float acc = 0.f;
        const float* ra = a.data() + i * K;
        const float* rb = b.data() + j * K;
        for (int64_t k = 0; k < K; ++k) acc += ra[k] * rb[k];
        float v = alpha * acc;
        if (beta != 0.f) v += beta * C.at(n * C.stride + i + j * C.ld);
        out[static_cast<size_t>(i + j * M)] = v;
      }
    }
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t i = 0; i < M; ++i) {
        store(D, C.type, n * stride_d + i + j * ld_d, out[static_cast<size_t>(i + j * M)]);
      }
    }
  }
}

bool fail(const char* why) {
  std::fprintf(stderr, "[fake cuBLAS] rejected: %s\n", why);
  return false;
}

}  // namespace

extern "C" {

// ---------------------------------- CUDA runtime ----------------------------------
cudaError_t cudaMalloc(void** ptr, size_t size) {
  const size_t rounded = (std::max<size_t>(size, 1) + 255) / 256 * 256;
  *ptr = std::aligned_alloc(256, rounded);
  return *ptr != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t) {
  if (kind != cudaMemcpyDeviceToDevice && kind != cudaMemcpyDefault) {
    return cudaErrorInvalidMemcpyDirection;
  }
  if (overlaps(dst, count, src, count)) return cudaErrorInvalidValue;
  std::memcpy(dst, src, count);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  *stream = reinterpret_cast<cudaStream_t>(&g_handle_storage[0]);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int) {
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "host emulation (no GPU)");
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : "cudaError";
}
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "error"; }

// ---------------------------------- cuBLAS ----------------------------------
cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = reinterpret_cast<cublasHandle_t>(&g_handle_storage[1]);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasGetStream_v2(cublasHandle_t, cudaStream_t* stream) {
  *stream = g_legacy_stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t, cudaStream_t stream) {
  g_legacy_stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetMathMode(cublasHandle_t, cublasMath_t* mode) {
  *mode = g_math_mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t mode) {
  g_math_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t, cublasPointerMode_t* mode) {
  *mode = g_pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t, cublasPointerMode_t mode) {
  g_pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}
const char* cublasGetStatusName(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE";
}
const char* cublasGetStatusString(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "success" : "rejected by the host emulation (see stderr)";
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k,
                                          const void* alpha, const void* A, cudaDataType Atype,
                                          int lda, long long int strideA, const void* B,
                                          cudaDataType Btype, int ldb, long long int strideB,
                                          const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t) {
  const bool ta = transa != CUBLAS_OP_N;
  const bool tb = transb != CUBLAS_OP_N;
  const Operand a{A, ta ? k : m, ta ? m : k, lda, strideA, Atype};
  const Operand b{B, tb ? n : k, tb ? k : n, ldb, strideB, Btype};
  const Operand c{C, m, n, ldc, strideC, Ctype};
  bool ok = true;
  if (!supported_type(Atype) || Btype != Atype || Ctype != Atype) ok = fail("types");
  if (computeType != CUBLAS_COMPUTE_32F) ok = fail("compute type");
  if (g_pointer_mode != CUBLAS_POINTER_MODE_HOST) ok = fail("pointer mode");
  if ((g_math_mode & CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) == 0) {
    ok = fail("reduced-precision reductions not disallowed");
  }
  if (lda < a.rows || ldb < b.rows || ldc < c.rows) ok = fail("ld < rows");
  if (overlaps(C, extent_bytes(c, batchCount), A, extent_bytes(a, batchCount)) ||
      overlaps(C, extent_bytes(c, batchCount), B, extent_bytes(b, batchCount))) {
    ok = fail("legacy GEMM output C overlaps input A or B");
  }
  if (!ok) return CUBLAS_STATUS_INVALID_VALUE;
  gemm_cpu(ta, tb, m, n, k, *static_cast<const float*>(alpha), a, b,
           *static_cast<const float*>(beta), c, C, ldc, strideC, batchCount);
  return CUBLAS_STATUS_SUCCESS;
}

// ---------------------------------- cuBLASLt ----------------------------------
cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
  *handle = reinterpret_cast<cublasLtHandle_t>(&g_handle_storage[2]);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t) { return CUBLAS_STATUS_SUCCESS; }

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
  auto* l = new cublasLtMatrixLayoutOpaque_t{};
  l->data[kType] = static_cast<uint64_t>(type);
  l->data[kRows] = rows;
  l->data[kCols] = cols;
  l->data[kLd] = static_cast<uint64_t>(ld);
  l->data[kBatch] = 1;
  l->data[kStride] = 0;
  *layout = l;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete layout;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout,
                                                cublasLtMatrixLayoutAttribute_t attr,
                                                const void* buf, size_t size) {
  if (attr == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT && size == sizeof(int32_t)) {
    int32_t v;
    std::memcpy(&v, buf, sizeof(v));
    layout->data[kBatch] = static_cast<uint64_t>(v);
    return CUBLAS_STATUS_SUCCESS;
  }
  if (attr == CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET && size == sizeof(int64_t)) {
    int64_t v;
    std::memcpy(&v, buf, sizeof(v));
    layout->data[kStride] = static_cast<uint64_t>(v);
    return CUBLAS_STATUS_SUCCESS;
  }
  fail("layout attribute or size");
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
  auto* d = new cublasLtMatmulDescOpaque_t{};
  d->data[kTransA] = CUBLAS_OP_N;
  d->data[kTransB] = CUBLAS_OP_N;
  d->data[kCompute] = static_cast<uint64_t>(compute);
  d->data[kScale] = static_cast<uint64_t>(scale);
  *desc = d;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete desc;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc,
                                              cublasLtMatmulDescAttributes_t attr, const void* buf,
                                              size_t size) {
  if ((attr == CUBLASLT_MATMUL_DESC_TRANSA || attr == CUBLASLT_MATMUL_DESC_TRANSB) &&
      size == sizeof(int32_t)) {
    int32_t v;
    std::memcpy(&v, buf, sizeof(v));
    desc->data[attr == CUBLASLT_MATMUL_DESC_TRANSA ? kTransA : kTransB] = static_cast<uint64_t>(v);
    return CUBLAS_STATUS_SUCCESS;
  }
  fail("matmul desc attribute or size");
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  auto* p = new cublasLtMatmulPreferenceOpaque_t{};
  p->data[kWorkspace] = 0;
  p->data[kReductionMask] = CUBLASLT_REDUCTION_SCHEME_MASK;
  for (int f = kAlignA; f <= kAlignD; ++f) p->data[f] = 256;
  *pref = p;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete pref;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void* buf, size_t size) {
  if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES && size == sizeof(uint64_t)) {
    std::memcpy(&pref->data[kWorkspace], buf, sizeof(uint64_t));
    return CUBLAS_STATUS_SUCCESS;
  }
  uint32_t v = 0;
  if (size != sizeof(uint32_t)) {
    fail("preference attribute size");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  std::memcpy(&v, buf, sizeof(v));
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
      pref->data[kReductionMask] = v;
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
      pref->data[kAlignA] = v;
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
      pref->data[kAlignB] = v;
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
      pref->data[kAlignC] = v;
      return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      pref->data[kAlignD] = v;
      return CUBLAS_STATUS_SUCCESS;
    default:
      fail("preference attribute");
      return CUBLAS_STATUS_INVALID_VALUE;
  }
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t results[],
                                              int* returned) {
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  if ((pref->data[kReductionMask] & (CUBLASLT_REDUCTION_SCHEME_INPLACE |
                                     CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE)) != 0) {
    fail("heuristic allows split-K reductions in the 16-bit output type");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  std::memset(&results[0], 0, sizeof(results[0]));
  // The "algorithm" remembers the alignments it was promised; cublasLtMatmul checks them.
  results[0].algo.data[0] = kAlgoMagic;
  for (int f = kAlignA; f <= kAlignD; ++f) results[0].algo.data[1 + f - kAlignA] = pref->data[f];
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

// An algorithm from the heuristic above fits any batch of the same GEMM (the stand-in has one
// algorithm); anything else is refused as cuBLASLt would.
cublasStatus_t cublasLtMatmulAlgoCheck(cublasLtHandle_t, cublasLtMatmulDesc_t,
                                       cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                       cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                       const cublasLtMatmulAlgo_t* algo,
                                       cublasLtMatmulHeuristicResult_t* result) {
  if (algo == nullptr || result == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (algo->data[0] != kAlgoMagic) return CUBLAS_STATUS_INVALID_VALUE;
  std::memset(result, 0, sizeof(*result));
  result->algo = *algo;
  result->state = CUBLAS_STATUS_SUCCESS;
  result->wavesCount = 1.f;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha,
                              const void* A, cublasLtMatrixLayout_t Adesc, const void* B,
                              cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
                              cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                              const cublasLtMatmulAlgo_t* algo, void*, size_t, cudaStream_t) {
  auto operand = [](const void* p, cublasLtMatrixLayout_t l) {
    return Operand{p, signed_field(l->data[kRows]), signed_field(l->data[kCols]),
                   signed_field(l->data[kLd]), signed_field(l->data[kStride]),
                   static_cast<cudaDataType>(l->data[kType])};
  };
  const Operand a = operand(A, Adesc), b = operand(B, Bdesc), c = operand(C, Cdesc),
                d = operand(D, Ddesc);
  const bool ta = desc->data[kTransA] != CUBLAS_OP_N;
  const bool tb = desc->data[kTransB] != CUBLAS_OP_N;
  const int64_t M = d.rows, N = d.cols;
  const int64_t K = ta ? a.rows : a.cols;
  const int64_t batch = signed_field(Ddesc->data[kBatch]);
  bool ok = true;
  if (algo == nullptr || algo->data[0] != kAlgoMagic) ok = fail("algo not from the heuristic");
  for (cublasLtMatrixLayout_t l : {Adesc, Bdesc, Cdesc, Ddesc}) {
    if (!supported_type(l->data[kType]) || l->data[kType] != Adesc->data[kType]) {
      ok = fail("layout type");
    }
    if (signed_field(l->data[kBatch]) != batch) ok = fail("batch counts differ");
    if (signed_field(l->data[kLd]) < signed_field(l->data[kRows])) ok = fail("ld < rows");
  }
  if (desc->data[kCompute] != CUBLAS_COMPUTE_32F || desc->data[kScale] != CUDA_R_32F) {
    ok = fail("compute/scale type");
  }
  if ((ta ? a.cols : a.rows) != M) ok = fail("op(A) rows != D rows");
  if ((tb ? b.cols : b.rows) != K || (tb ? b.rows : b.cols) != N) ok = fail("op(B) shape");
  if (c.rows != M || c.cols != N || c.ld != d.ld || c.stride != d.stride) {
    ok = fail("C layout differs from D");
  }
  const Operand* ops[4] = {&a, &b, &c, &d};
  for (int i = 0; i < 4 && ok; ++i) {
    const uint64_t align = algo->data[1 + i];
    for (int64_t n = 0; n < batch; ++n) {
      const auto addr = reinterpret_cast<uintptr_t>(ops[i]->batch_ptr(n));
      if (addr % align != 0) {
        ok = fail("an operand batch is less aligned than promised to the heuristic");
        break;
      }
    }
  }
  const size_t d_bytes = extent_bytes(d, batch);
  if (C != D && overlaps(D, d_bytes, C, extent_bytes(c, batch))) ok = fail("C overlaps D");
  if (overlaps(D, d_bytes, A, extent_bytes(a, batch)) ||
      overlaps(D, d_bytes, B, extent_bytes(b, batch))) {
    ok = fail("D overlaps A or B");
  }
  if (!ok) return CUBLAS_STATUS_INVALID_VALUE;
  gemm_cpu(ta, tb, M, N, K, *static_cast<const float*>(alpha), a, b,
           *static_cast<const float*>(beta), c, D, d.ld, d.stride, batch);
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
