// Definitions shared by the math headers of every op (kd_loss_math.h, dkd_math.h,
// feature_loss_math.h, attention_transfer_math.h): the inlining macro of functions that
// run on host and device, the reduction codes, the two-level row layout of [..., D]
// tensors, and the scalar policy of the element-wise formulas.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

// Inlined everywhere: on CUDA a call that is not inlined goes through the ABI and
// spills registers to local memory.
#if defined(__CUDACC__)
#define KDFAST_MATH_FN C10_HOST_DEVICE __forceinline__
#else
#define KDFAST_MATH_FN C10_HOST_DEVICE inline
#endif

namespace kdfast {

// Reduction codes of the ops. BatchMean is kd_loss's and dkd_loss's "batchmean" and
// feature_loss's "mean" (each op documents its divisor).
enum class Reduction : int64_t { BatchMean = 0, Sum = 1, None = 2 };

// Where row r of a [..., V] tensor starts, in elements:
//   (r / n_inner) * stride_outer + (r % n_inner) * stride_inner.
// Two levels cover 2-D tensors and slices such as logits[:, :-1, :] without a copy.
struct RowLayout {
  int64_t n_inner = 1;
  int64_t stride_outer = 0;
  int64_t stride_inner = 0;

  KDFAST_MATH_FN int64_t offset(int64_t row) const {
    // Branch keeps the common 2-D case free of a 64-bit division.
    if (n_inner == 1) return row * stride_outer;
    return (row / n_inner) * stride_outer + (row % n_inner) * stride_inner;
  }
};

namespace math {

// ---------------------------------------------------------------------------------------
// Scalar policy (float or double accumulators), host and device. IEEE functions only:
// the build uses no fast-math, so expf / logf are accurate and denormals are kept on
// CUDA; the formulas below are also safe where denormals flush to zero (FTZ / DAZ).

template <typename acc_t>
struct ScalarOps {
  using Scalar = acc_t;
  using V = acc_t;
  using Mask = bool;
  static KDFAST_MATH_FN V exp(V x) { return ::exp(x); }
  static KDFAST_MATH_FN V log(V x) { return ::log(x); }
  static KDFAST_MATH_FN V log1p(V x) { return ::log1p(x); }
  static KDFAST_MATH_FN V tanh(V x) { return ::tanh(x); }
  static KDFAST_MATH_FN V max(V a, V b) { return a > b ? a : b; }
  static KDFAST_MATH_FN V min(V a, V b) { return a < b ? a : b; }
  static KDFAST_MATH_FN Mask gt(V a, V b) { return a > b; }
  static KDFAST_MATH_FN Mask lt(V a, V b) { return a < b; }
  static KDFAST_MATH_FN Mask eq(V a, V b) { return a == b; }
  static KDFAST_MATH_FN V select(Mask m, V a, V b) { return m ? a : b; }
  static KDFAST_MATH_FN bool any(Mask m) { return m; }
};
template <>
KDFAST_MATH_FN float ScalarOps<float>::exp(float x) { return ::expf(x); }
template <>
KDFAST_MATH_FN float ScalarOps<float>::log(float x) { return ::logf(x); }
template <>
KDFAST_MATH_FN float ScalarOps<float>::log1p(float x) { return ::log1pf(x); }
template <>
KDFAST_MATH_FN float ScalarOps<float>::tanh(float x) { return ::tanhf(x); }

template <typename acc_t>
KDFAST_MATH_FN acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

}  // namespace math
}  // namespace kdfast
