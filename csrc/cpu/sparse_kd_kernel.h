// CPU kernels of sparse_kd_loss, written once with at::vec::Vectorized and compiled once
// per instruction set (sparse_kd_kernel_{default,avx2,avx512}.cpp define CPU_CAPABILITY).
// The formulas come from ../sparse_kd_math.h (shared with CUDA).
//
// A row is processed by one thread:
//   1. one pass over the student row in chunks of kChunk elements: the chunk's maximum
//      (the only read of the row from memory), then its exponentials relative to the
//      running maximum (the chunk again, from L1), summed and kept in a per-thread row
//      buffer (O(V), cache-resident), with one factor per chunk to the final maximum;
//   2. the teacher's support (K entries): its mass, the divergence terms and, for the
//      residual tail, the student mass off the support, summed from the row buffer
//      with the support entries zeroed (no cancellation against the normaliser); then
//      the gradient's values at the support and the label (from their logits, in acc_t);
//   3. the gradient: the row written densely from the kept exponentials with the
//      coefficient of the entries off the support, then the values of step 2 written
//      over their entries.
// Step 1 is bound by the exponentials, step 3 by memory (a gradient-sized buffer written
// for the first time), so a thread overlaps them across rows: while it reads row r in
// step 1 it writes row r - 1's gradient chunk by chunk (two row buffers per thread).
// The recomputing backward (float16 students) does step 3 from the row statistics, with
// the exponentials of the logits. No dense teacher is formed.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>

#include "../sparse_kd.h"
#include "../sparse_kd_math.h"
#include "sparse_kd_cpu.h"
#include "vec_common.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

// Elements per chunk of pass 1: small enough to stay in L1 between its two reads.
template <typename acc_t>
constexpr int64_t sparse_chunk() {
  return 32 * Vectorized<acc_t>::size();
}

// Per-thread row buffers: the exponentials of pass 1 (e relative to the running maximum
// when their chunk was read; e1 the same at temperature 1) and, per chunk, first that
// maximum, then the factor from it to the row's maximum; the row's support entries (index,
// teacher probability and its log, (s_i - m) / T); the gradient's values at the support
// and the label (entries + 1 values, indices in index[]), written over the dense row.
template <typename acc_t>
struct SparseScratch {
  std::unique_ptr<acc_t[]> data;
  std::unique_ptr<int64_t[]> index;
  acc_t *e = nullptr, *e1 = nullptr, *factor = nullptr, *factor1 = nullptr;
  acc_t *p = nullptr, *log_p = nullptr, *x = nullptr, *grad = nullptr;
  int64_t entries = 0, patches = 0;
  SparseScratch(int64_t vocab, int64_t support, bool with_s1) {
    const int64_t w = Vectorized<acc_t>::size();
    const int64_t padded = (vocab + w - 1) / w * w;
    const int64_t chunks = (vocab + sparse_chunk<acc_t>() - 1) / sparse_chunk<acc_t>();
    const int64_t rows = with_s1 ? 2 : 1;
    data.reset(new acc_t[padded * rows + 2 * chunks + 4 * (support + 1)]);
    index.reset(new int64_t[support + 1]);
    e = data.get();
    e1 = with_s1 ? e + padded : nullptr;
    factor = e + padded * rows;
    factor1 = factor + chunks;
    p = factor1 + chunks;
    log_p = p + support + 1;
    x = log_p + support + 1;
    grad = x + support + 1;
  }
};

template <typename s_t, typename acc_t>
struct SparseRowKernel {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t kChunk = sparse_chunk<acc_t>();
  static constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const SparseKdParams& p;
  const math::SparseConsts<acc_t> k;

  explicit SparseRowKernel(const SparseKdParams& params)
      : p(params),
        k(math::make_sparse_consts<acc_t>(params.temperature, params.alpha, params.logprobs, params.tail)) {}

  const s_t* student_row(int64_t row) const {
    return static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
  }
  s_t* grad_row(int64_t row) const { return static_cast<s_t*>(p.grad_student) + row * p.vocab; }
  acc_t row_weight(int64_t row) const {
    return p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
  }
  void fill_grad(int64_t row, acc_t value) const {
    if (p.grad_student == nullptr) return;
    s_t* g = grad_row(row);
    std::fill(g, g + p.vocab, static_cast<s_t>(value));
  }

  struct Norm {
    acc_t max, z, z1;
    bool defined;
  };

