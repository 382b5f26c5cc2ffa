// CUDA kernels of mmfast::concat_linear (contract in concat_linear.h). Two paths, chosen from the shapes:
//
// Fused (float32, batch <= 8192, batch x out_features <= 2^16: the sizes where launches and framework overhead
// dominate): the inputs are K-segments of one GEMM and the concatenation never exists.
//   forward:  one split-K GEMM kernel reads every segment and the weight directly, applying the dropout mask as it
//             loads x, and writes float partial sums per K chunk; one epilogue kernel sums the chunks in a fixed
//             order (deterministic) and adds the bias and the ReLU.
//   backward: one kernel for grad_pre (ReLU mask) and grad_bias, then ONE kernel whose blocks compute either a
//             tile of grad_weight (= grad_pre^T @ dropout(x), the mask applied as x is loaded) or a tile of a
//             grad_input (= grad_pre @ weight, the mask applied in the epilogue).
// cuBLAS (float16/bfloat16, which get tensor cores there, and larger float32 problems): every segment's GEMM
// through ATen into the one output (addmm with the bias, then addmm_), after one dropout launch over all
// segments that writes each segment's dropped copy; ReLU in place.
// Either way the mask is regenerated from the seed, which the kernels read from device memory: no host sync and
// no value-dependent allocation, so forward and backward can be captured in a CUDA graph.
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
#include <map>
#include <mutex>
#include <utility>
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

// One input's K-segment: src [rows, cols] with any strides; dst contiguous [rows, cols] (the dropped copy, or the
// grad_input of the fused backward; may alias src when src is contiguous; null where a kernel writes none). Its
// columns are col_offset.. of the concatenation; its blocks along a kernel's segment axis (column tiles, K chunks)
// are first.. up to the next segment's first.
template <typename scalar_t>
struct Segment {
  const scalar_t* src;
  scalar_t* dst;
  int64_t src_stride0, src_stride1, cols, col_offset, first;
};

// Passed by value: segments with cols > 0, in order, seg[0].first == 0.
template <typename scalar_t>
struct SegmentTable {
  Segment<scalar_t> seg[kMaxSegments];
  int count;
};

// The segment that owns block `index` along the segment axis. Constant indices only, so that the table is read
// from parameter space rather than copied to the stack.
template <typename scalar_t>
__device__ __forceinline__ Segment<scalar_t> segment_of(const SegmentTable<scalar_t>& table, int64_t index) {
  Segment<scalar_t> s = table.seg[0];
#pragma unroll
  for (int i = 1; i < kMaxSegments; ++i) {
    if (i < table.count && index >= table.seg[i].first) s = table.seg[i];
  }
  return s;
}

// The table of srcs (dsts: the matching dst of each, or empty for none): every input of nonzero width, its blocks
// ceil(width / block_cols) consecutive ones along the segment axis. Returns the total block count.
template <typename scalar_t>
int64_t segment_table(at::TensorList srcs, at::TensorList dsts, int64_t block_cols, SegmentTable<scalar_t>& table) {
  table = SegmentTable<scalar_t>{};
  int64_t col_offset = 0, blocks = 0;
  for (size_t i = 0; i < srcs.size(); ++i) {
    const int64_t cols = srcs[i].size(1);
    if (cols > 0) {
      table.seg[table.count++] = Segment<scalar_t>{srcs[i].const_data_ptr<scalar_t>(),
                                                   dsts.empty() ? nullptr : dsts[i].mutable_data_ptr<scalar_t>(),
                                                   srcs[i].stride(0),
                                                   srcs[i].stride(1),
                                                   cols,
                                                   col_offset,
                                                   blocks};
      blocks += ceil_div(cols, block_cols);
    }
    col_offset += cols;
  }
  return blocks;
}

// dst[r, c] = keep(r, col_offset + c) ? src[r, c] * scale : 0, for every segment.
// blockIdx.x: one tile of kColsPerTile columns of one segment (thread t owns columns t, t + 256, ...);
// blockIdx.y: rows blockIdx.y, blockIdx.y + gridDim.y, ...  Column hashes are computed once per thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    concat_linear_dropout_kernel(const SegmentTable<scalar_t> table, int64_t rows, const int64_t* seed, double p,
                                 at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Segment<scalar_t> s = segment_of(table, blockIdx.x);
  const DropoutMask mask(*seed, p);
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) - s.first) * kColsPerTile + threadIdx.x;
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

