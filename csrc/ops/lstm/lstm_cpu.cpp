// CPU kernels of mmfast::lstm. Sequences are packed as pack_padded_sequence packs them: rank r is the r-th
// longest sequence (stable), step t holds the bs[t] sequences longer than t, and packed row off[t] + r is
// (sequence order[r], step t). Only packed rows are computed: one GEMM for the input projection of all of
// them, then per step one GEMM against w_hh of the bs[t] active rows and a fused elementwise cell update.
// Workspace layout (CPU kernels only): the first N = sum(lengths) rows of gates viewed as [B*T, 4H] and of
// cells viewed as [B*T, H] are the packed activated gates and cell states; the remaining rows are zero.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/blas.h"
#include "ops/lstm/lstm.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define MMFAST_LSTM_AVX2 1
#else
#define MMFAST_LSTM_AVX2 0
#endif

namespace mmfast {
namespace {

struct Packing {
  int64_t max_len = 0, total = 0;
  std::vector<int64_t> len, order, rank, bs, off;  // off has max_len + 1 entries
  std::vector<int64_t> row_b, row_t;               // sequence and step of each packed row

  Packing(const std::optional<at::Tensor>& lengths, int64_t batch, int64_t steps)
      : len(batch), order(batch), rank(batch) {
    if (lengths.has_value()) {
      const at::Tensor l = lengths->contiguous();
      std::memcpy(len.data(), l.const_data_ptr<int64_t>(), batch * sizeof(int64_t));
    } else {
      std::fill(len.begin(), len.end(), steps);
    }
    std::vector<int64_t> count(steps + 2, 0);  // counting sort, longest first, stable in b
    for (int64_t l : len) ++count[steps - l + 1];
    for (int64_t k = 1; k <= steps + 1; ++k) count[k] += count[k - 1];
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t r = count[steps - len[b]]++;
      order[r] = b;
      rank[b] = r;
    }
    max_len = batch > 0 ? len[order[0]] : 0;
    bs.assign(max_len, 0);
    off.assign(max_len + 1, 0);
    for (int64_t l : len)
      for (int64_t t = 0; t < l; ++t) ++bs[t];
    for (int64_t t = 0; t < max_len; ++t) off[t + 1] = off[t] + bs[t];
    total = off[max_len];
    row_b.resize(total);
    row_t.resize(total);
    for (int64_t t = 0; t < max_len; ++t)
      for (int64_t r = 0; r < bs[t]; ++r) {
        row_b[off[t] + r] = order[r];
        row_t[off[t] + r] = t;
      }
  }
};

// ---- Elementwise cell update. float: GCC vector extensions (8 lanes in an AVX2 clone chosen at run time,
// 4 otherwise) with a Cephes-style exp (~1 ulp); double (gradcheck, tests): scalar libm.
#define MMFAST_INLINE inline __attribute__((always_inline))
// 32-byte vectors in always-inline helpers, used only in AVX2 code (the warning comes at the end of the file).
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
template <int W> struct Vec;
template <> struct Vec<8> { using F = f32x8; using I = i32x8; };
template <> struct Vec<4> { using F = f32x4; using I = i32x4; };

template <typename F, typename I>
MMFAST_INLINE F vexp(F x) {
  x = x < -87.3f ? F{} - 87.3f : x;
  x = x > 88.3f ? F{} + 88.3f : x;
  const F n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const F r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * (F)((__builtin_convertvector(n, I) + 127) << 23);
}

template <typename F, typename I>
MMFAST_INLINE F vsigmoid(F x) {
  return 1.f / (1.f + vexp<F, I>(-x));
}

template <typename F, typename I>
MMFAST_INLINE F vtanh(F x) {
  constexpr int32_t kSign = static_cast<int32_t>(0x80000000u);
  const F neg_abs = (F)((I)x | kSign);
  const F e = vexp<F, I>(neg_abs * 2.f);
  const F big = (F)((I)((1.f - e) / (1.f + e)) | ((I)x & kSign));
  const F z = x * x;  // |x| < 0.625: Cephes' odd polynomial, which keeps the relative error small near 0
  F p = z * -5.70498872745e-3f + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const F small = p * z * x + x;
  return neg_abs > -0.625f ? small : big;
}

// m lanes from/to p (the others zero); m is std::integral_constant<int64_t, W> for a full vector.
template <typename F, typename M>
MMFAST_INLINE F vload(const float* p, M m) {
  F v{};
  std::memcpy(&v, p, static_cast<int64_t>(m) * sizeof(float));
  return v;
}

template <typename F, typename M>
MMFAST_INLINE void vstore(float* p, F v, M m) {
  std::memcpy(p, &v, static_cast<int64_t>(m) * sizeof(float));
}

// One step forward for `rows` active rows. g: [rows, 4H] pre-activations less the bias [4H] in, activations
// out. c_prev, c_out, h_out: [rows, H].
template <int W>
MMFAST_INLINE void fwd_rows_vec(float* g, const float* bias, const float* c_prev, float* c_out, float* h_out,
                                int64_t rows, int64_t H) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  for (int64_t r = 0; r < rows; ++r) {
    float* gi = g + r * 4 * H;
    const float* cp = c_prev + r * H;
    float* c = c_out + r * H;
    float* h = h_out + r * H;
    // m: lanes in use, a compile-time W except in the last, partial vector.
    const auto lanes = [&](int64_t j, auto m) __attribute__((always_inline)) {
      const F i = vsigmoid<F, I>(vload<F>(gi + j, m) + vload<F>(bias + j, m));
      const F f = vsigmoid<F, I>(vload<F>(gi + H + j, m) + vload<F>(bias + H + j, m));
      const F gv = vtanh<F, I>(vload<F>(gi + 2 * H + j, m) + vload<F>(bias + 2 * H + j, m));
      const F o = vsigmoid<F, I>(vload<F>(gi + 3 * H + j, m) + vload<F>(bias + 3 * H + j, m));
      const F cv = f * vload<F>(cp + j, m) + i * gv;
      vstore(gi + j, i, m);
      vstore(gi + H + j, f, m);
      vstore(gi + 2 * H + j, gv, m);
      vstore(gi + 3 * H + j, o, m);
      vstore(c + j, cv, m);
      vstore(h + j, o * vtanh<F, I>(cv), m);
    };
    int64_t j = 0;
    for (; j + W <= H; j += W) lanes(j, std::integral_constant<int64_t, W>{});
    if (j < H) lanes(j, H - j);
  }
}

