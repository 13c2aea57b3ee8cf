// CPU kernels of kd_loss, written once with at::vec::Vectorized and compiled once per
// instruction set (kd_loss_kernel_{default,avx2,avx512}.cpp define CPU_CAPABILITY).
// Math: docs/kd_loss_math.md. Rows run in parallel; a row is streamed in chunks
// small enough to stay in L1, so each input is read from memory once per pass.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../kd_loss.h"
#include "kd_loss_cpu.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads / stores a Vectorized<acc_t> worth of elements of type T.
template <typename T, typename acc_t>
struct VecIO {
  using Vec = Vectorized<acc_t>;
  static Vec load(const T* p) { return Vec::loadu(p); }
  static void store(const Vec& v, T* p, int64_t n) { v.store(p, static_cast<int>(n)); }
};

template <typename T>
struct ReducedVecIO {
  using Vec = Vectorized<float>;
  static Vec load(const T* p) {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
  static void store(const Vec& v, T* p, int64_t n) {
    at::vec::convert_from_float<T>(v, v).store(p, static_cast<int>(n));
  }
};
template <>
struct VecIO<c10::BFloat16, float> : ReducedVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half, float> : ReducedVecIO<c10::Half> {};

// Loads n <= Vec::size() elements, padding with -inf, which every formula treats as
// a masked-out vocabulary entry (zero probability, zero contribution).
template <typename T, typename acc_t>
inline Vectorized<acc_t> load_tail(const T* p, int64_t n) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  alignas(64) acc_t buf[W];
  for (int64_t k = 0; k < W; ++k) {
    buf[k] = k < n ? static_cast<acc_t>(p[k]) : -std::numeric_limits<acc_t>::infinity();
  }
  return Vectorized<acc_t>::loadu(buf);
}

