// CPU kernels of mmfast::concat_linear: every input is one K-segment of the GEMM against a column block
// of weight, accumulated into the same output, so the concatenation never exists. Dropout is applied
// while copying a segment (forward) or to its gradient (backward), with the mask regenerated from the seed.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/dropout_mask.h"
#include "ops/concat_linear/concat_linear.h"

namespace mmfast {
namespace {

// One row of dropout: dst[k] = keep(row, col_hash[k]) ? src[k] * scale : 0. Cloned for AVX2, where the
// hash's 32-bit multiplies vectorise (x86-64's baseline SSE2 has no packed 32-bit multiply); the loader
// picks the clone at run time.
// Branch-free (multiply by 0 or scale, so NaN/inf propagate as in F.dropout); element k reads only src[k]
// and writes only dst[k], so the loop is safe to vectorise even in place (ivdep).
template <typename scalar_t>
inline void dropout_row_impl(const scalar_t* src, scalar_t* dst, const uint32_t* col_hash, int64_t cols,
                             uint32_t row_h, const DropoutMask mask, scalar_t scale) {
#pragma GCC ivdep
  for (int64_t k = 0; k < cols; ++k) {
    const scalar_t factor = mask.keep(row_h, col_hash[k]) ? scale : scalar_t(0);
    dst[k] = src[k] * factor;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MMFAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MMFAST_CPU_CLONES
#endif

MMFAST_CPU_CLONES void dropout_row(const float* src, float* dst, const uint32_t* col_hash, int64_t cols,
                                   uint32_t row_h, const DropoutMask& mask, float scale) {
  dropout_row_impl(src, dst, col_hash, cols, row_h, mask, scale);
}

MMFAST_CPU_CLONES void dropout_row(const double* src, double* dst, const uint32_t* col_hash, int64_t cols,
                                   uint32_t row_h, const DropoutMask& mask, double scale) {
  dropout_row_impl(src, dst, col_hash, cols, row_h, mask, scale);
}

// dst[n, k] = keep(n, col_offset + k) ? src[n, k] * scale : 0, for contiguous [N, K] src and dst (may alias).
template <typename scalar_t>
void dropout_segment(const scalar_t* src, scalar_t* dst, int64_t rows, int64_t cols, int64_t col_offset,
                     const DropoutMask& mask, scalar_t scale) {
  std::vector<uint32_t> col_hash(cols);
  for (int64_t k = 0; k < cols; ++k) col_hash[k] = mask.col_hash(col_offset + k);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      dropout_row(src + n * cols, dst + n * cols, col_hash.data(), cols, mask.row_hash(n), mask, scale);
    }
  });
}

// Applies the dropout of segment [col_offset, col_offset + K) to x, into a new tensor or in place.
at::Tensor apply_dropout(const at::Tensor& x, int64_t col_offset, const DropoutMask& mask, double p, bool in_place) {
  const at::Tensor src = x.contiguous();
  at::Tensor dst = in_place && src.is_same(x) ? x : at::empty_like(src);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "concat_linear_dropout_cpu", [&] {
    dropout_segment<scalar_t>(src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), src.size(0),
                              src.size(1), col_offset, mask, static_cast<scalar_t>(dropout_scale(p)));
  });
  return dst;
}

std::optional<DropoutMask> make_mask(double p, const std::optional<at::Tensor>& seed) {
  if (!seed.has_value() || p <= 0.0) return std::nullopt;
  return DropoutMask(seed->item<int64_t>(), p);
}

}  // namespace

at::Tensor concat_linear_cpu(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             double dropout_p, bool relu, const std::optional<at::Tensor>& seed) {
  check_concat_linear_inputs(inputs, weight, bias, dropout_p, seed);
  const auto mask = make_mask(dropout_p, seed);
  const int64_t rows = inputs[0].size(0);
  // clone, not contiguous(): with one row the expanded bias is already contiguous and would be aliased.
  at::Tensor out = bias.has_value() ? bias->expand({rows, weight.size(0)}).clone(at::MemoryFormat::Contiguous)
                                    : at::zeros({rows, weight.size(0)}, weight.options());
  int64_t offset = 0;
  for (const at::Tensor& x : inputs) {
    const int64_t k = x.size(1);
    if (k > 0) {
      const at::Tensor xs = mask ? apply_dropout(x, offset, *mask, dropout_p, /*in_place=*/false) : x;
      out.addmm_(xs, weight.narrow(1, offset, k).t());
    }
    offset += k;
  }
  if (relu) out.clamp_min_(0);
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_linear_backward_cpu(
    const at::Tensor& grad_out, at::TensorList inputs, const at::Tensor& weight, const at::Tensor& out,
    double dropout_p, bool relu, const std::optional<at::Tensor>& seed) {
  check_concat_linear_inputs(inputs, weight, std::nullopt, dropout_p, seed);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({inputs[0].size(0), weight.size(0)}),
              "mmfast::_concat_linear_backward: expected grad_out and out of shape [", inputs[0].size(0), ", ",
              weight.size(0), "], got ", grad_out.sizes(), " and ", out.sizes());
  const auto mask = make_mask(dropout_p, seed);
  // d(relu)/d(pre) is 1 where out > 0, as native relu's backward (threshold_backward) defines it.
  const at::Tensor grad_pre = relu ? at::threshold_backward(grad_out, out, 0) : grad_out;
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> grad_inputs;
  grad_inputs.reserve(inputs.size());
  int64_t offset = 0;
  for (const at::Tensor& x : inputs) {
    const int64_t k = x.size(1);
    at::Tensor grad_w_seg = grad_weight.narrow(1, offset, k);
    if (k == 0) {
      grad_inputs.push_back(at::zeros({x.size(0), 0}, x.options()));
      continue;
    }
    const at::Tensor xs = mask ? apply_dropout(x, offset, *mask, dropout_p, /*in_place=*/false) : x;
    at::mm_out(grad_w_seg, grad_pre.t(), xs);
    at::Tensor grad_x = at::mm(grad_pre, weight.narrow(1, offset, k));
    if (mask) grad_x = apply_dropout(grad_x, offset, *mask, dropout_p, /*in_place=*/true);
    grad_inputs.push_back(grad_x);
    offset += k;
  }
  return {grad_inputs, grad_weight, grad_pre.sum(0)};
}

}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("concat_linear", &mmfast::concat_linear_cpu);
  m.impl("_concat_linear_backward", &mmfast::concat_linear_backward_cpu);
}
