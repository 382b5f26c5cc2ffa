// CUDA kernels of mmfast::conv2d_relu_maxpool2d (contract in conv2d_relu_maxpool2d.h); float32, float16 and
// bfloat16 in global memory, float in shared memory and registers.
// Forward: a direct convolution; each thread computes the 2x2 conv window of one pooled pixel for 8 output
// channels, the block's input tile (with halo) and weights are staged in shared memory per input-channel chunk,
// and the epilogue pools, adds the bias and applies the ReLU: only out and the uint8 argmax reach global memory.
// Backward: (1) per-block partial weight/bias gradients over a fixed chunk of pooled tiles, written to a float
// workspace, (2) a reduction of the chunks in a fixed order: no atomics, so gradients are bitwise reproducible;
// (3) grad_x in gather form: one thread per input pixel sums weight * grad_out over the pooled windows whose
// argmax conv position reads that pixel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include "ops/conv2d_relu_maxpool2d/conv2d_relu_maxpool2d.h"

// float64 is rejected on CUDA by check_floating, so only the three CUDA dtypes are instantiated.
#define MMFAST_DISPATCH_CONV_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace mmfast {

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              int64_t padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& argmax,
    int64_t padding, bool need_grad_x);

namespace {

constexpr int kThreads = 256;
constexpr int kTile = 8;                  // pooled pixels per tile side (forward and weight gradient)
constexpr int kTilePixels = kTile * kTile;

struct Geometry {
  int n, c, h, w, o, pad;
  int hp, wp;                    // pooled output
  int tiles_w, tiles_per_image;  // kTile x kTile pooled tiles
};

template <typename T>
constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

template <typename F>
void dispatch_kernel_size(int64_t k, const F& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "kernel size ", k, " passed the input checks");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward

constexpr int kFwdChannelsPerThread = 8;                               // output channels per thread
constexpr int kFwdOutTile = kFwdChannelsPerThread * kThreads / 64;     // 4 groups of 8 = 32 channels per block
constexpr int kFwdPitch = 24;  // input tile row pitch: >= 2*kTile + K - 1, and 2*24 = 16 mod 32 banks, so the
                               // two pooled rows a half-warp reads with float2 loads fall in disjoint banks
constexpr int kFwdWPitch = kFwdOutTile + 4;  // weight rows [cc][ky][kx] of 32 channels, padded: the transposing
                                             // stores (4 channels x 8 rows per warp) are conflict-free

template <int K>
constexpr int fwd_chunk() {  // input channels staged per step; keeps shared memory under ~24 KB
  return K <= 3 ? 8 : (K == 5 ? 4 : 2);
}

template <int K>
__device__ __forceinline__ void load_row(const float* p, float (&r)[K + 1]) {
#pragma unroll
  for (int j = 0; j < (K + 1) / 2; ++j) {  // p is 8-byte aligned: even row pitch and even column
    const float2 v = reinterpret_cast<const float2*>(p)[j];
    r[2 * j] = v.x;
    r[2 * j + 1] = v.y;
  }
}

// grid (tiles_per_image * N, ceil(O / 32)), 256 threads. Warp w: channel group w / 2 (8 channels), pooled rows
// 4 * (w % 2) .. +3 of the tile, lane -> (row lane / 8, column lane % 8).
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kThreads, 3)
    conv2d_relu_maxpool2d_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                     uint8_t* __restrict__ argmax, const Geometry g) {
  static_assert(std::is_same_v<at::opmath_type<scalar_t>, float>);
  constexpr int KK = K * K, CC = fwd_chunk<K>(), TIN = 2 * kTile + K - 1, Q = kFwdChannelsPerThread;
  static_assert(TIN <= kFwdPitch);
  __shared__ __align__(16) float xs[CC * TIN * kFwdPitch];   // [cc][row][col] input tile with halo
  __shared__ __align__(16) float ws[CC * KK * kFwdWPitch];   // [cc][ky * K + kx][o]

  const int tile = blockIdx.x % g.tiles_per_image;
  const int64_t n = blockIdx.x / g.tiles_per_image;
  const int py0 = tile / g.tiles_w * kTile, px0 = tile % g.tiles_w * kTile;
  const int iy0 = 2 * py0 - g.pad, ix0 = 2 * px0 - g.pad;  // input coordinates of the tile's (0, 0)
  const int o0 = blockIdx.y * kFwdOutTile;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int group = warp >> 1, pix = (warp & 1) * 32 + (tid & 31), ly = pix >> 3, lx = pix & 7;

  // acc[q][2 * dy + dx]: conv output (2 * py + dy, 2 * px + dx) of channel o0 + group * Q + q.
  float acc[Q][4];
#pragma unroll
  for (int q = 0; q < Q; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.f;

  for (int c0 = 0; c0 < g.c; c0 += CC) {
    const int cn = min(CC, g.c - c0);
    const scalar_t* xc = x + (n * g.c + c0) * g.h * g.w;             // 32-bit offsets from here: fewer
    const scalar_t* wc = weight + (int64_t(o0) * g.c + c0) * KK;     // registers in the unrolled copies
    __syncthreads();  // the previous chunk is consumed
#pragma unroll 2  // more unrolling spills at 3 blocks per SM (80 registers)
    for (int i = tid; i < cn * TIN * TIN; i += kThreads) {
      const int cc = i / (TIN * TIN), r = i / TIN % TIN, s = i % TIN;
      const int iy = iy0 + r, ix = ix0 + s;
      float v = 0.f;
      if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = static_cast<float>(xc[(cc * g.h + iy) * g.w + ix]);
      xs[(cc * TIN + r) * kFwdPitch + s] = v;
    }
    // weight[o0 + o][c0 + cc][kk] -> ws[t = cc * KK + kk][o]. A warp reads 8 consecutive t of 4 channels.
    const int rows = cn * KK;
#pragma unroll 2
    for (int i = tid; i < ceil_div(rows, 8) * 8 * kFwdOutTile; i += kThreads) {
      const int t = i / (8 * kFwdOutTile) * 8 + (i & 7), o = (i >> 3) % kFwdOutTile;
      if (t < rows) ws[t * kFwdWPitch + o] = o0 + o < g.o ? static_cast<float>(wc[o * g.c * KK + t]) : 0.f;
    }
    __syncthreads();

    // A warp whose four pooled rows lie below the image (pooled images smaller than the tile, e.g. 4x4) or whose
    // eight channels lie past O stages its share of the tiles but skips the arithmetic. Warp-uniform: no
    // divergence, and the loop has no barrier.
    const bool idle_warp = py0 + 4 * (warp & 1) >= g.hp || o0 + group * Q >= g.o;
    for (int cc = 0; cc < (idle_warp ? 0 : cn); ++cc) {
      const float* xp = xs + (cc * TIN + 2 * ly) * kFwdPitch + 2 * lx;  // the thread's (K+1)x(K+1) patch
      const float* wp = ws + cc * KK * kFwdWPitch + group * Q;
      float r0[K + 1], r1[K + 1];  // input rows ky and ky + 1 of the patch: conv rows dy = 0 and dy = 1
      load_row<K>(xp, r0);
#pragma unroll
      for (int ky = 0; ky < K; ++ky) {
        load_row<K>(xp + (ky + 1) * kFwdPitch, r1);
#pragma unroll
        for (int kx = 0; kx < K; ++kx) {
          const float4 wa = *reinterpret_cast<const float4*>(wp + (ky * K + kx) * kFwdWPitch);
          const float4 wb = *reinterpret_cast<const float4*>(wp + (ky * K + kx) * kFwdWPitch + 4);
          const float wv[Q] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
          for (int q = 0; q < Q; ++q) {
            acc[q][0] += wv[q] * r0[kx];
            acc[q][1] += wv[q] * r0[kx + 1];
            acc[q][2] += wv[q] * r1[kx];
            acc[q][3] += wv[q] * r1[kx + 1];
          }
        }
#pragma unroll
        for (int j = 0; j <= K; ++j) r0[j] = r1[j];
      }
    }
  }

  const int py = py0 + ly, px = px0 + lx;
  if (py >= g.hp || px >= g.wp) return;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int o = o0 + group * Q + q;
    if (o >= g.o) break;
    // max_pool2d's scan order and comparison: the first of equal maxima, a NaN wins.
    float best = acc[q][0];
    uint8_t idx = 0;
#pragma unroll
    for (int d = 1; d < 4; ++d) {
      if (acc[q][d] > best || isnan(acc[q][d])) best = acc[q][d], idx = d;
    }
    const float v = best + (bias != nullptr ? static_cast<float>(bias[o]) : 0.f);
    const bool dropped = v <= 0.f;  // ReLU output 0: no gradient
    const int64_t at = ((n * g.o + o) * g.hp + py) * g.wp + px;
    out[at] = static_cast<scalar_t>(dropped ? 0.f : v);
    argmax[at] = dropped ? kArgmaxDropped : idx;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight and bias gradients

// Input channels TC x output channels TO per block; each (o, c) slot owns grad_weight[o, c, :, :] for its
// pixel lane; PL lanes split a tile's 64 pooled pixels and are summed in lane order at the end.
template <int TC>
struct WgradTile {
  static constexpr int kTO = TC == 16 ? 16 : 32;
  static constexpr int kSlots = kTO * TC;
  static constexpr int kLanes = kThreads / kSlots;
  static constexpr int kBlock = kSlots * kLanes;  // 192 for TC = 3, else 256
};

constexpr int64_t kWgradTargetBlocks = 512;  // chunks are sized from shapes only: same sums on every device

// grid (chunks, ceil(C / TC), ceil(O / TO)). partials [chunks, O * C * K * K + O] (float): row `chunk` holds the
// block's sums over tiles [chunk * tiles_per_chunk, +tiles_per_chunk) of all (n, tile) pairs, weights then bias.
template <typename scalar_t, int K, int TC>
__global__ void __launch_bounds__(kThreads, K == 7 ? 2 : (K == 5 ? 3 : 4))
    conv2d_relu_maxpool2d_wgrad_kernel(const scalar_t* __restrict__ grad_out, const uint8_t* __restrict__ argmax,
                                       const scalar_t* __restrict__ x, float* __restrict__ partials,
                                       const Geometry g, const int tiles_per_chunk, const int64_t row_len) {
  using T = WgradTile<TC>;
  constexpr int KK = K * K, TO = T::kTO, PL = T::kLanes, TIN = 2 * kTile + K - 1;
  constexpr int PLANE = TIN * TIN + 1;  // odd: the 16 channels a warp reads at one offset hit 16 banks
  constexpr int GP = TO + 1;
  __shared__ float xs[TC * PLANE];                 // [c][row][col] input tile with halo
  __shared__ float gs[kTilePixels * GP];           // [pixel][o] grad_out, 0 where dropped
  __shared__ int offs[kTilePixels * GP];           // [pixel][o] xs offset of the argmax conv position
  __shared__ float red[PL > 1 ? T::kSlots * (KK + 1) : 1];

  const int chunk = blockIdx.x, c0 = blockIdx.y * TC, o0 = blockIdx.z * TO;
  const int tid = threadIdx.x, slot = tid % T::kSlots, lane = tid / T::kSlots;
  const int ol = slot / TC, cl = slot % TC;
  const int total_tiles = g.n * g.tiles_per_image;
  const int t_begin = chunk * tiles_per_chunk, t_end = min(total_tiles, t_begin + tiles_per_chunk);

  float acc[KK];
#pragma unroll
  for (int i = 0; i < KK; ++i) acc[i] = 0.f;
  float bacc = 0.f;

  for (int t = t_begin; t < t_end; ++t) {
    const int64_t n = t / g.tiles_per_image;
    const int tile = t % g.tiles_per_image;
    const int py0 = tile / g.tiles_w * kTile, px0 = tile % g.tiles_w * kTile;
    const int iy0 = 2 * py0 - g.pad, ix0 = 2 * px0 - g.pad;
    __syncthreads();  // the previous tile is consumed
    for (int i = tid; i < TC * TIN * TIN; i += T::kBlock) {
      const int cc = i / (TIN * TIN), r = i / TIN % TIN, s = i % TIN;
      const int c = c0 + cc, iy = iy0 + r, ix = ix0 + s;
      float v = 0.f;
      if (c < g.c && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w)
        v = static_cast<float>(x[((n * g.c + c) * g.h + iy) * g.w + ix]);
      xs[cc * PLANE + r * TIN + s] = v;
    }
    for (int i = tid; i < TO * kTilePixels; i += T::kBlock) {
      const int o = i / kTilePixels, p = i % kTilePixels, ly = p >> 3, lx = p & 7;
      const int py = py0 + ly, px = px0 + lx;
      float gv = 0.f;
      int off = 0;
      if (o0 + o < g.o && py < g.hp && px < g.wp) {
        const int64_t at = ((n * g.o + o0 + o) * g.hp + py) * g.wp + px;
        const int a = argmax[at];
        if (a < 4) {  // kArgmaxDropped (or any invalid code): no gradient
          gv = static_cast<float>(grad_out[at]);
          off = (2 * ly + (a >> 1)) * TIN + 2 * lx + (a & 1);
        }
      }
      gs[p * GP + o] = gv;
      offs[p * GP + o] = off;
    }
    __syncthreads();

    // Only the tile's pixels inside the pooled image: tiles of small images (4x4 pooled) are mostly outside, and
    // those pixels add nothing. Row-major order, lanes splitting the columns: the same order as over all 64.
    const float* xc = xs + cl * PLANE;
    const int rows = min(kTile, g.hp - py0), cols = min(kTile, g.wp - px0);
    for (int ly = 0; ly < rows; ++ly) {
      for (int lx = lane; lx < cols; lx += PL) {
        const int p = ly * kTile + lx;
        const float gv = gs[p * GP + ol];
        const float* xp = xc + offs[p * GP + ol];
#pragma unroll
        for (int ky = 0; ky < K; ++ky) {
#pragma unroll
          for (int kx = 0; kx < K; ++kx) acc[ky * K + kx] += gv * xp[ky * TIN + kx];
        }
        bacc += gv;
      }
    }
  }

  if constexpr (PL > 1) {  // lanes 1..PL-1 are added to lane 0 one after the other: a fixed order
    for (int l = 1; l < PL; ++l) {
      __syncthreads();
      if (lane == l) {
#pragma unroll
        for (int i = 0; i < KK; ++i) red[slot * (KK + 1) + i] = acc[i];
        red[slot * (KK + 1) + KK] = bacc;
      }
      __syncthreads();
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < KK; ++i) acc[i] += red[slot * (KK + 1) + i];
        bacc += red[slot * (KK + 1) + KK];
      }
    }
  }

  const int o = o0 + ol, c = c0 + cl;
  if (lane != 0 || o >= g.o) return;
  float* row = partials + chunk * row_len;
  if (c < g.c) {
#pragma unroll
    for (int i = 0; i < KK; ++i) row[(int64_t(o) * g.c + c) * KK + i] = acc[i];
  }
  if (blockIdx.y == 0 && cl == 0) row[int64_t(g.o) * g.c * KK + o] = bacc;
}

