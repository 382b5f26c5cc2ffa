// CUDA kernels of mmfast::lstm (contract in lstm.h).
//
// Forward: gates <- x @ w_ih^T + b_ih + b_hh, one GEMM over all B*T rows written straight into the gates output,
// then ONE cooperative persistent kernel runs the recurrence. Block (bu, bb) owns hidden units
// [bu*U, bu*U + U) (the i, f, g, o rows of w_hh for those units stay in shared memory as float) and batch rows
// [bb*R, bb*R + R), so the cell update of its (unit, row) pairs is local. Each step it stages h_{t-1} for its rows
// from a float exchange buffer hx[2][H][B] (double-buffered: step t reads slot t&1, writes slot (t+1)&1), computes
// its slice of h_{t-1} @ w_hh^T, updates c, h and writes y/gates/cells; one grid sync per step, or only a block
// barrier where one block holds all of w_hh (grid_u == 1: rows are independent, so no block waits for another;
// the layout's cost counts a grid sync as some microseconds and prefers this where it fits). Where one block owns
// every unit of its rows and stages all of K at once (Layout::local), h never leaves the chip: the cell update
// writes h_t straight into the block's staged GEMM operand. Each thread loads the x projections of its (unit, row)
// pairs for step t + 1 before the barrier that ends step t, so their global-memory latency hides behind the
// barrier and the next GEMM instead of sitting on the step's serial path. Backward runs the same way from the last
// step down to 0 with dgates_t @ w_hh (w_hh column slices on chip, dgates exchanged through a float buffer
// [2][4H][B], or kept on chip when local; the gates, cells and grad_y of step t - 1 loaded ahead), then the
// weight gradients are ATen GEMMs over the [B*T, 4H] dgates.
// Lengths stay on the device; every block computes max(lengths) itself and the loop stops there; rows past their
// length keep h, c frozen and get y = 0. Where w_hh does not fit on chip for a co-resident grid, or
// MMFAST_LSTM_CUDA_FALLBACK=1, a host loop over all T steps runs at::addmm + one fused elementwise kernel per step.
//
// Workspace layout (CUDA kernels): gates[b, t] and cells[b, t] hold step t of sequence b (activated i, f, g, o and
// c_t); they are zero at and past the sequence's length. The recurrence state is float for every dtype.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "ops/lstm/lstm.h"

