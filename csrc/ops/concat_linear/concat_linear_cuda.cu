// CUDA kernels of mmfast::concat_linear (contract in concat_linear.h). Every input is one K-segment of the
// GEMM against a column block of weight, accumulated into the output by cuBLAS through ATen, so the
// concatenation never exists. Dropout is one launch over all segments: it writes each segment's dropped copy
// into that segment's own buffer (forward, and again in backward for grad_weight) or scales each segment's
// gradient in place. The mask is regenerated from the seed, which the kernel reads from device memory: no host
// sync and no value-dependent allocation, so forward and backward can be captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/dropout_mask.h"
#include "ops/concat_linear/concat_linear.h"

namespace mmfast {
namespace {

constexpr int kMaxSegments = 8;  // check_concat_linear_inputs allows 1 to 8 inputs
constexpr int kThreads = 256;
constexpr int kColsPerThread = 4;
constexpr int kColsPerTile = kThreads * kColsPerThread;
constexpr int kRowsPerBlock = 4;
constexpr int kBiasCols = 32;  // grad_pre kernel: 32 columns x 32 row lanes per block
constexpr int kBiasRowLanes = 32;
constexpr int kBiasUnroll = 4;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One input's K-segment: src [rows, cols] with any strides; dst contiguous [rows, cols], may alias src when src
// is contiguous. Its columns are col_offset.. of the concatenation; its column tiles are blocks tile_begin..
template <typename scalar_t>
struct Segment {
  const scalar_t* src;
  scalar_t* dst;
  int64_t src_stride0, src_stride1, cols, col_offset, tile_begin;
};

// Passed by value: segments with cols > 0, in order, seg[0].tile_begin == 0.
template <typename scalar_t>
struct SegmentTable {
  Segment<scalar_t> seg[kMaxSegments];
  int count;
};

// dst[r, c] = keep(r, col_offset + c) ? src[r, c] * scale : 0, for every segment.
// blockIdx.x: one tile of kColsPerTile columns of one segment (thread t owns columns t, t + 256, ...);
// blockIdx.y: rows blockIdx.y, blockIdx.y + gridDim.y, ...  Column hashes are computed once per thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    concat_linear_dropout_kernel(const SegmentTable<scalar_t> table, int64_t rows, const int64_t* seed, double p,
                                 at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  // Constant indices only, so that the table is read from parameter space rather than copied to the stack.
  Segment<scalar_t> s = table.seg[0];
#pragma unroll
  for (int i = 1; i < kMaxSegments; ++i) {
    if (i < table.count && static_cast<int64_t>(blockIdx.x) >= table.seg[i].tile_begin) s = table.seg[i];
  }
  const DropoutMask mask(*seed, p);
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) - s.tile_begin) * kColsPerTile + threadIdx.x;
  uint32_t col_h[kColsPerThread];
#pragma unroll
  for (int j = 0; j < kColsPerThread; ++j) col_h[j] = mask.col_hash(s.col_offset + col0 + j * kThreads);

  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const uint32_t row_h = mask.row_hash(r);
    const scalar_t* src = s.src + r * s.src_stride0;
    scalar_t* dst = s.dst + r * s.cols;
    scalar_t v[kColsPerThread];
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t c = col0 + j * kThreads;
      if (c < s.cols) v[j] = src[c * s.src_stride1];
    }
    // Every load of the row before any store: in place, each element is read and written by one thread.
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t c = col0 + j * kThreads;
      if (c < s.cols) {
        dst[c] = mask.keep(row_h, col_h[j]) ? static_cast<scalar_t>(static_cast<opmath_t>(v[j]) * scale)
                                            : static_cast<scalar_t>(opmath_t(0));
      }
    }
  }
}

