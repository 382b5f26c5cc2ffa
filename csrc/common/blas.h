// Row-major GEMM on raw pointers for the CPU kernels' inner loops.
//
// The kernels call many small GEMMs inside at::parallel_for: for the conv block, one per image in forward and
// backward. Wrapping each in ATen tensors (from_blob + at::mm_out) costs microseconds of dispatch and allocation
// per call, so where torch's CPU library exports the Fortran BLAS (sgemm_/dgemm_: MKL in the x86-64 Linux
// wheels, CPU and CUDA builds alike), the helper calls it directly. The symbols are weak: where they are absent,
// or a size exceeds BLAS's 32-bit integers, it falls back to at::mm_out, which reaches the same BLAS. Inside an
// OpenMP parallel region MKL runs single-threaded, as it does under at::mm_out. MMFAST_BLAS=aten (read once)
// forces the fallback: tests compare the two paths.
#pragma once
#include <ATen/Functions.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace mmfast {

inline bool exported_blas_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MMFAST_BLAS");
    return v == nullptr || std::string_view(v) != "aten";
  }();
  return enabled;
}

// Whether gemm calls the exported BLAS (both symbols present, not disabled), else at::mm_out.
inline bool use_exported_blas() { return &sgemm_ != nullptr && &dgemm_ != nullptr && exported_blas_enabled(); }

// "exported" where the kernels call the exported BLAS directly, "aten" where they fall back to at::mm_out.
inline const char* cpu_gemm_backend() { return use_exported_blas() ? "exported" : "aten"; }

// c[m, n] (+)= op(a)[m, k] @ op(b)[k, n], row-major. ta/tb: a/b are stored transposed; lda/ldb are the stored
// rows' strides; c is contiguous. accumulate: add to c instead of overwriting it.
template <typename scalar_t>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda, const scalar_t* b,
          int64_t ldb, scalar_t* c, bool accumulate = false) {
  static_assert(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>);
  if (m == 0 || n == 0) return;
  const bool fits = m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX;
  if (fits && use_exported_blas()) {
    // Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T: b's storage is the first operand.
    const char trans_b = tb ? 'T' : 'N', trans_a = ta ? 'T' : 'N';
    const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
    const int ld_b = static_cast<int>(std::max<int64_t>(ldb, 1)), ld_a = static_cast<int>(std::max<int64_t>(lda, 1));
    const int ldc = static_cast<int>(n);
    const scalar_t alpha = 1, beta = accumulate ? 1 : 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_(&trans_b, &trans_a, &mm, &nn, &kk, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ldc);
    } else {
      dgemm_(&trans_b, &trans_a, &mm, &nn, &kk, &alpha, b, &ld_b, a, &ld_a, &beta, c, &ldc);
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto wrap = [&](const scalar_t* data, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
    const std::array<int64_t, 2> sizes = transposed ? std::array{cols, rows} : std::array{rows, cols};
    const at::Tensor t = at::from_blob(const_cast<scalar_t*>(data), sizes, {ld, 1}, options);
    return transposed ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, options);
  if (accumulate) {
    out.addmm_(wrap(a, m, k, lda, ta), wrap(b, k, n, ldb, tb));
  } else {
    at::mm_out(out, wrap(a, m, k, lda, ta), wrap(b, k, n, ldb, tb));
  }
}

}  // namespace mmfast