constexpr int kReduceX = 32, kReduceY = 16;

// grid ceil(row_len / 32), block (32, 16): column i of partials summed over rows, rows r = y (mod 16) first, then
// the 16 sums in y order. Columns [0, n_weight) go to grad_weight, the rest to grad_bias.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceX* kReduceY)
    conv2d_relu_maxpool2d_reduce_kernel(const float* __restrict__ partials, const int rows, const int64_t row_len,
                                        const int64_t n_weight, scalar_t* __restrict__ grad_weight,
                                        scalar_t* __restrict__ grad_bias) {
  __shared__ float part[kReduceY][kReduceX + 1];
  const int64_t i = int64_t(blockIdx.x) * kReduceX + threadIdx.x;
  float s = 0.f;
  if (i < row_len) {
#pragma unroll 4
    for (int r = threadIdx.y; r < rows; r += kReduceY) s += partials[r * row_len + i];
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || i >= row_len) return;
  float total = 0.f;
#pragma unroll
  for (int y = 0; y < kReduceY; ++y) total += part[y][threadIdx.x];
  if (i < n_weight) {
    grad_weight[i] = static_cast<scalar_t>(total);
  } else {
    grad_bias[i - n_weight] = static_cast<scalar_t>(total);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Input gradient

template <int K>
constexpr int xgrad_out_tile() {  // output channels of weights staged per step (<= 32 KB)
  return K == 1 ? 64 : (K == 3 ? 32 : (K == 5 ? 16 : 8));
}

// grid (ceil(H * W / 256) * N, ceil(C / CT)), 256 threads; thread = input pixel (n, h, w) for CT channels.
// Conv position (ho, wo) reads x[h, w] with kernel tap (h - ho + pad, w - wo + pad), so only conv rows
// ho in [h + pad - K + 1, h + pad] (within the pooled region) matter: at most (K + 1) / 2 pooled rows, same for
// columns. Each such pooled window contributes through its argmax position only.
template <typename scalar_t, int K, int CT>
__global__ void __launch_bounds__(kThreads, CT == 16 ? 3 : 4)
    conv2d_relu_maxpool2d_xgrad_kernel(const scalar_t* __restrict__ grad_out, const uint8_t* __restrict__ argmax,
                                       const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x,
                                       const Geometry g, const int blocks_per_image) {
  constexpr int KK = K * K, NW = (K + 1) / 2, OT = xgrad_out_tile<K>();
  constexpr int CTP = CT == 4 ? 4 : CT + 4;  // row pitch of [o][kk][c]: float4 loads of random kk spread over banks
  __shared__ __align__(16) float ws[OT * KK * CTP];

  const int64_t n = blockIdx.x / blocks_per_image;
  const int p = blockIdx.x % blocks_per_image * kThreads + threadIdx.x;
  const int c0 = blockIdx.y * CT;
  const bool valid = p < g.h * g.w;
  const int h = valid ? p / g.w : 0, w = valid ? p % g.w : 0;
  const int ho_lo = max(h + g.pad - K + 1, 0), ho_hi = min(h + g.pad, 2 * g.hp - 1);
  const int wo_lo = max(w + g.pad - K + 1, 0), wo_hi = min(w + g.pad, 2 * g.wp - 1);
  const int py_lo = ho_lo >> 1, px_lo = wo_lo >> 1;
  const int ny = valid && ho_lo <= ho_hi ? (ho_hi >> 1) - py_lo + 1 : 0;  // <= NW
  const int nx = valid && wo_lo <= wo_hi ? (wo_hi >> 1) - px_lo + 1 : 0;
  unsigned windows = 0;  // bit i * NW + j: pooled window (py_lo + i, px_lo + j) exists
#pragma unroll
  for (int i = 0; i < NW; ++i) {
#pragma unroll
    for (int j = 0; j < NW; ++j) windows |= unsigned(i < ny && j < nx) << (i * NW + j);
  }
  const int win0 = py_lo * g.wp + px_lo;
  const int hy = h + g.pad - 2 * py_lo, wx = w + g.pad - 2 * px_lo;  // kernel tap of window (0, 0)'s (0, 0)

  float acc[CT];
#pragma unroll
  for (int c = 0; c < CT; ++c) acc[c] = 0.f;

  for (int o0 = 0; o0 < g.o; o0 += OT) {
    const int on = min(OT, g.o - o0);
    __syncthreads();  // the previous weights are consumed
    for (int i = threadIdx.x; i < on * KK * CT; i += kThreads) {
      const int c = i % CT, kk = i / CT % KK, o = i / (CT * KK);
      float v = 0.f;
      if (c0 + c < g.c) v = static_cast<float>(weight[(int64_t(o0 + o) * g.c + c0 + c) * KK + kk]);
      ws[(o * KK + kk) * CTP + c] = v;
    }
    __syncthreads();

#pragma unroll 1
    for (int o = 0; o < on; ++o) {
      const int64_t plane = (n * g.o + o0 + o) * g.hp * g.wp + win0;
      const float* wo = ws + o * KK * CTP;
#pragma unroll
      for (int i = 0; i < NW; ++i) {
#pragma unroll
        for (int j = 0; j < NW; ++j) {
          if (windows >> (i * NW + j) & 1u) {
            const int64_t at = plane + i * g.wp + j;
            const int a = argmax[at];
            const int ky = hy - 2 * i - (a >> 1), kx = wx - 2 * j - (a & 1);
            if (a < 4 && unsigned(ky) < unsigned(K) && unsigned(kx) < unsigned(K)) {
              const float gv = static_cast<float>(grad_out[at]);
              const float4* wp = reinterpret_cast<const float4*>(wo + (ky * K + kx) * CTP);
#pragma unroll
              for (int c4 = 0; c4 < CT / 4; ++c4) {
                const float4 wv = wp[c4];
                acc[4 * c4] += gv * wv.x;
                acc[4 * c4 + 1] += gv * wv.y;
                acc[4 * c4 + 2] += gv * wv.z;
                acc[4 * c4 + 3] += gv * wv.w;
              }
            }
          }
        }
      }
    }
  }

  if (!valid) return;
#pragma unroll
  for (int c = 0; c < CT; ++c) {
    if (c0 + c < g.c) grad_x[(n * g.c + c0 + c) * g.h * g.w + p] = static_cast<scalar_t>(acc[c]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch plan: grids and workspace sizes from the shapes alone (so the same sums on every device, and
// allocations a CUDA graph can capture).

struct Plan {
  Geometry g;
  int k;
  dim3 fwd_grid;
  int wgrad_channels;  // TC of the weight-gradient kernel
  dim3 wgrad_grid;     // (chunks, C tiles, O tiles)
  int tiles_per_chunk;
  int64_t chunks, n_weight, row_len;  // partials [chunks, row_len]: O * C * K * K weight sums, then O bias sums
  dim3 reduce_grid;
  int xgrad_channels;  // CT of the input-gradient kernel
  int blocks_per_image;
  dim3 xgrad_grid;
};

// Sizes must pass fits_int_indexing() first.
Plan make_plan(int64_t n, int64_t c, int64_t h, int64_t w, int64_t o, int64_t k, int64_t padding) {
  Plan pl;
  Geometry& g = pl.g;
  g.n = int(n), g.c = int(c), g.h = int(h), g.w = int(w), g.o = int(o), g.pad = int(padding);
  g.hp = int((h + 2 * padding - k + 1) / 2), g.wp = int((w + 2 * padding - k + 1) / 2);
  g.tiles_w = ceil_div(g.wp, kTile);
  g.tiles_per_image = ceil_div(g.hp, kTile) * g.tiles_w;
  pl.k = int(k);
  pl.fwd_grid = dim3{unsigned(g.tiles_per_image) * unsigned(g.n), unsigned(ceil_div(g.o, kFwdOutTile))};

  const int tc = c <= 3 ? 3 : (c <= 8 ? 8 : 16);
  const int to = tc == 16 ? WgradTile<16>::kTO : WgradTile<8>::kTO;
  const int64_t c_tiles = std::max<int64_t>(1, ceil_div<int64_t>(c, tc)), o_tiles = ceil_div<int64_t>(o, to);
  const int64_t total_tiles = n * g.tiles_per_image;
  const int64_t want = std::clamp<int64_t>(ceil_div<int64_t>(kWgradTargetBlocks, c_tiles * o_tiles), 1,
                                           std::max<int64_t>(total_tiles, 1));
  const int64_t tiles_per_chunk = ceil_div<int64_t>(std::max<int64_t>(total_tiles, 1), want);
  pl.wgrad_channels = tc;
  pl.tiles_per_chunk = int(tiles_per_chunk);
  pl.chunks = ceil_div(total_tiles, tiles_per_chunk);
  pl.wgrad_grid = dim3{unsigned(pl.chunks), unsigned(c_tiles), unsigned(o_tiles)};
  pl.n_weight = o * c * k * k;
  pl.row_len = pl.n_weight + o;
  pl.reduce_grid = dim3{unsigned(ceil_div<int64_t>(pl.row_len, kReduceX))};

  pl.xgrad_channels = c <= 4 ? 4 : (c <= 8 ? 8 : 16);
  pl.blocks_per_image = int(ceil_div<int64_t>(h * w, kThreads));
  pl.xgrad_grid =
      dim3{unsigned(pl.blocks_per_image) * unsigned(g.n), unsigned(ceil_div<int64_t>(c, pl.xgrad_channels))};
  return pl;
}

// 32-bit indexing within an image and within the weight, and grid dimensions in range.
bool fits_int_indexing(int64_t n, int64_t c, int64_t h, int64_t w, int64_t o, int64_t k, int64_t padding) {
  const int64_t hp = (h + 2 * padding - k + 1) / 2, wp = (w + 2 * padding - k + 1) / 2;
  const int64_t tiles = ceil_div<int64_t>(hp, kTile) * ceil_div<int64_t>(wp, kTile);
  return c * h * w <= INT_MAX && h * w <= INT_MAX && o * c * k * k + o <= INT_MAX && n * tiles <= INT_MAX &&
         n * ceil_div<int64_t>(h * w, kThreads) <= INT_MAX && ceil_div<int64_t>(o, 16) <= 65535 &&
         ceil_div<int64_t>(c, 3) <= 65535;
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-facing host code

Plan plan_for(const at::Tensor& x, const at::Tensor& weight, int64_t padding) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), o = weight.size(0), k = weight.size(2);
  TORCH_CHECK(fits_int_indexing(n, c, h, w, o, k, padding), "mmfast::conv2d_relu_maxpool2d: the CUDA kernels ",
              "index an image, the weight and the grid with 32-bit integers; x of shape ", x.sizes(),
              " and weight of shape ", weight.sizes(), " are too large");
  return make_plan(n, c, h, w, o, k, padding);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              int64_t padding) {
  check_conv2d_relu_maxpool2d_inputs(x, weight, bias, padding);
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan pl = plan_for(x, weight, padding);
  const Geometry& g = pl.g;
  at::Tensor out = at::empty({g.n, g.o, g.hp, g.wp}, x.options());
  at::Tensor argmax = at::empty({g.n, g.o, g.hp, g.wp}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  const at::Tensor b_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MMFAST_DISPATCH_CONV_TYPES(x.scalar_type(), "conv2d_relu_maxpool2d_cuda", [&] {
    dispatch_kernel_size(pl.k, [&](auto kc) {
      conv2d_relu_maxpool2d_fwd_kernel<scalar_t, decltype(kc)::value><<<pl.fwd_grid, kThreads, 0, stream>>>(
          x_c.const_data_ptr<scalar_t>(), w_c.const_data_ptr<scalar_t>(),
          b_c.defined() ? b_c.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
          argmax.mutable_data_ptr<uint8_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& argmax,
    int64_t padding, bool need_grad_x) {
  check_conv2d_relu_maxpool2d_backward_inputs(grad_out, x, weight, argmax, padding);
  const c10::cuda::CUDAGuard guard(x.device());
  const Plan pl = plan_for(x, weight, padding);
  const Geometry& g = pl.g;

  at::Tensor grad_x = need_grad_x ? at::empty({g.n, g.c, g.h, g.w}, x.options()) : at::empty({0}, x.options());
  if (g.n == 0) {
    return {grad_x, at::zeros(weight.sizes(), weight.options()), at::zeros({g.o}, weight.options())};
  }
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor grad_bias = at::empty({g.o}, weight.options());
  const at::Tensor go_c = grad_out.contiguous(), x_c = x.contiguous(), w_c = weight.contiguous();
  const at::Tensor am_c = argmax.contiguous();
  // Every (o, c) entry of every row is written by its block and every bias entry by a C-tile-0 block: no zeroing.
  at::Tensor partials = at::empty({pl.chunks, pl.row_len}, x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  MMFAST_DISPATCH_CONV_TYPES(x.scalar_type(), "conv2d_relu_maxpool2d_backward_cuda", [&] {
    const scalar_t* go_p = go_c.const_data_ptr<scalar_t>();
    const uint8_t* am_p = am_c.const_data_ptr<uint8_t>();
    dispatch_kernel_size(pl.k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      auto launch_wgrad = [&](auto tcc) {
        constexpr int TC = decltype(tcc)::value;
        conv2d_relu_maxpool2d_wgrad_kernel<scalar_t, K, TC><<<pl.wgrad_grid, WgradTile<TC>::kBlock, 0, stream>>>(
            go_p, am_p, x_c.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<float>(), g, pl.tiles_per_chunk,
            pl.row_len);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (pl.wgrad_channels == 3) {
        launch_wgrad(std::integral_constant<int, 3>{});
      } else if (pl.wgrad_channels == 8) {
        launch_wgrad(std::integral_constant<int, 8>{});
      } else {
        launch_wgrad(std::integral_constant<int, 16>{});
      }
      if (!need_grad_x || g.c == 0) return;
      auto launch_xgrad = [&](auto ctc) {
        constexpr int CT = decltype(ctc)::value;
        conv2d_relu_maxpool2d_xgrad_kernel<scalar_t, K, CT><<<pl.xgrad_grid, kThreads, 0, stream>>>(
            go_p, am_p, w_c.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), g, pl.blocks_per_image);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (pl.xgrad_channels == 4) {
        launch_xgrad(std::integral_constant<int, 4>{});
      } else if (pl.xgrad_channels == 8) {
        launch_xgrad(std::integral_constant<int, 8>{});
      } else {
        launch_xgrad(std::integral_constant<int, 16>{});
      }
    });
    conv2d_relu_maxpool2d_reduce_kernel<scalar_t><<<pl.reduce_grid, dim3(kReduceX, kReduceY), 0, stream>>>(
        partials.const_data_ptr<float>(), int(pl.chunks), pl.row_len, pl.n_weight,
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("conv2d_relu_maxpool2d", &mmfast::conv2d_relu_maxpool2d_cuda);
  m.impl("_conv2d_relu_maxpool2d_backward", &mmfast::conv2d_relu_maxpool2d_backward_cuda);
}