namespace mmfast {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;     // threads per block of every kernel here
constexpr int kRedFloats = 4096;  // partial sums per block: kThreads threads x a 4x4 register tile
constexpr int kMaxPairs = 4;      // (unit, row) pairs per thread, held in registers: layouts keep U*R within
                                  // kMaxPairs * kThreads (the forward's tiling implies it)
// A grid-wide sync between steps, in the layout cost's units (SM cycles). An estimate of a few microseconds: on an
// H200 the forward step of the seed's LSTM (B256 H64) took 3.8 us with a grid sync, and cuDNN's step 1.4 us.
constexpr double kGridSyncCycles = 4000.0;

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

__device__ __forceinline__ int clamp_len(const int64_t* lengths, int b, int T) {
  if (lengths == nullptr) return T;
  const int64_t l = lengths[b];
  return static_cast<int>(l < 0 ? 0 : (l > T ? T : l));  // out-of-range device lengths are clamped
}

// Tiling of a persistent kernel. Each block computes out[r][c] = sum_k act[k][r] * W[k][c] for its R rows and
// C columns (forward: C = 4U gate rows of w_hh, column 4j+g = gate g of unit j, K = H; backward: C = U units,
// K = 4H) with a 4x4 (row x column) register tile per thread; the K rows are split over ks = 256 / tiles
// thread slices (slice s takes k = s, s + ks, ...) and the partial sums are reduced through shared memory.
struct Layout {
  int units = 0;   // U
  int rows = 0;    // R (multiple of 4)
  int chunk = 0;   // reduction rows staged in shared memory at a time
  int grid_u = 0;  // blocks along the units; grid = grid_u * ceil(B / R)
  int grid = 0;
  size_t smem = 0;
  bool local = false;  // grid_u == 1 and chunk == K: the exchanged state stays in the block's shared memory
  bool ok = false;
};

struct Tile {
  int C, K, ks, s, ct, rt;
  __device__ Tile(int U, int R, int H, bool fwd) {
    C = fwd ? 4 * U : U;
    K = fwd ? H : 4 * H;
    const int nct = C / 4, tiles = nct * (R / 4);
    ks = kThreads / tiles;
    s = threadIdx.x / tiles;
    const int q = threadIdx.x % tiles;
    ct = q % nct;
    rt = q / nct;
  }
};

// Shared memory: w [K][C] | act [chunk][R] | red [ks][R][C] | state0 [U*R] | state1 [U*R] | lens [R].
struct Smem {
  float *w, *act, *red, *st0, *st1;
  int* lens;
  __device__ Smem(float* base, int K, int C, int chunk, int U, int R) {
    w = base;
    act = w + K * C;
    red = act + chunk * R;
    st0 = red + kRedFloats;
    st1 = st0 + U * R;
    lens = reinterpret_cast<int*>(st1 + U * R);
  }
};

size_t smem_bytes(int K, int C, int chunk, int U, int R) {
  return sizeof(float) * (static_cast<size_t>(K) * C + static_cast<size_t>(chunk) * R + kRedFloats + 2 * U * R) +
         sizeof(int) * R;
}

// red[s][r][c] <- this thread slice's part of sum_k src[k][b0 + r] * w[k][c]; src is a [K][B] float buffer
// written by other blocks of this grid (read through L2 only), or null when act already holds all K rows (local).
__device__ void block_gemm(const Tile& tl, const Smem& sm, const float* src, int chunk, int R, int b0, int B) {
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  const bool vec = (B % 4) == 0;  // then b0 + 4m < B implies the whole float4 is in range (b0 % 4 == 0)
  for (int kc = 0; kc < tl.K; kc += chunk) {
    const int n = min(chunk, tl.K - kc);
    if (src == nullptr) {
      // local: the cell update of the previous step wrote act, and the step barrier published it
    } else if (vec) {
      const int r4 = R / 4;
      for (int idx = threadIdx.x; idx < n * r4; idx += kThreads) {
        const int kk = idx / r4, m = idx % r4, b = b0 + 4 * m;
        const float4 v = b < B ? __ldcg(reinterpret_cast<const float4*>(src + static_cast<size_t>(kc + kk) * B + b))
                               : make_float4(0.f, 0.f, 0.f, 0.f);
        *reinterpret_cast<float4*>(sm.act + kk * R + 4 * m) = v;
      }
    } else {
      for (int idx = threadIdx.x; idx < n * R; idx += kThreads) {
        const int kk = idx / R, r = idx % R, b = b0 + r;
        sm.act[idx] = b < B ? __ldcg(src + static_cast<size_t>(kc + kk) * B + b) : 0.f;
      }
    }
    if (src != nullptr) __syncthreads();  // a block-uniform condition
    const float* w = sm.w + kc * tl.C + 4 * tl.ct;
    const float* a = sm.act + 4 * tl.rt;
#pragma unroll 4
    for (int kk = tl.s; kk < n; kk += tl.ks) {
      const float4 wv = *reinterpret_cast<const float4*>(w + kk * tl.C);
      const float4 av = *reinterpret_cast<const float4*>(a + kk * R);
      const float ar[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[i][0] = fmaf(ar[i], wv.x, acc[i][0]);
        acc[i][1] = fmaf(ar[i], wv.y, acc[i][1]);
        acc[i][2] = fmaf(ar[i], wv.z, acc[i][2]);
        acc[i][3] = fmaf(ar[i], wv.w, acc[i][3]);
      }
    }
    __syncthreads();  // before the next chunk overwrites act
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    *reinterpret_cast<float4*>(sm.red + (tl.s * R + 4 * tl.rt + i) * tl.C + 4 * tl.ct) =
        make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  __syncthreads();
}

// The barrier between two steps. A block exchanges h (forward) or dgates (backward) with the blocks of the other
// units of its rows; with grid_u == 1 it owns every unit of its rows, rows never mix, and a block barrier does
// (a __syncthreads also makes the block's global writes visible to the block): no grid-wide sync at all.
__device__ __forceinline__ void step_barrier(int grid_u) {
  if (grid_u > 1) {
    cg::this_grid().sync();
  } else {
    __syncthreads();
  }
}

// Per-block lengths of its rows, and max(lengths) over the whole batch (the same value in every block).
__device__ int load_lengths(const int64_t* lengths, int* lens, int R, int b0, int B, int T) {
  __shared__ int max_len;
  if (threadIdx.x == 0) max_len = lengths == nullptr ? T : 0;
  __syncthreads();
  if (lengths != nullptr)
    for (int b = threadIdx.x; b < B; b += kThreads) atomicMax(&max_len, clamp_len(lengths, b, T));
  for (int r = threadIdx.x; r < R; r += kThreads) lens[r] = b0 + r < B ? clamp_len(lengths, b0 + r, T) : 0;
  __syncthreads();
  return max_len;
}

template <typename scalar_t>
struct FwdParams {
  scalar_t* gates;        // [B, T, 4H]: in x @ w_ih^T + b, out activated gates
  scalar_t* y;            // [B, T, H]
  scalar_t* cells;        // [B, T, H]
  scalar_t* h_n;          // [B, H]
  scalar_t* c_n;          // [B, H]
  const scalar_t* h0;     // [B, H] or null
  const scalar_t* c0;     // [B, H] or null
  const scalar_t* w_hh;   // [4H, H]
  const int64_t* lengths; // [B] or null
  float* hx;              // [2][H][B], null when local
  int B, T, H, U, R, chunk, grid_u;
};

// xg[i] <- the x projections (gate pre-activations before h_{t-1} @ w_hh^T) of the thread's pair i at step t,
// for the pairs whose sequence is still running at t.
template <typename scalar_t>
__device__ __forceinline__ void load_x_projections(float (&xg)[kMaxPairs][4], const FwdParams<scalar_t>& p,
                                                   const int* lens, int pairs, int u0, int b0, int t) {
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int q = threadIdx.x + i * kThreads;
    if (q >= pairs) break;
    const int r = q / p.U, b = b0 + r, u = u0 + q % p.U;
    if (b >= p.B || u >= p.H || t >= lens[r]) continue;
    const scalar_t* g = p.gates + (static_cast<size_t>(b) * p.T + t) * 4 * p.H + u;
#pragma unroll
    for (int k = 0; k < 4; ++k) xg[i][k] = static_cast<float>(g[k * p.H]);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) lstm_fwd_persistent_kernel(const FwdParams<scalar_t> p) {
  extern __shared__ float4 smem4[];
  const int B = p.B, T = p.T, H = p.H, U = p.U, R = p.R;
  const int u0 = (blockIdx.x % p.grid_u) * U, b0 = (blockIdx.x / p.grid_u) * R;
  const Tile tl(U, R, H, true);
  const Smem sm(reinterpret_cast<float*>(smem4), tl.K, tl.C, p.chunk, U, R);
  const int pairs = U * R;  // pair q: row q / U, unit q % U; st0 = h, st1 = c
  const bool local = p.hx == nullptr;  // act [H][R] holds h_{t-1} of the block's rows (u0 == 0)

  // w[k][4j+g] = w_hh[g*H + u0 + j][k]. Consecutive threads take consecutive columns (conflict-free stores);
  // each takes 4 consecutive k of its w_hh row.
  for (int idx = threadIdx.x; idx < tl.C * ((H + 3) / 4); idx += kThreads) {
    const int c = idx % tl.C, k0 = 4 * (idx / tl.C), j = c / 4, g = c % 4;
    for (int k = k0; k < min(k0 + 4, H); ++k)
      sm.w[k * tl.C + c] = u0 + j < H ? static_cast<float>(p.w_hh[static_cast<size_t>(g * H + u0 + j) * H + k]) : 0.f;
  }
  const int steps = load_lengths(p.lengths, sm.lens, R, b0, B, T);
  if (local)  // act rows of padding rows (b >= B) stay zero; the pairs below write every other entry
    for (int idx = threadIdx.x; idx < H * R; idx += kThreads)
      if (b0 + idx % R >= B) sm.act[idx] = 0.f;
  for (int q = threadIdx.x; q < pairs; q += kThreads) {
    const int r = q / U, b = b0 + r, u = u0 + q % U;
    float h = 0.f, c = 0.f;
    if (b < B && u < H) {
      if (p.h0) h = static_cast<float>(p.h0[static_cast<size_t>(b) * H + u]);
      if (p.c0) c = static_cast<float>(p.c0[static_cast<size_t>(b) * H + u]);
      if (local) {
        sm.act[u * R + r] = h;
      } else {
        p.hx[static_cast<size_t>(u) * B + b] = h;
      }
      if (sm.lens[r] == 0) {
        p.h_n[static_cast<size_t>(b) * H + u] = static_cast<scalar_t>(h);
        p.c_n[static_cast<size_t>(b) * H + u] = static_cast<scalar_t>(c);
      }
    }
    sm.st0[q] = h;
    sm.st1[q] = c;
  }
  float xg[kMaxPairs][4] = {};
  if (steps > 0) load_x_projections(xg, p, sm.lens, pairs, u0, b0, 0);
  step_barrier(p.grid_u);

  for (int t = 0; t < steps; ++t) {
    block_gemm(tl, sm, local ? nullptr : p.hx + static_cast<size_t>(t & 1) * H * B, p.chunk, R, b0, B);
    float* hx_next = local ? nullptr : p.hx + static_cast<size_t>((t + 1) & 1) * H * B;
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const int q = threadIdx.x + i * kThreads;
      if (q >= pairs) break;
      const int r = q / U, j = q % U, b = b0 + r, u = u0 + j;
      if (b >= B || u >= H) continue;
      const size_t row = static_cast<size_t>(b) * T + t;
      scalar_t* g = p.gates + row * 4 * H;
      if (t < sm.lens[r]) {
        float4 pre = make_float4(xg[i][0], xg[i][1], xg[i][2], xg[i][3]);
        for (int s = 0; s < tl.ks; ++s) {
          const float4 v = *reinterpret_cast<const float4*>(sm.red + (s * R + r) * tl.C + 4 * j);
          pre.x += v.x;
          pre.y += v.y;
          pre.z += v.z;
          pre.w += v.w;
        }
        const float gi = sigmoid_f(pre.x), gf = sigmoid_f(pre.y), gg = tanhf(pre.z), go = sigmoid_f(pre.w);
        const float c = gf * sm.st1[q] + gi * gg;
        const float h = go * tanhf(c);
        g[u] = static_cast<scalar_t>(gi);
        g[H + u] = static_cast<scalar_t>(gf);
        g[2 * H + u] = static_cast<scalar_t>(gg);
        g[3 * H + u] = static_cast<scalar_t>(go);
        p.cells[row * H + u] = static_cast<scalar_t>(c);
        p.y[row * H + u] = static_cast<scalar_t>(h);
        if (local) {
          sm.act[u * R + r] = h;  // the GEMM of this step is done (block_gemm ends with a barrier)
        } else {
          hx_next[static_cast<size_t>(u) * B + b] = h;
        }
        sm.st0[q] = h;
        sm.st1[q] = c;
        if (t == sm.lens[r] - 1) {
          p.h_n[static_cast<size_t>(b) * H + u] = static_cast<scalar_t>(h);
          p.c_n[static_cast<size_t>(b) * H + u] = static_cast<scalar_t>(c);
        }
      } else {  // finished: state frozen (act keeps h when local), outputs zero
        for (int k = 0; k < 4; ++k) g[k * H + u] = scalar_t(0);
        p.cells[row * H + u] = scalar_t(0);
        p.y[row * H + u] = scalar_t(0);
        if (!local) hx_next[static_cast<size_t>(u) * B + b] = sm.st0[q];
      }
    }
    if (t + 1 < steps) {  // steps is the same in every block
      load_x_projections(xg, p, sm.lens, pairs, u0, b0, t + 1);
      step_barrier(p.grid_u);
    }
  }

  const int64_t rest = static_cast<int64_t>(T - steps) * pairs;  // steps past the longest sequence
  for (int64_t idx = threadIdx.x; idx < rest; idx += kThreads) {
    const int q = static_cast<int>(idx % pairs), t = steps + static_cast<int>(idx / pairs);
    const int b = b0 + q / U, u = u0 + q % U;
    if (b >= B || u >= H) continue;
    const size_t row = static_cast<size_t>(b) * T + t;
    for (int k = 0; k < 4; ++k) p.gates[row * 4 * H + k * H + u] = scalar_t(0);
    p.cells[row * H + u] = scalar_t(0);
    p.y[row * H + u] = scalar_t(0);
  }
}

template <typename scalar_t>
struct BwdParams {
  const scalar_t* grad_y;    // [B, T, H] or null
  const scalar_t* grad_h_n;  // [B, H] or null
  const scalar_t* grad_c_n;  // [B, H] or null
  const scalar_t* gates;     // [B, T, 4H]
  const scalar_t* cells;     // [B, T, H]
  const scalar_t* c0;        // [B, H] or null
  const scalar_t* w_hh;      // [4H, H]
  const int64_t* lengths;    // [B] or null
  scalar_t* dgates;          // [B, T, 4H]: grads of the pre-activations
  scalar_t* grad_h0;         // [B, H]
  scalar_t* grad_c0;         // [B, H]
  float* dx;                 // [2][4H][B], null when local
  int B, T, H, U, R, chunk, grid_u;
};

// What the backward of one (unit, row) pair reads at step t, besides the recurrence: the activated gates, c_t,
// c_{t-1} and the grad of y_t.
struct StepInputs {
  float g[4], c, c_prev, gy;
};

// in[i] <- the step-t inputs of the thread's pair i, for the pairs whose sequence ran step t.
template <typename scalar_t>
__device__ __forceinline__ void load_step_inputs(StepInputs (&in)[kMaxPairs], const BwdParams<scalar_t>& p,
                                                 const int* lens, int pairs, int u0, int b0, int t) {
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int q = threadIdx.x + i * kThreads;
    if (q >= pairs) break;
    const int r = q / p.U, b = b0 + r, u = u0 + q % p.U, H = p.H;
    if (b >= p.B || u >= H || t >= lens[r]) continue;
    const size_t row = static_cast<size_t>(b) * p.T + t;
#pragma unroll
    for (int k = 0; k < 4; ++k) in[i].g[k] = static_cast<float>(p.gates[row * 4 * H + k * H + u]);
    in[i].c = static_cast<float>(p.cells[row * H + u]);
    in[i].c_prev = t > 0 ? static_cast<float>(p.cells[(row - 1) * H + u])
                         : (p.c0 ? static_cast<float>(p.c0[static_cast<size_t>(b) * H + u]) : 0.f);
    in[i].gy = p.grad_y ? static_cast<float>(p.grad_y[row * H + u]) : 0.f;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) lstm_bwd_persistent_kernel(const BwdParams<scalar_t> p) {
  extern __shared__ float4 smem4[];
  const int B = p.B, T = p.T, H = p.H, U = p.U, R = p.R;
  const int u0 = (blockIdx.x % p.grid_u) * U, b0 = (blockIdx.x / p.grid_u) * R;
  const Tile tl(U, R, H, false);
  const Smem sm(reinterpret_cast<float*>(smem4), tl.K, tl.C, p.chunk, U, R);
  const int pairs = U * R;  // st0 = grad of h_t (from later steps / h_n), st1 = grad of c_t
  const bool local = p.dx == nullptr;  // act [4H][R] holds dgates_{t+1} of the block's rows (u0 == 0)

  for (int idx = threadIdx.x; idx < tl.K * U; idx += kThreads) {  // w[k][j] = w_hh[k][u0 + j], k < 4H
    const int k = idx / U, j = idx % U;
    sm.w[idx] = u0 + j < H ? static_cast<float>(p.w_hh[static_cast<size_t>(k) * H + u0 + j]) : 0.f;
  }
  const int steps = load_lengths(p.lengths, sm.lens, R, b0, B, T);
  if (local)  // act rows of padding rows (b >= B) stay zero; the cell updates write every other entry
    for (int idx = threadIdx.x; idx < 4 * H * R; idx += kThreads)
      if (b0 + idx % R >= B) sm.act[idx] = 0.f;
  for (int q = threadIdx.x; q < pairs; q += kThreads) {
    const int b = b0 + q / U, u = u0 + q % U;
    const bool in = b < B && u < H;
    sm.st0[q] = in && p.grad_h_n ? static_cast<float>(p.grad_h_n[static_cast<size_t>(b) * H + u]) : 0.f;
    sm.st1[q] = in && p.grad_c_n ? static_cast<float>(p.grad_c_n[static_cast<size_t>(b) * H + u]) : 0.f;
  }
  StepInputs inputs[kMaxPairs] = {};
  if (steps > 0) load_step_inputs(inputs, p, sm.lens, pairs, u0, b0, steps - 1);
  __syncthreads();

  for (int t = steps - 1; t >= -1; --t) {
    const bool have_next = t + 1 < steps;  // dgates of step t + 1 are in act (local) or dx[(t + 1) & 1]
    if (have_next)
      block_gemm(tl, sm, local ? nullptr : p.dx + static_cast<size_t>((t + 1) & 1) * 4 * H * B, p.chunk, R, b0, B);
    float* dx_t = local ? nullptr : p.dx + static_cast<size_t>(t & 1) * 4 * H * B;
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const int q = threadIdx.x + i * kThreads;
      if (q >= pairs) break;
      const int r = q / U, j = q % U, b = b0 + r, u = u0 + j;
      if (b >= B || u >= H) continue;
      const int len = sm.lens[r];
      if (have_next && t + 1 < len) {  // step t + 1 was active: grad of h_t = dgates_{t+1} @ w_hh
        float m = 0.f;
        for (int s = 0; s < tl.ks; ++s) m += sm.red[(s * R + r) * tl.C + j];
        sm.st0[q] = m;
      }
      if (t < 0) continue;
      const size_t row = static_cast<size_t>(b) * T + t;
      scalar_t* dg = p.dgates + row * 4 * H;
      float d[4] = {0.f, 0.f, 0.f, 0.f};  // finished (t >= len): grads pass through unchanged, dgates zero
      if (t < len) {
        const StepInputs& x = inputs[i];
        const float gi = x.g[0], gf = x.g[1], gg = x.g[2], go = x.g[3];
        const float dh = sm.st0[q] + x.gy;
        const float tc = tanhf(x.c);
        const float dc = sm.st1[q] + dh * go * (1.f - tc * tc);
        d[0] = dc * gg * gi * (1.f - gi);
        d[1] = dc * x.c_prev * gf * (1.f - gf);
        d[2] = dc * gi * (1.f - gg * gg);
        d[3] = dh * tc * go * (1.f - go);
        sm.st1[q] = dc * gf;
      }
      for (int k = 0; k < 4; ++k) {
        dg[k * H + u] = static_cast<scalar_t>(d[k]);
        if (local) {
          sm.act[(k * H + u) * R + r] = d[k];  // the GEMM of this step is done (block_gemm ends with a barrier)
        } else {
          dx_t[static_cast<size_t>(k * H + u) * B + b] = d[k];
        }
      }
    }
    if (t > 0) load_step_inputs(inputs, p, sm.lens, pairs, u0, b0, t - 1);
    if (t >= 0) step_barrier(p.grid_u);  // steps is the same in every block
  }