// ---------------------------------------------------------------------------------------------------------------
// Fused path (float32). Every GEMM here is C[p][q] = sum_r A(r, p) * B(r, q) over one 64 x 64 output tile, with r
// the contraction index, staged kStep rows at a time in shared memory as s[r][p]. Each of the 256 threads owns a
// 4x4 block of C: rows p = ty*4.., columns q = tx*4.. (tx = thread % 16, ty = thread / 16).

constexpr int kGemmTile = 64;
constexpr int kGemmStep = 16;
constexpr int kGemmPitch = kGemmTile + 4;  // float4-aligned rows; staggers the banks of the transposed stores
constexpr int kGemmThreads = 256;
constexpr int kMaxSplitK = 64;
constexpr int64_t kFusedMaxRows = 8192;            // beyond: a grad_weight tile's loop over the batch gets long
// Beyond 2^16 outputs cuBLAS's GEMMs win on the GPU: on an H200 at batch 256, [8192, 256] -> 512 took 253 + 237 us
// in these kernels (forward, backward) against 166 + 99 us in cuBLAS's, while [7200, 64] -> 128 took 40 + 60 us
// against 44 + 32 us plus the dropout, grad_pre and ReLU launches this path saves.
constexpr int64_t kFusedMaxOutputs = int64_t{1} << 16;
constexpr int64_t kFusedMaxColumns = int64_t{1} << 24;  // keeps the backward grid and tile indices in range

// Thread -> element (r, p) of a tile load, four elements per thread. kContigR: consecutive threads walk r, for an
// operand stored contiguous along the contraction; else they walk p. Either way global loads coalesce.
template <bool kContigR>
__device__ __forceinline__ void tile_element(int i, int& r, int& p) {
  const int e = threadIdx.x + i * kGemmThreads;
  if (kContigR) {
    p = e / kGemmStep;
    r = e % kGemmStep;
  } else {
    r = e / kGemmTile;
    p = e % kGemmTile;
  }
}

// acc += A^T B over r < len. load_a(r, p) / load_b(r, q) return the operand element, or 0 outside the operand's
// tile columns; tile_gemm never asks for r >= len. The next step's global loads are in flight during this step's
// arithmetic (register prefetch).
template <bool kAContigR, bool kBContigR, typename LoadA, typename LoadB>
__device__ __forceinline__ void tile_gemm(int64_t len, const LoadA& load_a, const LoadB& load_b, float* sa,
                                          float* sb, float (&acc)[4][4]) {
  float va[4], vb[4];
  auto fetch = [&](int64_t r0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int r, p;
      tile_element<kAContigR>(i, r, p);
      va[i] = r0 + r < len ? load_a(r0 + r, p) : 0.f;
      tile_element<kBContigR>(i, r, p);
      vb[i] = r0 + r < len ? load_b(r0 + r, p) : 0.f;
    }
  };
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  fetch(0);
  for (int64_t r0 = 0; r0 < len; r0 += kGemmStep) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int r, p;
      tile_element<kAContigR>(i, r, p);
      sa[r * kGemmPitch + p] = va[i];
      tile_element<kBContigR>(i, r, p);
      sb[r * kGemmPitch + p] = vb[i];
    }
    __syncthreads();
    if (r0 + kGemmStep < len) fetch(r0 + kGemmStep);
#pragma unroll
    for (int r = 0; r < kGemmStep; ++r) {
      const float4 a = *reinterpret_cast<const float4*>(sa + r * kGemmPitch + ty * 4);
      const float4 b = *reinterpret_cast<const float4*>(sb + r * kGemmPitch + tx * 4);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();  // the tiles are consumed before the next step overwrites them
  }
}

// dst[p][q] = acc for this thread's 4x4 block of the tile at (p0, q0), inside [0, p_end) x [0, q_end); row pitch ld.
__device__ __forceinline__ void store_tile(const float (&acc)[4][4], int64_t p0, int64_t q0, int64_t p_end,
                                           int64_t q_end, int64_t ld, float* dst) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t p = p0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t q = q0 + tx * 4 + j;
      if (p < p_end && q < q_end) dst[p * ld + q] = acc[i][j];
    }
  }
}