// One step backward. g: activated gates [rows, 4H]; c_cur, c_prev: [rows, H]; dh: [rows, H] grad of h_t from
// the step above; gy[r]: the grad_y row of rank r; dc: [rows, H] grad of c_t in, of c_{t-1} out;
// dg: [rows, 4H] grads of the pre-activations.
template <int W>
MMFAST_INLINE void bwd_rows_vec(const float* g, const float* c_cur, const float* c_prev, const float* dh,
                                const float* const* gy, float* dc, float* dg, int64_t rows, int64_t H) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  for (int64_t r = 0; r < rows; ++r) {
    const float* gi = g + r * 4 * H;
    float* di = dg + r * 4 * H;
    const auto lanes = [&](int64_t j, auto m) __attribute__((always_inline)) {
      const F i = vload<F>(gi + j, m), f = vload<F>(gi + H + j, m), gv = vload<F>(gi + 2 * H + j, m),
              o = vload<F>(gi + 3 * H + j, m);
      const F tc = vtanh<F, I>(vload<F>(c_cur + r * H + j, m));
      const F dhv = vload<F>(dh + r * H + j, m) + vload<F>(gy[r] + j, m);
      const F dcv = vload<F>(dc + r * H + j, m) + dhv * o * (1.f - tc * tc);
      vstore(di + j, dcv * gv * i * (1.f - i), m);
      vstore(di + H + j, dcv * vload<F>(c_prev + r * H + j, m) * f * (1.f - f), m);
      vstore(di + 2 * H + j, dcv * i * (1.f - gv * gv), m);
      vstore(di + 3 * H + j, dhv * tc * o * (1.f - o), m);
      vstore(dc + r * H + j, dcv * f, m);
    };
    int64_t j = 0;
    for (; j + W <= H; j += W) lanes(j, std::integral_constant<int64_t, W>{});
    if (j < H) lanes(j, H - j);
  }
}

