// CPU kernels of mmfast::conv2d_relu_maxpool2d. The batch is cut into chunks of a fixed number of images
// (set by the shape alone). Per chunk: im2col into a thread-local cols [C*K*K, m*Ho*Wo], one GEMM with
// weight [O, C*K*K] into a thread-local conv [O, m*Ho*Wo], then the pool + bias + ReLU epilogue writes out
// and argmax. Ho = 2*Hp, Wo = 2*Wp: the conv row/column that floor pooling drops is never computed.
// Backward writes grad_out through argmax into a chunk's grad_conv (the 2x2 windows tile it, so every
// element is written), recomputes cols, and accumulates the weight/bias gradients per group of chunks;
// the groups are fixed by the shape and summed in order, so the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/blas.h"
#include "ops/conv2d_relu_maxpool2d/conv2d_relu_maxpool2d.h"

namespace mmfast {
namespace {

// Images per chunk: enough for kChunkCols conv outputs (one image at the benchmark shapes: measured faster
// than wider chunks, whose cols outgrow L2). Backward sums the chunks' weight gradients in at most
// kMaxGroups groups of consecutive chunks, in order; the groups' sums are then added in order.
constexpr int64_t kChunkCols = 256;
constexpr int64_t kMaxGroups = 16;

struct Geometry {
  int64_t n, c, h, w, o, k, pad;
  int64_t hp, wp;    // pooled output
  int64_t ho, wo;    // conv region that the pool reads: 2*hp x 2*wp
  int64_t hw, ckk;   // ho*wo, c*k*k
  int64_t chunk, n_chunks;  // images per chunk, chunks
  int64_t group, n_groups;  // chunks per group, groups (backward)
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t padding) {
  Geometry g;
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.o = weight.size(0), g.k = weight.size(2), g.pad = padding;
  g.hp = (g.h + 2 * padding - g.k + 1) / 2, g.wp = (g.w + 2 * padding - g.k + 1) / 2;
  g.ho = 2 * g.hp, g.wo = 2 * g.wp, g.hw = g.ho * g.wo, g.ckk = g.c * g.k * g.k;
  g.chunk = std::clamp<int64_t>(kChunkCols / g.hw, 1, std::max<int64_t>(g.n, 1));
  g.n_chunks = (g.n + g.chunk - 1) / g.chunk;
  g.group = std::max<int64_t>(1, (g.n_chunks + kMaxGroups - 1) / kMaxGroups);
  g.n_groups = (g.n_chunks + g.group - 1) / g.group;
  return g;
}

template <typename scalar_t>
std::unique_ptr<scalar_t[]> scratch(int64_t size) {
  return std::unique_ptr<scalar_t[]>(new scalar_t[size]);
}

// Valid output columns [lo, hi) of kernel column kx: 0 <= ox + kx - pad < w.
inline std::pair<int64_t, int64_t> valid_cols(const Geometry& g, int64_t kx) {
  const int64_t lo = std::min(g.wo, std::max<int64_t>(0, g.pad - kx));
  const int64_t hi = std::max(lo, std::min(g.wo, g.w + g.pad - kx));
  return {lo, hi};
}

// Column order within an image: conv row oy = 2*y + dy is stored at row_offset(oy) = dy*hp*wo + y*wo (even
// rows, then odd rows), so that the pool's 2x2 window j = y*wp + xx reads columns 2*j, 2*j + 1 of both halves:
// the pool loops run flat over a whole plane.
inline int64_t row_offset(const Geometry& g, int64_t oy) { return (oy % 2) * g.hp * g.wo + (oy / 2) * g.wo; }

// cols[(ci*K + ky)*K + kx, row_offset(oy) + ox] = x[ci, oy + ky - pad, ox + kx - pad] (0 outside x), for one
// image x [C, H, W]; cols has leading dimension ld.
template <typename scalar_t>
void im2col(const scalar_t* x, scalar_t* cols, int64_t ld, const Geometry& g) {
  for (const auto ci : c10::irange(g.c)) {
    for (const auto ky : c10::irange(g.k)) {
      for (const auto kx : c10::irange(g.k)) {
        scalar_t* row = cols + ((ci * g.k + ky) * g.k + kx) * ld;
        const auto [lo, hi] = valid_cols(g, kx);
        for (const auto oy : c10::irange(g.ho)) {
          scalar_t* dst = row + row_offset(g, oy);
          const int64_t iy = oy + ky - g.pad;
          if (iy < 0 || iy >= g.h) {
            std::fill(dst, dst + g.wo, scalar_t(0));
            continue;
          }
          const scalar_t* src = x + (ci * g.h + iy) * g.w + (lo + kx - g.pad);
          std::copy(src, src + (hi - lo), dst + lo);
          if (lo > 0) std::fill(dst, dst + lo, scalar_t(0));  // guarded: an unguarded fill costs a memset call
          if (hi < g.wo) std::fill(dst + hi, dst + g.wo, scalar_t(0));
        }
      }
    }
  }
}

// The adjoint of im2col: x[ci, iy, ix] += cols[...] over every (ky, kx, oy, ox) that reads it.
template <typename scalar_t>
void col2im(const scalar_t* cols, int64_t ld, scalar_t* x, const Geometry& g) {
  for (const auto ci : c10::irange(g.c)) {
    for (const auto ky : c10::irange(g.k)) {
      for (const auto kx : c10::irange(g.k)) {
        const scalar_t* row = cols + ((ci * g.k + ky) * g.k + kx) * ld;
        const auto [lo, hi] = valid_cols(g, kx);
        for (const auto oy : c10::irange(g.ho)) {
          const int64_t iy = oy + ky - g.pad;
          if (iy < 0 || iy >= g.h) continue;
          const scalar_t* C10_RESTRICT src = row + row_offset(g, oy) + lo;
          scalar_t* C10_RESTRICT dst = x + (ci * g.h + iy) * g.w + (lo + kx - g.pad);
          for (const auto j : c10::irange(hi - lo)) dst[j] += src[j];
        }
      }
    }
  }
}

// The hot loops below are branch-free (selects and bit masks) so that they vectorize at the baseline ISA.

// out and argmax of one [hp, wp] plane from its conv plane: even rows r0 = conv, odd rows r1 = conv + hp*wo.
// max_pool2d's scan order (0,0), (0,1), (1,0), (1,1), first of equal maxima, a NaN replaces the max; then
// bias and ReLU.
template <typename scalar_t>
void pool_bias_relu(const scalar_t* C10_RESTRICT r0, const scalar_t* C10_RESTRICT r1, scalar_t bias,
                    scalar_t* C10_RESTRICT out, uint8_t* C10_RESTRICT argmax, int64_t plane) {
  for (const auto j : c10::irange(plane)) {
    scalar_t best = r0[2 * j];
    int32_t idx = 0;
    const scalar_t v1 = r0[2 * j + 1], v2 = r1[2 * j], v3 = r1[2 * j + 1];
    const bool u1 = (v1 > best) | (v1 != v1);
    best = u1 ? v1 : best, idx = u1 ? 1 : idx;
    const bool u2 = (v2 > best) | (v2 != v2);
    best = u2 ? v2 : best, idx = u2 ? 2 : idx;
    const bool u3 = (v3 > best) | (v3 != v3);
    best = u3 ? v3 : best, idx = u3 ? 3 : idx;
    const scalar_t v = best + bias;
    const bool keep = !(v <= scalar_t(0));  // relu(NaN) is NaN, as native
    out[j] = keep ? v : scalar_t(0);
    argmax[j] = static_cast<uint8_t>(keep ? idx : int32_t(kArgmaxDropped));
  }
}

// The adjoint: the conv plane (halves r0, r1) = grad_out at each window's argmax, 0 elsewhere (the windows
// tile it, so every element is written).
template <typename scalar_t>
void unpool(const scalar_t* C10_RESTRICT grad_out, const uint8_t* C10_RESTRICT argmax, scalar_t* C10_RESTRICT r0,
            scalar_t* C10_RESTRICT r1, int64_t plane) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  const auto masked = [](bits_t value, bool keep) { return std::bit_cast<scalar_t>(value & (bits_t(0) - keep)); };
  for (const auto j : c10::irange(plane)) {
    const bits_t v = std::bit_cast<bits_t>(grad_out[j]);
    const uint8_t a = argmax[j];
    r0[2 * j] = masked(v, a == 0);
    r0[2 * j + 1] = masked(v, a == 1);
    r1[2 * j] = masked(v, a == 2);
    r1[2 * j + 1] = masked(v, a == 3);
  }
}

template <typename scalar_t>
void conv2d_relu_maxpool2d_fwd_kernel(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                      scalar_t* out, uint8_t* argmax, const Geometry& g) {
  const int64_t x_stride = g.c * g.h * g.w, out_plane = g.hp * g.wp;
  at::parallel_for(0, g.n_chunks, 1, [&](int64_t begin, int64_t end) {
    auto cols = scratch<scalar_t>(g.ckk * g.chunk * g.hw);
    auto conv = scratch<scalar_t>(g.o * g.chunk * g.hw);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n0 = chunk * g.chunk, m = std::min(g.chunk, g.n - n0), ld = m * g.hw;
      for (const auto i : c10::irange(m)) im2col(x + (n0 + i) * x_stride, cols.get() + i * g.hw, ld, g);
      gemm<scalar_t>(false, false, g.o, ld, g.ckk, weight, g.ckk, cols.get(), ld, conv.get());
      for (const auto i : c10::irange(m)) {
        for (const auto oc : c10::irange(g.o)) {
          const scalar_t* src = conv.get() + oc * ld + i * g.hw;
          const int64_t plane = ((n0 + i) * g.o + oc) * out_plane;
          pool_bias_relu(src, src + g.hw / 2, bias ? bias[oc] : scalar_t(0), out + plane, argmax + plane, out_plane);
        }
      }
    }
  });
}