  for (int q = threadIdx.x; q < pairs; q += kThreads) {
    const int b = b0 + q / U, u = u0 + q % U;
    if (b >= B || u >= H) continue;
    p.grad_h0[static_cast<size_t>(b) * H + u] = static_cast<scalar_t>(sm.st0[q]);
    p.grad_c0[static_cast<size_t>(b) * H + u] = static_cast<scalar_t>(sm.st1[q]);
  }
  const int64_t rest = static_cast<int64_t>(T - steps) * pairs;
  for (int64_t idx = threadIdx.x; idx < rest; idx += kThreads) {
    const int q = static_cast<int>(idx % pairs), t = steps + static_cast<int>(idx / pairs);
    const int b = b0 + q / U, u = u0 + q % U;
    if (b >= B || u >= H) continue;
    const size_t row = static_cast<size_t>(b) * T + t;
    for (int k = 0; k < 4; ++k) p.dgates[row * 4 * H + k * H + u] = scalar_t(0);
  }
}

// ---- fallback: one fused elementwise kernel per step after at::addmm / at::mm.

// pre: [B, 4H] = gates[:, t] + h @ w_hh^T. h (scalar_t, the GEMM's operand) and c (float) are updated in place.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lstm_fwd_step_kernel(const scalar_t* __restrict__ pre,
                                                                 scalar_t* __restrict__ gates,
                                                                 scalar_t* __restrict__ cells, scalar_t* __restrict__ y,
                                                                 scalar_t* __restrict__ h, float* __restrict__ c,
                                                                 const int64_t* __restrict__ lengths, int B, int T,
                                                                 int H, int t) {
  const int64_t n = static_cast<int64_t>(B) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(idx / H), u = static_cast<int>(idx % H);
    const size_t row = static_cast<size_t>(b) * T + t;
    scalar_t* g = gates + row * 4 * H;
    if (t < clamp_len(lengths, b, T)) {
      const scalar_t* pr = pre + static_cast<size_t>(b) * 4 * H;
      const float gi = sigmoid_f(static_cast<float>(pr[u]));
      const float gf = sigmoid_f(static_cast<float>(pr[H + u]));
      const float gg = tanhf(static_cast<float>(pr[2 * H + u]));
      const float go = sigmoid_f(static_cast<float>(pr[3 * H + u]));
      const float cv = gf * c[idx] + gi * gg;
      const float hv = go * tanhf(cv);
      g[u] = static_cast<scalar_t>(gi);
      g[H + u] = static_cast<scalar_t>(gf);
      g[2 * H + u] = static_cast<scalar_t>(gg);
      g[3 * H + u] = static_cast<scalar_t>(go);
      cells[row * H + u] = static_cast<scalar_t>(cv);
      y[row * H + u] = static_cast<scalar_t>(hv);
      h[idx] = static_cast<scalar_t>(hv);
      c[idx] = cv;
    } else {
      for (int k = 0; k < 4; ++k) g[k * H + u] = scalar_t(0);
      cells[row * H + u] = scalar_t(0);
      y[row * H + u] = scalar_t(0);
    }
  }
}