  // A row's gradient waiting to be written (pass 3) from its row buffer.
  struct PendingGrad {
    const SparseScratch<acc_t>* sc = nullptr;  // nullptr: nothing pending
    s_t* gs = nullptr;
    acc_t per_z = 0, per_z1 = 0;  // q_j * dense = e_j * factor * per_z; the CE's part likewise
    int64_t written = 0;          // chunks written so far
  };

  // Pass 1 over one row (see the top); next: the next row of this thread (or nullptr),
  // prefetched while the last chunks are exponentiated; pending: a previous row's
  // gradient, one chunk of which is written along with each chunk of this row.
  Norm normalise(const s_t* s, SparseScratch<acc_t>& sc, const s_t* next, PendingGrad& pending) const {
    const int64_t vocab = p.vocab;
    const Vec vinv_temp(k.inv_temp), zero(acc_t(0));
    const bool with_s1 = k.with_s1;
    Vec za(zero), zb(zero), z1a(zero), z1b(zero);
    acc_t m = kNegInf;
    int64_t c = 0;
    for (int64_t lo = 0; lo < vocab; lo += kChunk, ++c) {
      if (pending.sc != nullptr) write_chunk(pending, c);
      const int64_t n = std::min(kChunk, vocab - lo);
      const acc_t cm = row_max<s_t, acc_t>(s + lo, n);
      if (cm != cm || cm == -kNegInf) return {cm, acc_t(0), acc_t(0), false};  // NaN or +inf
      if (cm > m) {
        if (m != kNegInf) {  // move the sums to the new maximum
          const Vec r(std::exp((m - cm) * k.inv_temp));
          za = za * r;
          zb = zb * r;
          if (with_s1) {
            const Vec r1(std::exp(m - cm));
            z1a = z1a * r1;
            z1b = z1b * r1;
          }
        }
        m = cm;
      }
      sc.factor[c] = m;
      if (m == kNegInf) {  // all -inf so far: zero weight
        std::fill(sc.e + lo, sc.e + lo + n, acc_t(0));
        if (with_s1) std::fill(sc.e1 + lo, sc.e1 + lo + n, acc_t(0));
        continue;
      }
      const Vec vmax(m);
      auto step = [&](int64_t j, int64_t nn, Vec& z, Vec& z1) {
        // Two chunks ahead (of this row or the next), for pass 1's max: about the memory
        // latency's worth of this loop.
        const int64_t ahead = j + 2 * kChunk;
        if (ahead < vocab) {
          __builtin_prefetch(s + ahead, 0, 3);
        } else if (next != nullptr && ahead - vocab < vocab) {
          __builtin_prefetch(next + (ahead - vocab), 0, 3);
        }
        const Vec v = load_n<s_t, acc_t>(s + j, nn);
        const Vec e = Ops::exp((v - vmax) * vinv_temp);
        e.store(sc.e + j);
        z = z + e;
        if (with_s1) {
          const Vec e1 = Ops::exp(v - vmax);
          e1.store(sc.e1 + j);
          z1 = z1 + e1;
        }
      };
      // Two independent vectors per iteration: the exp is a long dependency chain.
      const int64_t end = lo + n;
      int64_t j = lo;
      for (; j + 2 * W <= end; j += 2 * W) {
        step(j, W, za, z1a);
        step(j + W, W, zb, z1b);
      }
      for (; j < end; j += W) step(j, std::min(W, end - j), za, z1a);
    }
    if (m == kNegInf) return {m, acc_t(0), acc_t(0), false};  // no finite logit
    const int64_t chunks = c;
    const Vec vm(m);
    for (c = 0; c < chunks; c += W) {  // running maximum of each chunk -> factor to m (-inf: 0)
      const int64_t n = std::min(W, chunks - c);
      const Vec d = load_n<acc_t, acc_t>(sc.factor + c, n) - vm;
      Ops::exp(d * vinv_temp).store(sc.factor + c, static_cast<int>(n));
      if (with_s1) Ops::exp(d).store(sc.factor1 + c, static_cast<int>(n));
    }
    return {m, hsum(za + zb), with_s1 ? hsum(z1a + z1b) : acc_t(0), true};
  }