template <typename T, typename acc_t>
inline Vectorized<acc_t> load_n(const T* p, int64_t n) {
  return n == Vectorized<acc_t>::size() ? VecIO<T, acc_t>::load(p) : load_tail<T, acc_t>(p, n);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// exp for the hot loops: at::vec's polynomial exp_u20 (<= 20 ulp, about 1.2e-6
// relative, 0 for -inf) in float; Sleef's 1-ulp exp in double, where the kernels serve
// gradcheck. exp_u20 clamps NaN to a finite value, so rows holding NaN or +inf never
// reach it: the max pass flags them and they are made NaN as a whole (as softmax does).
template <typename acc_t>
inline Vectorized<acc_t> fast_exp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// x where keep is set, else 0 (keep is a comparison mask: all bits set or none).
template <typename acc_t>
inline Vectorized<acc_t> where(const Vectorized<acc_t>& keep, const Vectorized<acc_t>& x) {
  return keep & x;
}

// Elements per chunk of a row: both inputs' chunks (<= 16 KiB in fp32) stay in L1
// between the max pass and the exp pass.
constexpr int64_t kChunk = 2048;

// Running state of one row: scalar maxima of the raw logits shared by all lanes, and
// per-lane sums relative to them (see docs/kd_loss_math.md, "Numerics").
template <typename acc_t>
struct RowState {
  using Vec = Vectorized<acc_t>;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_s = kNegInf, max_t = kNegInf;
  bool saw_nan = false;
  Vec z_s{acc_t(0)}, z_t{acc_t(0)}, z_s1{acc_t(0)};
  Vec w{acc_t(0)};  // weighted log-ratio sum of forward / reverse KL
};

// Scalar max over n elements (n may be < a vector) of a row slice.
template <typename T, typename acc_t>
inline acc_t slice_max(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec m(-std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) m = at::vec::maximum(m, VecIO<T, acc_t>::load(p + j));
  if (j < n) m = at::vec::maximum(m, load_tail<T, acc_t>(p + j, n - j));
  return hmax(m);
}

// One streaming pass over a row: maxima, normalisers and (forward / reverse KL) the
// weighted log-ratio sum, chunk by chunk. with_w selects the KL accumulator.
template <Divergence div, typename s_t, typename t_t, typename acc_t>
inline RowState<acc_t> row_normalisers(const s_t* s, const t_t* t, int64_t vocab, acc_t inv_temp,
                                       bool with_s1) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool with_w = div != Divergence::JSD;
  RowState<acc_t> st;
  for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
    const int64_t len = std::min(kChunk, vocab - c0);
    const acc_t cmax_s = slice_max<s_t, acc_t>(s + c0, len);
    const acc_t cmax_t = slice_max<t_t, acc_t>(t + c0, len);
    // at::vec::maximum propagates NaN: a NaN logit makes its chunk maximum NaN.
    if (std::isnan(cmax_s) || std::isnan(cmax_t)) {
      st.saw_nan = true;
      return st;
    }
    if (cmax_t > st.max_t) {
      if (st.max_t != RowState<acc_t>::kNegInf) {
        const acc_t delta = (cmax_t - st.max_t) * inv_temp;
        const Vec r(std::exp(-delta));
        if (with_w && div == Divergence::ForwardKL) st.w = r * (st.w - Vec(delta) * st.z_t);
        st.z_t = st.z_t * r;
        if (with_w && div == Divergence::ReverseKL) st.w = st.w + Vec(delta) * st.z_s;
      }
      st.max_t = cmax_t;
    }
    if (cmax_s > st.max_s) {
      if (st.max_s != RowState<acc_t>::kNegInf) {
        const acc_t delta = (cmax_s - st.max_s) * inv_temp;
        const Vec r(std::exp(-delta));
        if (with_w && div == Divergence::ReverseKL) st.w = r * (st.w - Vec(delta) * st.z_s);
        st.z_s = st.z_s * r;
        if (with_w && div == Divergence::ForwardKL) st.w = st.w + Vec(delta) * st.z_t;
        if (with_s1) st.z_s1 = st.z_s1 * Vec(std::exp(st.max_s - cmax_s));
      }
      st.max_s = cmax_s;
    }
    // An infinite maximum makes the row undefined; nothing more to sum.
    if (st.max_s == std::numeric_limits<acc_t>::infinity() || st.max_t == std::numeric_limits<acc_t>::infinity()) {
      return st;
    }
    // While a side has seen only -inf (masked vocabulary) its terms are exp(-inf) = 0
    // whatever the shift: shift by 0 rather than -inf to avoid -inf - -inf = NaN.
    const Vec vmax_s(st.max_s == RowState<acc_t>::kNegInf ? acc_t(0) : st.max_s);
    const Vec vmax_t(st.max_t == RowState<acc_t>::kNegInf ? acc_t(0) : st.max_t);
    const Vec vinv(inv_temp), zero(acc_t(0));
    for (int64_t j = 0; j < len; j += W) {
      const int64_t n = std::min(W, len - j);
      const Vec sv = load_n<s_t, acc_t>(s + c0 + j, n);
      const Vec tv = load_n<t_t, acc_t>(t + c0 + j, n);
      // (s - max) is exact near the maximum, so the largest term is exactly exp(0) = 1.
      const Vec xs = (sv - vmax_s) * vinv;
      const Vec xt = (tv - vmax_t) * vinv;
      const Vec es = fast_exp(xs), et = fast_exp(xt);
      st.z_s = st.z_s + es;
      st.z_t = st.z_t + et;
      if (div == Divergence::ForwardKL) st.w = st.w + where(et > zero, et * (xt - xs));
      if (div == Divergence::ReverseKL) st.w = st.w + where(es > zero, es * (xs - xt));
      if (with_s1) st.z_s1 = st.z_s1 + fast_exp(sv - vmax_s);
    }
  }
  return st;
}