// h = o * tanh(c) for `rows` rows, as the forward step computed it. g: activated gates [rows, 4H]; c, h: [rows, H].
template <int W>
MMFAST_INLINE void hidden_rows_vec(const float* g, const float* c, float* h, int64_t rows, int64_t H) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  for (int64_t r = 0; r < rows; ++r) {
    const auto lanes = [&](int64_t j, auto m) __attribute__((always_inline)) {
      vstore(h + r * H + j, vload<F>(g + r * 4 * H + 3 * H + j, m) * vtanh<F, I>(vload<F>(c + r * H + j, m)), m);
    };
    int64_t j = 0;
    for (; j + W <= H; j += W) lanes(j, std::integral_constant<int64_t, W>{});
    if (j < H) lanes(j, H - j);
  }
}

template <typename scalar_t>
MMFAST_INLINE scalar_t sigmoid_(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

template <typename scalar_t>
void fwd_rows_scalar(scalar_t* g, const scalar_t* bias, const scalar_t* c_prev, scalar_t* c_out, scalar_t* h_out,
                     int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* gi = g + r * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = sigmoid_(gi[j] + bias[j]), f = sigmoid_(gi[H + j] + bias[H + j]),
                     gv = std::tanh(gi[2 * H + j] + bias[2 * H + j]), o = sigmoid_(gi[3 * H + j] + bias[3 * H + j]);
      const scalar_t cv = f * c_prev[r * H + j] + i * gv;
      gi[j] = i;
      gi[H + j] = f;
      gi[2 * H + j] = gv;
      gi[3 * H + j] = o;
      c_out[r * H + j] = cv;
      h_out[r * H + j] = o * std::tanh(cv);
    }
  }
}

template <typename scalar_t>
void bwd_rows_scalar(const scalar_t* g, const scalar_t* c_cur, const scalar_t* c_prev, const scalar_t* dh,
                     const scalar_t* const* gy, scalar_t* dc, scalar_t* dg, int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gi = g + r * 4 * H;
    scalar_t* di = dg + r * 4 * H;
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = gi[j], f = gi[H + j], gv = gi[2 * H + j], o = gi[3 * H + j];
      const scalar_t tc = std::tanh(c_cur[r * H + j]);
      const scalar_t dhv = dh[r * H + j] + gy[r][j];
      const scalar_t dcv = dc[r * H + j] + dhv * o * (1 - tc * tc);
      di[j] = dcv * gv * i * (1 - i);
      di[H + j] = dcv * c_prev[r * H + j] * f * (1 - f);
      di[2 * H + j] = dcv * i * (1 - gv * gv);
      di[3 * H + j] = dhv * tc * o * (1 - o);
      dc[r * H + j] = dcv * f;
    }
  }
}

template <typename scalar_t>
void hidden_rows_scalar(const scalar_t* g, const scalar_t* c, scalar_t* h, int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < H; ++j) h[r * H + j] = g[r * 4 * H + 3 * H + j] * std::tanh(c[r * H + j]);
}