  // sum_j e_j * factor of the kept exponentials (those zeroed on the support: the
  // student's mass off the support, times Z).
  acc_t kept_sum(const SparseScratch<acc_t>& sc) const {
    const int64_t vocab = p.vocab;
    acc_t total = 0;
    int64_t c = 0;
    for (int64_t lo = 0; lo < vocab; lo += kChunk, ++c) {
      const int64_t end = std::min(lo + kChunk, vocab);
      Vec a(acc_t(0)), b(acc_t(0));
      int64_t j = lo;
      for (; j + 2 * W <= end; j += 2 * W) {
        a = a + Vec::loadu(sc.e + j);
        b = b + Vec::loadu(sc.e + j + W);
      }
      for (; j < end; j += W) a = a + load_n<acc_t, acc_t>(sc.e + j, std::min(W, end - j), acc_t(0));
      total += sc.factor[c] * hsum(a + b);
    }
    return total;
  }

  // The student logit at index i, in acc_t.
  static acc_t logit(const s_t* s, int64_t i) { return static_cast<acc_t>(s[i]); }

  // The row's support entries into sc (index -1: skipped), with x = (s_i - max_s) / T.
  void gather_support(int64_t row, const s_t* s, acc_t max_s, SparseScratch<acc_t>& sc) const {
    int64_t n = 0;
    acc_t* stored = k.logprobs ? sc.log_p : sc.p;
    for (int64_t kk = 0; kk < p.support; ++kk) {
      const int64_t i = sparse_index(p, row, kk);
      if (i < 0) continue;
      sc.index[n] = i;
      stored[n] = sparse_value<acc_t>(p, row, kk);
      sc.x[n++] = (logit(s, i) - max_s) * k.inv_temp;
    }
    sc.entries = n;
    // math::teacher_prob, W entries at a time: p = exp(log p), or log p = log p (0 for p <= 0).
    const Vec zero(acc_t(0));
    for (int64_t j = 0; j < n; j += W) {
      const int count = static_cast<int>(std::min(W, n - j));
      const Vec v = load_n<acc_t, acc_t>(stored + j, count, acc_t(0));
      if (k.logprobs) {
        v.exp().store(sc.p + j, count);
      } else {
        Ops::select(Ops::gt(v, zero), v.log(), zero).store(sc.log_p + j, count);
      }
    }
  }

  // Pass 2: row statistics from the normaliser and the teacher's support; zeroes the
  // support's exponentials in sc (residual).
  math::SparseRowStats<acc_t> support_stats(int64_t row, const s_t* s, const Norm& nm,
                                            SparseScratch<acc_t>& sc) const {
    gather_support(row, s, nm.max, sc);
    acc_t mass = 0;
    for (int64_t n = 0; n < sc.entries; ++n) mass += sc.p[n];
    const math::SupportScale<acc_t> scale = math::support_scale(mass, k);
    const acc_t log_z = std::log(nm.z);
    acc_t terms = 0;
    for (int64_t n = 0; n < sc.entries; ++n) {
      terms += math::support_term(math::TeacherProb<acc_t>{sc.p[n], sc.log_p[n]}, sc.x[n] - log_z, scale);
    }
    acc_t off_support = 0;
    if (k.residual) {
      for (int64_t n = 0; n < sc.entries; ++n) sc.e[sc.index[n]] = acc_t(0);
      off_support = kept_sum(sc) / nm.z;
    }
    return math::sparse_row_stats(nm.max, nm.z, nm.z1, mass, terms, off_support, k);
  }

  // q1 of the student logit at i from the row statistics (q when T = 1).
  acc_t prob1_at(const s_t* s, int64_t i, const math::SparseRowStats<acc_t>& r, acc_t q) const {
    return k.with_s1 ? std::exp(math::log_prob(logit(s, i), r.max_s, acc_t(1), r.log_z1)) : q;
  }

  // Pass 2b: the gradient's values at the gathered support entries and the label, into sc.
  void support_gradient(const s_t* s, const math::SparseRowStats<acc_t>& r, const math::SparseGradConsts<acc_t>& g,
                        int64_t label, SparseScratch<acc_t>& sc) const {
    const Vec vlz(r.log_z);
    for (int64_t j = 0; j < sc.entries; j += W) {  // q of each entry, W at a time
      const int count = static_cast<int>(std::min(W, sc.entries - j));
      Ops::exp(load_n<acc_t, acc_t>(sc.x + j, count) - vlz).store(sc.grad + j, count);
    }
    bool label_in_support = false;
    for (int64_t n = 0; n < sc.entries; ++n) {
      const int64_t i = sc.index[n];
      const acc_t q = sc.grad[n];
      sc.grad[n] = math::support_grad(g, sc.p[n], q, prob1_at(s, i, r, q), i == label);
      label_in_support |= i == label;
    }
    sc.patches = sc.entries;
    if (k.with_ce && !label_in_support) {
      const acc_t q = std::exp(math::log_prob(logit(s, label), r.max_s, k.inv_temp, r.log_z));
      sc.index[sc.patches] = label;
      sc.grad[sc.patches++] = math::dense_grad(g, q, prob1_at(s, label, r, q), true);
    }
  }