// grad_pre = relu ? threshold_backward(grad_out, out, 0) : grad_out, written contiguous [rows, cols], and
// grad_bias = column sums of grad_pre, each summed by one block in a fixed order (deterministic).
// Block (kBiasCols, kBiasRowLanes): thread (x, y) owns column blockIdx.x * kBiasCols + x and rows y, y + 32, ...,
// loaded kBiasUnroll rows at a time. grid.x = ceil(cols / kBiasCols). rows may be 0 (then grad_bias = 0).
template <typename scalar_t>
__global__ void __launch_bounds__(kBiasCols * kBiasRowLanes)
    concat_linear_grad_pre_kernel(const scalar_t* __restrict__ grad_out, int64_t g_stride0, int64_t g_stride1,
                                  const scalar_t* __restrict__ out, int64_t o_stride0, int64_t o_stride1, bool relu,
                                  scalar_t* __restrict__ grad_pre, scalar_t* __restrict__ grad_bias, int64_t rows,
                                  int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t partial[kBiasRowLanes][kBiasCols];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBiasCols + threadIdx.x;
  opmath_t acc = 0;
  if (c < cols) {
    for (int64_t r0 = threadIdx.y; r0 < rows; r0 += kBiasRowLanes * kBiasUnroll) {
      opmath_t g[kBiasUnroll];
#pragma unroll
      for (int u = 0; u < kBiasUnroll; ++u) {
        const int64_t r = r0 + u * kBiasRowLanes;
        g[u] = 0;
        if (r < rows) {
          g[u] = static_cast<opmath_t>(grad_out[r * g_stride0 + c * g_stride1]);
          if (relu && static_cast<opmath_t>(out[r * o_stride0 + c * o_stride1]) <= opmath_t(0)) g[u] = 0;
        }
      }
#pragma unroll
      for (int u = 0; u < kBiasUnroll; ++u) {
        const int64_t r = r0 + u * kBiasRowLanes;
        if (r < rows) {
          grad_pre[r * cols + c] = static_cast<scalar_t>(g[u]);
          acc += g[u];
        }
      }
    }
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    opmath_t sum = partial[0][threadIdx.x];
    for (int i = 1; i < kBiasRowLanes; ++i) sum += partial[i][threadIdx.x];
    grad_bias[c] = static_cast<scalar_t>(sum);
  }
}

bool dropout_active(double p, const std::optional<at::Tensor>& seed) { return seed.has_value() && p > 0.0; }

