// The per-row math of feature_loss, written once for every backend.
//
// A row is a pair of feature vectors s, t (the last dimension, D elements). With
// normalize, u = s / max(||s||, 1e-12) and v = t / max(||t||, 1e-12) (F.normalize);
// otherwise u = s, v = t. The row loss is
//   mse        sum_d (u_d - v_d)^2
//   l1         sum_d |u_d - v_d|
//   smooth_l1  sum_d h(u_d - v_d), h(x) = 0.5 x^2 if |x| < 1 else |x| - 0.5
//   cosine     1 - (u / max(||u||, 1e-8)) . (v / max(||v||, 1e-8))
// and its gradient is the exact derivative of that formula (a clamp has zero derivative
// where it is active).
//
// Gradients. For cosine (and mse with normalize) the gradient is linear in the inputs,
// g_s = a u + b v and g_t = c u + d v with per-row scalars from ||s||^2, ||t||^2 and s.t
// (LinearGrad): one pass for the three sums, one pass writing the gradients. With
//   nu = max(||u||, 1e-8), nv likewise, cos = u.v / (nu nv):
//   d cosine / d u = [||u|| >= 1e-8] cos / nu^2 u - v / (nu nv)   (and symmetrically)
//   d mse / d u = 2 u - 2 v
// and through the normalisation u = s / ns (ns = max(||s||, 1e-12)):
//   g_s = (g_u - [||s|| >= 1e-12] u (u . g_u)) / ns,
// which keeps the form a u + b v (u . u = 1 where the norm is not clamped). For l1 and
// smooth_l1 with normalize g_u is element-wise, so u . g_u and v . g_u take one more
// pass over the row (ElementChain).
//
// Element-wise formulas are templates over an `Ops` policy (common_math.h's ScalarOps,
// the CPU's at::vec VecOps); row scalars are host-device functions of acc_t.
#pragma once

#include "common_math.h"

