// CPU kernels of dkd_loss, written once with at::vec::Vectorized and compiled once per
// instruction set (dkd_kernel_{default,avx2,avx512}.cpp define CPU_CAPABILITY). The
// formulas come from ../dkd_math.h (shared with CUDA) through VecOps.
//
// A row is processed by one thread, in passes over the row:
//   1. the non-target maxima of both inputs (the only pass that reads the inputs from
//      memory; the target is left out by running the max over the two sides of it),
//   2. exponentials and their non-target sums, the target lane set to -inf (weight 0);
//      when the gradient is wanted in the same call, the exponentials are kept in a
//      per-thread row buffer (O(V), cache-resident),
//   3. the gradient, written once (fused call: from the kept exponentials; recomputing
//      backward: from the row statistics); the target element is written last.
// Passes 2-3 read the row back from L2 (a 32000-wide fp32 row pair is 256 KB).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

#include "../dkd.h"
#include "../dkd_math.h"
#include "dkd_cpu.h"
#include "vec_common.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

// Per-thread row buffers of the fused call: the exponentials of pass 2, in acc_t.
template <typename acc_t>
struct DkdScratch {
  std::unique_ptr<acc_t[]> data;
  acc_t *e_s = nullptr, *e_t = nullptr;
  explicit DkdScratch(int64_t vocab) {
    const int64_t w = Vectorized<acc_t>::size();
    const int64_t padded = (vocab + w - 1) / w * w;
    data.reset(new acc_t[2 * padded]);
    e_s = data.get();
    e_t = e_s + padded;
  }
};

template <typename s_t, typename t_t, typename acc_t>
struct DkdRowKernel {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const DkdParams& p;
  const math::DkdConsts<acc_t> k;
  const Vec vinv_temp;

  explicit DkdRowKernel(const DkdParams& params)
      : p(params),
        k(math::make_dkd_consts<acc_t>(params.temperature, params.alpha, params.beta)),
        vinv_temp(k.inv_temp) {}

  // n elements of x from j, the target's lane (when among them) set to -inf.
  template <typename T>
  static Vec load_non_target(const T* x, int64_t j, int64_t n, int64_t label) {
    const Vec v = load_n<T, acc_t>(x + j, n);
    if (static_cast<uint64_t>(label - j) >= static_cast<uint64_t>(n)) return v;
    alignas(64) acc_t buf[W];
    v.store(buf);
    buf[label - j] = kNegInf;
    return Vec::loadu(buf);
  }

  // Maximum over the non-target elements (NaN propagates).
  template <typename T>
  static acc_t non_target_max(const T* x, int64_t vocab, int64_t label) {
    const acc_t a = row_max<T, acc_t>(x, label);
    const acc_t b = row_max<T, acc_t>(x + label + 1, vocab - label - 1);
    return (a != a || b != b) ? a + b : std::max(a, b);
  }

