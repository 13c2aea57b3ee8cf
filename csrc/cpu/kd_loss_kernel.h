// CPU kernels of kd_loss, written once with at::vec::Vectorized and compiled once per
// instruction set (kd_loss_kernel_{default,avx2,avx512}.cpp define CPU_CAPABILITY).
// The formulas come from ../kd_loss_math.h (shared with CUDA) through VecOps.
//
// A row is processed by one thread, in passes over the row:
//   1. maxima of both inputs (the only pass that reads the inputs from memory),
//   2. exponentials and their sums; when the gradient is wanted in the same call, the
//      exponentials are kept in a per-thread row buffer (O(V), cache-resident),
//   3. JSD only: KL(p||m) and KL(q||m), which need both normalisers,
//   4. the gradient (fused call), or, in the recomputing backward, the gradient from
//      the row statistics.
// Passes 2-4 read the row back from L2 (a 32000-wide fp32 row pair is 256 KB), so each
// input is read from memory once, each exponential is computed once per element and
// the gradient is written once.
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
#include <memory>
#include <type_traits>

#include "../kd_loss.h"
#include "../kd_loss_math.h"
#include "kd_loss_cpu.h"
#include "vec_common.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

// Per-thread row buffers of the fused call: the exponentials of pass 2, in acc_t.
template <typename acc_t>
struct Scratch {
  std::unique_ptr<acc_t[]> data;
  acc_t *e_s = nullptr, *e_t = nullptr, *e_s1 = nullptr;
  Scratch(int64_t vocab, bool with_s1) {
    const int64_t w = Vectorized<acc_t>::size();
    const int64_t padded = (vocab + w - 1) / w * w;
    data.reset(new acc_t[padded * (with_s1 ? 3 : 2)]);
    e_s = data.get();
    e_t = e_s + padded;
    e_s1 = with_s1 ? e_t + padded : nullptr;
  }
};

// Everything about one row's computation for one (divergence, soft-cap, dtypes)
// combination.
template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
struct RowKernel {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

  const KdLossParams& p;
  const math::RowConsts<acc_t> k;
  const math::Mixture<Vec> mix;
  const Vec vcap, vinv_cap, vinv_temp;

  explicit RowKernel(const KdLossParams& params)
      : p(params),
        k(math::make_row_consts<acc_t>(params.temperature, params.alpha, params.beta, params.softcap)),
        mix(broadcast(math::make_mixture<acc_t>(static_cast<acc_t>(params.beta)))),
        vcap(k.cap),
        vinv_cap(k.inv_cap),
        vinv_temp(k.inv_temp) {}

  static math::Mixture<Vec> broadcast(const math::Mixture<acc_t>& m) {
    return {Vec(m.beta), Vec(m.beta1), Vec(m.log_beta), Vec(m.log_beta1), Vec(m.tiny)};
  }

  // (Capped) logits of n elements, -inf padded.
  Vec load_s(const s_t* s, int64_t n) const {
    const Vec v = load_n<s_t, acc_t>(s, n);
    if constexpr (kCap) return math::softcap<Ops>(v, vcap, vinv_cap);
    return v;
  }
  Vec load_t(const t_t* t, int64_t n) const {
    const Vec v = load_n<t_t, acc_t>(t, n);
    if constexpr (kCap) return math::softcap<Ops>(v, vcap, vinv_cap);
    return v;
  }
  // The cap of a raw maximum, computed by the same vector code as the elements.
  acc_t cap_scalar(acc_t x) const {
    if constexpr (kCap) {
      alignas(64) acc_t out[W];
      math::softcap<Ops>(Vec(x), vcap, vinv_cap).store(out);
      return out[0];
    }
    return x;
  }