// m: [B, H] = dgates[:, t + 1] @ w_hh (null at the last step). dh, dc: float [B, H] running grads of h_t, c_t.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lstm_bwd_step_kernel(
    const scalar_t* __restrict__ m, float* __restrict__ dh, float* __restrict__ dc, const scalar_t* __restrict__ gates,
    const scalar_t* __restrict__ cells, const scalar_t* __restrict__ c0, const scalar_t* __restrict__ grad_y,
    scalar_t* __restrict__ dgates, const int64_t* __restrict__ lengths, int B, int T, int H, int t) {
  const int64_t n = static_cast<int64_t>(B) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(idx / H), u = static_cast<int>(idx % H);
    const int len = clamp_len(lengths, b, T);
    if (m != nullptr && t + 1 < len) dh[idx] = static_cast<float>(m[idx]);
    const size_t row = static_cast<size_t>(b) * T + t;
    scalar_t* dg = dgates + row * 4 * H;
    if (t < len) {
      const scalar_t* g = gates + row * 4 * H;
      const float gi = static_cast<float>(g[u]), gf = static_cast<float>(g[H + u]);
      const float gg = static_cast<float>(g[2 * H + u]), go = static_cast<float>(g[3 * H + u]);
      const float c = static_cast<float>(cells[row * H + u]);
      const float c_prev = t > 0 ? static_cast<float>(cells[(row - 1) * H + u]) : (c0 ? static_cast<float>(c0[idx]) : 0.f);
      const float dhv = dh[idx] + (grad_y ? static_cast<float>(grad_y[row * H + u]) : 0.f);
      const float tc = tanhf(c);
      const float dcv = dc[idx] + dhv * go * (1.f - tc * tc);
      dg[u] = static_cast<scalar_t>(dcv * gg * gi * (1.f - gi));
      dg[H + u] = static_cast<scalar_t>(dcv * c_prev * gf * (1.f - gf));
      dg[2 * H + u] = static_cast<scalar_t>(dcv * gi * (1.f - gg * gg));
      dg[3 * H + u] = static_cast<scalar_t>(dhv * tc * go * (1.f - go));
      dc[idx] = dcv * gf;
    } else {
      for (int k = 0; k < 4; ++k) dg[k * H + u] = scalar_t(0);
    }
  }
}

