// The per-row math of sparse_kd_loss, written once for the CPU and CUDA kernels
// (docs/sparse_kd_loss.md).
//
// One row: student logits s (length V) at temperature T, z = s / T, q = softmax(z) over
// the whole vocabulary; the teacher on its support S (the K entries whose index is not
// -1) as p_i = exp(v_i) (logprobs) or p_i = v_i (probs); P = sum_S p.
//
//   renormalize:  D = sum_S p^_i (log p^_i - log q_i),  p^ = p / P   (D = 0 when P = 0)
//   residual:     D = sum_S p_i (log p_i - log q_i) + r_t (log r_t - log r_s),
//                 r_t = max(1 - P, 0),  r_s = sum_{j not in S} q_j  (floored at the
//                 accumulation type's smallest normal; the term is 0 when r_t = 0)
//   loss = (1 - alpha) T^2 D + alpha (log sum_j exp(s_j) - s_y)
//
// with log q_i = (s_i - m) / T - log Z, m = max_j s_j, Z = sum_j exp((s_j - m) / T), and
// the cross-entropy's normaliser Z1 = sum_j exp(s_j - m) at temperature 1. A term whose
// teacher probability is 0 (a -inf log-probability, a 0 weight) contributes nothing.
//
// Gradient of one row whose loss receives the gradient w, c = (1 - alpha) T w:
//   d loss / d s_j = c (q_j a_j - b_j [j in S]) + alpha w (q1_j - [j == y])
//   renormalize: a_j = 1,                         b_j = p^_j      (a = b = 0 when P = 0)
//   residual:    a_j = P + r_t - r_t / r_s  (j not in S),  P + r_t  (j in S),  b_j = p_j
//                (a_j = P where the tail term is constant: r_t = 0, or r_s below its floor)
// so a row is written densely with the coefficient of j not in S, and its K support
// entries (and the label) are then overwritten with their own values.
//
// Scalar functions run on host and device (C10_HOST_DEVICE), as in kd_loss_math.h.
#pragma once

#include "common_math.h"
#include "kd_loss_math.h"  // weighted_diff

