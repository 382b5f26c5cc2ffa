// Input checks shared by every op. Messages read "mmfast::<op>: expected ..., got ...".
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace mmfast {

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " to be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// Same device and dtype as `ref` (the op's main input).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), " (the device of ",
              ref_name, "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

// CPU kernels: float32/float64; CUDA kernels: float32/float16/bfloat16.
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": expected ", name,
                " of dtype float32, float16 or bfloat16 on CUDA, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": expected ", name,
                " of dtype float32 or float64 on CPU, got ", st);
  }
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", t.sizes());
}

}  // namespace mmfast
