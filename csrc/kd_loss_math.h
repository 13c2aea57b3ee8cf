// The per-row math of kd_loss, written once for every backend (docs/kd_loss_math.md).
//
// Scalar functions are C10_HOST_DEVICE, so the CPU kernels, the CUDA kernels and the
// host code share them. Element-wise formulas are templates over an `Ops` policy: the
// scalar policy of common_math.h (float / double, host and device) and the CPU's at::vec policy
// (csrc/cpu/kd_loss_kernel.h), so the vectorised CPU loop and the CUDA thread compute
// the same expression; a fix to a formula lands here once.
#pragma once

#include "common_math.h"

namespace kdfast {

enum class Divergence : int64_t { ForwardKL = 0, ReverseKL = 1, JSD = 2 };

// Columns of the per-row statistics written by the forward and read by the backward.
constexpr int64_t kStatsCols = 7;
enum StatsCol : int64_t {
  kMaxS = 0, kMaxT = 1, kLogZS = 2, kLogZT = 3, kLogZS1 = 4, kAuxS = 5, kAuxT = 6
};

namespace math {

// ---------------------------------------------------------------------------------------
// Element-wise formulas, generic over the policy (V is a scalar or a SIMD vector).

// w * (a - b), or 0 where the weight w is 0: a zero-probability term contributes
// nothing even when its log difference is -inf - (-inf) = NaN (masked vocabulary).
template <class Ops>
KDFAST_MATH_FN typename Ops::V weighted_diff(const typename Ops::V& w, const typename Ops::V& a,
                                                     const typename Ops::V& b) {
  using V = typename Ops::V;
  return Ops::select(Ops::gt(w, V(0)), w * (a - b), V(0));
}

// Gemma-style soft-capping, cap * tanh(x / cap), applied to raw logits before the
// temperature. -inf (masked vocabulary) stays -inf.
template <class Ops>
KDFAST_MATH_FN typename Ops::V softcap(const typename Ops::V& x, const typename Ops::V& cap,
                                               const typename Ops::V& inv_cap) {
  using V = typename Ops::V;
  return Ops::select(Ops::eq(x, V(neg_inf<typename Ops::Scalar>())), x, cap * Ops::tanh(x * inv_cap));
}

// d softcap(x) / dx from the capped value: 1 - tanh(x / cap)^2; 1 on masked entries
// (they pass the gradient through unchanged, as without a cap).
template <class Ops>
KDFAST_MATH_FN typename Ops::V softcap_slope(const typename Ops::V& capped,
                                                     const typename Ops::V& inv_cap) {
  using V = typename Ops::V;
  const V u = capped * inv_cap;
  return Ops::select(Ops::eq(capped, V(neg_inf<typename Ops::Scalar>())), V(1), V(1) - u * u);
}

// Constants of the JSD mixture m = beta p + (1 - beta) q.
template <typename V>
struct Mixture {
  V beta, beta1, log_beta, log_beta1, tiny;
};

template <typename acc_t>
KDFAST_MATH_FN Mixture<acc_t> make_mixture(acc_t beta) {
  // Below `tiny` a product beta * p may have flushed to zero (or lost bits as a
  // denormal) while p itself has not: log m is then taken in log space.
  constexpr acc_t tiny = std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();
  return {beta, acc_t(1) - beta, ScalarOps<acc_t>::log(beta), ScalarOps<acc_t>::log1p(-beta), tiny};
}

// log m = log(beta p + (1 - beta) q), safe under flush-to-zero: where m is not safely
// normal it is logaddexp(log p + log beta, log q + log(1 - beta)), which stays finite
// while either probability is non-zero in log space (e.g. p = 1e-38, q = 0).
template <class Ops>
KDFAST_MATH_FN typename Ops::V log_mixture(const typename Ops::V& log_p, const typename Ops::V& log_q,
                                                   const typename Ops::V& p, const typename Ops::V& q,
                                                   const Mixture<typename Ops::V>& k) {
  using V = typename Ops::V;
  const V m = k.beta * p + k.beta1 * q;
  V out = Ops::log(m);
  const auto small = Ops::lt(m, k.tiny);
  if (Ops::any(small)) {
    const V a = log_p + k.log_beta, b = log_q + k.log_beta1;
    const V hi = Ops::max(a, b), lo = Ops::min(a, b);
    // hi == -inf: both probabilities are zero, so is m (and exp(lo - hi) would be NaN).
    const V safe = Ops::select(Ops::eq(hi, V(-INFINITY)), hi, hi + Ops::log1p(Ops::exp(lo - hi)));
    out = Ops::select(small, safe, out);
  }
  return out;
}

// Per-row constants of the gradient (see "Gradients" in docs/kd_loss_math.md).
template <typename V>
struct GradConsts {
  V c;             // (1 - alpha) T w: the T^2 of the loss times d(s/T)/ds times the row weight
  V aux_s, aux_t;  // the divergence terms of the row (stats columns 5 and 6)
};

// Divergence part of d loss / d s_j and d loss / d t_j for one element (or vector),
// from log-probabilities and probabilities at temperature T.
template <Divergence div, class Ops>
KDFAST_MATH_FN void divergence_grads(const typename Ops::V& log_q, const typename Ops::V& log_p,
                                             const typename Ops::V& q, const typename Ops::V& p,
                                             const GradConsts<typename Ops::V>& k,
                                             const Mixture<typename Ops::V>& mix, typename Ops::V& gs,
                                             typename Ops::V& gt) {
  if constexpr (div == Divergence::ForwardKL) {
    gs = k.c * (q - p);
    gt = k.c * (weighted_diff<Ops>(p, log_p, log_q) - p * k.aux_t);
  } else if constexpr (div == Divergence::ReverseKL) {
    gs = k.c * (weighted_diff<Ops>(q, log_q, log_p) - q * k.aux_s);
    gt = k.c * (p - q);
  } else {
    const typename Ops::V log_m = log_mixture<Ops>(log_p, log_q, p, q, mix);
    gs = k.c * mix.beta1 * (weighted_diff<Ops>(q, log_q, log_m) - q * k.aux_s);
    gt = k.c * mix.beta * (weighted_diff<Ops>(p, log_p, log_m) - p * k.aux_t);
  }
}

// The terms of KL(p||m) and KL(q||m) of one element (or vector), JSD's loss.
template <class Ops>
KDFAST_MATH_FN void jsd_terms(const typename Ops::V& log_q, const typename Ops::V& log_p,
                                      const typename Ops::V& q, const typename Ops::V& p,
                                      const Mixture<typename Ops::V>& mix, typename Ops::V& kl_pm,
                                      typename Ops::V& kl_qm) {
  const typename Ops::V log_m = log_mixture<Ops>(log_p, log_q, p, q, mix);
  kl_pm = kl_pm + weighted_diff<Ops>(p, log_p, log_m);
  kl_qm = kl_qm + weighted_diff<Ops>(q, log_q, log_m);
}

// ---------------------------------------------------------------------------------------
// Streaming sums of a row, relative to running maxima of the (capped) logits:
//   z_s = sum exp((s - max_s) / T), z_t likewise, z_s1 = sum exp(s - max_s),
//   w = sum e_t (x_t - x_s) (forward KL) or sum e_s (x_s - x_t) (reverse KL),
// with x = (logit - max) / T. max == -inf means only masked (or no) elements so far.

template <typename acc_t>
struct RowSums {
  acc_t max_s, max_t, z_s, z_t, z_s1, w;
};

template <typename acc_t>
KDFAST_MATH_FN RowSums<acc_t> empty_sums() {
  return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Moves the sums to larger maxima exactly: sums scale by exp(-delta), w also shifts.
template <Divergence div, typename acc_t>
KDFAST_MATH_FN void rescale(RowSums<acc_t>& st, acc_t new_max_s, acc_t new_max_t, acc_t inv_temp,
                                    bool with_s1) {
  using Ops = ScalarOps<acc_t>;
  if (new_max_t != st.max_t) {
    if (st.max_t != neg_inf<acc_t>()) {
      const acc_t delta = (new_max_t - st.max_t) * inv_temp;
      const acc_t r = Ops::exp(-delta);
      if (div == Divergence::ForwardKL) st.w = r * (st.w - delta * st.z_t);
      if (div == Divergence::ReverseKL) st.w += delta * st.z_s;
      st.z_t *= r;
    }
    st.max_t = new_max_t;
  }
  if (new_max_s != st.max_s) {
    if (st.max_s != neg_inf<acc_t>()) {
      const acc_t delta = (new_max_s - st.max_s) * inv_temp;
      const acc_t r = Ops::exp(-delta);
      if (div == Divergence::ReverseKL) st.w = r * (st.w - delta * st.z_s);
      if (div == Divergence::ForwardKL) st.w += delta * st.z_t;
      st.z_s *= r;
      if (with_s1) st.z_s1 *= Ops::exp(st.max_s - new_max_s);
    }
    st.max_s = new_max_s;
  }
}

// Combines the sums of two parts of a row (split rows, block reductions).
template <Divergence div, typename acc_t>
KDFAST_MATH_FN RowSums<acc_t> merge_sums(RowSums<acc_t> a, RowSums<acc_t> b, acc_t inv_temp,
                                                 bool with_s1) {
  using Ops = ScalarOps<acc_t>;
  // NaN maxima propagate, so a NaN anywhere makes the merged row undefined.
  const acc_t ms = (a.max_s != a.max_s || b.max_s != b.max_s) ? a.max_s + b.max_s : Ops::max(a.max_s, b.max_s);
  const acc_t mt = (a.max_t != a.max_t || b.max_t != b.max_t) ? a.max_t + b.max_t : Ops::max(a.max_t, b.max_t);
  rescale<div>(a, ms, mt, inv_temp, with_s1);
  rescale<div>(b, ms, mt, inv_temp, with_s1);
  return {ms, mt, a.z_s + b.z_s, a.z_t + b.z_t, a.z_s1 + b.z_s1, a.w + b.w};
}

// ---------------------------------------------------------------------------------------
// Row finalisation: from the merged sums (and JSD's KL pair) to loss and stats.

// The scalar options of a call, in the accumulation type.
template <typename acc_t>
struct RowConsts {
  acc_t temp, inv_temp, alpha, beta, cap, inv_cap;
  bool with_ce, with_s1, with_cap;
};

template <typename acc_t>
KDFAST_MATH_FN RowConsts<acc_t> make_row_consts(double temperature, double alpha, double beta,
                                                        double softcap) {
  RowConsts<acc_t> k;
  k.temp = static_cast<acc_t>(temperature);
  k.inv_temp = acc_t(1) / k.temp;
  k.alpha = static_cast<acc_t>(alpha);
  k.beta = static_cast<acc_t>(beta);
  k.with_cap = softcap > 0;
  k.cap = static_cast<acc_t>(k.with_cap ? softcap : 1.0);
  k.inv_cap = acc_t(1) / k.cap;
  k.with_ce = alpha > 0;
  k.with_s1 = alpha > 0 && temperature != 1.0;
  return k;
}

// A row holding NaN (or +inf without a cap), or whose side is masked entirely, has no
// softmax: its loss, stats and gradient are NaN.
template <typename acc_t>
KDFAST_MATH_FN bool row_defined(acc_t max_s, acc_t max_t) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  return max_s > -inf && max_s < inf && max_t > -inf && max_t < inf;
}

template <typename acc_t>
struct RowStats {
  acc_t max_s, max_t, log_z_s, log_z_t, log_z_s1, aux_s, aux_t;
};

// Normalisers and (forward / reverse KL) divergence of a defined row; JSD's aux terms
// come from its second pass (set_jsd).
template <Divergence div, typename acc_t>
KDFAST_MATH_FN RowStats<acc_t> row_stats(const RowSums<acc_t>& st, const RowConsts<acc_t>& k) {
  using Ops = ScalarOps<acc_t>;
  RowStats<acc_t> r{st.max_s, st.max_t, Ops::log(st.z_s), Ops::log(st.z_t), acc_t(0), acc_t(0), acc_t(0)};
  if (k.with_ce) r.log_z_s1 = k.with_s1 ? Ops::log(st.z_s1) : r.log_z_s;
  if constexpr (div == Divergence::ForwardKL) r.aux_t = st.w / st.z_t - r.log_z_t + r.log_z_s;
  if constexpr (div == Divergence::ReverseKL) r.aux_s = st.w / st.z_s - r.log_z_s + r.log_z_t;
  return r;
}

template <typename acc_t>
KDFAST_MATH_FN void set_jsd(RowStats<acc_t>& r, acc_t kl_pm, acc_t kl_qm) {
  r.aux_t = kl_pm;
  r.aux_s = kl_qm;
}

// D of the row from its stats.
template <Divergence div, typename acc_t>
KDFAST_MATH_FN acc_t row_divergence(const RowStats<acc_t>& r, const RowConsts<acc_t>& k) {
  if constexpr (div == Divergence::ForwardKL) return r.aux_t;
  if constexpr (div == Divergence::ReverseKL) return r.aux_s;
  return k.beta * r.aux_t + (acc_t(1) - k.beta) * r.aux_s;
}

// loss_i = (1 - alpha) T^2 D + alpha CE; s_label is the (capped) student logit of the
// label. (max_s - s_label) first: exact for nearby values, so logits of +-1e4 lose
// no precision to the normaliser.
template <Divergence div, typename acc_t>
KDFAST_MATH_FN acc_t row_loss(const RowStats<acc_t>& r, const RowConsts<acc_t>& k, acc_t s_label) {
  acc_t loss = (acc_t(1) - k.alpha) * k.temp * k.temp * row_divergence<div>(r, k);
  if (k.with_ce) loss += k.alpha * ((r.max_s - s_label) + r.log_z_s1);
  return loss;
}

template <typename acc_t>
KDFAST_MATH_FN void store_stats(const RowStats<acc_t>& r, acc_t* out) {
  out[kMaxS] = r.max_s;
  out[kMaxT] = r.max_t;
  out[kLogZS] = r.log_z_s;
  out[kLogZT] = r.log_z_t;
  out[kLogZS1] = r.log_z_s1;
  out[kAuxS] = r.aux_s;
  out[kAuxT] = r.aux_t;
}

template <typename acc_t>
KDFAST_MATH_FN RowStats<acc_t> load_stats(const acc_t* in) {
  return {in[kMaxS], in[kMaxT], in[kLogZS], in[kLogZT], in[kLogZS1], in[kAuxS], in[kAuxT]};
}

template <typename acc_t>
KDFAST_MATH_FN void fill_stats(acc_t* out, acc_t value) {
  for (int64_t c = 0; c < kStatsCols; ++c) out[c] = value;
}

// Gradient constants of a counted row whose loss receives the gradient `weight`.
template <typename acc_t>
KDFAST_MATH_FN GradConsts<acc_t> grad_consts(const RowStats<acc_t>& r, const RowConsts<acc_t>& k,
                                                     acc_t weight) {
  return {(acc_t(1) - k.alpha) * k.temp * weight, r.aux_s, r.aux_t};
}

}  // namespace math
}  // namespace kdfast