  static void apply_patches(const SparseScratch<acc_t>& sc, s_t* gs) {
    for (int64_t n = 0; n < sc.patches; ++n) gs[sc.index[n]] = static_cast<s_t>(sc.grad[n]);
  }

  // Pass 3 from the kept exponentials, one chunk: g_j = q_j * dense (+ the CE's q1_j part).
  void write_chunk(PendingGrad& pg, int64_t c) const {
    const SparseScratch<acc_t>& sc = *pg.sc;
    const int64_t lo = c * kChunk, end = std::min(lo + kChunk, p.vocab);
    const Vec mul(pg.per_z * sc.factor[c]);
    s_t* gs = pg.gs;
    if (!k.with_ce) {
      for (int64_t j = lo; j < end; j += W) {
        VecIO<s_t, acc_t>::store(Vec::loadu(sc.e + j) * mul, gs + j, std::min(W, end - j));
      }
    } else {
      const acc_t* e1 = k.with_s1 ? sc.e1 : sc.e;
      const Vec mul1(pg.per_z1 * (k.with_s1 ? sc.factor1[c] : sc.factor[c]));
      for (int64_t j = lo; j < end; j += W) {
        const Vec gv = Vec::loadu(sc.e + j) * mul + Vec::loadu(e1 + j) * mul1;
        VecIO<s_t, acc_t>::store(gv, gs + j, std::min(W, end - j));
      }
    }
    pg.written = c + 1;
  }

  // The rest of a pending gradient, then its support and label values.
  void finish(PendingGrad& pg) const {
    if (pg.sc == nullptr) return;
    const int64_t chunks = (p.vocab + kChunk - 1) / kChunk;
    for (int64_t c = pg.written; c < chunks; ++c) write_chunk(pg, c);
    apply_patches(*pg.sc, pg.gs);
    pg = PendingGrad{};
  }

  // Pass 3a of the recomputing backward: the dense gradient from the logits.
  void dense_from_logits(const s_t* s, const math::SparseRowStats<acc_t>& r, const math::SparseGradConsts<acc_t>& g,
                         s_t* gs) const {
    const Vec vmax(r.max_s), vinv_temp(k.inv_temp), vlz(r.log_z), vlz1(r.log_z1);
    const Vec dense(g.dense), ce(g.ce);
    const int64_t vocab = p.vocab;
    for (int64_t j = 0; j < vocab; j += W) {
      const int64_t n = std::min(W, vocab - j);
      const Vec d = load_n<s_t, acc_t>(s + j, n) - vmax;
      const Vec q = Ops::exp(d * vinv_temp - vlz);
      Vec gv = q * dense;
      if (k.with_ce) gv = gv + ce * (k.with_s1 ? Ops::exp(d - vlz1) : q);
      VecIO<s_t, acc_t>::store(gv, gs + j, n);
    }
  }