namespace kdfast {

enum class SparseTail : int64_t { Renormalize = 0, Residual = 1 };

// Columns of the per-row statistics (forward output, recomputing backward input).
constexpr int64_t kSparseStatsCols = 7;
enum SparseStatsCol : int64_t {
  kSparseMaxS = 0,   // m, the student row maximum (raw logits)
  kSparseLogZ = 1,   // log Z   (temperature T, relative to m)
  kSparseLogZ1 = 2,  // log Z1  (temperature 1, relative to m; log Z when T = 1; 0 without CE)
  kSparseMass = 3,   // P, the teacher mass on the support
  kSparseTailT = 4,  // r_t (0 for renormalize)
  kSparseTailS = 5,  // r_s, before its floor (1 for renormalize)
  kSparseDiv = 6,    // D
};

namespace math {

// The scalar options of a call, in the accumulation type.
template <typename acc_t>
struct SparseConsts {
  acc_t temp, inv_temp, alpha;
  bool with_ce, with_s1, residual, logprobs;
};

template <typename acc_t>
KDFAST_MATH_FN SparseConsts<acc_t> make_sparse_consts(double temperature, double alpha, bool logprobs,
                                                      SparseTail tail) {
  SparseConsts<acc_t> k;
  k.temp = static_cast<acc_t>(temperature);
  k.inv_temp = acc_t(1) / k.temp;
  k.alpha = static_cast<acc_t>(alpha);
  k.with_ce = alpha > 0;
  k.with_s1 = alpha > 0 && temperature != 1.0;
  k.residual = tail == SparseTail::Residual;
  k.logprobs = logprobs;
  return k;
}

// The teacher probability of a stored value and its logarithm (log of a non-positive
// weight: 0, never used since its term is dropped).
template <typename acc_t>
struct TeacherProb {
  acc_t p, log_p;
};

template <typename acc_t>
KDFAST_MATH_FN TeacherProb<acc_t> teacher_prob(acc_t value, bool logprobs) {
  using Ops = ScalarOps<acc_t>;
  if (logprobs) return {Ops::exp(value), value};
  return {value, value > acc_t(0) ? Ops::log(value) : acc_t(0)};
}

// The weights of the support terms: p' = p * scale, log p' = log p + log_scale
// (renormalize: p / P; residual: p itself).
template <typename acc_t>
struct SupportScale {
  acc_t scale, log_scale;
};

template <typename acc_t>
KDFAST_MATH_FN SupportScale<acc_t> support_scale(acc_t mass, const SparseConsts<acc_t>& k) {
  if (!k.residual && mass > acc_t(0)) return {acc_t(1) / mass, -ScalarOps<acc_t>::log(mass)};
  return {acc_t(1), acc_t(0)};
}

// p' (log p' - log q) of one support entry; 0 when p' is 0.
template <typename acc_t>
KDFAST_MATH_FN acc_t support_term(const TeacherProb<acc_t>& t, acc_t log_q, const SupportScale<acc_t>& sc) {
  return weighted_diff<ScalarOps<acc_t>>(t.p * sc.scale, t.log_p + sc.log_scale, log_q);
}

// log q of the student logit x from the row's maximum and log-normaliser (at T, or at
// temperature 1 with inv_temp = 1). (x - m) first: exact near the maximum.
template <typename acc_t>
KDFAST_MATH_FN acc_t log_prob(acc_t x, acc_t max_s, acc_t inv_temp, acc_t log_z) {
  return (x - max_s) * inv_temp - log_z;
}

// Streaming normaliser of a row: running maximum m of the raw logits and
// z = sum exp((x - m) / T), z1 = sum exp(x - m). max == -inf: no finite element yet.
template <typename acc_t>
struct OnlineNorm {
  acc_t max, z, z1;
};

template <typename acc_t>
KDFAST_MATH_FN OnlineNorm<acc_t> empty_norm() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

// Adds one logit with one exponential (two with z1): a new maximum rescales the sums by
// exp of the (non-positive) difference, an element below it adds its own exponential.
// NaN reaches z (never the maximum); -inf adds nothing.
template <typename acc_t>
KDFAST_MATH_FN void norm_add(OnlineNorm<acc_t>& n, acc_t x, acc_t inv_temp, bool with_s1) {
  using Ops = ScalarOps<acc_t>;
  if (x > n.max) {
    const acc_t d = n.max - x;  // -inf for the first finite element: exp gives 0
    n.z = n.z * Ops::exp(d * inv_temp) + acc_t(1);
    if (with_s1) n.z1 = n.z1 * Ops::exp(d) + acc_t(1);
    n.max = x;
  } else if (x != neg_inf<acc_t>()) {
    const acc_t d = x - n.max;
    n.z += Ops::exp(d * inv_temp);
    if (with_s1) n.z1 += Ops::exp(d);
  }
}

// Combines the normalisers of two parts of a row (block reductions). A NaN maximum
// (only from +inf - +inf, a row that is undefined anyway) propagates.
template <typename acc_t>
KDFAST_MATH_FN OnlineNorm<acc_t> merge_norm(const OnlineNorm<acc_t>& a, const OnlineNorm<acc_t>& b,
                                            acc_t inv_temp, bool with_s1) {
  using Ops = ScalarOps<acc_t>;
  const acc_t m = a.max > b.max ? a.max : b.max;
  if (m == neg_inf<acc_t>()) return {m, a.z + b.z, a.z1 + b.z1};  // both empty (or NaN sums)
  OnlineNorm<acc_t> r{m, acc_t(0), acc_t(0)};
  // An empty part (max -inf) has sums 0 unless it saw NaN; exp(-inf) = 0 keeps that NaN.
  const acc_t da = a.max - m, db = b.max - m;
  r.z = a.z * Ops::exp(da * inv_temp) + b.z * Ops::exp(db * inv_temp);
  if (with_s1) r.z1 = a.z1 * Ops::exp(da) + b.z1 * Ops::exp(db);
  return r;
}

// A student row has a softmax when its maximum is finite (not all -inf, no +inf, no
// NaN maximum) and its sum is finite (no NaN).
template <typename acc_t>
KDFAST_MATH_FN bool sparse_row_defined(acc_t max_s, acc_t z) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  return max_s > -inf && max_s < inf && z == z;
}

template <typename acc_t>
struct SparseRowStats {
  acc_t max_s, log_z, log_z1, mass, tail_t, tail_s, div;
};

// r_t = max(1 - P, 0), NaN kept.
template <typename acc_t>
KDFAST_MATH_FN acc_t teacher_tail(acc_t mass) {
  const acc_t r = acc_t(1) - mass;
  return r < acc_t(0) ? acc_t(0) : r;
}

// r_s floored at the smallest normal (NaN kept): log r_s stays finite. Below the floor
// log r_s is a constant, so it passes no gradient (as a clamp does).
template <typename acc_t>
KDFAST_MATH_FN bool student_tail_floored(acc_t r_s) {
  return r_s < std::numeric_limits<acc_t>::min();
}

template <typename acc_t>
KDFAST_MATH_FN acc_t student_tail(acc_t r_s) {
  return student_tail_floored(r_s) ? std::numeric_limits<acc_t>::min() : r_s;
}

// Statistics and divergence of a defined row. terms: the sum of support_term over the
// support; off_support: r_s = sum_{j not in S} q_j, not yet floored (residual only).
template <typename acc_t>
KDFAST_MATH_FN SparseRowStats<acc_t> sparse_row_stats(acc_t max_s, acc_t z, acc_t z1, acc_t mass, acc_t terms,
                                                      acc_t off_support, const SparseConsts<acc_t>& k) {
  using Ops = ScalarOps<acc_t>;
  SparseRowStats<acc_t> r{max_s, Ops::log(z), acc_t(0), mass, acc_t(0), acc_t(1), terms};
  if (k.with_ce) r.log_z1 = k.with_s1 ? Ops::log(z1) : r.log_z;
  if (k.residual) {
    r.tail_t = teacher_tail(mass);
    r.tail_s = off_support;
    if (r.tail_t > acc_t(0)) r.div += r.tail_t * (Ops::log(r.tail_t) - Ops::log(student_tail(off_support)));
  }
  if (mass != mass) r.div = mass;  // NaN in the teacher's values: NaN out
  return r;
}

// loss_i = (1 - alpha) T^2 D + alpha CE; s_label is the student logit of the label.
template <typename acc_t>
KDFAST_MATH_FN acc_t sparse_row_loss(const SparseRowStats<acc_t>& r, const SparseConsts<acc_t>& k, acc_t s_label) {
  acc_t loss = (acc_t(1) - k.alpha) * k.temp * k.temp * r.div;
  if (k.with_ce) loss += k.alpha * ((r.max_s - s_label) + r.log_z1);
  return loss;
}

template <typename acc_t>
KDFAST_MATH_FN void store_sparse_stats(const SparseRowStats<acc_t>& r, acc_t* out) {
  out[kSparseMaxS] = r.max_s;
  out[kSparseLogZ] = r.log_z;
  out[kSparseLogZ1] = r.log_z1;
  out[kSparseMass] = r.mass;
  out[kSparseTailT] = r.tail_t;
  out[kSparseTailS] = r.tail_s;
  out[kSparseDiv] = r.div;
}

template <typename acc_t>
KDFAST_MATH_FN SparseRowStats<acc_t> load_sparse_stats(const acc_t* in) {
  return {in[kSparseMaxS], in[kSparseLogZ], in[kSparseLogZ1], in[kSparseMass],
          in[kSparseTailT], in[kSparseTailS], in[kSparseDiv]};
}

template <typename acc_t>
KDFAST_MATH_FN void fill_sparse_stats(acc_t* out, acc_t value) {
  for (int64_t c = 0; c < kSparseStatsCols; ++c) out[c] = value;
}

// Per-row constants of the gradient (see the top): q_j * dense off the support,
// q_i * support - p_i * p_scale on it, and ce * (q1_j - [j == y]).
template <typename acc_t>
struct SparseGradConsts {
  acc_t dense, support, p_scale, ce;
};

template <typename acc_t>
KDFAST_MATH_FN SparseGradConsts<acc_t> sparse_grad_consts(const SparseRowStats<acc_t>& r,
                                                          const SparseConsts<acc_t>& k, acc_t weight) {
  const acc_t c = (acc_t(1) - k.alpha) * k.temp * weight;
  SparseGradConsts<acc_t> g{acc_t(0), acc_t(0), acc_t(0), k.alpha * weight};
  if (k.residual) {
    // The tail's term passes a gradient only while r_t > 0 and r_s is above its floor.
    acc_t on = r.mass, off = r.mass;
    if (r.tail_t > acc_t(0) && !student_tail_floored(r.tail_s)) {
      on += r.tail_t;
      off = on - r.tail_t / r.tail_s;
    }
    g.dense = c * off;
    g.support = c * on;
    g.p_scale = c;
  } else if (r.mass > acc_t(0)) {
    g.dense = c;
    g.support = c;
    g.p_scale = c / r.mass;
  }
  return g;
}

// d loss / d s_i of a support entry (teacher probability p, student q_i and q1_i),
// label term included.
template <typename acc_t>
KDFAST_MATH_FN acc_t support_grad(const SparseGradConsts<acc_t>& g, acc_t p, acc_t q, acc_t q1, bool is_label) {
  acc_t out = g.support * q - g.p_scale * p;
  if (g.ce != acc_t(0)) out += g.ce * (is_label ? q1 - acc_t(1) : q1);
  return out;
}

// d loss / d s_j of an element off the support, label term included.
template <typename acc_t>
KDFAST_MATH_FN acc_t dense_grad(const SparseGradConsts<acc_t>& g, acc_t q, acc_t q1, bool is_label) {
  acc_t out = g.dense * q;
  if (g.ce != acc_t(0)) out += g.ce * (is_label ? q1 - acc_t(1) : q1);
  return out;
}

}  // namespace math
}  // namespace kdfast