// dsts[i] = dropout(srcs[i]) with the mask of columns [offset_i, offset_i + K_i) of the concatenation, where
// offset_i = sum of the widths before i. dsts[i]: contiguous [N, K_i]; dsts[i] may be srcs[i] if contiguous.
void dropout_segments(at::TensorList srcs, at::TensorList dsts, const at::Tensor& seed, double p) {
  const int64_t rows = srcs[0].size(0);
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, srcs[0].scalar_type(), "concat_linear_dropout_cuda", [&] {
    SegmentTable<scalar_t> table{};
    int64_t col_offset = 0, tiles = 0;
    for (size_t i = 0; i < srcs.size(); ++i) {
      const int64_t cols = srcs[i].size(1);
      if (cols > 0) {
        table.seg[table.count++] = Segment<scalar_t>{srcs[i].const_data_ptr<scalar_t>(),
                                                     dsts[i].mutable_data_ptr<scalar_t>(),
                                                     srcs[i].stride(0),
                                                     srcs[i].stride(1),
                                                     cols,
                                                     col_offset,
                                                     tiles};
        tiles += ceil_div(cols, kColsPerTile);
      }
      col_offset += cols;
    }
    if (tiles == 0) return;
    const dim3 grid(static_cast<unsigned>(tiles),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kRowsPerBlock), 65535)));
    concat_linear_dropout_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        table, rows, seed.const_data_ptr<int64_t>(), p, static_cast<at::opmath_type<scalar_t>>(dropout_scale(p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> dropped_copies(at::TensorList inputs, const at::Tensor& seed, double p) {
  std::vector<at::Tensor> dropped;
  dropped.reserve(inputs.size());
  for (const at::Tensor& x : inputs) dropped.push_back(at::empty({x.size(0), x.size(1)}, x.options()));
  dropout_segments(inputs, dropped, seed, p);
  return dropped;
}

}  // namespace

at::Tensor concat_linear_cuda(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double dropout_p, bool relu, const std::optional<at::Tensor>& seed) {
  check_concat_linear_inputs(inputs, weight, bias, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const int64_t rows = inputs[0].size(0), out_features = weight.size(0);
  if (rows == 0 || out_features == 0) return at::empty({rows, out_features}, weight.options());
  const std::vector<at::Tensor> segments =
      dropout_active(dropout_p, seed) ? dropped_copies(inputs, *seed, dropout_p) : inputs.vec();
  at::Tensor out;
  int64_t offset = 0;
  for (const at::Tensor& x : segments) {
    const int64_t k = x.size(1);
    if (k > 0) {
      const at::Tensor w = weight.narrow(1, offset, k).t();
      if (!out.defined()) {
        out = bias.has_value() ? at::addmm(*bias, x, w) : at::mm(x, w);
      } else {
        out.addmm_(x, w);
      }
    }
    offset += k;
  }
  if (!out.defined()) {  // every input has width 0
    // clone, not contiguous(): with one row the expanded bias is already contiguous and would be aliased.
    out = bias.has_value() ? bias->expand({rows, out_features}).clone(at::MemoryFormat::Contiguous)
                           : at::zeros({rows, out_features}, weight.options());
  }
  if (relu) at::relu_(out);
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_linear_backward_cuda(
    const at::Tensor& grad_out, at::TensorList inputs, const at::Tensor& weight, const at::Tensor& out,
    double dropout_p, bool relu, const std::optional<at::Tensor>& seed) {
  check_concat_linear_inputs(inputs, weight, std::nullopt, dropout_p, seed);
  const int64_t rows = inputs[0].size(0), out_features = weight.size(0), total_k = weight.size(1);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({rows, out_features}),
              "mmfast::_concat_linear_backward: expected grad_out and out of shape [", rows, ", ", out_features,
              "], got ", grad_out.sizes(), " and ", out.sizes());
  // The kernel reads grad_out and out through raw pointers: they must live on the inputs' device, same dtype.
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->device() == inputs[0].device() && t->scalar_type() == inputs[0].scalar_type(),
                "mmfast::_concat_linear_backward: expected grad_out and out on ", inputs[0].device(), " of dtype ",
                inputs[0].scalar_type(), ", got ", t->device(), " and ", t->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto options = weight.options();

  at::Tensor grad_pre = at::empty({rows, out_features}, options);
  at::Tensor grad_bias = at::empty({out_features}, options);
  if (out_features > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "concat_linear_grad_pre_cuda",
                                    [&] {
      const dim3 block(kBiasCols, kBiasRowLanes);
      const dim3 grid(static_cast<unsigned>(ceil_div(out_features, kBiasCols)));
      concat_linear_grad_pre_kernel<scalar_t><<<grid, block, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), grad_out.stride(0), grad_out.stride(1), out.const_data_ptr<scalar_t>(),
          out.stride(0), out.stride(1), relu, grad_pre.mutable_data_ptr<scalar_t>(),
          grad_bias.mutable_data_ptr<scalar_t>(), rows, out_features);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  std::vector<at::Tensor> grad_inputs;
  grad_inputs.reserve(inputs.size());
  if (rows == 0) {
    for (const at::Tensor& x : inputs) grad_inputs.push_back(at::empty({0, x.size(1)}, options));
    return {grad_inputs, at::zeros({out_features, total_k}, options), grad_bias};
  }
  const bool dropout = dropout_active(dropout_p, seed);
  const std::vector<at::Tensor> segments = dropout ? dropped_copies(inputs, *seed, dropout_p) : inputs.vec();
  at::Tensor grad_weight = at::empty({out_features, total_k}, options);
  int64_t offset = 0;
  for (const at::Tensor& x : segments) {
    const int64_t k = x.size(1);
    if (k == 0) {
      grad_inputs.push_back(at::empty({rows, 0}, options));
      continue;
    }
    at::Tensor grad_w_seg = grad_weight.narrow(1, offset, k);  // strided view: cuBLAS writes it in place
    at::mm_out(grad_w_seg, grad_pre.t(), x);
    grad_inputs.push_back(at::mm(grad_pre, weight.narrow(1, offset, k)));
    offset += k;
  }
  if (dropout) dropout_segments(grad_inputs, grad_inputs, *seed, dropout_p);  // in place: * mask * scale
  return {grad_inputs, grad_weight, grad_bias};
}

}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("concat_linear", &mmfast::concat_linear_cuda);
  m.impl("_concat_linear_backward", &mmfast::concat_linear_backward_cuda);
}
