// The math of attention_transfer, written once for every backend (Zagoruyko & Komodakis,
// ICLR 2017). For one sample of an [N, C, H, W] feature map x, with P = H * W positions:
//
//   A[j]  = (1 / C) sum_c |x[c, j]|^p                      (the attention map, j < P)
//   a     = A / max(||A||_2, eps),  eps = 1e-12             (F.normalize(A, dim=1))
//   loss  = 1 / (N P) sum_n sum_j (a_s[j] - a_t[j])^2       (the mean over N * P)
//
// Gradient of one sample, with d = a_s - a_t, its loss receiving the gradient `weight`,
// c = 2 weight / (N P) (so dL / da_s = c d and dL / da_t = -c d) and n_s = ||A_s||:
//
//   dL / dA_s[j] = c (d[j] - a_s[j] <a_s, d>) / n_s     when n_s >= eps (the projection
//                                                       of F.normalize's Jacobian),
//                = c d[j] / eps                         when n_s < eps (the clamp is
//                                                       constant; zero maps),
//   dL / dx[c, j] = (p / C) |x[c, j]|^(p - 1) sign(x[c, j]) dL / dA[j],
//
// and likewise for the teacher with -d and <a_t, d>. The per-sample scalars (norms and
// the two inner products) make the weight of a position a function of that position
// alone, w_s[j] = k_s (d[j] - proj_s a_s[j]), so the gradient of x[:, j] needs A_s[j],
// A_t[j] and five numbers per sample (the statistics below).
//
// Scalar functions are C10_HOST_DEVICE; element-wise ones are templates over an `Ops`
// policy (AtScalarOps below for host and CUDA threads, the CPU's at::vec policy in
// csrc/cpu/attention_transfer_kernel.h), so every backend computes the same expression.
#pragma once

#include "common_math.h"