  const s_t* student_row(int64_t row) const {
    return static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
  }
  const t_t* teacher_row(int64_t row) const {
    return static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row);
  }
  s_t* grad_student_row(int64_t row) const {
    return p.grad_student == nullptr ? nullptr : static_cast<s_t*>(p.grad_student) + row * p.vocab;
  }
  t_t* grad_teacher_row(int64_t row) const {
    return p.grad_teacher == nullptr ? nullptr : static_cast<t_t*>(p.grad_teacher) + row * p.vocab;
  }
  acc_t row_weight(int64_t row) const {
    return p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
  }

  // Pass 2: non-target sums of one row (maxima known and finite); keeps the
  // exponentials in sc. Bound by exp, so it also prefetches the next row (next_s /
  // next_t, or nullptr) into L2 for the next row's max pass.
  math::DkdSums<acc_t> sums(const s_t* s, const t_t* t, acc_t max_s, acc_t max_t, int64_t label, DkdScratch<acc_t>* sc,
            const s_t* next_s, const t_t* next_t) const {
    const Vec vmax_s(max_s), vmax_t(max_t);
    struct Acc {
      Vec z_s{acc_t(0)}, z_t{acc_t(0)}, z_diff{acc_t(0)}, w{acc_t(0)};
    };
    auto step = [&](int64_t j, int64_t n, Acc& a) {
      if (next_s != nullptr) {
        __builtin_prefetch(next_s + j, 0, 2);
        __builtin_prefetch(next_t + j, 0, 2);
      }
      // (x - max) is exact near the maximum, so the largest term is exactly exp(0) = 1.
      const Vec xs = (load_non_target(s, j, n, label) - vmax_s) * vinv_temp;
      const Vec xt = (load_non_target(t, j, n, label) - vmax_t) * vinv_temp;
      const Vec es = Ops::exp(xs), et = Ops::exp(xt);
      a.z_s = a.z_s + es;
      a.z_t = a.z_t + et;
      a.z_diff = a.z_diff + (es - et);
      a.w = a.w + math::weighted_diff<Ops>(et, xt, xs);
      if (sc != nullptr) {
        es.store(sc->e_s + j);
        et.store(sc->e_t + j);
      }
    };
    // Two independent vectors per iteration: the exp is a long dependency chain.
    Acc a, b;
    const int64_t vocab = p.vocab;
    int64_t j = 0;
    for (; j + 2 * W <= vocab; j += 2 * W) {
      step(j, W, a);
      step(j + W, W, b);
    }
    for (; j < vocab; j += W) step(j, std::min(W, vocab - j), a);
    return {hsum(a.z_s + b.z_s), hsum(a.z_t + b.z_t), hsum(a.z_diff + b.z_diff), hsum(a.w + b.w)};
  }

  // Pass 3: gradients of one counted row. With sc (fused call) the non-target
  // probabilities come from the kept exponentials (z_s, z_t their sums); without
  // (recomputing backward), from exp of the logits and the statistics.
  template <bool kStudent, bool kTeacher>
  void gradients(const s_t* s, const t_t* t, const math::DkdStats<acc_t>& r, const math::DkdGradConsts<acc_t>& g,
                 int64_t label, s_t* gs_row, t_t* gt_row,
                 const DkdScratch<acc_t>* sc, acc_t z_s, acc_t z_t) const {
    const math::DkdGradConsts<Vec> gv{Vec(g.nckd_w), Vec(g.nckd), Vec(g.tckd_s), Vec(g.tckd_t), Vec(g.log_ratio)};
    const Vec vmax_s(r.max_s), vmax_t(r.max_t), vlzs(r.log_z_s), vlzt(r.log_z_t);
    const Vec inv_zs(acc_t(1) / z_s), inv_zt(acc_t(1) / z_t), zero(acc_t(0));
    // The student's gradient needs no logits when the exponentials are kept.
    const bool read_logits = kTeacher || sc == nullptr;
    auto step = [&](int64_t j, int64_t n) {
      Vec xs = zero, xt = zero, ps, pt;  // x~ = (x - m') / T, -inf at the target
      if (read_logits) {
        xs = (load_non_target(s, j, n, label) - vmax_s) * vinv_temp;
        xt = (load_non_target(t, j, n, label) - vmax_t) * vinv_temp;
      }
      if (sc != nullptr) {
        ps = Vec::loadu(sc->e_s + j) * inv_zs;
        pt = Vec::loadu(sc->e_t + j) * inv_zt;
      } else {
        ps = Ops::exp(xs - vlzs);
        pt = Ops::exp(xt - vlzt);
      }
      if constexpr (kStudent) VecIO<s_t, acc_t>::store(math::dkd_student_grad<Ops>(ps, pt, gv), gs_row + j, n);
      if constexpr (kTeacher) VecIO<t_t, acc_t>::store(math::dkd_teacher_grad<Ops>(pt, xt, xs, gv), gt_row + j, n);
    };
    const int64_t vocab = p.vocab;
    int64_t j = 0;
    for (; j + 2 * W <= vocab; j += 2 * W) {
      step(j, W);
      step(j + W, W);
    }
    for (; j < vocab; j += W) step(j, std::min(W, vocab - j));
    // The target's lane got the non-target formula at zero probability; its own value:
    if constexpr (kStudent) gs_row[label] = static_cast<s_t>(g.tckd_s);
    if constexpr (kTeacher) gt_row[label] = static_cast<t_t>(g.tckd_t);
  }

  template <typename F>
  void with_gradient_kinds(const F& f) const {
    if (p.grad_student != nullptr && p.grad_teacher != nullptr) {
      f(std::true_type{}, std::true_type{});
    } else if (p.grad_student != nullptr) {
      f(std::true_type{}, std::false_type{});
    } else if (p.grad_teacher != nullptr) {
      f(std::false_type{}, std::true_type{});
    }
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
    std::unique_ptr<DkdScratch<acc_t>> scratch;
    if (with_grad) scratch = std::make_unique<DkdScratch<acc_t>>(p.vocab);
    for (int64_t row = begin; row < end; ++row) {
      acc_t* srow = stats + row * kDkdStatsCols;
      const int64_t label = p.labels[row];
      if (label == p.ignore_index) {
        loss[row] = acc_t(0);
        math::fill_dkd_stats(srow, acc_t(0));
        fill_row(row, acc_t(0));
        continue;
      }
      const s_t* s = student_row(row);
      const t_t* t = teacher_row(row);
      const acc_t max_s = non_target_max(s, p.vocab, label);
      const acc_t max_t = non_target_max(t, p.vocab, label);
      const acc_t s_y = static_cast<acc_t>(s[label]), t_y = static_cast<acc_t>(t[label]);
      acc_t row_loss = kNaN;
      math::DkdStats<acc_t> r{};
      math::DkdSums<acc_t> st{};
      if (math::dkd_row_defined(max_s, max_t, s_y, t_y)) {
        const bool has_next = row + 1 < end;
        st = sums(s, t, max_s, max_t, label, scratch.get(), has_next ? student_row(row + 1) : nullptr,
                  has_next ? teacher_row(row + 1) : nullptr);
        r = math::dkd_row_stats(max_s, max_t, st, s_y, t_y, k);
        row_loss = math::dkd_row_loss(r, k);
      }
      if (row_loss != row_loss) {  // NaN in, or no distribution on a side: NaN out
        loss[row] = kNaN;
        math::fill_dkd_stats(srow, kNaN);
        fill_row(row, kNaN);
        continue;
      }
      loss[row] = row_loss;
      math::store_dkd_stats(r, srow);
      if (!with_grad) continue;
      const math::DkdGradConsts<acc_t> g = math::dkd_grad_consts(r, k, row_weight(row));
      with_gradient_kinds([&](auto ks, auto kt) {
        gradients<decltype(ks)::value, decltype(kt)::value>(s, t, r, g, label, grad_student_row(row),
                                                             grad_teacher_row(row), scratch.get(), st.z_s, st.z_t);
      });
    }
  }

  // Gradients of rows [begin, end) recomputed from the forward's stats.
  void backward(int64_t begin, int64_t end) const {
    const auto* stats = static_cast<const acc_t*>(p.stats_in);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = p.labels[row];
      if (label == p.ignore_index) {  // stats of ignored rows may hold anything
        fill_row(row, acc_t(0));
        continue;
      }
      const math::DkdStats<acc_t> r = math::load_dkd_stats(stats + row * kDkdStatsCols);
      if (r.max_s != r.max_s) {  // the forward marked the row undefined
        fill_row(row, kNaN);
        continue;
      }
      const math::DkdGradConsts<acc_t> g = math::dkd_grad_consts(r, k, row_weight(row));
      with_gradient_kinds([&](auto ks, auto kt) {
        gradients<decltype(ks)::value, decltype(kt)::value>(student_row(row), teacher_row(row), r, g, label,
                                                             grad_student_row(row), grad_teacher_row(row), nullptr,
                                                             acc_t(1), acc_t(1));
      });
    }
  }
};

// Rows per parallel task: enough elements to amortise scheduling.
inline int64_t dkd_grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

template <bool kBackward>
struct DkdLauncher {
  const DkdParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const {
    const DkdRowKernel<s_t, t_t, acc_t> kernel(p);
    at::parallel_for(0, p.rows, dkd_grain_rows(p.vocab), [&](int64_t b, int64_t e) {
      if constexpr (kBackward) {
        kernel.backward(b, e);
      } else {
        kernel.forward(b, e);
      }
    });
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per dkd_kernel_*.cpp.
#define KDFAST_DEFINE_DKD_CPU_KERNELS(SUFFIX)                                              \
  namespace kdfast {                                                                       \
  namespace cpu {                                                                          \
  void dkd_forward_##SUFFIX(const DkdParams& p, c10::ScalarType s, c10::ScalarType t) {  \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::DkdLauncher<false>{p});          \
  }                                                                                        \
  void dkd_backward_##SUFFIX(const DkdParams& p, c10::ScalarType s, c10::ScalarType t) { \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::DkdLauncher<true>{p});           \
  }                                                                                        \
  }                                                                                        \
  }