template <Divergence div, typename s_t, typename t_t, typename acc_t>
void forward_rows(const KdLossParams& p, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t inv_temp = acc_t(1) / static_cast<acc_t>(p.temperature);
  const acc_t temp = static_cast<acc_t>(p.temperature);
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  const acc_t beta = static_cast<acc_t>(p.beta);
  const acc_t kd_scale = (acc_t(1) - alpha) * temp * temp;
  const bool with_ce = p.alpha > 0;
  const bool with_s1 = with_ce && p.temperature != 1.0;
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* stats = static_cast<acc_t*>(p.stats);
  const int64_t vocab = p.vocab;

  for (int64_t row = begin; row < end; ++row) {
    acc_t* srow = stats + row * kStatsCols;
    const int64_t label = p.labels ? p.labels[row] : 0;
    if (p.labels && label == p.ignore_index) {
      loss[row] = acc_t(0);
      for (int64_t k = 0; k < kStatsCols; ++k) srow[k] = acc_t(0);
      continue;
    }
    const s_t* s = static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
    const t_t* t = static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row);
    RowState<acc_t> st = row_normalisers<div, s_t, t_t, acc_t>(s, t, vocab, inv_temp, with_s1);
    // NaN or +inf anywhere, or a side masked entirely: softmax is undefined, so is the row.
    if (st.saw_nan || !std::isfinite(st.max_s) || !std::isfinite(st.max_t)) {
      constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      loss[row] = nan;
      for (int64_t k = 0; k < kStatsCols; ++k) srow[k] = nan;
      continue;
    }
    const acc_t z_s = hsum(st.z_s), z_t = hsum(st.z_t);
    const acc_t log_z_s = std::log(z_s), log_z_t = std::log(z_t);
    acc_t d = 0, aux_s = 0, aux_t = 0;
    if (div == Divergence::ForwardKL) {
      d = aux_t = hsum(st.w) / z_t - log_z_t + log_z_s;
    } else if (div == Divergence::ReverseKL) {
      d = aux_s = hsum(st.w) / z_s - log_z_s + log_z_t;
    } else {
      // Second pass (from cache for ordinary V): the mixture needs both normalisers.
      const Vec vmax_s(st.max_s), vmax_t(st.max_t), vinv(inv_temp), zero(acc_t(0));
      const Vec vlzs(log_z_s), vlzt(log_z_t), vb(beta), vb1(acc_t(1) - beta);
      Vec kl_pm(acc_t(0)), kl_qm(acc_t(0));
      for (int64_t j = 0; j < vocab; j += W) {
        const int64_t n = std::min(W, vocab - j);
        const Vec log_q = (load_n<s_t, acc_t>(s + j, n) - vmax_s) * vinv - vlzs;
        const Vec log_p = (load_n<t_t, acc_t>(t + j, n) - vmax_t) * vinv - vlzt;
        const Vec q = fast_exp(log_q), pr = fast_exp(log_p);
        const Vec log_m = (vb * pr + vb1 * q).log();
        kl_pm = kl_pm + where(pr > zero, pr * (log_p - log_m));
        kl_qm = kl_qm + where(q > zero, q * (log_q - log_m));
      }
      aux_t = hsum(kl_pm);
      aux_s = hsum(kl_qm);
      d = beta * aux_t + (acc_t(1) - beta) * aux_s;
    }
    acc_t row_loss = kd_scale * d;
    acc_t log_z_s1 = 0;
    if (with_ce) {
      log_z_s1 = with_s1 ? std::log(hsum(st.z_s1)) : log_z_s;
      const acc_t s_label = static_cast<acc_t>(s[label]);
      // (max - s_y) first: adding log_z to a logit of 1e4 would round it to ~1e-3.
      row_loss += alpha * ((st.max_s - s_label) + log_z_s1);
    }
    loss[row] = row_loss;
    srow[kMaxS] = st.max_s;
    srow[kMaxT] = st.max_t;
    srow[kLogZS] = log_z_s;
    srow[kLogZT] = log_z_t;
    srow[kLogZS1] = log_z_s1;
    srow[kAuxS] = aux_s;
    srow[kAuxT] = aux_t;
  }
}

