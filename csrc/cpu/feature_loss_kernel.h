// CPU kernels of feature_loss, written once with at::vec::Vectorized and compiled once per
// instruction set (feature_loss_kernel_{default,avx2,avx512}.cpp define CPU_CAPABILITY).
// The formulas come from ../feature_loss_math.h (shared with CUDA) through VecOps.
//
// A row is processed by one thread:
//   - mse / l1 / smooth_l1: one pass computing the loss and writing the gradients;
//   - cosine, and mse with normalize: pass 1 sums ||s||^2, ||t||^2, s.t (the only pass
//     that reads the inputs from memory), pass 2 writes the gradients a u + b v (and sums
//     mse's loss); a 4096-wide fp32 row pair is 32 KB, so pass 2 reads L1 / L2;
//   - l1 / smooth_l1 with normalize: pass 1, then the loss and s.g_u, t.g_u, then the
//     gradients.
// Each input is read from memory once and each gradient written once.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../feature_loss.h"
#include "../feature_loss_math.h"
#include "feature_loss_cpu.h"
#include "vec_common.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

// Everything about one row's computation for one (kind, normalize, dtypes) combination.
template <FeatureKind kind, bool kNormalize, typename s_t, typename t_t, typename acc_t>
struct FeatureRowKernel {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  using Triple = math::RowTriple<acc_t>;
  using Row = math::FeatureRow<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr bool kDots = kNormalize || kind == FeatureKind::Cosine;
  // Gradient a u + b v: cosine, and mse with normalize.
  static constexpr bool kLinear = kind == FeatureKind::Cosine || (kind == FeatureKind::MSE && kNormalize);

  const FeatureLossParams& p;

  explicit FeatureRowKernel(const FeatureLossParams& params) : p(params) {}

  // n elements, zero padded (a zero pair adds nothing to any sum or loss).
  static Vec load_s(const s_t* s, int64_t n) { return load_n<s_t, acc_t>(s, n, acc_t(0)); }
  static Vec load_t(const t_t* t, int64_t n) { return load_n<t_t, acc_t>(t, n, acc_t(0)); }