// grad_parts [n_groups, O, CKK + 1]: each group's weight gradient, and its bias gradient in the last column
// (a row of ones under the chunk's cols turns the bias sums into one more GEMM column).
// grad_out is read through its strides (go_stride, [N, O, Hp, Wp]): the gradient of out.sum() arrives expanded
// (all strides 0), and materialising it would cost a full pass; a plane that is not contiguous is gathered
// into a small thread-local buffer instead.
template <typename scalar_t>
void conv2d_relu_maxpool2d_bwd_kernel(const scalar_t* grad_out, const std::array<int64_t, 4>& go_stride,
                                      const scalar_t* x, const scalar_t* weight, const uint8_t* argmax,
                                      scalar_t* grad_x, scalar_t* grad_parts, const Geometry& g) {
  const int64_t x_stride = g.c * g.h * g.w, out_plane = g.hp * g.wp;
  const bool planes_contiguous = go_stride[3] == 1 && go_stride[2] == g.wp;
  at::parallel_for(0, g.n_groups, 1, [&](int64_t begin, int64_t end) {
    auto cols = scratch<scalar_t>((g.ckk + 1) * g.chunk * g.hw);
    auto grad_conv = scratch<scalar_t>(g.o * g.chunk * g.hw);
    auto gathered = scratch<scalar_t>(planes_contiguous ? 0 : out_plane);
    for (int64_t chunk = begin * g.group; chunk < std::min(end * g.group, g.n_chunks); ++chunk) {
      const int64_t n0 = chunk * g.chunk, m = std::min(g.chunk, g.n - n0), ld = m * g.hw;
      for (const auto oc : c10::irange(g.o)) {
        for (const auto i : c10::irange(m)) {
          const scalar_t* go = grad_out + (n0 + i) * go_stride[0] + oc * go_stride[1];
          if (!planes_contiguous) {
            for (const auto y : c10::irange(g.hp)) {
              for (const auto xx : c10::irange(g.wp)) gathered[y * g.wp + xx] = go[y * go_stride[2] + xx * go_stride[3]];
            }
            go = gathered.get();
          }
          const int64_t plane = ((n0 + i) * g.o + oc) * out_plane;
          scalar_t* dst = grad_conv.get() + oc * ld + i * g.hw;
          unpool(go, argmax + plane, dst, dst + g.hw / 2, out_plane);
        }
      }
      for (const auto i : c10::irange(m)) im2col(x + (n0 + i) * x_stride, cols.get() + i * g.hw, ld, g);
      std::fill(cols.get() + g.ckk * ld, cols.get() + (g.ckk + 1) * ld, scalar_t(1));
      gemm<scalar_t>(false, true, g.o, g.ckk + 1, ld, grad_conv.get(), ld, cols.get(), ld,
                     grad_parts + chunk / g.group * g.o * (g.ckk + 1), /*accumulate=*/chunk % g.group != 0);
      if (grad_x != nullptr) {
        // cols is free again: reuse it for grad_cols = weight^T @ grad_conv.
        gemm<scalar_t>(true, false, g.ckk, ld, g.o, weight, g.ckk, grad_conv.get(), ld, cols.get());
        for (const auto i : c10::irange(m)) {
          scalar_t* gx = grad_x + (n0 + i) * x_stride;
          std::fill(gx, gx + x_stride, scalar_t(0));
          col2im(cols.get() + i * g.hw, ld, gx, g);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             int64_t padding) {
  check_conv2d_relu_maxpool2d_inputs(x, weight, bias, padding);
  const Geometry g = make_geometry(x, weight, padding);
  at::Tensor out = at::empty({g.n, g.o, g.hp, g.wp}, x.options());
  at::Tensor argmax = at::empty({g.n, g.o, g.hp, g.wp}, x.options().dtype(at::kByte));
  if (g.n == 0) return {out, argmax};
  const at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  const at::Tensor b_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_relu_maxpool2d_cpu", [&] {
    conv2d_relu_maxpool2d_fwd_kernel<scalar_t>(x_c.const_data_ptr<scalar_t>(), w_c.const_data_ptr<scalar_t>(),
                                               b_c.defined() ? b_c.const_data_ptr<scalar_t>() : nullptr,
                                               out.mutable_data_ptr<scalar_t>(), argmax.mutable_data_ptr<uint8_t>(),
                                               g);
  });
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& argmax,
    int64_t padding, bool need_grad_x) {
  check_conv2d_relu_maxpool2d_backward_inputs(grad_out, x, weight, argmax, padding);
  const Geometry g = make_geometry(x, weight, padding);

  at::Tensor grad_x = need_grad_x ? at::empty({g.n, g.c, g.h, g.w}, x.options()) : x.new_empty({0});
  at::Tensor grad_weight = at::zeros({g.o, g.c, g.k, g.k}, weight.options());
  at::Tensor grad_bias = at::zeros({g.o}, weight.options());
  if (g.n == 0) return {grad_x, grad_weight, grad_bias};

  const at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  const std::array<int64_t, 4> go_stride{grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                                         grad_out.stride(3)};
  const at::Tensor am_c = argmax.contiguous();
  at::Tensor grad_parts = at::empty({g.n_groups, g.o, g.ckk + 1}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu", [&] {
    conv2d_relu_maxpool2d_bwd_kernel<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(), go_stride, x_c.const_data_ptr<scalar_t>(), w_c.const_data_ptr<scalar_t>(),
        am_c.const_data_ptr<uint8_t>(), need_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
        grad_parts.mutable_data_ptr<scalar_t>(), g);
    // Sum the groups' partial gradients in group order (fixed for a given shape).
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    const scalar_t* part = grad_parts.const_data_ptr<scalar_t>();
    for (int64_t group = 0; group < g.n_groups; ++group) {
      for (const auto oc : c10::irange(g.o)) {
        for (const auto j : c10::irange(g.ckk)) gw[oc * g.ckk + j] += part[j];
        gb[oc] += part[g.ckk];
        part += g.ckk + 1;
      }
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("conv2d_relu_maxpool2d", &mmfast::conv2d_relu_maxpool2d_cpu);
  m.impl("_conv2d_relu_maxpool2d_backward", &mmfast::conv2d_relu_maxpool2d_backward_cpu);
}