  const s_t* student_row(int64_t row) const {
    return static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
  }
  const t_t* teacher_row(int64_t row) const {
    return static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row);
  }
  acc_t row_weight(int64_t row) const {
    return p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
  }

  // Pass 2: sums of one row (maxima known and finite); keeps the exponentials in sc.
  // This pass is bound by exp, so it also prefetches the next row (next_s / next_t, or
  // nullptr) into L2: the next row's max pass then overlaps no memory latency.
  math::RowSums<acc_t> sums(const s_t* s, const t_t* t, acc_t max_s, acc_t max_t, Scratch<acc_t>* sc,
                            const s_t* next_s, const t_t* next_t) const {
    const Vec vmax_s(max_s), vmax_t(max_t);
    struct Acc {
      Vec z_s{acc_t(0)}, z_t{acc_t(0)}, z_s1{acc_t(0)}, w{acc_t(0)};
    };
    auto step = [&](int64_t j, int64_t n, Acc& a) {
      if (next_s != nullptr) {
        __builtin_prefetch(next_s + j, 0, 2);
        __builtin_prefetch(next_t + j, 0, 2);
      }
      const Vec sv = load_s(s + j, n), tv = load_t(t + j, n);
      // (s - max) is exact near the maximum, so the largest term is exactly exp(0) = 1.
      const Vec xs = (sv - vmax_s) * vinv_temp, xt = (tv - vmax_t) * vinv_temp;
      const Vec es = Ops::exp(xs), et = Ops::exp(xt);
      a.z_s = a.z_s + es;
      a.z_t = a.z_t + et;
      if constexpr (div == Divergence::ForwardKL) a.w = a.w + math::weighted_diff<Ops>(et, xt, xs);
      if constexpr (div == Divergence::ReverseKL) a.w = a.w + math::weighted_diff<Ops>(es, xs, xt);
      if (sc != nullptr) {
        es.store(sc->e_s + j);
        et.store(sc->e_t + j);
      }
      if (k.with_s1) {
        const Vec es1 = Ops::exp(sv - vmax_s);
        a.z_s1 = a.z_s1 + es1;
        if (sc != nullptr) es1.store(sc->e_s1 + j);
      }
    };
    // Two independent vectors per iteration: each is a long chain of dependent
    // operations (the exp), and interleaving two keeps the FP units busy.
    Acc a, b;
    const int64_t vocab = p.vocab;
    int64_t j = 0;
    for (; j + 2 * W <= vocab; j += 2 * W) {
      step(j, W, a);
      step(j + W, W, b);
    }
    for (; j < vocab; j += W) step(j, std::min(W, vocab - j), a);
    return {max_s, max_t, hsum(a.z_s + b.z_s), hsum(a.z_t + b.z_t), hsum(a.z_s1 + b.z_s1), hsum(a.w + b.w)};
  }

  // Pass 3 (JSD): KL(p||m) and KL(q||m) of one row.
  void jsd(const s_t* s, const t_t* t, math::RowStats<acc_t>& r, const math::RowSums<acc_t>& st,
           const Scratch<acc_t>* sc) const {
    const Vec vmax_s(r.max_s), vmax_t(r.max_t), vlzs(r.log_z_s), vlzt(r.log_z_t);
    const Vec inv_zs(acc_t(1) / st.z_s), inv_zt(acc_t(1) / st.z_t);
    Vec kl_pm(acc_t(0)), kl_qm(acc_t(0));
    const int64_t vocab = p.vocab;
    for (int64_t j = 0; j < vocab; j += W) {
      const int64_t n = std::min(W, vocab - j);
      const Vec log_q = (load_s(s + j, n) - vmax_s) * vinv_temp - vlzs;
      const Vec log_p = (load_t(t + j, n) - vmax_t) * vinv_temp - vlzt;
      const Vec q = sc != nullptr ? Vec::loadu(sc->e_s + j) * inv_zs : Ops::exp(log_q);
      const Vec pr = sc != nullptr ? Vec::loadu(sc->e_t + j) * inv_zt : Ops::exp(log_p);
      math::jsd_terms<Ops>(log_q, log_p, q, pr, mix, kl_pm, kl_qm);
    }
    math::set_jsd(r, hsum(kl_pm), hsum(kl_qm));
  }

  // Pass 4: gradients of one counted row. With sc (fused call) the probabilities come
  // from the kept exponentials; without (recomputing backward), from exp of the logits.
  template <bool kStudent, bool kTeacher>
  void gradients(const s_t* s, const t_t* t, const math::RowStats<acc_t>& r, acc_t weight, int64_t label,
                 s_t* gs_row, t_t* gt_row, const Scratch<acc_t>* sc, acc_t z_s, acc_t z_t, acc_t z_s1) const {
    const math::GradConsts<acc_t> g = math::grad_consts(r, k, weight);
    const math::GradConsts<Vec> gv{Vec(g.c), Vec(g.aux_s), Vec(g.aux_t)};
    const Vec vmax_s(r.max_s), vmax_t(r.max_t), vlzs(r.log_z_s), vlzt(r.log_z_t), vlzs1(r.log_z_s1);
    const Vec inv_zs(acc_t(1) / z_s), inv_zt(acc_t(1) / z_t), inv_zs1(acc_t(1) / z_s1);
    const Vec ce_w(k.alpha * weight), zero(acc_t(0));
    // Forward KL's student gradient c (q - p) needs no logits when the exponentials are kept.
    constexpr bool kLogits = kCap || kTeacher || div != Divergence::ForwardKL;
    const bool read_logits = kLogits || sc == nullptr;
    auto step = [&](int64_t j, int64_t n) {
      Vec sv = zero, tv = zero, log_q = zero, log_p = zero, q, pr;
      if (read_logits) {
        sv = load_s(s + j, n);
        tv = load_t(t + j, n);
        log_q = (sv - vmax_s) * vinv_temp - vlzs;
        log_p = (tv - vmax_t) * vinv_temp - vlzt;
      }
      if (sc != nullptr) {
        q = Vec::loadu(sc->e_s + j) * inv_zs;
        pr = Vec::loadu(sc->e_t + j) * inv_zt;
      } else {
        q = Ops::exp(log_q);
        pr = Ops::exp(log_p);
      }
      Vec gs, gt;
      math::divergence_grads<div, Ops>(log_q, log_p, q, pr, gv, mix, gs, gt);
      if constexpr (kStudent) {
        if (k.with_ce) {
          Vec q1 = q;
          if (k.with_s1) q1 = sc != nullptr ? Vec::loadu(sc->e_s1 + j) * inv_zs1 : Ops::exp(sv - vmax_s - vlzs1);
          gs = gs + ce_w * q1;
          // The one-hot part of the cross-entropy gradient, in the vector holding the label.
          if (label >= j && label < j + n) {
            alignas(64) acc_t buf[W];
            gs.store(buf);
            buf[label - j] -= k.alpha * weight;
            gs = Vec::loadu(buf);
          }
        }
        if constexpr (kCap) gs = gs * math::softcap_slope<Ops>(sv, vinv_cap);
        VecIO<s_t, acc_t>::store(gs, gs_row + j, n);
      }
      if constexpr (kTeacher) {
        if constexpr (kCap) gt = gt * math::softcap_slope<Ops>(tv, vinv_cap);
        VecIO<t_t, acc_t>::store(gt, gt_row + j, n);
      }
    };
    const int64_t vocab = p.vocab;
    int64_t j = 0;
    for (; j + 2 * W <= vocab; j += 2 * W) {  // two independent vectors in flight, as in sums()
      step(j, W);
      step(j + W, W);
    }
    for (; j < vocab; j += W) step(j, std::min(W, vocab - j));
  }

  template <typename F>
  void with_gradient_kinds(bool student, bool teacher, const F& f) const {
    if (student && teacher) {
      f(std::true_type{}, std::true_type{});
    } else if (student) {
      f(std::true_type{}, std::false_type{});
    } else if (teacher) {
      f(std::false_type{}, std::true_type{});
    }
  }

  s_t* grad_student_row(int64_t row) const {
    return p.grad_student == nullptr ? nullptr : static_cast<s_t*>(p.grad_student) + row * p.vocab;
  }
  t_t* grad_teacher_row(int64_t row) const {
    return p.grad_teacher == nullptr ? nullptr : static_cast<t_t*>(p.grad_teacher) + row * p.vocab;
  }

  void fill_row(int64_t row, acc_t value) const {
    if (s_t* g = grad_student_row(row)) std::fill(g, g + p.vocab, static_cast<s_t>(value));
    if (t_t* g = grad_teacher_row(row)) std::fill(g, g + p.vocab, static_cast<t_t>(value));
  }

  // Loss, stats and (when p.grad_* are set) gradients of rows [begin, end).
  void forward(int64_t begin, int64_t end) const {
    auto* loss = static_cast<acc_t*>(p.loss);
    auto* stats = static_cast<acc_t*>(p.stats);
    const bool with_grad = p.grad_student != nullptr || p.grad_teacher != nullptr;
    // JSD keeps the exponentials for its second pass even without a gradient, so that
    // its loss is the same to the bit whether or not a gradient is computed.
    std::unique_ptr<Scratch<acc_t>> scratch;
    if (with_grad || div == Divergence::JSD) scratch = std::make_unique<Scratch<acc_t>>(p.vocab, k.with_s1);
    for (int64_t row = begin; row < end; ++row) {
      acc_t* srow = stats == nullptr ? nullptr : stats + row * kStatsCols;
      const int64_t label = p.labels ? p.labels[row] : 0;
      if (p.labels && label == p.ignore_index) {
        loss[row] = acc_t(0);
        if (srow) math::fill_stats(srow, acc_t(0));
        fill_row(row, acc_t(0));
        continue;
      }
      const s_t* s = student_row(row);
      const t_t* t = teacher_row(row);
      const acc_t max_s = cap_scalar(row_max<s_t, acc_t>(s, p.vocab));
      const acc_t max_t = cap_scalar(row_max<t_t, acc_t>(t, p.vocab));
      if (!math::row_defined(max_s, max_t)) {
        loss[row] = kNaN;
        if (srow) math::fill_stats(srow, kNaN);
        fill_row(row, kNaN);
        continue;
      }
      const bool has_next = row + 1 < end;
      const math::RowSums<acc_t> st = sums(s, t, max_s, max_t, scratch.get(),
                                           has_next ? student_row(row + 1) : nullptr,
                                           has_next ? teacher_row(row + 1) : nullptr);
      math::RowStats<acc_t> r = math::row_stats<div>(st, k);
      if constexpr (div == Divergence::JSD) jsd(s, t, r, st, scratch.get());
      const acc_t s_label = k.with_ce ? cap_scalar(static_cast<acc_t>(s[label])) : acc_t(0);
      loss[row] = math::row_loss<div>(r, k, s_label);
      if (srow) math::store_stats(r, srow);
      if (!with_grad) continue;
      s_t* gs_row = grad_student_row(row);
      t_t* gt_row = grad_teacher_row(row);
      with_gradient_kinds(p.grad_student != nullptr, p.grad_teacher != nullptr, [&](auto ks, auto kt) {
        gradients<decltype(ks)::value, decltype(kt)::value>(s, t, r, row_weight(row), label, gs_row, gt_row,
                                                             scratch.get(), st.z_s, st.z_t, st.z_s1);
      });
    }
  }

  // Gradients of rows [begin, end) recomputed from the forward's stats.
  void backward(int64_t begin, int64_t end) const {
    const auto* stats = static_cast<const acc_t*>(p.stats_in);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = p.labels ? p.labels[row] : -1;
      if (p.labels && label == p.ignore_index) {  // stats of ignored rows may hold anything
        fill_row(row, acc_t(0));
        continue;
      }
      const math::RowStats<acc_t> r = math::load_stats(stats + row * kStatsCols);
      if (!math::row_defined(r.max_s, r.max_t)) {
        fill_row(row, kNaN);
        continue;
      }
      s_t* gs_row = grad_student_row(row);
      t_t* gt_row = grad_teacher_row(row);
      with_gradient_kinds(p.grad_student != nullptr, p.grad_teacher != nullptr, [&](auto ks, auto kt) {
        gradients<decltype(ks)::value, decltype(kt)::value>(student_row(row), teacher_row(row), r,
                                                             row_weight(row), label, gs_row, gt_row, nullptr,
                                                             acc_t(1), acc_t(1), acc_t(1));
      });
    }
  }
};

