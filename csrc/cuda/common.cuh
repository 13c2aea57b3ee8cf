// CUDA building blocks shared by the kernels of every op: 16-byte vector groups of a
// row, block-wide reductions with a fixed order (bitwise reproducible results).
#pragma once

#include <cuda_runtime.h>

#include <cassert>
#include <cmath>
#include <cstdint>

namespace kdfast {
namespace cuda {

// Helpers are host-device so the per-thread math can also be exercised on the host.
#define KDFAST_HD __host__ __device__ __forceinline__

constexpr int kWarp = 32;

KDFAST_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The raw elements of one group, kept in the input dtype until used (fewer registers
// than converting on load, so more loads stay in flight).
template <typename T, int VEC>
struct alignas(16) Group {
  T e[VEC];
};

// Loads the group starting at element lo of row; elements outside [0, n) read as pad:
// -inf by default, which the softmax formulas treat as masked vocabulary (zero
// probability, zero contribution); sums of products pass 0.
// vec: the group is full and on the 16-byte grid.
template <int VEC, typename T>
KDFAST_HD void load_group(const T* __restrict__ row, int64_t lo, int64_t n, bool full, bool vec,
                          Group<T, VEC>& out, float pad = -INFINITY) {
  constexpr int kChunks = VEC * static_cast<int>(sizeof(T)) / 16;
  static_assert(kChunks * 16 == VEC * static_cast<int>(sizeof(T)), "a group is whole 16-byte vectors");
  if (full && vec) {
    const uint4* src = reinterpret_cast<const uint4*>(row + lo);
    uint4* dst = reinterpret_cast<uint4*>(out.e);
#ifdef __CUDA_ARCH__
#pragma unroll
    for (int c = 0; c < kChunks; ++c) dst[c] = __ldg(src + c);
#else
    assert((reinterpret_cast<uintptr_t>(src) & 15u) == 0);  // host simulation: vector loads stay aligned
    for (int c = 0; c < kChunks; ++c) dst[c] = src[c];
#endif
  } else if (full) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.e[k] = row[lo + k];
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = lo + k;
      out.e[k] = (j >= 0 && j < n) ? row[j] : static_cast<T>(pad);
    }
  }
}

template <int VEC, typename T>
KDFAST_HD void store_group(T* __restrict__ row, int64_t lo, int64_t begin, int64_t end, bool full, bool vec,
                           const Group<T, VEC>& v) {
  if (full && vec) {
    uint4* dst = reinterpret_cast<uint4*>(row + lo);
    const uint4* src = reinterpret_cast<const uint4*>(v.e);
#pragma unroll
    for (int c = 0; c < VEC * static_cast<int>(sizeof(T)) / 16; ++c) dst[c] = src[c];
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = lo + k;
      if (j >= begin && j < end) row[j] = v.e[k];
    }
  }
}

__device__ __forceinline__ float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
__device__ __forceinline__ double shfl_xor(double v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

// Reduces v over the block; every thread gets the result. Needs every thread of the block
// (blockDim.x a multiple of 32, at most 1024); smem holds blockDim.x / 32 values.
// The order of the reduction is fixed, so results are bitwise reproducible.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, const Op& op, T* smem) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  const int warps = blockDim.x / kWarp;
  for (int i = 1; i < warps; ++i) r = op(r, smem[i]);
  __syncthreads();  // smem is reused by the next reduction
  return r;
}

}  // namespace cuda
}  // namespace kdfast
