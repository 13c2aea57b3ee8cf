// The per-row math of dkd_loss (Decoupled Knowledge Distillation, Zhao et al., CVPR 2022),
// written once for the CPU and CUDA kernels.
//
// Per row with target y, temperature T and logits x (student s, teacher t):
//   m'    = max_{j != y} x_j                          (the non-target maximum)
//   Z'    = sum_{j != y} exp((x_j - m') / T)          (target excluded exactly)
//   d     = (x_y - m') / T - log Z'                    (log odds of target vs rest: log(b_1 / b_2))
//   b     = (b_1, b_2) = (sigmoid(d), sigmoid(-d)),    log b_1 = -softplus(-d), log b_2 = -softplus(d)
//   p~_j  = exp((x_j - m') / T) / Z'  (j != y)         (softmax over the non-target classes)
//   TCKD  = KL(b_t || b_s),  NCKD = KL(p~_t || p~_s)
//         = sum_{j != y} p~_t,j (x~_t,j - x~_s,j) + log(Z'_s / Z'_t),  x~ = (x - m') / T
//   loss  = T^2 (alpha TCKD + beta NCKD)
// Nothing is computed as 1 - p_y (no cancellation), and every exponential has a
// non-positive argument (safe where denormals flush to zero): a certain teacher
// (p_y -> 1) keeps an exact non-target distribution. log(Z'_s / Z'_t) is taken as
// log1p((Z'_s - Z'_t) / Z'_t) with Z'_s - Z'_t summed element by element when the two
// are close: NCKD (of order (x~_t - x~_s)^2) then does not inherit the rounding of two
// log-normalisers of size log V, which matters at large temperatures.
//
// Gradients of one row whose loss receives the gradient w (c = T w), j != y:
//   d/ds_y = c alpha (b_s1 - b_t1)
//   d/ds_j = c beta (p~_s,j - p~_t,j) - c alpha (b_s1 - b_t1) p~_s,j
//   d/dt_y = c alpha k_t,   k_t = b_t1 b_t2 (d_t - d_s)   (= dTCKD / d d_t)
//   d/dt_j = c beta p~_t,j (log p~_t,j - log p~_s,j - NCKD) - c alpha k_t p~_t,j
//
// Scalar functions run on host and device; element-wise ones are templates over an
// `Ops` policy (common_math.h's ScalarOps, the CPU's at::vec VecOps), as in kd_loss_math.h.
#pragma once

#include "common_math.h"
#include "kd_loss_math.h"  // weighted_diff