// Rows per parallel task: enough elements to amortise scheduling.
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

template <bool kBackward, typename s_t, typename t_t, typename acc_t>
void run(const KdLossParams& p) {
  auto go = [&](auto div_tag, auto cap_tag) {
    const RowKernel<decltype(div_tag)::value, decltype(cap_tag)::value, s_t, t_t, acc_t> kernel(p);
    at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t b, int64_t e) {
      if constexpr (kBackward) {
        kernel.backward(b, e);
      } else {
        kernel.forward(b, e);
      }
    });
  };
  auto with_cap = [&](auto div_tag) {
    if (p.softcap > 0) {
      go(div_tag, std::true_type{});
    } else {
      go(div_tag, std::false_type{});
    }
  };
  using D = Divergence;
  switch (p.divergence) {
    case D::ForwardKL: with_cap(std::integral_constant<D, D::ForwardKL>{}); break;
    case D::ReverseKL: with_cap(std::integral_constant<D, D::ReverseKL>{}); break;
    case D::JSD: with_cap(std::integral_constant<D, D::JSD>{}); break;
  }
}

struct ForwardLauncher {
  const KdLossParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run<false, s_t, t_t, acc_t>(p); }
};
struct BackwardLauncher {
  const KdLossParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run<true, s_t, t_t, acc_t>(p); }
};