template <Divergence div, typename s_t, typename t_t, typename acc_t>
void backward_rows(const KdLossParams& p, int64_t begin, int64_t end) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t temp = static_cast<acc_t>(p.temperature);
  const acc_t inv_temp = acc_t(1) / temp;
  const acc_t alpha = static_cast<acc_t>(p.alpha);
  const acc_t beta = static_cast<acc_t>(p.beta);
  const bool with_ce = p.alpha > 0;
  const int64_t vocab = p.vocab;
  const auto* grad_loss = static_cast<const acc_t*>(p.grad_loss);
  const auto* stats = static_cast<const acc_t*>(p.stats_in);
  auto* grad_s = static_cast<s_t*>(p.grad_student);
  auto* grad_t = static_cast<t_t*>(p.grad_teacher);
  const Vec zero(acc_t(0)), vinv(inv_temp), vb(beta), vb1(acc_t(1) - beta);

  alignas(64) acc_t lane_index_buf[W];
  for (int64_t k = 0; k < W; ++k) lane_index_buf[k] = static_cast<acc_t>(k);
  const Vec lane_index = Vec::loadu(lane_index_buf);

  for (int64_t row = begin; row < end; ++row) {
    s_t* gs_row = grad_s ? grad_s + row * vocab : nullptr;
    t_t* gt_row = grad_t ? grad_t + row * vocab : nullptr;
    const int64_t label = p.labels ? p.labels[row] : -1;
    if (p.labels && label == p.ignore_index) {
      if (gs_row) std::fill(gs_row, gs_row + vocab, s_t(0));
      if (gt_row) std::fill(gt_row, gt_row + vocab, t_t(0));
      continue;
    }
    const s_t* s = static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
    const t_t* t = static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row);
    const acc_t* st = stats + row * kStatsCols;
    const acc_t w = grad_loss[row];
    if (std::isnan(st[kLogZS])) {  // an undefined row (see forward_rows): NaN gradient
      constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      if (gs_row) std::fill(gs_row, gs_row + vocab, static_cast<s_t>(nan));
      if (gt_row) std::fill(gt_row, gt_row + vocab, static_cast<t_t>(nan));
      continue;
    }
    // c = (1 - alpha) T (the T^2 of the loss times d(s/T)/ds), times the incoming gradient.
    const Vec c((acc_t(1) - alpha) * temp * w);
    const Vec vmax_s(st[kMaxS]), vmax_t(st[kMaxT]), vlzs(st[kLogZS]), vlzt(st[kLogZT]);
    const Vec vlzs1(st[kLogZS1]), aux_s(st[kAuxS]), aux_t(st[kAuxT]), ce_w(alpha * w);

    for (int64_t j = 0; j < vocab; j += W) {
      const int64_t n = std::min(W, vocab - j);
      const Vec sv = load_n<s_t, acc_t>(s + j, n);
      const Vec ds = sv - vmax_s;
      const Vec log_q = ds * vinv - vlzs;
      const Vec log_p = (load_n<t_t, acc_t>(t + j, n) - vmax_t) * vinv - vlzt;
      const Vec q = fast_exp(log_q), pr = fast_exp(log_p);
      Vec gs, gt;
      if (div == Divergence::ForwardKL) {
        gs = c * (q - pr);
        gt = c * pr * (where(pr > zero, log_p - log_q) - aux_t);
      } else if (div == Divergence::ReverseKL) {
        gs = c * q * (where(q > zero, log_q - log_p) - aux_s);
        gt = c * (pr - q);
      } else {
        const Vec log_m = (vb * pr + vb1 * q).log();
        gs = c * vb1 * q * (where(q > zero, log_q - log_m) - aux_s);
        gt = c * vb * pr * (where(pr > zero, log_p - log_m) - aux_t);
      }
      if (gs_row) {
        if (with_ce) {
          const Vec q1 = fast_exp(ds - vlzs1);
          gs = gs + ce_w * q1;
          // The one-hot part of the cross-entropy gradient, in the vector holding the label.
          if (label >= j && label < j + n) {
            gs = gs - Vec::blendv(zero, ce_w, lane_index == Vec(static_cast<acc_t>(label - j)));
          }
        }
        VecIO<s_t, acc_t>::store(gs, gs_row + j, n);
      }
      if (gt_row) VecIO<t_t, acc_t>::store(gt, gt_row + j, n);
    }
  }
}