// Forward, split K. Block (m tile, n tile, chunk z): partial[z][m][n] = sum over the chunk's columns k of
// dropout(x)[m][k] * weight[n][k]. Chunk z is columns [(z - first) * chunk_len, + chunk_len) of its segment.
template <bool kDropout>
__global__ void __launch_bounds__(kGemmThreads)
    concat_linear_fwd_gemm_kernel(const SegmentTable<float> table, const float* __restrict__ weight, int64_t ldw,
                                  int64_t rows, int64_t out_features, int64_t chunk_len, const int64_t* seed, double p,
                                  float scale, float* __restrict__ partial) {
  __shared__ __align__(16) float sa[kGemmStep * kGemmPitch];
  __shared__ __align__(16) float sb[kGemmStep * kGemmPitch];
  __shared__ uint32_t row_hash[kGemmTile];
  const int z = blockIdx.z;
  const Segment<float> s = segment_of(table, z);
  const int64_t k0 = (z - s.first) * chunk_len, len = std::min<int64_t>(chunk_len, s.cols - k0);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kGemmTile, n0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const DropoutMask mask(kDropout ? *seed : 0, p);
  if (kDropout) {
    if (threadIdx.x < kGemmTile) row_hash[threadIdx.x] = mask.row_hash(m0 + threadIdx.x);
    __syncthreads();
  }
  const float* x = s.src + k0 * s.src_stride1;
  const auto load_x = [&](int64_t r, int q) -> float {  // A(r, q) = dropout(x)[m0 + q][k0 + r]
    if (m0 + q >= rows) return 0.f;
    const float v = x[(m0 + q) * s.src_stride0 + r * s.src_stride1];
    if (!kDropout) return v;
    return mask.keep(row_hash[q], mask.col_hash(s.col_offset + k0 + r)) ? v * scale : 0.f;
  };
  const float* w = weight + s.col_offset + k0;
  const auto load_w = [&](int64_t r, int q) -> float {  // B(r, q) = weight[n0 + q][col_offset + k0 + r]
    return n0 + q < out_features ? w[(n0 + q) * ldw + r] : 0.f;
  };
  float acc[4][4] = {};
  tile_gemm<true, true>(len, load_x, load_w, sa, sb, acc);

  store_tile(acc, m0, n0, rows, out_features, out_features, partial + static_cast<int64_t>(z) * rows * out_features);
}

// out = act(bias + sum of the chunks' partials, summed in chunk order: deterministic). out: contiguous [rows, O].
__global__ void __launch_bounds__(kGemmThreads)
    concat_linear_fwd_epilogue_kernel(const float* __restrict__ partial, int chunks, int64_t size, int64_t out_features,
                                      const float* __restrict__ bias, bool relu, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int z = 0; z < chunks; ++z) v += partial[z * size + i];
    if (bias != nullptr) v += bias[i % out_features];
    out[i] = relu && v < 0.f ? 0.f : v;  // NaN passes through, as torch.relu
  }
}

