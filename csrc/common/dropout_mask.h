// Counter-based dropout mask shared by the CPU and CUDA kernels and mirrored in mmfast/reference.py.
// The keep/drop decision for element (row, col) of the (virtual) concatenated input is a pure function
// of (seed, row, col), so backward regenerates forward's mask instead of storing it, and CPU, CUDA and
// the reference agree bit for bit.
//   keep(row, col) = (mix32(row_hash(row) ^ col_hash(col)) >> 8) >= threshold,  threshold = floor(p * 2^24)
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMFAST_HOST_DEVICE inline
#endif

namespace mmfast {

// A 32-bit integer finaliser with low bias ("lowbias32"): full avalanche, two multiplies.
MMFAST_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct DropoutMask {
  uint32_t row_key, col_key, threshold;

  MMFAST_HOST_DEVICE DropoutMask(int64_t seed, double p) {
    const auto s = static_cast<uint64_t>(seed);
    row_key = mix32(static_cast<uint32_t>(s));
    col_key = mix32(static_cast<uint32_t>(s >> 32) ^ row_key);
    threshold = p >= 1.0 ? (1u << 24) : static_cast<uint32_t>(p * 16777216.0);
  }
  MMFAST_HOST_DEVICE uint32_t row_hash(int64_t row) const { return mix32(static_cast<uint32_t>(row) ^ row_key); }
  MMFAST_HOST_DEVICE uint32_t col_hash(int64_t col) const { return mix32(static_cast<uint32_t>(col) ^ col_key); }
  MMFAST_HOST_DEVICE bool keep(uint32_t row_h, uint32_t col_h) const { return (mix32(row_h ^ col_h) >> 8) >= threshold; }
};

// Scale applied to kept elements: 1/(1-p), or 0 when everything is dropped (as F.dropout with p=1).
MMFAST_HOST_DEVICE double dropout_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

}  // namespace mmfast