// Rows per parallel task: enough elements to amortise scheduling.
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

template <typename s_t, typename t_t, typename acc_t>
void run_forward(const KdLossParams& p) {
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t b, int64_t e) {
    switch (p.divergence) {
      case Divergence::ForwardKL: forward_rows<Divergence::ForwardKL, s_t, t_t, acc_t>(p, b, e); break;
      case Divergence::ReverseKL: forward_rows<Divergence::ReverseKL, s_t, t_t, acc_t>(p, b, e); break;
      case Divergence::JSD: forward_rows<Divergence::JSD, s_t, t_t, acc_t>(p, b, e); break;
    }
  });
}

template <typename s_t, typename t_t, typename acc_t>
void run_backward(const KdLossParams& p) {
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t b, int64_t e) {
    switch (p.divergence) {
      case Divergence::ForwardKL: backward_rows<Divergence::ForwardKL, s_t, t_t, acc_t>(p, b, e); break;
      case Divergence::ReverseKL: backward_rows<Divergence::ReverseKL, s_t, t_t, acc_t>(p, b, e); break;
      case Divergence::JSD: backward_rows<Divergence::JSD, s_t, t_t, acc_t>(p, b, e); break;
    }
  });
}

// Calls f.template operator()<s_t, t_t, acc_t>() for the (student, teacher) dtypes.
template <typename F>
void dispatch_dtypes(c10::ScalarType s, c10::ScalarType t, const F& f) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  auto with_teacher = [&](auto s_tag) {
    using s_t = decltype(s_tag);
    switch (t) {
      case ScalarType::Float: f.template operator()<s_t, float, float>(); return;
      case ScalarType::Half: f.template operator()<s_t, Half, float>(); return;
      case ScalarType::BFloat16: f.template operator()<s_t, BFloat16, float>(); return;
      default: TORCH_CHECK(false, "kd_loss: unsupported teacher_logits dtype ", t);
    }
  };
  switch (s) {
    case ScalarType::Double:
      TORCH_CHECK(t == ScalarType::Double, "kd_loss: float64 needs float64 teacher_logits");
      f.template operator()<double, double, double>();
      return;
    case ScalarType::Float: with_teacher(float{}); return;
    case ScalarType::Half: with_teacher(Half{}); return;
    case ScalarType::BFloat16: with_teacher(BFloat16{}); return;
    default: TORCH_CHECK(false, "kd_loss: unsupported student_logits dtype ", s);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {
struct ForwardLauncher {
  const KdLossParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run_forward<s_t, t_t, acc_t>(p); }
};
struct BackwardLauncher {
  const KdLossParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run_backward<s_t, t_t, acc_t>(p); }
};
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per kd_loss_kernel_*.cpp.
#define KDFAST_DEFINE_KD_LOSS_CPU_KERNELS(SUFFIX)                                                \
  namespace kdfast {                                                                             \
  namespace cpu {                                                                                \
  void kd_loss_forward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t) {  \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::ForwardLauncher{p});                   \
  }                                                                                              \
  void kd_loss_backward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t) { \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::BackwardLauncher{p});                  \
  }                                                                                              \
  }                                                                                              \
  }