  const s_t* student_row(int64_t row) const {
    return static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
  }
  const t_t* teacher_row(int64_t row) const {
    return static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row);
  }
  s_t* grad_student_row(int64_t row) const {
    return p.grad_student == nullptr ? nullptr : static_cast<s_t*>(p.grad_student) + row * p.dim;
  }
  t_t* grad_teacher_row(int64_t row) const {
    return p.grad_teacher == nullptr ? nullptr : static_cast<t_t*>(p.grad_teacher) + row * p.dim;
  }
  acc_t row_weight(int64_t row) const {
    return p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
  }
  bool selected(int64_t row) const { return p.mask == nullptr || p.mask[row]; }

  // Runs body(j, n, acc) over the row in vectors, two independent accumulators in flight.
  template <typename Acc, typename Body>
  void for_row(Acc& a, Acc& b, const Body& body) const {
    const int64_t dim = p.dim;
    int64_t j = 0;
    for (; j + 2 * W <= dim; j += 2 * W) {
      body(j, W, a);
      body(j + W, W, b);
    }
    for (; j < dim; j += W) body(j, std::min(W, dim - j), a);
  }

  struct Sums {
    Vec a{acc_t(0)}, b{acc_t(0)}, c{acc_t(0)};
    Triple total(const Sums& o) const { return {hsum(a + o.a), hsum(b + o.b), hsum(c + o.c)}; }
  };

  // Pass 1: ||s||^2, ||t||^2, s.t.
  Triple dots(const s_t* s, const t_t* t) const {
    Sums x, y;
    for_row(x, y, [&](int64_t j, int64_t n, Sums& acc) {
      const Vec sv = load_s(s + j, n), tv = load_t(t + j, n);
      acc.a = acc.a + sv * sv;
      acc.b = acc.b + tv * tv;
      acc.c = acc.c + sv * tv;
    });
    return x.total(y);
  }

  // mse / l1 / smooth_l1 without normalize: the loss, and the gradients times w, in one pass.
  template <bool kS, bool kT>
  acc_t plain_pass(const s_t* s, const t_t* t, acc_t w, s_t* gs, t_t* gt) const {
    const Vec vw(w), neg_w(-w);
    Sums x, y;
    for_row(x, y, [&](int64_t j, int64_t n, Sums& acc) {
      const Vec d = load_s(s + j, n) - load_t(t + j, n);
      acc.a = acc.a + math::element_loss<kind, Ops>(d);
      if constexpr (kS || kT) {
        const Vec g = math::element_grad<kind, Ops>(d);
        if constexpr (kS) VecIO<s_t, acc_t>::store(g * vw, gs + j, n);
        if constexpr (kT) VecIO<t_t, acc_t>::store(g * neg_w, gt + j, n);
      }
    });
    return x.total(y).a;
  }

  // Cosine and mse with normalize: gradients a u + b v, and (kLoss) mse's loss. Prefetches
  // the next row (next_s / next_t, or nullptr) so that its pass 1 finds it in L2.
  template <bool kS, bool kT, bool kLoss>
  acc_t linear_pass(const s_t* s, const t_t* t, const Row& r, s_t* gs, t_t* gt, const s_t* next_s,
                    const t_t* next_t) const {
    const Vec g_su(r.grad.su), g_sv(r.grad.sv), g_tu(r.grad.tu), g_tv(r.grad.tv);
    const Vec inv_s(r.s.inv), inv_t(r.t.inv);
    Sums x, y;
    for_row(x, y, [&](int64_t j, int64_t n, Sums& acc) {
      if (next_s != nullptr) {
        __builtin_prefetch(next_s + j, 0, 2);
        __builtin_prefetch(next_t + j, 0, 2);
      }
      Vec u = load_s(s + j, n), v = load_t(t + j, n);
      if constexpr (kNormalize) {
        u = u * inv_s;
        v = v * inv_t;
      }
      if constexpr (kLoss) {
        const Vec d = u - v;
        acc.a = acc.a + d * d;
      }
      if constexpr (kS) VecIO<s_t, acc_t>::store(g_su * u + g_sv * v, gs + j, n);
      if constexpr (kT) VecIO<t_t, acc_t>::store(g_tu * u + g_tv * v, gt + j, n);
    });
    return kLoss ? x.total(y).a : acc_t(0);
  }

  // l1 / smooth_l1 with normalize: the loss, s.g_u and t.g_u (kSums) of the normalised row.
  template <bool kSums>
  Triple element_sums(const s_t* s, const t_t* t, const Row& r) const {
    const Vec inv_s(r.s.inv), inv_t(r.t.inv);
    Sums x, y;
    for_row(x, y, [&](int64_t j, int64_t n, Sums& acc) {
      const Vec sv = load_s(s + j, n), tv = load_t(t + j, n);
      const Vec d = sv * inv_s - tv * inv_t;
      acc.a = acc.a + math::element_loss<kind, Ops>(d);
      if constexpr (kSums) {
        const Vec g = math::element_grad<kind, Ops>(d);
        acc.b = acc.b + sv * g;
        acc.c = acc.c + tv * g;
      }
    });
    return x.total(y);
  }

  // l1 / smooth_l1 with normalize: the gradients through the normalisation.
  template <bool kS, bool kT>
  void element_chain_pass(const s_t* s, const t_t* t, const Row& r, const math::ElementChain<acc_t>& c, s_t* gs,
                          t_t* gt) const {
    const Vec inv_s(r.s.inv), inv_t(r.t.inv);
    const Vec gu_s(c.gu_s), s_s(c.s_s), gu_t(c.gu_t), t_t_(c.t_t);
    Sums x, y;
    for_row(x, y, [&](int64_t j, int64_t n, Sums&) {
      const Vec sv = load_s(s + j, n), tv = load_t(t + j, n);
      const Vec g = math::element_grad<kind, Ops>(sv * inv_s - tv * inv_t);
      if constexpr (kS) VecIO<s_t, acc_t>::store(gu_s * g + s_s * sv, gs + j, n);
      if constexpr (kT) VecIO<t_t, acc_t>::store(gu_t * g + t_t_ * tv, gt + j, n);
    });
  }

  // The gradients of a selected row whose row scalars are known (after pass 1), plus the
  // loss where an element pass computes it (kLoss). Returns that loss (0 otherwise).
  template <bool kS, bool kT, bool kLoss>
  acc_t finish_row(const s_t* s, const t_t* t, const Row& r, acc_t w, s_t* gs, t_t* gt, const s_t* next_s,
                   const t_t* next_t) const {
    constexpr bool kGrad = kS || kT;
    if constexpr (kind == FeatureKind::Cosine) {
      if constexpr (kGrad) linear_pass<kS, kT, false>(s, t, r, gs, gt, next_s, next_t);
      return acc_t(0);
    } else if constexpr (kLinear) {  // mse with normalize
      if constexpr (kGrad || kLoss) return linear_pass<kS, kT, kLoss>(s, t, r, gs, gt, next_s, next_t);
      return acc_t(0);
    } else {  // l1 / smooth_l1 with normalize
      const Triple sums = element_sums<kGrad>(s, t, r);  // the loss comes with it
      if constexpr (kGrad) {
        element_chain_pass<kS, kT>(s, t, r, math::element_chain(r, sums.b, sums.c, w), gs, gt);
      }
      return sums.a;
    }
  }

  void zero_row(int64_t row) const {
    if (s_t* g = grad_student_row(row)) std::fill(g, g + p.dim, s_t(0));
    if (t_t* g = grad_teacher_row(row)) std::fill(g, g + p.dim, t_t(0));
  }

  template <typename F>
  static void with_sides(bool student, bool teacher, const F& f) {
    if (student && teacher) {
      f(std::true_type{}, std::true_type{});
    } else if (student) {
      f(std::true_type{}, std::false_type{});
    } else if (teacher) {
      f(std::false_type{}, std::true_type{});
    } else {
      f(std::false_type{}, std::false_type{});
    }
  }

  // Loss, stats and (when p.grad_* are set) gradients of rows [begin, end).
  void forward(int64_t begin, int64_t end) const {
    auto* loss = static_cast<acc_t*>(p.loss);
    auto* stats = static_cast<acc_t*>(p.stats);
    with_sides(p.grad_student != nullptr, p.grad_teacher != nullptr, [&](auto ks, auto kt) {
      constexpr bool kS = decltype(ks)::value, kT = decltype(kt)::value;
      for (int64_t row = begin; row < end; ++row) {
        acc_t* srow = stats == nullptr ? nullptr : stats + row * kFeatureStatsCols;
        if (!selected(row)) {
          loss[row] = acc_t(0);
          if (srow) srow[0] = srow[1] = srow[2] = acc_t(0);
          zero_row(row);
          continue;
        }
        const s_t* s = student_row(row);
        const t_t* t = teacher_row(row);
        const acc_t w = row_weight(row);
        if constexpr (!kDots) {
          loss[row] = plain_pass<kS, kT>(s, t, w, grad_student_row(row), grad_teacher_row(row));
          if (srow) srow[0] = srow[1] = srow[2] = acc_t(0);
        } else {
          const Triple d = dots(s, t);
          if (srow) {
            srow[0] = d.a;
            srow[1] = d.b;
            srow[2] = d.c;
          }
          const Row r = math::feature_row<kind, kNormalize>(d, w);
          const bool has_next = row + 1 < end;
          const acc_t pass_loss =
              finish_row<kS, kT, true>(s, t, r, w, grad_student_row(row), grad_teacher_row(row),
                                       has_next ? student_row(row + 1) : nullptr,
                                       has_next ? teacher_row(row + 1) : nullptr);
          loss[row] = kind == FeatureKind::Cosine ? r.loss : pass_loss;
        }
      }
    });
  }

  // Gradients of rows [begin, end), the row sums read from p.stats_in.
  void backward(int64_t begin, int64_t end) const {
    const auto* stats = static_cast<const acc_t*>(p.stats_in);
    with_sides(p.grad_student != nullptr, p.grad_teacher != nullptr, [&](auto ks, auto kt) {
      constexpr bool kS = decltype(ks)::value, kT = decltype(kt)::value;
      if constexpr (kS || kT) {
        for (int64_t row = begin; row < end; ++row) {
          if (!selected(row)) {  // stats of unselected rows may hold anything
            zero_row(row);
            continue;
          }
          const s_t* s = student_row(row);
          const t_t* t = teacher_row(row);
          const acc_t w = row_weight(row);
          if constexpr (!kDots) {
            plain_pass<kS, kT>(s, t, w, grad_student_row(row), grad_teacher_row(row));
          } else {
            const acc_t* srow = stats + row * kFeatureStatsCols;
            const Row r = math::feature_row<kind, kNormalize>(Triple{srow[0], srow[1], srow[2]}, w);
            const bool has_next = row + 1 < end;
            finish_row<kS, kT, false>(s, t, r, w, grad_student_row(row), grad_teacher_row(row),
                                      has_next ? student_row(row + 1) : nullptr,
                                      has_next ? teacher_row(row + 1) : nullptr);
          }
        }
      }
    });
  }
};