namespace kdfast {

// Columns of dkd_loss's per-row statistics (forward output, recomputing backward input).
constexpr int64_t kDkdStatsCols = 8;
enum DkdStatsCol : int64_t {
  kDkdMaxS = 0,      // m'_s
  kDkdMaxT = 1,      // m'_t
  kDkdLogZS = 2,     // log Z'_s
  kDkdLogZT = 3,     // log Z'_t
  kDkdLogRatio = 4,  // log(Z'_s / Z'_t)
  kDkdOddsS = 5,     // d_s
  kDkdOddsT = 6,     // d_t
  kDkdNckd = 7,      // NCKD
};

namespace math {

template <typename acc_t>
struct DkdConsts {
  acc_t temp, inv_temp, alpha, beta;
};

template <typename acc_t>
KDFAST_MATH_FN DkdConsts<acc_t> make_dkd_consts(double temperature, double alpha, double beta) {
  DkdConsts<acc_t> k;
  k.temp = static_cast<acc_t>(temperature);
  k.inv_temp = acc_t(1) / k.temp;
  k.alpha = static_cast<acc_t>(alpha);
  k.beta = static_cast<acc_t>(beta);
  return k;
}

// log(1 + exp(u)) without overflow; +inf -> +inf, -inf -> 0, NaN -> NaN.
template <typename acc_t>
KDFAST_MATH_FN acc_t softplus(acc_t u) {
  using Ops = ScalarOps<acc_t>;
  const acc_t neg_abs = u > acc_t(0) ? -u : u;
  return (u > acc_t(0) ? u : acc_t(0)) + Ops::log1p(Ops::exp(neg_abs));
}

// The binary (target, non-target) distribution of a row from its log odds d.
template <typename acc_t>
struct DkdBinary {
  acc_t log_b1, log_b2, b1, b2;
};

template <typename acc_t>
KDFAST_MATH_FN DkdBinary<acc_t> dkd_binary(acc_t odds) {
  using Ops = ScalarOps<acc_t>;
  DkdBinary<acc_t> b;
  b.log_b1 = -softplus(-odds);
  b.log_b2 = -softplus(odds);
  b.b1 = Ops::exp(b.log_b1);
  b.b2 = Ops::exp(b.log_b2);
  return b;
}

// A row has both distributions when neither input holds NaN or +inf and each has a
// non-target class that is not masked (-inf); a masked target (-inf) is fine (b_1 = 0).
// NaN fails every comparison.
template <typename acc_t>
KDFAST_MATH_FN bool dkd_row_defined(acc_t max_s, acc_t max_t, acc_t s_y, acc_t t_y) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  return max_s > -inf && max_s < inf && max_t > -inf && max_t < inf && s_y < inf && t_y < inf;
}

template <typename acc_t>
struct DkdStats {
  acc_t max_s, max_t, log_z_s, log_z_t, log_ratio, odds_s, odds_t, nckd;
};

// The non-target sums of a row, relative to its non-target maxima:
//   z_s = Z'_s, z_t = Z'_t, z_diff = sum_{j != y} (exp(x~_s,j) - exp(x~_t,j)),
//   w = sum_{j != y} exp(x~_t,j) (x~_t,j - x~_s,j) (terms of zero teacher weight dropped).
template <typename acc_t>
struct DkdSums {
  acc_t z_s, z_t, z_diff, w;
};

// Statistics of a defined row from its non-target sums and target logits.
template <typename acc_t>
KDFAST_MATH_FN DkdStats<acc_t> dkd_row_stats(acc_t max_s, acc_t max_t, const DkdSums<acc_t>& st, acc_t s_y,
                                             acc_t t_y, const DkdConsts<acc_t>& k) {
  using Ops = ScalarOps<acc_t>;
  DkdStats<acc_t> r;
  r.max_s = max_s;
  r.max_t = max_t;
  r.log_z_s = Ops::log(st.z_s);
  r.log_z_t = Ops::log(st.z_t);
  // Within a factor 2 the difference of the sums is the accurate one (see the top).
  const acc_t ratio = st.z_s / st.z_t;
  r.log_ratio = ratio >= acc_t(0.5) && ratio <= acc_t(2) ? Ops::log1p(st.z_diff / st.z_t) : r.log_z_s - r.log_z_t;
  // (x_y - m') first: exact for nearby values, so logits of +-1e4 keep their precision.
  r.odds_s = (s_y - max_s) * k.inv_temp - r.log_z_s;
  r.odds_t = (t_y - max_t) * k.inv_temp - r.log_z_t;
  r.nckd = st.w / st.z_t + r.log_ratio;
  return r;
}

// KL(b_t || b_s), zero-weight terms dropped (a masked teacher target contributes nothing).
template <typename acc_t>
KDFAST_MATH_FN acc_t dkd_tckd(const DkdStats<acc_t>& r) {
  using Ops = ScalarOps<acc_t>;
  const DkdBinary<acc_t> bs = dkd_binary(r.odds_s), bt = dkd_binary(r.odds_t);
  return weighted_diff<Ops>(bt.b1, bt.log_b1, bs.log_b1) + weighted_diff<Ops>(bt.b2, bt.log_b2, bs.log_b2);
}

// T^2 (alpha TCKD + beta NCKD); a zero weight drops its term even where it is infinite,
// so alpha = 0 or beta = 0 is an exact ablation.
template <typename acc_t>
KDFAST_MATH_FN acc_t dkd_row_loss(const DkdStats<acc_t>& r, const DkdConsts<acc_t>& k) {
  const acc_t tckd = k.alpha != acc_t(0) ? k.alpha * dkd_tckd(r) : acc_t(0);
  const acc_t nckd = k.beta != acc_t(0) ? k.beta * r.nckd : acc_t(0);
  return k.temp * k.temp * (tckd + nckd);
}

template <typename acc_t>
KDFAST_MATH_FN void store_dkd_stats(const DkdStats<acc_t>& r, acc_t* out) {
  out[kDkdMaxS] = r.max_s;
  out[kDkdMaxT] = r.max_t;
  out[kDkdLogZS] = r.log_z_s;
  out[kDkdLogZT] = r.log_z_t;
  out[kDkdLogRatio] = r.log_ratio;
  out[kDkdOddsS] = r.odds_s;
  out[kDkdOddsT] = r.odds_t;
  out[kDkdNckd] = r.nckd;
}

template <typename acc_t>
KDFAST_MATH_FN DkdStats<acc_t> load_dkd_stats(const acc_t* in) {
  return {in[kDkdMaxS],     in[kDkdMaxT],  in[kDkdLogZS],  in[kDkdLogZT],
          in[kDkdLogRatio], in[kDkdOddsS], in[kDkdOddsT], in[kDkdNckd]};
}

template <typename acc_t>
KDFAST_MATH_FN void fill_dkd_stats(acc_t* out, acc_t value) {
  for (int64_t c = 0; c < kDkdStatsCols; ++c) out[c] = value;
}

// Per-row constants of the gradient (see the header comment), grouped so that each
// part keeps its own precision (the NCKD part as a difference of probabilities, which
// is exactly 0 where the two non-target distributions agree):
//   d/ds_j = nckd_w (p~_s,j - p~_t,j) - tckd_s p~_s,j
//   d/dt_j = nckd_w (wd(p~_t,j, log p~_t,j, log p~_s,j) - nckd p~_t,j) - tckd_t p~_t,j
// with nckd_w = c beta, tckd_s = c alpha (b_s1 - b_t1) = d/ds_y, tckd_t = c alpha k_t = d/dt_y,
// and log p~_t,j - log p~_s,j = (x~_t,j + log_ratio) - x~_s,j (no log-normaliser rounding).
template <typename V>
struct DkdGradConsts {
  V nckd_w, nckd, tckd_s, tckd_t, log_ratio;
};

template <typename acc_t>
KDFAST_MATH_FN DkdGradConsts<acc_t> dkd_grad_consts(const DkdStats<acc_t>& r, const DkdConsts<acc_t>& k,
                                                    acc_t weight) {
  using Ops = ScalarOps<acc_t>;
  const DkdBinary<acc_t> bs = dkd_binary(r.odds_s), bt = dkd_binary(r.odds_t);
  // b_s1 - b_t1 from the pair of smaller probabilities: b_t2 - b_s2 when both b_1 are
  // near 1, so a confident pair keeps its relative precision.
  const acc_t delta = bs.b1 + bt.b1 <= acc_t(1) ? bs.b1 - bt.b1 : bt.b2 - bs.b2;
  // dTCKD / d d_t = b_t1 b_t2 (d_t - d_s), 0 where b_t1 b_t2 is 0 (then d_t may be infinite).
  const acc_t prod = Ops::exp(bt.log_b1 + bt.log_b2);
  const acc_t k_t = prod > acc_t(0) ? prod * (r.odds_t - r.odds_s) : acc_t(0);
  const acc_t c = k.temp * weight;
  const bool with_tckd = k.alpha != acc_t(0), with_nckd = k.beta != acc_t(0);
  // A zero weight drops its part, even where the part is infinite.
  return {with_nckd ? c * k.beta : acc_t(0), with_nckd ? r.nckd : acc_t(0),
          with_tckd ? c * k.alpha * delta : acc_t(0), with_tckd ? c * k.alpha * k_t : acc_t(0), r.log_ratio};
}

// d loss / d s_j of non-target elements from the non-target probabilities.
template <class Ops>
KDFAST_MATH_FN typename Ops::V dkd_student_grad(const typename Ops::V& ps, const typename Ops::V& pt,
                                                const DkdGradConsts<typename Ops::V>& g) {
  return g.nckd_w * (ps - pt) - g.tckd_s * ps;
}

// d loss / d t_j of non-target elements from the teacher probabilities and the shifted
// logits x~ = (x - m') / T of both inputs.
template <class Ops>
KDFAST_MATH_FN typename Ops::V dkd_teacher_grad(const typename Ops::V& pt, const typename Ops::V& xt,
                                                const typename Ops::V& xs, const DkdGradConsts<typename Ops::V>& g) {
  return g.nckd_w * (weighted_diff<Ops>(pt, xt + g.log_ratio, xs) - g.nckd * pt) - g.tckd_t * pt;
}

}  // namespace math
}  // namespace kdfast