namespace kdfast {

enum class FeatureKind : int64_t { MSE = 0, L1 = 1, SmoothL1 = 2, Cosine = 3 };

// Columns of the per-row statistics: ||s||^2, ||t||^2, s.t of the raw rows (zeros for
// the kinds that need none: mse, l1, smooth_l1 without normalize).
constexpr int64_t kFeatureStatsCols = 3;

namespace math {

constexpr double kNormalizeEps = 1e-12;  // F.normalize's eps
constexpr double kCosineEps = 1e-8;      // F.cosine_similarity's eps

// Whether a kind (with or without normalize) needs the row's dot products.
KDFAST_MATH_FN bool feature_needs_dots(FeatureKind kind, bool normalize) {
  return normalize || kind == FeatureKind::Cosine;
}

// Whether the elementwise losses are divided by D under reduction "mean".
KDFAST_MATH_FN bool feature_elementwise(FeatureKind kind) { return kind != FeatureKind::Cosine; }

// ---------------------------------------------------------------------------------------
// Element-wise formulas of the difference x = u_d - v_d (V: scalar or SIMD vector).

template <class Ops>
KDFAST_MATH_FN typename Ops::V abs_value(const typename Ops::V& x) {
  using V = typename Ops::V;
  return Ops::max(x, V(0) - x);  // NaN propagates through both policies' max
}

template <FeatureKind kind, class Ops>
KDFAST_MATH_FN typename Ops::V element_loss(const typename Ops::V& x) {
  using V = typename Ops::V;
  if constexpr (kind == FeatureKind::MSE) {
    return x * x;
  } else if constexpr (kind == FeatureKind::L1) {
    return abs_value<Ops>(x);
  } else {
    const V a = abs_value<Ops>(x);
    return Ops::select(Ops::lt(a, V(1)), V(0.5) * x * x, a - V(0.5));
  }
}

// d element_loss / dx: 2x; sign(x) with 0 at 0 (and at NaN, as torch's abs); x clamped
// to [-1, 1] (NaN stays NaN, as torch's smooth_l1_loss).
template <FeatureKind kind, class Ops>
KDFAST_MATH_FN typename Ops::V element_grad(const typename Ops::V& x) {
  using V = typename Ops::V;
  if constexpr (kind == FeatureKind::MSE) {
    return x + x;
  } else if constexpr (kind == FeatureKind::L1) {
    return Ops::select(Ops::gt(x, V(0)), V(1), V(0)) - Ops::select(Ops::lt(x, V(0)), V(1), V(0));
  } else {
    return Ops::select(Ops::gt(x, V(1)), V(1), Ops::select(Ops::lt(x, V(-1)), V(-1), x));
  }
}

// ---------------------------------------------------------------------------------------
// Row scalars.

// Three sums over a row: (||s||^2, ||t||^2, s.t) in pass 1, (loss, s.g_u, t.g_u) in the
// element pass of l1 / smooth_l1 with normalize.
template <typename acc_t>
struct RowTriple {
  acc_t a, b, c;
};

template <typename acc_t>
KDFAST_MATH_FN RowTriple<acc_t> operator+(const RowTriple<acc_t>& x, const RowTriple<acc_t>& y) {
  return {x.a + y.a, x.b + y.b, x.c + y.c};
}

template <typename acc_t>
KDFAST_MATH_FN acc_t sqrt_of(acc_t x) {
  return ::sqrt(x);
}
template <>
KDFAST_MATH_FN float sqrt_of(float x) {
  return ::sqrtf(x);
}

// max(x, eps), with NaN propagating (a NaN row stays NaN).
template <typename acc_t>
KDFAST_MATH_FN acc_t clamp_min_nan(acc_t x, acc_t eps) {
  return x < eps ? eps : x;
}

// The normalisation of one side: x / max(||x||, 1e-12), or the identity.
template <typename acc_t>
struct RowNorm {
  acc_t inv;       // 1 / max(||x||, 1e-12); 1 without normalize
  bool unclamped;  // ||x|| >= 1e-12: the norm's derivative passes the clamp; false without normalize
  acc_t norm;      // ||u|| of the normalised (or raw) vector
};

template <typename acc_t>
KDFAST_MATH_FN RowNorm<acc_t> row_norm(acc_t squared_norm, bool normalize) {
  const acc_t n = sqrt_of(squared_norm);
  if (!normalize) return {acc_t(1), false, n};
  const acc_t eps = static_cast<acc_t>(kNormalizeEps);
  const bool unclamped = !(n < eps);
  const acc_t inv = acc_t(1) / clamp_min_nan(n, eps);
  // An unclamped normalised vector has norm 1 exactly (not its rounded recomputation).
  return {inv, unclamped, unclamped ? acc_t(1) : n * inv};
}

// Gradient of a row that is linear in the (normalised) vectors: g_s = su * u + sv * v,
// g_t = tu * u + tv * v (already times the row's weight), u = s * inv_s, v = t * inv_t.
// In u and v rather than s and t: the coefficients of a zero row pair stay finite in
// float32 (up to 1e28) where those of s and t would overflow (1e40) times a zero vector.
template <typename acc_t>
struct LinearGrad {
  acc_t su, sv, tu, tv;
};

// Everything a row's passes need, from its dot products (when the kind needs them).
template <typename acc_t>
struct FeatureRow {
  acc_t loss;  // cosine: the row's loss; other kinds: computed by an element pass
  RowNorm<acc_t> s, t;
  LinearGrad<acc_t> grad;  // cosine, and mse with normalize
};

// d loss / d u = au u + bu v, d loss / d v = av v + bv u, mapped to the raw inputs through
// the normalisation (identity without it) and scaled by the weight w. uv = u . v.
template <typename acc_t>
KDFAST_MATH_FN LinearGrad<acc_t> chain_linear(acc_t au, acc_t bu, acc_t av, acc_t bv, acc_t uv,
                                              const RowNorm<acc_t>& s, const RowNorm<acc_t>& t, acc_t w) {
  // The normalisation's Jacobian (I - [unclamped] u u^T) / ns turns g_u = au u + bu v into
  // ((au - [unclamped] (au + bu uv)) u + bu v) / ns, as u . u = 1 where unclamped.
  LinearGrad<acc_t> g;
  g.su = w * (s.unclamped ? -bu * uv : au) * s.inv;
  g.sv = w * bu * s.inv;
  g.tv = w * (t.unclamped ? -bv * uv : av) * t.inv;
  g.tu = w * bv * t.inv;
  return g;
}

// Row scalars of kind / normalize from the raw dot products (ignored by the kinds that
// need none) and the weight w of the row's loss.
template <FeatureKind kind, bool kNormalize, typename acc_t>
KDFAST_MATH_FN FeatureRow<acc_t> feature_row(const RowTriple<acc_t>& dots, acc_t w) {
  FeatureRow<acc_t> r{};
  r.s = row_norm(dots.a, kNormalize);
  r.t = row_norm(dots.b, kNormalize);
  const acc_t uv = dots.c * r.s.inv * r.t.inv;
  if constexpr (kind == FeatureKind::Cosine) {
    const acc_t eps = static_cast<acc_t>(kCosineEps);
    const acc_t nu = clamp_min_nan(r.s.norm, eps), nv = clamp_min_nan(r.t.norm, eps);
    const acc_t inv_uv = acc_t(1) / (nu * nv);
    const acc_t cos = uv * inv_uv;
    r.loss = acc_t(1) - cos;
    // d/du of -u.v / (nu nv): -v / (nu nv) + [||u|| >= eps] cos u / nu^2.
    const acc_t au = r.s.norm < eps ? acc_t(0) : cos / (nu * nu);
    const acc_t av = r.t.norm < eps ? acc_t(0) : cos / (nv * nv);
    r.grad = chain_linear(au, -inv_uv, av, -inv_uv, uv, r.s, r.t, w);
  } else if constexpr (kind == FeatureKind::MSE && kNormalize) {
    r.grad = chain_linear(acc_t(2), acc_t(-2), acc_t(2), acc_t(-2), uv, r.s, r.t, w);
  }
  return r;
}

// Gradient of l1 / smooth_l1 with normalize, from the element gradient g_u (g_v = -g_u)
// and the sums sg = s . g_u, tg = t . g_u:
//   g_s = gu_s * g_u + s_s * s,  g_t = gu_t * g_u + t_t * t  (times the weight w).
template <typename acc_t>
struct ElementChain {
  acc_t gu_s, s_s, gu_t, t_t;
};

template <typename acc_t>
KDFAST_MATH_FN ElementChain<acc_t> element_chain(const FeatureRow<acc_t>& r, acc_t sg, acc_t tg, acc_t w) {
  // g_s = (g_u - [unclamped] u (u . g_u)) / ns with u = s / ns; g_t likewise with -g_u.
  ElementChain<acc_t> c;
  c.gu_s = w * r.s.inv;
  c.s_s = r.s.unclamped ? -w * sg * r.s.inv * r.s.inv * r.s.inv : acc_t(0);
  c.gu_t = -w * r.t.inv;
  c.t_t = r.t.unclamped ? w * tg * r.t.inv * r.t.inv * r.t.inv : acc_t(0);
  return c;
}

// The weight of one row's loss in a reduction "mean": 1 / (selected rows * D) for the
// element-wise kinds, 1 / selected rows for cosine (1 when no row is selected: then no
// row has a gradient).
KDFAST_MATH_FN double feature_mean_weight(FeatureKind kind, int64_t selected, int64_t dim) {
  const double n = static_cast<double>(selected > 0 ? selected : 1);
  return 1.0 / (feature_elementwise(kind) ? n * static_cast<double>(dim) : n);
}

}  // namespace math
}  // namespace kdfast