// Backward. Blocks [0, n_tiles * k_tiles): a tile of grad_weight, grad_weight[n][col_offset + k] = sum over rows m
// of grad_pre[m][n] * dropout(x)[m][k]; the rest: a tile of a grad_input, grad_x[m][k] = mask(m, k) * scale *
// sum over n of grad_pre[m][n] * weight[n][col_offset + k]. K tile t of the concatenation belongs to the segment
// whose first <= t; grad_pre: contiguous [rows, out_features]; grad_weight: contiguous [out_features, total_k].
template <bool kDropout>
__global__ void __launch_bounds__(kGemmThreads)
    concat_linear_bwd_gemm_kernel(const SegmentTable<float> table, int k_tiles, int n_tiles,
                                  const float* __restrict__ grad_pre, const float* __restrict__ weight, int64_t ldw,
                                  int64_t rows, int64_t out_features, const int64_t* seed, double p, float scale,
                                  float* __restrict__ grad_weight) {
  __shared__ __align__(16) float sa[kGemmStep * kGemmPitch];
  __shared__ __align__(16) float sb[kGemmStep * kGemmPitch];
  __shared__ uint32_t col_hash[kGemmTile];
  const int64_t weight_blocks = static_cast<int64_t>(n_tiles) * k_tiles;
  const bool weight_role = blockIdx.x < weight_blocks;
  const int64_t b = weight_role ? blockIdx.x : blockIdx.x - weight_blocks;
  const int kt = static_cast<int>(b % k_tiles);
  const int64_t t0 = (b / k_tiles) * kGemmTile;  // first n (grad_weight) or m (grad_input) of the tile
  const Segment<float> s = segment_of(table, kt);
  const int64_t k0 = (kt - s.first) * kGemmTile;
  const DropoutMask mask(kDropout ? *seed : 0, p);
  if (kDropout) {
    if (threadIdx.x < kGemmTile) col_hash[threadIdx.x] = mask.col_hash(s.col_offset + k0 + threadIdx.x);
    __syncthreads();
  }
  const float* w = weight + s.col_offset + k0;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};

  if (weight_role) {
    const auto load_g = [&](int64_t m, int q) -> float {  // A(m, q) = grad_pre[m][t0 + q]
      return t0 + q < out_features ? grad_pre[m * out_features + t0 + q] : 0.f;
    };
    const float* x = s.src + k0 * s.src_stride1;
    const auto load_x = [&](int64_t m, int q) -> float {  // B(m, q) = dropout(x)[m][k0 + q]
      if (k0 + q >= s.cols) return 0.f;
      const float v = x[m * s.src_stride0 + q * s.src_stride1];
      if (!kDropout) return v;
      return mask.keep(mask.row_hash(m), col_hash[q]) ? v * scale : 0.f;
    };
    tile_gemm<false, false>(rows, load_g, load_x, sa, sb, acc);
    store_tile(acc, t0, k0, out_features, s.cols, ldw, grad_weight + s.col_offset);  // ldw = total_k
    return;
  }

  const auto load_g = [&](int64_t n, int q) -> float {  // A(n, q) = grad_pre[t0 + q][n]
    return t0 + q < rows ? grad_pre[(t0 + q) * out_features + n] : 0.f;
  };
  const auto load_w = [&](int64_t n, int q) -> float {  // B(n, q) = weight[n][col_offset + k0 + q]
    return k0 + q < s.cols ? w[n * ldw + q] : 0.f;
  };
  tile_gemm<true, false>(out_features, load_g, load_w, sa, sb, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = t0 + ty * 4 + i;
    if (m >= rows) continue;
    const uint32_t row_h = kDropout ? mask.row_hash(m) : 0u;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx * 4 + j;
      if (k >= s.cols) continue;
      float v = acc[i][j];
      if (kDropout) v = mask.keep(row_h, col_hash[tx * 4 + j]) ? v * scale : 0.f;
      s.dst[m * s.cols + k] = v;
    }
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
    SegmentTable<scalar_t> table;
    const int64_t tiles = segment_table(srcs, dsts, kColsPerTile, table);
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

// The fused kernels' problem sizes (see the file comment).
bool use_fused_gemm(const at::Tensor& weight, int64_t rows) {
  const int64_t out_features = weight.size(0);
  return weight.scalar_type() == at::kFloat && rows > 0 && rows <= kFusedMaxRows && out_features > 0 &&
         rows * out_features <= kFusedMaxOutputs && weight.size(1) <= kFusedMaxColumns;
}

// Blocks of `kernel` (kGemmThreads threads, static shared memory only) resident at once on the current device, i.e.
// one wave. Cached per kernel and device: the query is host-side arithmetic, but it would run on every step.
int64_t resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = cache.find({kernel, dev}); it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemmThreads, 0));
  return cache.emplace(std::make_pair(kernel, dev), int64_t{sms} * std::max(per_sm, 1)).first->second;
}