  // Loss, stats and (when p.grad_student is set) the gradient of rows [begin, end).
  void forward(int64_t begin, int64_t end) const {
    auto* loss = static_cast<acc_t*>(p.loss);
    auto* stats = static_cast<acc_t*>(p.stats);
    const bool with_grad = p.grad_student != nullptr;
    // Two row buffers: row r's exponentials are computed while row r - 1's gradient is
    // written from the other one.
    SparseScratch<acc_t> buffers[2] = {SparseScratch<acc_t>(p.vocab, p.support, k.with_s1),
                                       SparseScratch<acc_t>(p.vocab, p.support, k.with_s1)};
    int cur = 0;
    PendingGrad pending;
    for (int64_t row = begin; row < end; ++row) {
      acc_t* srow = stats + row * kSparseStatsCols;
      const int64_t label = p.labels ? p.labels[row] : -1;
      if (p.labels && label == p.ignore_index) {
        finish(pending);
        loss[row] = acc_t(0);
        math::fill_sparse_stats(srow, acc_t(0));
        fill_grad(row, acc_t(0));
        continue;
      }
      const s_t* s = student_row(row);
      SparseScratch<acc_t>& sc = buffers[cur];
      const Norm nm = normalise(s, sc, row + 1 < end ? student_row(row + 1) : nullptr, pending);
      finish(pending);
      acc_t row_loss = kNaN;
      math::SparseRowStats<acc_t> r{};
      if (math::sparse_row_defined(nm.max, nm.z)) {
        r = support_stats(row, s, nm, sc);
        row_loss = math::sparse_row_loss(r, k, k.with_ce ? logit(s, label) : acc_t(0));
      }
      if (row_loss != row_loss) {  // no softmax, or NaN in: NaN out
        loss[row] = kNaN;
        math::fill_sparse_stats(srow, kNaN);
        fill_grad(row, kNaN);
        continue;
      }
      loss[row] = row_loss;
      math::store_sparse_stats(r, srow);
      if (!with_grad) continue;
      const math::SparseGradConsts<acc_t> g = math::sparse_grad_consts(r, k, row_weight(row));
      support_gradient(s, r, g, label, sc);
      pending.sc = &sc;
      pending.gs = grad_row(row);
      pending.per_z = g.dense / nm.z;
      pending.per_z1 = k.with_ce ? g.ce / (k.with_s1 ? nm.z1 : nm.z) : acc_t(0);
      pending.written = 0;
      cur ^= 1;
    }
    finish(pending);
  }

  // Gradients of rows [begin, end) recomputed from the forward's stats.
  void backward(int64_t begin, int64_t end) const {
    const auto* stats = static_cast<const acc_t*>(p.stats_in);
    SparseScratch<acc_t> sc(0, p.support, false);  // the patch buffers only
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = p.labels ? p.labels[row] : -1;
      if (p.labels && label == p.ignore_index) {  // stats of ignored rows may hold anything
        fill_grad(row, acc_t(0));
        continue;
      }
      const math::SparseRowStats<acc_t> r = math::load_sparse_stats(stats + row * kSparseStatsCols);
      if (r.max_s != r.max_s) {  // the forward marked the row undefined
        fill_grad(row, kNaN);
        continue;
      }
      const math::SparseGradConsts<acc_t> g = math::sparse_grad_consts(r, k, row_weight(row));
      const s_t* s = student_row(row);
      s_t* gs = grad_row(row);
      dense_from_logits(s, r, g, gs);
      gather_support(row, s, r.max_s, sc);
      support_gradient(s, r, g, label, sc);
      apply_patches(sc, gs);
    }
  }
};

// Rows per parallel task: enough elements to amortise scheduling.
inline int64_t sparse_grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

template <bool kBackward>
struct SparseLauncher {
  const SparseKdParams& p;
  template <typename s_t, typename acc_t>
  void run() const {
    const SparseRowKernel<s_t, acc_t> kernel(p);
    at::parallel_for(0, p.rows, sparse_grain_rows(p.vocab), [&](int64_t b, int64_t e) {
      if constexpr (kBackward) {
        kernel.backward(b, e);
      } else {
        kernel.forward(b, e);
      }
    });
  }
};

// Calls launcher.run<s_t, acc_t>() for the student dtype (the teacher's values are read
// per entry in any float dtype).
template <typename Launcher>
void dispatch_student(c10::ScalarType s, const Launcher& launcher) {
  switch (s) {
    case c10::ScalarType::Double: launcher.template run<double, double>(); return;
    case c10::ScalarType::Float: launcher.template run<float, float>(); return;
    case c10::ScalarType::Half: launcher.template run<c10::Half, float>(); return;
    case c10::ScalarType::BFloat16: launcher.template run<c10::BFloat16, float>(); return;
    default: TORCH_CHECK(false, "sparse_kd_loss: unsupported student_logits dtype ", s);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per sparse_kd_kernel_*.cpp.
#define KDFAST_DEFINE_SPARSE_KD_CPU_KERNELS(SUFFIX)                                \
  namespace kdfast {                                                               \
  namespace cpu {                                                                  \
  void sparse_kd_forward_##SUFFIX(const SparseKdParams& p, c10::ScalarType s) {   \
    CPU_CAPABILITY::dispatch_student(s, CPU_CAPABILITY::SparseLauncher<false>{p}); \
  }                                                                                \
  void sparse_kd_backward_##SUFFIX(const SparseKdParams& p, c10::ScalarType s) {  \
    CPU_CAPABILITY::dispatch_student(s, CPU_CAPABILITY::SparseLauncher<true>{p});  \
  }                                                                                \
  }                                                                                \
  }