#if MMFAST_LSTM_AVX2
__attribute__((target("avx2,fma"))) void hidden_rows_avx2(const float* g, const float* c, float* h, int64_t rows,
                                                          int64_t H) {
  hidden_rows_vec<8>(g, c, h, rows, H);
}
__attribute__((target("avx2,fma"))) void fwd_rows_avx2(float* g, const float* bias, const float* c_prev,
                                                       float* c_out, float* h_out, int64_t rows, int64_t H) {
  fwd_rows_vec<8>(g, bias, c_prev, c_out, h_out, rows, H);
}
__attribute__((target("avx2,fma"))) void bwd_rows_avx2(const float* g, const float* c_cur, const float* c_prev,
                                                       const float* dh, const float* const* gy, float* dc, float* dg,
                                                       int64_t rows, int64_t H) {
  bwd_rows_vec<8>(g, c_cur, c_prev, dh, gy, dc, dg, rows, H);
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename scalar_t>
void fwd_rows(scalar_t* g, const scalar_t* bias, const scalar_t* c_prev, scalar_t* c_out, scalar_t* h_out,
              int64_t rows, int64_t H) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if MMFAST_LSTM_AVX2
    if (has_avx2()) return fwd_rows_avx2(g, bias, c_prev, c_out, h_out, rows, H);
#endif
    fwd_rows_vec<4>(g, bias, c_prev, c_out, h_out, rows, H);
  } else {
    fwd_rows_scalar(g, bias, c_prev, c_out, h_out, rows, H);
  }
}

template <typename scalar_t>
void bwd_rows(const scalar_t* g, const scalar_t* c_cur, const scalar_t* c_prev, const scalar_t* dh,
              const scalar_t* const* gy, scalar_t* dc, scalar_t* dg, int64_t rows, int64_t H) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if MMFAST_LSTM_AVX2
    if (has_avx2()) return bwd_rows_avx2(g, c_cur, c_prev, dh, gy, dc, dg, rows, H);
#endif
    bwd_rows_vec<4>(g, c_cur, c_prev, dh, gy, dc, dg, rows, H);
  } else {
    bwd_rows_scalar(g, c_cur, c_prev, dh, gy, dc, dg, rows, H);
  }
}

template <typename scalar_t>
void hidden_rows(const scalar_t* g, const scalar_t* c, scalar_t* h, int64_t rows, int64_t H) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if MMFAST_LSTM_AVX2
    if (has_avx2()) return hidden_rows_avx2(g, c, h, rows, H);
#endif
    hidden_rows_vec<4>(g, c, h, rows, H);
  } else {
    hidden_rows_scalar(g, c, h, rows, H);
  }
}

// Rows per parallel_for chunk for an elementwise pass of `cols` values per row.
int64_t grain_rows(int64_t cols, int64_t per_chunk = 16384) {
  return std::max<int64_t>(1, per_chunk / std::max<int64_t>(cols, 1));
}

// dst[n] = src row `src_row(n)` (or zeros where it returns -1), rows of `cols` values.
template <typename scalar_t, typename F>
void gather_rows(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols, const F& src_row) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t s = src_row(n);
      if (s >= 0) std::memcpy(dst + n * cols, src + s * cols, cols * sizeof(scalar_t));
      else std::memset(dst + n * cols, 0, cols * sizeof(scalar_t));
    }
  });
}

// [1, B, H] state (or zeros) in packing order: out[r] = state[order[r]].
template <typename scalar_t>
at::Tensor sorted_state(const std::optional<at::Tensor>& state, const Packing& p, int64_t H,
                        const at::TensorOptions& opts) {
  const int64_t batch = static_cast<int64_t>(p.order.size());
  if (!state.has_value()) return at::zeros({batch, H}, opts);
  const at::Tensor s = state->contiguous();
  at::Tensor out = at::empty({batch, H}, opts);
  gather_rows(out.mutable_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), batch, H,
              [&](int64_t r) { return p.order[r]; });
  return out;
}

// Unsorts a [B, H] packing-order buffer into a [1, B, H] tensor.
template <typename scalar_t>
at::Tensor unsorted_state(const at::Tensor& sorted, const Packing& p) {
  const int64_t batch = sorted.size(0), H = sorted.size(1);
  at::Tensor out = at::empty({1, batch, H}, sorted.options());
  gather_rows(out.mutable_data_ptr<scalar_t>(), sorted.const_data_ptr<scalar_t>(), batch, H,
              [&](int64_t b) { return p.rank[b]; });
  return out;
}