namespace kdfast {

// How |x|^p is computed: p = 1 and p = 2 exactly without pow (x * x for p = 2), any other
// p >= 1 with pow.
enum class PowerKind : int64_t { One = 0, Two = 1, General = 2 };

inline PowerKind power_kind(double p) {
  return p == 1.0 ? PowerKind::One : (p == 2.0 ? PowerKind::Two : PowerKind::General);
}

// F.normalize's default eps: ||A|| below it is replaced by it.
constexpr double kAttentionNormEps = 1e-12;

// Columns of the per-sample statistics [N, kAtStatsCols] written by the forward; the
// recomputing backward reads the first four.
constexpr int64_t kAtStatsCols = 5;
enum AtStatsCol : int64_t {
  kAtNormS = 0,  // ||A_s||_2
  kAtNormT = 1,  // ||A_t||_2
  kAtDotS = 2,   // <a_s, a_s - a_t>
  kAtDotT = 3,   // <a_t, a_s - a_t>
  kAtSqDist = 4  // ||a_s - a_t||^2, the sample's loss before the 1 / (N P)
};

namespace math {

// The scalar policy with what attention transfer adds: abs and pow.
template <typename acc_t>
struct AtScalarOps : ScalarOps<acc_t> {
  static KDFAST_MATH_FN acc_t abs(acc_t x) { return ::fabs(x); }
  static KDFAST_MATH_FN acc_t pow(acc_t x, acc_t y) { return ::pow(x, y); }
};
template <>
KDFAST_MATH_FN float AtScalarOps<float>::abs(float x) { return ::fabsf(x); }
template <>
KDFAST_MATH_FN float AtScalarOps<float>::pow(float x, float y) { return ::powf(x, y); }

// ---------------------------------------------------------------------------------------
// Element-wise formulas (V is a scalar or a SIMD vector).

// |x|^p; 0 for x = 0 (so zero padding adds nothing).
template <PowerKind kind, class Ops>
KDFAST_MATH_FN typename Ops::V power(const typename Ops::V& x, const typename Ops::V& p) {
  if constexpr (kind == PowerKind::One) {
    return Ops::abs(x);
  } else if constexpr (kind == PowerKind::Two) {
    return x * x;
  } else {
    return Ops::pow(Ops::abs(x), p);
  }
}

// d |x|^p / dx divided by p: |x|^(p - 1) sign(x), with sign(0) = 0 (as autograd's abs;
// for p > 1 the power is 0 there anyway). pm1 = p - 1. NaN stays NaN for p != 1; for
// p = 1 the position weight is NaN whenever x is.
template <PowerKind kind, class Ops>
KDFAST_MATH_FN typename Ops::V power_slope(const typename Ops::V& x, const typename Ops::V& pm1) {
  using V = typename Ops::V;
  if constexpr (kind == PowerKind::Two) {
    return x;
  } else {
    const V sign = Ops::select(Ops::gt(x, V(0)), V(1), Ops::select(Ops::lt(x, V(0)), V(-1), V(0)));
    if constexpr (kind == PowerKind::One) {
      return sign;
    } else {
      return Ops::pow(Ops::abs(x), pm1) * sign;
    }
  }
}

// The normalised maps of one position and their difference d = a_s - a_t.
template <class Ops>
KDFAST_MATH_FN void normalized(const typename Ops::V& map_s, const typename Ops::V& map_t,
                               const typename Ops::V& denom_s, const typename Ops::V& denom_t,
                               typename Ops::V& a_s, typename Ops::V& a_t, typename Ops::V& d) {
  a_s = map_s / denom_s;
  a_t = map_t / denom_t;
  d = a_s - a_t;
}

// ---------------------------------------------------------------------------------------
// Per-sample scalars.

// max(norm, eps) as F.normalize's clamp_min; a NaN norm stays NaN (so does the sample).
template <typename acc_t>
KDFAST_MATH_FN acc_t norm_denominator(acc_t norm) {
  const acc_t eps = static_cast<acc_t>(kAttentionNormEps);
  return norm < eps ? eps : norm;
}

// Constants of the position weights of one sample:
//   w_s[j] = k_s (d[j] - proj_s a_s[j]),   w_t[j] = k_t (d[j] - proj_t a_t[j]),
// the p / C of d|x|^p / dx and d A / d x included, so dL / dx[c, j] = w[j] power_slope(x).
template <typename acc_t>
struct PositionWeightConsts {
  acc_t denom_s, denom_t;  // max(||A||, eps)
  acc_t k_s, k_t;
  acc_t proj_s, proj_t;
};

// From the sample's statistics (stats: kAtStatsCols values) and the gradient reaching
// the sample's loss before the mean (weight / (N P) is the gradient of its ||d||^2).
template <typename acc_t>
KDFAST_MATH_FN PositionWeightConsts<acc_t> position_weight_consts(const acc_t* stats, acc_t weight,
                                                                  int64_t samples, int64_t positions,
                                                                  int64_t channels_s, int64_t channels_t,
                                                                  acc_t p) {
  const acc_t eps = static_cast<acc_t>(kAttentionNormEps);
  PositionWeightConsts<acc_t> k;
  k.denom_s = norm_denominator(stats[kAtNormS]);
  k.denom_t = norm_denominator(stats[kAtNormT]);
  // c = 2 weight / (N P); the products stay in acc_t, N P may exceed 2^24 (rounded once).
  const acc_t c = acc_t(2) * weight / (static_cast<acc_t>(samples) * static_cast<acc_t>(positions));
  k.k_s = c * p / (static_cast<acc_t>(channels_s) * k.denom_s);
  k.k_t = -c * p / (static_cast<acc_t>(channels_t) * k.denom_t);
  // Below eps the denominator is the constant eps: no projection.
  k.proj_s = stats[kAtNormS] < eps ? acc_t(0) : stats[kAtDotS];
  k.proj_t = stats[kAtNormT] < eps ? acc_t(0) : stats[kAtDotT];
  return k;
}

// w_s and w_t of one position (or vector of positions) from its two map values.
template <class Ops>
KDFAST_MATH_FN void position_weights(const typename Ops::V& map_s, const typename Ops::V& map_t,
                                     const PositionWeightConsts<typename Ops::V>& k, typename Ops::V& w_s,
                                     typename Ops::V& w_t) {
  typename Ops::V a_s, a_t, d;
  normalized<Ops>(map_s, map_t, k.denom_s, k.denom_t, a_s, a_t, d);
  w_s = k.k_s * (d - k.proj_s * a_s);
  w_t = k.k_t * (d - k.proj_t * a_t);
}

}  // namespace math
}  // namespace kdfast