// grad_h0 = dgates[:, 0] @ w_hh where step 0 ran, else the carried grad; grad_c0 = dc.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lstm_bwd_final_kernel(const scalar_t* __restrict__ m,
                                                                  const float* __restrict__ dh,
                                                                  const float* __restrict__ dc,
                                                                  const int64_t* __restrict__ lengths,
                                                                  scalar_t* __restrict__ grad_h0,
                                                                  scalar_t* __restrict__ grad_c0, int B, int T, int H) {
  const int64_t n = static_cast<int64_t>(B) * H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(idx / H);
    grad_h0[idx] = 0 < clamp_len(lengths, b, T) ? m[idx] : static_cast<scalar_t>(dh[idx]);
    grad_c0[idx] = static_cast<scalar_t>(dc[idx]);
  }
}

// ---- host side

struct DeviceInfo {
  int sms = 0, smem_optin = 0, smem_per_sm = 0, coop = 0;
};

DeviceInfo device_info(int dev) {
  DeviceInfo d;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, dev));
  return d;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::atoi(v) : 0;
}

// Picks the tiling of a persistent kernel for [B, H] that is co-resident on the device and cheapest by a
// per-thread work estimate; !ok when none fits (w_hh too large for the chip at this batch size).
Layout choose_layout(const void* kernel, bool fwd, int64_t B, int64_t H, int dev) {
  const int chunk_cap = env_int("MMFAST_LSTM_CUDA_MAX_CHUNK");  // testing: force chunked staging
  using Key = std::tuple<const void*, int, int64_t, int64_t, int>;
  static std::mutex mutex;
  static std::map<Key, Layout> cache;
  const Key key{kernel, dev, B, H, chunk_cap};
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;

  Layout best;
  const DeviceInfo d = device_info(dev);
  if (d.coop && B * 4 * H < (int64_t{1} << 31)) {
    // Dynamic shared memory may use what the kernel's static shared memory leaves of the opt-in maximum.
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int64_t dynamic_max = d.smem_optin - static_cast<int64_t>(attr.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_max)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
    const int64_t K = fwd ? H : 4 * H;
    double best_cost = 0;
    for (int U = fwd ? 1 : 4; U <= 256 && U < 2 * std::max<int64_t>(H, 4); U *= 2) {
      const int C = fwd ? 4 * U : U;
      for (int R = 4; R <= 1024 && R < 2 * std::max<int64_t>(B, 4); R *= 2) {
        const int tiles = (C / 4) * (R / 4);
        if (tiles > kThreads || U * R > kMaxPairs * kThreads) break;
        const int ks = kThreads / tiles;
        const int64_t grid_u = (H + U - 1) / U, grid = grid_u * ((B + R - 1) / R);
        const int64_t per_sm = (grid + d.sms - 1) / d.sms;
        if (per_sm > 8) continue;
        const int64_t budget = std::min<int64_t>(
            dynamic_max, d.smem_per_sm / per_sm - 1024 - static_cast<int64_t>(attr.sharedSizeBytes));
        const int64_t fixed = static_cast<int64_t>(smem_bytes(static_cast<int>(K), C, 0, U, R));
        int64_t chunk = std::min<int64_t>(K, (budget - fixed) / (4 * static_cast<int64_t>(R)));
        if (chunk_cap > 0) chunk = std::min<int64_t>(chunk, chunk_cap);
        if (chunk < std::min<int64_t>(K, 16) && !(chunk_cap > 0 && chunk >= 1)) continue;
        const bool local = grid_u == 1 && chunk >= K;
        const size_t smem = smem_bytes(static_cast<int>(K), C, static_cast<int>(chunk), U, R);
        int active = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&active, kernel, kThreads, smem));
        if (static_cast<int64_t>(active) * d.sms < grid) continue;
        // Per k step a warp issues 16 FMAs per lane (4 SM cycles) and two float4 shared loads whose wavefronts
        // grow with the distinct column / row tiles in the warp; the slower of the two bounds the inner loop.
        const int nct = C / 4, lanes = std::min(tiles, 32), slices = 32 / lanes;
        const int wf = (slices * std::min(nct, lanes) * 16 + 127) / 128 +
                       (slices * ((lanes + nct - 1) / nct) * 16 + 127) / 128;
        // Per SM: blocks x (inner loop, L2 staging unless local, cell-phase reads, chunk barriers per thread)
        // + grid size.
        const double cost =
            static_cast<double>(per_sm) *
                (4.0 * std::max(4, wf) * ((K + ks - 1) / ks) +
                 (local ? 0.0 : 16.0 * ((K * R + kThreads - 1) / kThreads)) +
                 ((U * R + kThreads - 1) / kThreads) * (4.0 * ks + 40.0) + 100.0 * ((K + chunk - 1) / chunk)) +
            static_cast<double>(grid) + (grid_u > 1 ? kGridSyncCycles : 0.0);
        if (!best.ok || cost < best_cost) {
          best_cost = cost;
          best.ok = true;
          best.units = U;
          best.rows = R;
          best.chunk = static_cast<int>(chunk);
          best.grid_u = static_cast<int>(grid_u);
          best.grid = static_cast<int>(grid);
          best.smem = smem;
          best.local = local;
        }
      }
    }
  }
  cache.emplace(key, best);
  return best;
}