// x [B, T, I] -> packed [N, I].
template <typename scalar_t>
at::Tensor pack_input(const at::Tensor& x, const Packing& p) {
  const int64_t steps = x.size(1), I = x.size(2);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({p.total, I}, x.options());
  gather_rows(out.mutable_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), p.total, I,
              [&](int64_t n) { return p.row_b[n] * steps + p.row_t[n]; });
  return out;
}

// packed [N, C] -> [B, T, C], zero past each length.
template <typename scalar_t>
void unpack_output(at::Tensor& out, const at::Tensor& packed, const Packing& p) {
  const int64_t steps = out.size(1), C = out.size(2);
  gather_rows(out.mutable_data_ptr<scalar_t>(), packed.const_data_ptr<scalar_t>(), out.size(0) * steps, C,
              [&](int64_t m) {
                const int64_t b = m / steps, t = m % steps;
                return t < p.len[b] ? p.off[t] + p.rank[b] : int64_t(-1);
              });
}

template <typename scalar_t>
void lstm_fwd_impl(const at::Tensor& x, const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias,
                   const Packing& p, at::Tensor& y, at::Tensor& h_n, at::Tensor& c_n, at::Tensor& gates,
                   at::Tensor& cells) {
  const int64_t batch = x.size(0), steps = x.size(1), H = w_hh.size(1), N = p.total;
  const auto opts = x.options();
  at::Tensor gp = gates.view({batch * steps, 4 * H}), cp = cells.view({batch * steps, H});
  gp.narrow(0, N, batch * steps - N).zero_();
  cp.narrow(0, N, batch * steps - N).zero_();
  gp = gp.narrow(0, 0, N);
  cp = cp.narrow(0, 0, N);
  at::Tensor hp = at::empty({N, H}, opts);
  const at::Tensor h0s = sorted_state<scalar_t>(h0, p, H, opts), c0s = sorted_state<scalar_t>(c0, p, H, opts);
  if (N > 0) {
    const at::Tensor xp = pack_input<scalar_t>(x, p);
    at::mm_out(gp, xp, w_ih.t());
    const scalar_t* w_hh_p = w_hh.const_data_ptr<scalar_t>();  // [4H, H], contiguous
    const scalar_t* h0p = h0s.const_data_ptr<scalar_t>();
    scalar_t* g = gp.mutable_data_ptr<scalar_t>();
    scalar_t* c = cp.mutable_data_ptr<scalar_t>();
    scalar_t* h = hp.mutable_data_ptr<scalar_t>();
    const scalar_t* c0p = c0s.const_data_ptr<scalar_t>();
    const scalar_t* bias_p = bias.const_data_ptr<scalar_t>();
    for (int64_t t = 0; t < p.max_len; ++t) {
      const int64_t rows = p.bs[t], off = p.off[t];
      const scalar_t* h_prev = t == 0 ? h0p : h + p.off[t - 1] * H;
      gemm<scalar_t>(false, true, rows, 4 * H, H, h_prev, H, w_hh_p, H, g + off * 4 * H, /*accumulate=*/true);
      const scalar_t* c_prev = t == 0 ? c0p : c + p.off[t - 1] * H;
      at::parallel_for(0, rows, grain_rows(8 * H), [&](int64_t begin, int64_t end) {
        fwd_rows<scalar_t>(g + (off + begin) * 4 * H, bias_p, c_prev + begin * H, c + (off + begin) * H,
                           h + (off + begin) * H, end - begin, H);
      });
    }
  }
  unpack_output<scalar_t>(y, hp, p);
  // Final states: the last active row of each sequence, or the initial state where the length is 0.
  const auto final_state = [&](at::Tensor& out, const at::Tensor& packed, const at::Tensor& init) {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    gather_rows(o, packed.const_data_ptr<scalar_t>(), batch, H,
                [&](int64_t b) { return p.len[b] > 0 ? p.off[p.len[b] - 1] + p.rank[b] : int64_t(-1); });
    const scalar_t* s = init.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b)
      if (p.len[b] == 0) std::memcpy(o + b * H, s + p.rank[b] * H, H * sizeof(scalar_t));
  };
  final_state(h_n, hp, h0s);
  final_state(c_n, cp, c0s);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  check_lstm_inputs(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK(!lengths.has_value() || lengths->is_cpu(), "mmfast::lstm: the CPU kernel expects lengths on the CPU, got ",
              lengths.has_value() ? lengths->device() : x.device());
  const int64_t batch = x.size(0), steps = x.size(1), H = w_hh.size(1);
  const auto opts = x.options();
  at::Tensor y = at::empty({batch, steps, H}, opts), h_n = at::empty({1, batch, H}, opts),
             c_n = at::empty({1, batch, H}, opts), gates = at::empty({batch, steps, 4 * H}, opts),
             cells = at::empty({batch, steps, H}, opts);
  const at::Tensor bias = b_ih.has_value() && b_hh.has_value() ? at::add(*b_ih, *b_hh)
                          : b_ih.has_value()                     ? b_ih->contiguous()
                          : b_hh.has_value()                     ? b_hh->contiguous()
                                                                 : at::zeros({4 * H}, opts);
  const Packing p(lengths, batch, steps);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cpu", [&] {
    lstm_fwd_impl<scalar_t>(x, h0, c0, w_ih.contiguous(), w_hh.contiguous(), bias, p, y, h_n, c_n, gates, cells);
  });
  return {y, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& y, const at::Tensor& gates, const at::Tensor& cells) {
  constexpr const char* op = "mmfast::_lstm_backward";
  check_lstm_inputs(x, lengths, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt);
  TORCH_CHECK(!lengths.has_value() || lengths->is_cpu(), op, ": the CPU kernel expects lengths on the CPU, got ",
              lengths.has_value() ? lengths->device() : x.device());
  const int64_t batch = x.size(0), steps = x.size(1), I = x.size(2), H = w_hh.size(1);
  const std::vector<int64_t> seq_shape{batch, steps, H}, state_shape{1, batch, H};
  // y is not needed here (h_{t-1} is recomputed from the workspace) but must fit the contract when given.
  const at::IntArrayRef y_shape = y.has_value() ? y->sizes() : at::IntArrayRef(seq_shape);
  TORCH_CHECK(y_shape == seq_shape && cells.sizes() == seq_shape &&
                  gates.sizes() == at::IntArrayRef({batch, steps, 4 * H}),
              op, ": expected y, cells [", batch, ", ", steps, ", ", H, "] and gates [", batch, ", ", steps, ", ",
              4 * H, "], got ", y_shape, ", ", cells.sizes(), " and ", gates.sizes());
  TORCH_CHECK(!grad_y.has_value() || grad_y->sizes() == seq_shape, op, ": expected grad_y of shape ",
              at::IntArrayRef(seq_shape), ", got ", grad_y->sizes());
  for (const auto* g : {&grad_h_n, &grad_c_n})
    TORCH_CHECK(!g->has_value() || (*g)->sizes() == state_shape, op, ": expected grad_h_n and grad_c_n of shape ",
                at::IntArrayRef(state_shape), ", got ", (*g)->sizes());

  const auto opts = x.options();
  const Packing p(lengths, batch, steps);
  const int64_t N = p.total;
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  at::Tensor grad_x = at::empty({batch, steps, I}, opts), grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_backward_cpu", [&] {
    // dh, dc: running grads of h and c per rank; rows past a sequence's length carry grad_h_n/grad_c_n.
    at::Tensor dh = sorted_state<scalar_t>(grad_h_n, p, H, opts), dc = sorted_state<scalar_t>(grad_c_n, p, H, opts);
    at::Tensor dgates = at::empty({N, 4 * H}, opts);
    const at::Tensor gc = gates.contiguous(), cc = cells.contiguous();
    if (N > 0) {
      const at::Tensor gy = grad_y.has_value() ? grad_y->contiguous() : at::Tensor();
      const at::Tensor zeros = at::zeros({H}, opts);
      const at::Tensor c0s = sorted_state<scalar_t>(c0, p, H, opts);
      const scalar_t* g = gc.const_data_ptr<scalar_t>();
      const scalar_t* c = cc.const_data_ptr<scalar_t>();
      const scalar_t* gyp = gy.defined() ? gy.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* dgp = dgates.mutable_data_ptr<scalar_t>();
      scalar_t* dhp = dh.mutable_data_ptr<scalar_t>();
      scalar_t* dcp = dc.mutable_data_ptr<scalar_t>();
      std::vector<const scalar_t*> gy_rows(batch);
      for (int64_t t = p.max_len - 1; t >= 0; --t) {
        const int64_t rows = p.bs[t], off = p.off[t];
        for (int64_t r = 0; r < rows; ++r)
          gy_rows[r] = gyp ? gyp + (p.order[r] * steps + t) * H : zeros.const_data_ptr<scalar_t>();
        const scalar_t* c_prev = t == 0 ? c0s.const_data_ptr<scalar_t>() : c + p.off[t - 1] * H;
        at::parallel_for(0, rows, grain_rows(8 * H), [&](int64_t begin, int64_t end) {
          bwd_rows<scalar_t>(g + (off + begin) * 4 * H, c + (off + begin) * H, c_prev + begin * H,
                             dhp + begin * H, gy_rows.data() + begin, dcp + begin * H, dgp + (off + begin) * 4 * H,
                             end - begin, H);
        });
        gemm<scalar_t>(false, false, rows, H, 4 * H, dgp + off * 4 * H, 4 * H, w_hh_c.const_data_ptr<scalar_t>(), H,
                       dhp);
      }
    }
    grad_h0 = unsorted_state<scalar_t>(dh, p);
    grad_c0 = unsorted_state<scalar_t>(dc, p);
    // Hidden state entering each packed row: h0 at t = 0, else h_{t-1} = o_{t-1} * tanh(c_{t-1}), recomputed
    // from the workspace. The rows of step t are ranks 0..bs[t]-1, whose step t-1 rows are contiguous too.
    at::Tensor h_prev = at::empty({N, H}, opts);
    if (N > 0) {
      h_prev.narrow(0, 0, p.bs[0]).copy_(sorted_state<scalar_t>(h0, p, H, opts).narrow(0, 0, p.bs[0]));
      const scalar_t* g = gc.const_data_ptr<scalar_t>();
      const scalar_t* c = cc.const_data_ptr<scalar_t>();
      scalar_t* hpp = h_prev.mutable_data_ptr<scalar_t>();
      for (int64_t t = 1; t < p.max_len; ++t) {
        const int64_t rows = p.bs[t], src = p.off[t - 1], dst = p.off[t];
        at::parallel_for(0, rows, grain_rows(2 * H), [&](int64_t begin, int64_t end) {
          hidden_rows<scalar_t>(g + (src + begin) * 4 * H, c + (src + begin) * H, hpp + (dst + begin) * H,
                                end - begin, H);
        });
      }
    }
    const at::Tensor xp = pack_input<scalar_t>(x, p);
    const at::Tensor dgates_t = dgates.t();
    grad_w_ih = at::mm(dgates_t, xp);
    grad_w_hh = at::mm(dgates_t, h_prev);
    grad_bias = dgates.sum(0);
    unpack_output<scalar_t>(grad_x, at::mm(dgates, w_ih_c), p);
  });
  return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("lstm", &mmfast::lstm_cpu);
  m.impl("_lstm_backward", &mmfast::lstm_backward_cpu);
}