// The K chunk of the split-K forward: the shortest multiple of kGemmStep, and at least 1/kMaxSplitK of the width,
// whose blocks (tiles x the inputs' chunk counts) fit in one wave of `slots`; whole inputs where even those do not
// fit. One wave and a few blocks more cost two block times: at the seed's head on an H200 (132 SMs, 2 blocks each)
// the earlier split, sized for two blocks per SM without the per-input rounding, made 272 blocks for 264 slots.
int64_t split_chunk_len(at::TensorList inputs, int64_t total_k, int64_t tiles, int64_t slots) {
  const auto blocks = [&](int64_t steps) {  // blocks for a chunk of `steps` kGemmStep rows
    int64_t chunks = 0;
    for (const at::Tensor& x : inputs) chunks += ceil_div(x.size(1), steps * kGemmStep);
    return tiles * chunks;
  };
  const auto steps_for = [](int64_t len) { return ceil_div(std::max<int64_t>(len, 1), kGemmStep); };
  int64_t lo = steps_for(std::max(ceil_div(total_k, kMaxSplitK), ceil_div(total_k * tiles, slots)));
  int64_t hi = steps_for(total_k);  // one chunk per input
  if (lo >= hi || blocks(hi) > slots) return hi * kGemmStep;
  while (lo < hi) {  // blocks() only falls as the chunk grows; blocks(hi) <= slots throughout
    const int64_t mid = (lo + hi) / 2;
    if (blocks(mid) <= slots) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return hi * kGemmStep;
}

at::Tensor fused_forward(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         double dropout_p, bool relu, const std::optional<at::Tensor>& seed) {
  const int64_t rows = inputs[0].size(0), out_features = weight.size(0), total_k = weight.size(1);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({rows, out_features}, weight.options());
  const bool dropout = dropout_active(dropout_p, seed);
  const auto kernel = dropout ? concat_linear_fwd_gemm_kernel<true> : concat_linear_fwd_gemm_kernel<false>;
  // Split K for enough parallelism at small batches, in one wave.
  const int64_t tiles = ceil_div(rows, kGemmTile) * ceil_div(out_features, kGemmTile);
  const int64_t chunk_len =
      split_chunk_len(inputs, total_k, tiles, resident_blocks(reinterpret_cast<const void*>(kernel)));
  SegmentTable<float> table;
  const int64_t chunks = segment_table(inputs, {}, chunk_len, table);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // chunks == 0 (every input has width 0): the epilogue alone writes act(bias).
  at::Tensor partial = at::empty({chunks, rows, out_features}, weight.options());
  if (chunks > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kGemmTile)), static_cast<unsigned>(ceil_div(out_features, kGemmTile)),
                    static_cast<unsigned>(chunks));
    kernel<<<grid, kGemmThreads, 0, stream>>>(table, w.const_data_ptr<float>(), total_k, rows, out_features, chunk_len,
                                              dropout ? seed->const_data_ptr<int64_t>() : nullptr, dropout_p,
                                              static_cast<float>(dropout_scale(dropout_p)),
                                              partial.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t size = rows * out_features;
  concat_linear_fwd_epilogue_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(size, kGemmThreads), 4096)),
                                      kGemmThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), static_cast<int>(chunks), size, out_features, b.defined() ? b.const_data_ptr<float>() : nullptr,
      relu, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grad_pre and grad_bias come from concat_linear_grad_pre_kernel; this writes grad_weight and every grad_input.
std::tuple<std::vector<at::Tensor>, at::Tensor> fused_backward(const at::Tensor& grad_pre, at::TensorList inputs,
                                                               const at::Tensor& weight, double dropout_p,
                                                               const std::optional<at::Tensor>& seed) {
  const int64_t rows = inputs[0].size(0), out_features = weight.size(0), total_k = weight.size(1);
  const at::Tensor w = weight.contiguous();
  at::Tensor grad_weight = at::empty({out_features, total_k}, weight.options());
  std::vector<at::Tensor> grad_inputs;
  grad_inputs.reserve(inputs.size());
  for (const at::Tensor& x : inputs) grad_inputs.push_back(at::empty({rows, x.size(1)}, weight.options()));
  SegmentTable<float> table;
  const int64_t k_tiles = segment_table(inputs, grad_inputs, kGemmTile, table);
  if (k_tiles > 0) {
    const int64_t n_tiles = ceil_div(out_features, kGemmTile), m_tiles = ceil_div(rows, kGemmTile);
    const bool dropout = dropout_active(dropout_p, seed);
    const auto kernel = dropout ? concat_linear_bwd_gemm_kernel<true> : concat_linear_bwd_gemm_kernel<false>;
    kernel<<<static_cast<unsigned>((n_tiles + m_tiles) * k_tiles), kGemmThreads, 0,
             c10::cuda::getCurrentCUDAStream()>>>(table, static_cast<int>(k_tiles), static_cast<int>(n_tiles),
                                                  grad_pre.const_data_ptr<float>(), w.const_data_ptr<float>(), total_k,
                                                  rows, out_features,
                                                  dropout ? seed->const_data_ptr<int64_t>() : nullptr, dropout_p,
                                                  static_cast<float>(dropout_scale(dropout_p)),
                                                  grad_weight.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_inputs, grad_weight};
}

}  // namespace

at::Tensor concat_linear_cuda(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              double dropout_p, bool relu, const std::optional<at::Tensor>& seed) {
  check_concat_linear_inputs(inputs, weight, bias, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const int64_t rows = inputs[0].size(0), out_features = weight.size(0);
  if (rows == 0 || out_features == 0) return at::empty({rows, out_features}, weight.options());
  if (use_fused_gemm(weight, rows)) return fused_forward(inputs, weight, bias, dropout_p, relu, seed);
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
  if (use_fused_gemm(weight, rows)) {
    auto [fused_grad_inputs, grad_weight] = fused_backward(grad_pre, inputs, weight, dropout_p, seed);
    return {fused_grad_inputs, grad_weight, grad_bias};
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