// grad[r, :] *= scale[r] for the rows whose scale is not exactly 1.
template <typename T, typename acc_t>
void scale_rows(T* grad, int64_t rows, int64_t vocab, const double* scale, int64_t scale_stride) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const double w = scale[row * scale_stride];
      if (w == 1.0) continue;
      const Vec vw(static_cast<acc_t>(w));
      T* g = grad + row * vocab;
      for (int64_t j = 0; j < vocab; j += W) {
        const int64_t n = std::min(W, vocab - j);
        VecIO<T, acc_t>::store(load_n<T, acc_t>(g + j, n) * vw, g + j, n);
      }
    }
  });
}

inline void scale_grad(void* grad, c10::ScalarType dtype, int64_t rows, int64_t vocab, const double* scale,
                       int64_t scale_stride) {
  switch (dtype) {
    case c10::ScalarType::Double: scale_rows<double, double>(static_cast<double*>(grad), rows, vocab, scale, scale_stride); return;
    case c10::ScalarType::Float: scale_rows<float, float>(static_cast<float*>(grad), rows, vocab, scale, scale_stride); return;
    case c10::ScalarType::Half: scale_rows<c10::Half, float>(static_cast<c10::Half*>(grad), rows, vocab, scale, scale_stride); return;
    case c10::ScalarType::BFloat16: scale_rows<c10::BFloat16, float>(static_cast<c10::BFloat16*>(grad), rows, vocab, scale, scale_stride); return;
    default: TORCH_CHECK(false, "kd_loss_scale_grad_: unsupported grad dtype ", dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per kd_loss_kernel_*.cpp.
#define KDFAST_DEFINE_KD_LOSS_CPU_KERNELS(SUFFIX)                                                   \
  namespace kdfast {                                                                                \
  namespace cpu {                                                                                   \
  void kd_loss_forward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t) {     \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::ForwardLauncher{p});                      \
  }                                                                                                 \
  void kd_loss_backward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t) {    \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::BackwardLauncher{p});                     \
  }                                                                                                 \
  void kd_loss_scale_grad_##SUFFIX(void* grad, c10::ScalarType dtype, int64_t rows, int64_t vocab, \
                                   const double* scale, int64_t scale_stride) {                    \
    CPU_CAPABILITY::scale_grad(grad, dtype, rows, vocab, scale, scale_stride);                      \
  }                                                                                                 \
  }                                                                                                 \
  }