template <typename Params>
void launch_cooperative(void (*kernel)(const Params), const Params& params, const Layout& lay, cudaStream_t stream) {
  const void* fn = reinterpret_cast<const void*>(kernel);  // choose_layout raised its shared-memory limit
  void* args[] = {const_cast<Params*>(&params)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(fn, dim3(lay.grid), dim3(kThreads), args, lay.smem, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int elementwise_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16));
}

// int64 lengths on x's device: device lengths as they are; CPU lengths through a pinned buffer and an async copy.
at::Tensor device_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& x, cudaStream_t stream,
                          const char* op) {
  if (!lengths.has_value()) return at::Tensor();
  if (lengths->is_cuda()) return lengths->contiguous();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
              ": expected lengths on the device while capturing a CUDA graph, got lengths on the CPU");
  at::Tensor host = lengths->contiguous();
  if (!host.is_pinned()) host = host.pin_memory();
  return host.to(x.device(), at::kLong, /*non_blocking=*/true);
}

const int64_t* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int64_t>() : nullptr; }

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// [1, B, H] copy of a state (or zeros) in x's dtype, never aliasing the input.
at::Tensor state_copy(const std::optional<at::Tensor>& s, int64_t B, int64_t H, const at::TensorOptions& opts) {
  if (!s.has_value()) return at::zeros({1, B, H}, opts);
  return at::empty({1, B, H}, opts).copy_(*s);
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  constexpr const char* op = "mmfast::lstm";
  check_lstm_inputs(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel expects x on a CUDA device, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), H = w_hh.size(1);
  TORCH_CHECK(B * T < (int64_t{1} << 31) && 4 * H < (int64_t{1} << 31), op, ": B*T and 4H must fit in int32");
  const auto opts = x.options();
  at::Tensor y = at::empty({B, T, H}, opts), gates = at::empty({B, T, 4 * H}, opts),
             cells = at::empty({B, T, H}, opts);
  if (B == 0 || T == 0) return {y, state_copy(h0, B, H, opts), state_copy(c0, B, H, opts), gates, cells};
  at::Tensor h_n = at::empty({1, B, H}, opts), c_n = at::empty({1, B, H}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor len = device_lengths(lengths, x, stream, op);

  // Input projection of every step, into the gates buffer: [B*T, 4H] = x [B*T, I] @ w_ih^T + b_ih + b_hh.
  at::Tensor pre = gates.view({B * T, 4 * H});
  const at::Tensor x2 = x.reshape({B * T, I});
  if (b_ih.has_value() || b_hh.has_value()) {
    const at::Tensor bias = b_ih.has_value() && b_hh.has_value() ? at::add(*b_ih, *b_hh) : (b_ih ? *b_ih : *b_hh);
    at::addmm_out(pre, bias, x2, w_ih.t());
  } else {
    at::mm_out(pre, x2, w_ih.t());
  }
  const at::Tensor w = w_hh.contiguous();
  const at::Tensor h0c = contiguous_or_undefined(h0), c0c = contiguous_or_undefined(c0);
  const bool force_fallback = env_flag("MMFAST_LSTM_CUDA_FALLBACK");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_cuda", [&] {
    const auto kernel = &lstm_fwd_persistent_kernel<scalar_t>;
    const Layout lay = force_fallback ? Layout{}
                                      : choose_layout(reinterpret_cast<const void*>(kernel), true, B, H,
                                                      x.device().index());
    if (lay.ok) {
      const at::Tensor hx = lay.local ? at::Tensor() : at::empty({2 * H * B}, opts.dtype(at::kFloat));
      FwdParams<scalar_t> p{gates.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                            cells.mutable_data_ptr<scalar_t>(), h_n.mutable_data_ptr<scalar_t>(),
                            c_n.mutable_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(h0c), ptr_or_null<scalar_t>(c0c),
                            w.const_data_ptr<scalar_t>(), ptr_or_null(len), lay.local ? nullptr : hx.mutable_data_ptr<float>(),
                            static_cast<int>(B), static_cast<int>(T), static_cast<int>(H), lay.units, lay.rows,
                            lay.chunk, lay.grid_u};
      launch_cooperative(kernel, p, lay, stream);
      return;
    }
    // Fallback: per step, pre_t = gates[:, t] + h @ w_hh^T, then the fused cell update (masked rows stay frozen).
    at::Tensor h = h0c.defined() ? at::empty({B, H}, opts).copy_(h0c.view({B, H})) : at::zeros({B, H}, opts);
    at::Tensor c = c0c.defined() ? at::empty({B, H}, opts.dtype(at::kFloat)).copy_(c0c.view({B, H}))
                                 : at::zeros({B, H}, opts.dtype(at::kFloat));
    at::Tensor step_pre = at::empty({B, 4 * H}, opts);
    const at::Tensor w_t = w.t();
    for (int64_t t = 0; t < T; ++t) {
      at::addmm_out(step_pre, gates.select(1, t), h, w_t);
      lstm_fwd_step_kernel<scalar_t><<<elementwise_blocks(B * H), kThreads, 0, stream>>>(
          step_pre.const_data_ptr<scalar_t>(), gates.mutable_data_ptr<scalar_t>(), cells.mutable_data_ptr<scalar_t>(),
          y.mutable_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(), c.mutable_data_ptr<float>(),
          ptr_or_null(len), static_cast<int>(B), static_cast<int>(T), static_cast<int>(H), static_cast<int>(t));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    h_n.view({B, H}).copy_(h);
    c_n.view({B, H}).copy_(c);
  });
  return {y, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cuda(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& y_opt, const at::Tensor& gates,
    const at::Tensor& cells) {
  constexpr const char* op = "mmfast::_lstm_backward";
  TORCH_CHECK(y_opt.has_value(), op, ": the CUDA kernel needs y (the forward's output)");
  const at::Tensor& y = *y_opt;
  check_lstm_inputs(x, lengths, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt);
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel expects x on a CUDA device, got ", x.device());
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), H = w_hh.size(1);
  TORCH_CHECK(B * T < (int64_t{1} << 31) && 4 * H < (int64_t{1} << 31), op, ": B*T and 4H must fit in int32");
  const std::vector<int64_t> seq{B, T, H}, state{1, B, H};
  TORCH_CHECK(y.sizes() == at::IntArrayRef(seq) && cells.sizes() == at::IntArrayRef(seq) &&
                  gates.sizes() == at::IntArrayRef({B, T, 4 * H}),
              op, ": expected y, cells [", B, ", ", T, ", ", H, "] and gates [", B, ", ", T, ", ", 4 * H, "], got ",
              y.sizes(), ", ", cells.sizes(), " and ", gates.sizes());
  TORCH_CHECK(!grad_y.has_value() || grad_y->sizes() == at::IntArrayRef(seq), op, ": expected grad_y of shape ",
              at::IntArrayRef(seq), ", got ", grad_y.has_value() ? grad_y->sizes() : at::IntArrayRef());
  for (const auto* g : {&grad_h_n, &grad_c_n})
    TORCH_CHECK(!g->has_value() || (*g)->sizes() == at::IntArrayRef(state), op,
                ": expected grad_h_n and grad_c_n of shape ", at::IntArrayRef(state), ", got ", (*g)->sizes());
  for (const at::Tensor* t : {&y, &gates, &cells})
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), op,
                ": expected y, gates and cells on ", x.device(), " with dtype ", x.scalar_type());
  for (const auto* g : {&grad_y, &grad_h_n, &grad_c_n})
    TORCH_CHECK(!g->has_value() || ((*g)->device() == x.device() && (*g)->scalar_type() == x.scalar_type()), op,
                ": expected the output grads on ", x.device(), " with dtype ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options();
  if (B == 0 || T == 0)
    return {at::zeros({B, T, I}, opts), state_copy(grad_h_n, B, H, opts), state_copy(grad_c_n, B, H, opts),
            at::zeros({4 * H, I}, opts), at::zeros({4 * H, H}, opts), at::zeros({4 * H}, opts)};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor len = device_lengths(lengths, x, stream, op);
  const at::Tensor gy = contiguous_or_undefined(grad_y), ghn = contiguous_or_undefined(grad_h_n),
                   gcn = contiguous_or_undefined(grad_c_n), c0c = contiguous_or_undefined(c0);
  const at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous(), w = w_hh.contiguous();
  at::Tensor dgates = at::empty({B, T, 4 * H}, opts);
  at::Tensor grad_h0 = at::empty({1, B, H}, opts), grad_c0 = at::empty({1, B, H}, opts);
  const bool force_fallback = env_flag("MMFAST_LSTM_CUDA_FALLBACK");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_backward_cuda", [&] {
    const auto kernel = &lstm_bwd_persistent_kernel<scalar_t>;
    const Layout lay = force_fallback ? Layout{}
                                      : choose_layout(reinterpret_cast<const void*>(kernel), false, B, H,
                                                      x.device().index());
    if (lay.ok) {
      const at::Tensor dx = lay.local ? at::Tensor() : at::empty({2 * 4 * H * B}, opts.dtype(at::kFloat));
      BwdParams<scalar_t> p{ptr_or_null<scalar_t>(gy), ptr_or_null<scalar_t>(ghn), ptr_or_null<scalar_t>(gcn),
                            gates_c.const_data_ptr<scalar_t>(), cells_c.const_data_ptr<scalar_t>(),
                            ptr_or_null<scalar_t>(c0c), w.const_data_ptr<scalar_t>(), ptr_or_null(len),
                            dgates.mutable_data_ptr<scalar_t>(), grad_h0.mutable_data_ptr<scalar_t>(),
                            grad_c0.mutable_data_ptr<scalar_t>(), lay.local ? nullptr : dx.mutable_data_ptr<float>(), static_cast<int>(B),
                            static_cast<int>(T), static_cast<int>(H), lay.units, lay.rows, lay.chunk, lay.grid_u};
      launch_cooperative(kernel, p, lay, stream);
      return;
    }
    // Fallback: per step t (from T-1 down), the fused cell backward, then m = dgates[:, t] @ w_hh.
    const auto fopts = opts.dtype(at::kFloat);
    at::Tensor dh = ghn.defined() ? at::empty({B, H}, fopts).copy_(ghn.view({B, H})) : at::zeros({B, H}, fopts);
    at::Tensor dc = gcn.defined() ? at::empty({B, H}, fopts).copy_(gcn.view({B, H})) : at::zeros({B, H}, fopts);
    at::Tensor m = at::empty({B, H}, opts);
    const int blocks = elementwise_blocks(B * H);
    for (int64_t t = T - 1; t >= 0; --t) {
      lstm_bwd_step_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          t + 1 < T ? m.const_data_ptr<scalar_t>() : nullptr, dh.mutable_data_ptr<float>(),
          dc.mutable_data_ptr<float>(), gates_c.const_data_ptr<scalar_t>(), cells_c.const_data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(c0c), ptr_or_null<scalar_t>(gy), dgates.mutable_data_ptr<scalar_t>(),
          ptr_or_null(len), static_cast<int>(B), static_cast<int>(T), static_cast<int>(H), static_cast<int>(t));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::mm_out(m, dgates.select(1, t), w);
    }
    lstm_bwd_final_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        m.const_data_ptr<scalar_t>(), dh.const_data_ptr<float>(), dc.const_data_ptr<float>(), ptr_or_null(len),
        grad_h0.mutable_data_ptr<scalar_t>(), grad_c0.mutable_data_ptr<scalar_t>(), static_cast<int>(B),
        static_cast<int>(T), static_cast<int>(H));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Weight gradients: rows at or past a length have dgates = 0, so their inputs do not contribute.
  const at::Tensor d2 = dgates.view({B * T, 4 * H});
  const at::Tensor grad_x = at::mm(d2, w_ih).view({B, T, I});
  const at::Tensor grad_w_ih = at::mm(d2.t(), x.reshape({B * T, I}));
  // h_prev[b, t] = h_{t-1}: h0 at t = 0, else y[b, t-1] (= h_{t-1} wherever step t ran).
  const at::Tensor first = h0.has_value() ? h0->transpose(0, 1) : at::zeros({B, 1, H}, opts);
  const at::Tensor h_prev = at::cat({first, y.narrow(1, 0, T - 1)}, 1).view({B * T, H});
  const at::Tensor grad_w_hh = at::mm(d2.t(), h_prev);
  const at::Tensor grad_bias = at::sum(d2, {0});
  return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("lstm", &mmfast::lstm_cuda);
  m.impl("_lstm_backward", &mmfast::lstm_backward_cuda);
}