// Rows per parallel task: enough elements to amortise scheduling.
inline int64_t feature_grain_rows(int64_t dim) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1)); }

template <bool kBackward, typename s_t, typename t_t, typename acc_t>
void run_feature_loss(const FeatureLossParams& p) {
  auto go = [&](auto kind_tag, auto norm_tag) {
    const FeatureRowKernel<decltype(kind_tag)::value, decltype(norm_tag)::value, s_t, t_t, acc_t> kernel(p);
    at::parallel_for(0, p.rows, feature_grain_rows(p.dim), [&](int64_t b, int64_t e) {
      if constexpr (kBackward) {
        kernel.backward(b, e);
      } else {
        kernel.forward(b, e);
      }
    });
  };
  auto with_norm = [&](auto kind_tag) {
    if (p.normalize) {
      go(kind_tag, std::true_type{});
    } else {
      go(kind_tag, std::false_type{});
    }
  };
  using K = FeatureKind;
  switch (p.kind) {
    case K::MSE: with_norm(std::integral_constant<K, K::MSE>{}); return;
    case K::L1: with_norm(std::integral_constant<K, K::L1>{}); return;
    case K::SmoothL1: with_norm(std::integral_constant<K, K::SmoothL1>{}); return;
    case K::Cosine: with_norm(std::integral_constant<K, K::Cosine>{}); return;
  }
  TORCH_CHECK(false, "feature_loss: unknown kind code ", static_cast<int64_t>(p.kind));
}

struct FeatureForwardLauncher {
  const FeatureLossParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run_feature_loss<false, s_t, t_t, acc_t>(p); }
};
struct FeatureBackwardLauncher {
  const FeatureLossParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run_feature_loss<true, s_t, t_t, acc_t>(p); }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per feature_loss_kernel_*.cpp.
#define KDFAST_DEFINE_FEATURE_LOSS_CPU_KERNELS(SUFFIX)                                                     \
  namespace kdfast {                                                                                       \
  namespace cpu {                                                                                          \
  void feature_loss_forward_##SUFFIX(const FeatureLossParams& p, c10::ScalarType s, c10::ScalarType t) {  \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::FeatureForwardLauncher{p});                      \
  }                                                                                                        \
  void feature_loss_backward_##SUFFIX(const FeatureLossParams& p, c10::ScalarType s, c10::ScalarType t) { \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::FeatureBackwardLauncher{p});                     \
  }                                                                                                        \
  }                                                                                                        \
  }
