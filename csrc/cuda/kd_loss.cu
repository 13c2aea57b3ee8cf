// CUDA kernels of kd_loss and their host functions. Math and op contract:
// docs/kd_loss_math.md; the formulas themselves live in ../kd_loss_math.h, shared with
// the CPU kernels.
//
// kd_loss_fused picks one of three paths (docs/kd_loss_math.md, "CUDA paths"):
//  1. one block per row, the row of both inputs staged in shared memory by 16-byte
//     asynchronous copies: HBM is read once and the gradient written once (rows whose
//     two inputs fit in a block's shared memory, e.g. V <= ~57000 for bf16 pairs on
//     H100);
//  2. sm_90: the same with a thread-block cluster of 2, 4 or 8 blocks per row, each
//     staging a slice, maxima and sums combined through distributed shared memory
//     (e.g. V = 128256 bf16 with 8 blocks of 64 KB);
//  3. otherwise the streaming forward (online maxima and sums; `splits` blocks per
//     row and a finalize kernel when rows are few and long; JSD's second pass), then
//     the elementwise gradient kernel on the statistics it wrote: the inputs are read
//     twice. kd_loss_backward (the recomputing backward) is that gradient kernel.
// In the streaming kernels a row is split into groups of VEC elements (16 bytes of the
// narrower input) on the 16-byte grid of the student row; the teacher and the gradient
// rows use 16-byte accesses where they share that grid and element accesses where they
// do not, each decided on its own; in the staged kernels every input is copied with
// its own alignment and the gradient stored on its own grid.
//
// No host synchronisation anywhere (CUDA-graph capturable): labels are checked on the
// device (a device-side assertion names the problem; the bad row is never indexed),
// the batchmean count and the reduction are device tensors. Every reduction has a
// fixed order, so results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_pipeline.h>
#include <torch/library.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../kd_loss.h"
#include "../kd_loss_math.h"
#include "common.cuh"

#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace kdfast {
namespace math {

// Warp shuffle of the running row sums, found by block_allreduce (common.cuh) through
// argument-dependent lookup.
template <typename acc_t>
__device__ __forceinline__ RowSums<acc_t> shfl_xor(const RowSums<acc_t>& v, int mask) {
  RowSums<acc_t> r;
  r.max_s = __shfl_xor_sync(0xffffffffu, v.max_s, mask);
  r.max_t = __shfl_xor_sync(0xffffffffu, v.max_t, mask);
  r.z_s = __shfl_xor_sync(0xffffffffu, v.z_s, mask);
  r.z_t = __shfl_xor_sync(0xffffffffu, v.z_t, mask);
  r.z_s1 = __shfl_xor_sync(0xffffffffu, v.z_s1, mask);
  r.w = __shfl_xor_sync(0xffffffffu, v.w, mask);
  return r;
}

}  // namespace math

namespace cuda {
namespace {

using math::RowConsts;
using math::RowStats;
using math::RowSums;

constexpr int kMaxForwardThreads = 512;
constexpr int kMaxWarps = kMaxForwardThreads / kWarp;
constexpr int kMaxBackwardThreads = 256;
// Groups in flight per thread (memory-level parallelism); 1 for float64, which would spill.
template <typename acc_t>
constexpr int kUnroll = sizeof(acc_t) == 8 ? 1 : 2;
constexpr int kGroupsPerThreadTarget = 4;     // sizes blocks so each thread streams a few groups
constexpr int kBackwardGroupsPerThread = 4;   // groups per thread per backward block (row chunk)
constexpr int64_t kMinGroupsPerSplit = 1024;  // below this a split costs more than it saves
constexpr int kMaxSplits = 256;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int kSumCols = 6;  // RowSums fields, in the split workspace

// Elements per group: 16 bytes of the narrower input (the wider one takes two loads).
template <typename s_t, typename t_t>
constexpr int group_width() {
  return 16 / static_cast<int>(sizeof(s_t) < sizeof(t_t) ? sizeof(s_t) : sizeof(t_t));
}

// ---------------------------------------------------------------------------------------
// Groups of a row. Group g covers elements [base + g * VEC, base + (g + 1) * VEC); base is
// in (-VEC, 0] so that the student's full groups start on a 16-byte boundary. Each other
// pointer (teacher, gradients) is vector-accessed where it shares that grid, element-wise
// where it does not (e.g. logits[:, :-1, :] against its contiguous gradient).

struct RowGroups {
  int64_t base;
  int64_t count;
  bool vec_t, vec_gs, vec_gt;  // the student is on the grid by construction
};

template <int VEC, typename s_t, typename t_t>
KDFAST_HD RowGroups row_groups(int64_t vocab, const s_t* s, const t_t* t, const s_t* gs, const t_t* gt) {
  const int64_t head = static_cast<int64_t>((reinterpret_cast<uintptr_t>(s) & 15u) / sizeof(s_t));
  RowGroups g;
  g.base = -head;
  g.count = (vocab - g.base + VEC - 1) / VEC;
  g.vec_t = aligned16(t + g.base);
  g.vec_gs = gs == nullptr || aligned16(gs + g.base);
  g.vec_gt = gt == nullptr || aligned16(gt + g.base);
  return g;
}

// Part `split` of `splits` equal parts of a row's groups (empty when there are too few).
struct GroupRange {
  int64_t begin, end;
};

KDFAST_HD GroupRange split_range(int64_t count, int splits, int64_t split) {
  const int64_t per_split = (count + splits - 1) / splits;
  const int64_t begin = split * per_split < count ? split * per_split : count;
  return {begin, begin + per_split < count ? begin + per_split : count};
}

template <int VEC>
KDFAST_HD bool full_group(int64_t lo, int64_t vocab) {
  return lo >= 0 && lo + VEC <= vocab;
}

// The (capped) logit of one raw element, in acc_t.
template <bool kCap, typename acc_t, typename T>
KDFAST_HD acc_t logit(T raw, const RowConsts<acc_t>& k) {
  const acc_t x = static_cast<acc_t>(raw);
  if constexpr (kCap) return math::softcap<math::ScalarOps<acc_t>>(x, k.cap, k.inv_cap);
  return x;
}

template <typename acc_t>
KDFAST_HD acc_t max_acc(acc_t a, acc_t b) {
  // fmax ignores a NaN operand: NaN never becomes a running maximum, it reaches the sums.
  if constexpr (std::is_same_v<acc_t, float>) return ::fmaxf(a, b);
  return ::fmax(a, b);
}

// Adds one group: the group's maxima first, so the running sums rescale at most once.
template <Divergence div, bool kCap, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD void accumulate(RowSums<acc_t>& st, const Group<s_t, VEC>& gs, const Group<t_t, VEC>& gt,
                          const RowConsts<acc_t>& k) {
  using Ops = math::ScalarOps<acc_t>;
  acc_t s[VEC], t[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s[e] = logit<kCap>(gs.e[e], k);
    t[e] = logit<kCap>(gt.e[e], k);
  }
  acc_t gmax_s = s[0], gmax_t = t[0];
#pragma unroll
  for (int e = 1; e < VEC; ++e) {
    gmax_s = max_acc(gmax_s, s[e]);
    gmax_t = max_acc(gmax_t, t[e]);
  }
  if (gmax_s > st.max_s || gmax_t > st.max_t) {
    math::rescale<div>(st, max_acc(st.max_s, gmax_s), max_acc(st.max_t, gmax_t), k.inv_temp, k.with_s1);
  }
  const acc_t shift_s = st.max_s == math::neg_inf<acc_t>() ? acc_t(0) : st.max_s;
  const acc_t shift_t = st.max_t == math::neg_inf<acc_t>() ? acc_t(0) : st.max_t;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const acc_t xs = (s[e] - shift_s) * k.inv_temp;
    const acc_t xt = (t[e] - shift_t) * k.inv_temp;
    const acc_t es = Ops::exp(xs), et = Ops::exp(xt);
    st.z_s += es;
    st.z_t += et;
    if constexpr (div == Divergence::ForwardKL) st.w += math::weighted_diff<Ops>(et, xt, xs);
    if constexpr (div == Divergence::ReverseKL) st.w += math::weighted_diff<Ops>(es, xs, xt);
    if (k.with_s1) st.z_s1 += Ops::exp(s[e] - shift_s);
  }
}

template <typename acc_t>
struct KlPair {
  acc_t pm, qm;  // KL(p||m), KL(q||m) (JSD)
};

template <typename acc_t>
__device__ __forceinline__ KlPair<acc_t> shfl_xor(const KlPair<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.pm, mask), __shfl_xor_sync(0xffffffffu, v.qm, mask)};
}

// ---------------------------------------------------------------------------------------
// Forward pieces shared by the single-block and split paths.

KDFAST_HD bool row_ignored(const KdLossParams& p, int64_t row) {
  return p.labels != nullptr && p.labels[row] == p.ignore_index;
}

template <typename s_t, typename t_t>
struct RowPtrs {
  const s_t* s;
  const t_t* t;
};

template <typename s_t, typename t_t>
KDFAST_HD RowPtrs<s_t, t_t> row_ptrs(const KdLossParams& p, int64_t row) {
  return {static_cast<const s_t*>(p.student) + p.student_layout.offset(row),
          static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row)};
}

// This thread's share of the streaming pass over groups [g_begin, g_end) of a row.
template <Divergence div, bool kCap, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD RowSums<acc_t> stream_groups(const s_t* s, const t_t* t, const RowGroups& g, int64_t vocab,
                                       int64_t g_begin, int64_t g_end, const RowConsts<acc_t>& k, int tid,
                                       int nthreads) {
  RowSums<acc_t> st = math::empty_sums<acc_t>();
  const int64_t stride = nthreads;
  for (int64_t g0 = g_begin + tid; g0 < g_end; g0 += stride * kUnroll<acc_t>) {
    Group<s_t, VEC> sv[kUnroll<acc_t>];
    Group<t_t, VEC> tv[kUnroll<acc_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      const int64_t gi = g0 + u * stride;
      if (gi < g_end) {
        const int64_t lo = g.base + gi * VEC;
        const bool full = full_group<VEC>(lo, vocab);
        load_group<VEC>(s, lo, vocab, full, true, sv[u]);
        load_group<VEC>(t, lo, vocab, full, g.vec_t, tv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      if (g0 + u * stride < g_end) accumulate<div, kCap, VEC>(st, sv[u], tv[u], k);
    }
  }
  return st;
}

// This thread's share of KL(p||m) and KL(q||m) over groups [g_begin, g_end), given the
// row's normalisers (JSD second pass).
template <bool kCap, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD KlPair<acc_t> jsd_groups(const s_t* s, const t_t* t, const RowGroups& g, int64_t vocab,
                                   int64_t g_begin, int64_t g_end, const RowStats<acc_t>& r,
                                   const RowConsts<acc_t>& k, int tid, int nthreads) {
  using Ops = math::ScalarOps<acc_t>;
  const math::Mixture<acc_t> mix = math::make_mixture<acc_t>(k.beta);
  acc_t kl_pm = 0, kl_qm = 0;
  const int64_t stride = nthreads;
  for (int64_t g0 = g_begin + tid; g0 < g_end; g0 += stride * kUnroll<acc_t>) {
    Group<s_t, VEC> sv[kUnroll<acc_t>];
    Group<t_t, VEC> tv[kUnroll<acc_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      const int64_t gi = g0 + u * stride;
      if (gi < g_end) {
        const int64_t lo = g.base + gi * VEC;
        const bool full = full_group<VEC>(lo, vocab);
        load_group<VEC>(s, lo, vocab, full, true, sv[u]);
        load_group<VEC>(t, lo, vocab, full, g.vec_t, tv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      if (g0 + u * stride >= g_end) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t log_q = (logit<kCap>(sv[u].e[e], k) - r.max_s) * k.inv_temp - r.log_z_s;
        const acc_t log_p = (logit<kCap>(tv[u].e[e], k) - r.max_t) * k.inv_temp - r.log_z_t;
        math::jsd_terms<Ops>(log_q, log_p, Ops::exp(log_q), Ops::exp(log_p), mix, kl_pm, kl_qm);
      }
    }
  }
  return {kl_pm, kl_qm};
}

// The label of a counted row, checked on the device: an invalid one trips a device-side
// assertion and is never used as an index (the row's loss is NaN if asserts are off).
KDFAST_HD bool label_in_range(const KdLossParams& p, int64_t row) {
  return p.labels == nullptr || (p.labels[row] >= 0 && p.labels[row] < p.vocab);
}

KDFAST_HD bool label_ok(const KdLossParams& p, int64_t row) {
  const bool ok = label_in_range(p, row);
#ifdef __CUDA_ARCH__
  CUDA_KERNEL_ASSERT_MSG(ok, "kd_loss: labels must be in [0, V) or equal ignore_index");
#endif
  return ok;
}

// Writes loss and stats of a counted row from its merged sums (one thread).
template <Divergence div, bool kCap, typename s_t, typename acc_t>
KDFAST_HD void write_row(const KdLossParams& p, int64_t row, const RowSums<acc_t>& st, const KlPair<acc_t>& kl,
                         const RowConsts<acc_t>& k) {
  acc_t* loss = static_cast<acc_t*>(p.loss) + row;
  acc_t* stats = static_cast<acc_t*>(p.stats) + row * kStatsCols;
  if (!math::row_defined(st.max_s, st.max_t) || !label_ok(p, row)) {
    *loss = acc_t(NAN);
    math::fill_stats(stats, acc_t(NAN));
    return;
  }
  RowStats<acc_t> r = math::row_stats<div>(st, k);
  if constexpr (div == Divergence::JSD) math::set_jsd(r, kl.pm, kl.qm);
  acc_t s_label = acc_t(0);
  if (k.with_ce) {
    const s_t* s = static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
    s_label = logit<kCap>(s[p.labels[row]], k);
  }
  *loss = math::row_loss<div>(r, k, s_label);
  math::store_stats(r, stats);
}

template <typename acc_t>
KDFAST_HD void write_ignored_row(const KdLossParams& p, int64_t row) {
  static_cast<acc_t*>(p.loss)[row] = acc_t(0);
  math::fill_stats(static_cast<acc_t*>(p.stats) + row * kStatsCols, acc_t(0));
}

template <typename acc_t>
KDFAST_HD void store_sums(acc_t* out, const RowSums<acc_t>& st) {
  out[0] = st.max_s;
  out[1] = st.max_t;
  out[2] = st.z_s;
  out[3] = st.z_t;
  out[4] = st.z_s1;
  out[5] = st.w;
}

// Merges the `splits` partial sums of a row over the block; every thread gets the result.
template <Divergence div, typename acc_t>
__device__ __forceinline__ RowSums<acc_t> merge_partials(const acc_t* partial, int splits, const RowConsts<acc_t>& k,
                                                         RowSums<acc_t>* smem) {
  RowSums<acc_t> st = math::empty_sums<acc_t>();
  for (int i = threadIdx.x; i < splits; i += blockDim.x) {
    const acc_t* in = partial + int64_t(i) * kSumCols;
    st = math::merge_sums<div>(st, RowSums<acc_t>{in[0], in[1], in[2], in[3], in[4], in[5]}, k.inv_temp,
                               k.with_s1);
  }
  auto merge = [&](const RowSums<acc_t>& a, const RowSums<acc_t>& b) {
    return math::merge_sums<div>(a, b, k.inv_temp, k.with_s1);
  };
  return block_allreduce(st, merge, smem);
}

struct KlSum {
  template <typename acc_t>
  KDFAST_HD KlPair<acc_t> operator()(const KlPair<acc_t>& a, const KlPair<acc_t>& b) const {
    return {a.pm + b.pm, a.qm + b.qm};
  }
};

// ---------------------------------------------------------------------------------------
// Forward kernels.

// grid (rows, splits). splits == 1: each block owns a row and writes its loss and stats
// (JSD: second pass in the same block). splits > 1: block y streams the y-th part of the
// row's groups and writes its partial sums to partial[row, y].
template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxForwardThreads, 1)
    kd_loss_forward_kernel(const KdLossParams p, const int splits, acc_t* __restrict__ partial) {
  constexpr int VEC = group_width<s_t, t_t>();
  __shared__ RowSums<acc_t> smem_sums[kMaxWarps];
  __shared__ KlPair<acc_t> smem_kl[kMaxWarps];
  const RowConsts<acc_t> k = math::make_row_consts<acc_t>(p.temperature, p.alpha, p.beta, p.softcap);
  const auto merge = [&](const RowSums<acc_t>& a, const RowSums<acc_t>& b) {
    return math::merge_sums<div>(a, b, k.inv_temp, k.with_s1);
  };
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    if (row_ignored(p, row)) {  // uniform over the block
      if (splits == 1 && threadIdx.x == 0) write_ignored_row<acc_t>(p, row);
      continue;
    }
    const RowPtrs<s_t, t_t> in = row_ptrs<s_t, t_t>(p, row);
    const RowGroups g = row_groups<VEC>(p.vocab, in.s, in.t, static_cast<const s_t*>(nullptr),
                                        static_cast<const t_t*>(nullptr));
    const GroupRange range = split_range(g.count, splits, blockIdx.y);

    RowSums<acc_t> st = stream_groups<div, kCap, VEC>(in.s, in.t, g, p.vocab, range.begin, range.end, k,
                                                      threadIdx.x, blockDim.x);
    st = block_allreduce(st, merge, smem_sums);
    if (splits > 1) {
      if (threadIdx.x == 0) store_sums(partial + (row * splits + blockIdx.y) * kSumCols, st);
      continue;
    }
    KlPair<acc_t> kl{acc_t(0), acc_t(0)};
    if constexpr (div == Divergence::JSD) {
      if (math::row_defined(st.max_s, st.max_t)) {  // uniform over the block
        const RowStats<acc_t> r = math::row_stats<div>(st, k);
        kl = jsd_groups<kCap, VEC>(in.s, in.t, g, p.vocab, range.begin, range.end, r, k, threadIdx.x,
                                   blockDim.x);
        kl = block_allreduce(kl, KlSum{}, smem_kl);
      }
    }
    if (threadIdx.x == 0) write_row<div, kCap, s_t>(p, row, st, kl, k);
  }
}

// Split JSD, second pass: block (row, y) merges the row's partial sums, then sums
// KL(p||m) and KL(q||m) over the y-th part of the row into partial_kl[row, y].
template <bool kCap, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxForwardThreads, 1)
    kd_loss_jsd_split_kernel(const KdLossParams p, const int splits, const acc_t* __restrict__ partial,
                             acc_t* __restrict__ partial_kl) {
  constexpr int VEC = group_width<s_t, t_t>();
  __shared__ RowSums<acc_t> smem_sums[kMaxWarps];
  __shared__ KlPair<acc_t> smem_kl[kMaxWarps];
  const RowConsts<acc_t> k = math::make_row_consts<acc_t>(p.temperature, p.alpha, p.beta, p.softcap);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    if (row_ignored(p, row)) continue;
    const RowSums<acc_t> st =
        merge_partials<Divergence::JSD>(partial + row * splits * kSumCols, splits, k, smem_sums);
    KlPair<acc_t> kl{acc_t(0), acc_t(0)};
    if (math::row_defined(st.max_s, st.max_t)) {  // uniform over the block
      const RowPtrs<s_t, t_t> in = row_ptrs<s_t, t_t>(p, row);
      const RowGroups g = row_groups<VEC>(p.vocab, in.s, in.t, static_cast<const s_t*>(nullptr),
                                          static_cast<const t_t*>(nullptr));
      const GroupRange range = split_range(g.count, splits, blockIdx.y);
      const RowStats<acc_t> r = math::row_stats<Divergence::JSD>(st, k);
      kl = jsd_groups<kCap, VEC>(in.s, in.t, g, p.vocab, range.begin, range.end, r, k, threadIdx.x, blockDim.x);
      kl = block_allreduce(kl, KlSum{}, smem_kl);
    }
    if (threadIdx.x == 0) {
      acc_t* out = partial_kl + (row * splits + blockIdx.y) * 2;
      out[0] = kl.pm;
      out[1] = kl.qm;
    }
  }
}

// Split path, last step: one warp per row merges the partials and writes loss and stats.
template <Divergence div, bool kCap, typename s_t, typename acc_t>
__global__ void __launch_bounds__(kWarp)
    kd_loss_finalize_kernel(const KdLossParams p, const int splits, const acc_t* __restrict__ partial,
                            const acc_t* __restrict__ partial_kl) {
  __shared__ RowSums<acc_t> smem_sums[1];
  __shared__ KlPair<acc_t> smem_kl[1];
  const RowConsts<acc_t> k = math::make_row_consts<acc_t>(p.temperature, p.alpha, p.beta, p.softcap);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    if (row_ignored(p, row)) {
      if (threadIdx.x == 0) write_ignored_row<acc_t>(p, row);
      continue;
    }
    const RowSums<acc_t> st = merge_partials<div>(partial + row * splits * kSumCols, splits, k, smem_sums);
    KlPair<acc_t> kl{acc_t(0), acc_t(0)};
    if constexpr (div == Divergence::JSD) {
      for (int i = threadIdx.x; i < splits; i += blockDim.x) {
        const acc_t* in = partial_kl + (row * splits + i) * 2;
        kl.pm += in[0];
        kl.qm += in[1];
      }
      kl = block_allreduce(kl, KlSum{}, smem_kl);
    }
    if (threadIdx.x == 0) write_row<div, kCap, s_t>(p, row, st, kl, k);
  }
}

// ---------------------------------------------------------------------------------------
// Gradient: elementwise given the row statistics.

// Per-row constants of the gradient.
template <typename acc_t>
struct GradRow {
  int64_t label;
  bool zero;  // ignored row: zero gradient, stats not read (they may hold anything)
  RowStats<acc_t> r;
  math::GradConsts<acc_t> g;
  acc_t ce_w;  // alpha * row weight
};

template <typename acc_t>
KDFAST_HD GradRow<acc_t> grad_row(const KdLossParams& p, const RowConsts<acc_t>& k, int64_t row) {
  GradRow<acc_t> r{};
  r.label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
  r.zero = p.labels != nullptr && r.label == p.ignore_index;
  if (r.zero) return r;
  r.r = math::load_stats(static_cast<const acc_t*>(p.stats_in) + row * kStatsCols);
  const acc_t w =
      p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
  r.g = math::grad_consts(r.r, k, w);
  r.ce_w = k.alpha * w;
  return r;
}

// d loss / d s_j and d loss / d t_j of element j (raw logits s_raw, t_raw) of a counted
// row. An undefined row (NaN stats) gets NaN through the formulas.
template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
KDFAST_HD void element_grads(s_t s_raw, t_t t_raw, int64_t j, const GradRow<acc_t>& r, const RowConsts<acc_t>& k,
                             const math::Mixture<acc_t>& mix, acc_t& gs, acc_t& gt) {
  using Ops = math::ScalarOps<acc_t>;
  const acc_t xs = logit<kCap>(s_raw, k), xt = logit<kCap>(t_raw, k);
  const acc_t ds = xs - r.r.max_s;
  const acc_t log_q = ds * k.inv_temp - r.r.log_z_s;
  const acc_t log_p = (xt - r.r.max_t) * k.inv_temp - r.r.log_z_t;
  math::divergence_grads<div, Ops>(log_q, log_p, Ops::exp(log_q), Ops::exp(log_p), r.g, mix, gs, gt);
  if (k.with_ce) {
    gs += r.ce_w * Ops::exp(ds - r.r.log_z_s1);
    if (j == r.label) gs -= r.ce_w;
  }
  if constexpr (kCap) {
    gs *= math::softcap_slope<Ops>(xs, k.inv_cap);
    gt *= math::softcap_slope<Ops>(xt, k.inv_cap);
  }
}

// This thread's share of groups [g_begin, g_end) of one row's gradients.
template <Divergence div, bool kCap, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD void gradient_groups(const KdLossParams& p, int64_t row, const RowConsts<acc_t>& k,
                               const GradRow<acc_t>& r, const RowGroups& g, int64_t g_begin, int64_t g_end,
                               int tid, int nthreads) {
  const math::Mixture<acc_t> mix = math::make_mixture<acc_t>(k.beta);
  const RowPtrs<s_t, t_t> in = row_ptrs<s_t, t_t>(p, row);
  s_t* gs_row = p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + row * p.vocab : nullptr;
  t_t* gt_row = p.grad_teacher != nullptr ? static_cast<t_t*>(p.grad_teacher) + row * p.vocab : nullptr;
  const int64_t vocab = p.vocab;
  const int64_t stride = nthreads;
  for (int64_t g0 = g_begin + tid; g0 < g_end; g0 += stride * kUnroll<acc_t>) {
    Group<s_t, VEC> sv[kUnroll<acc_t>];
    Group<t_t, VEC> tv[kUnroll<acc_t>];
    if (!r.zero) {
#pragma unroll
      for (int u = 0; u < kUnroll<acc_t>; ++u) {
        const int64_t gi = g0 + u * stride;
        if (gi < g_end) {
          const int64_t lo = g.base + gi * VEC;
          const bool full = full_group<VEC>(lo, vocab);
          load_group<VEC>(in.s, lo, vocab, full, true, sv[u]);
          load_group<VEC>(in.t, lo, vocab, full, g.vec_t, tv[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      const int64_t gi = g0 + u * stride;
      if (gi >= g_end) continue;
      const int64_t lo = g.base + gi * VEC;
      const bool full = full_group<VEC>(lo, vocab);
      Group<s_t, VEC> out_s;
      Group<t_t, VEC> out_t;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_t gs = acc_t(0), gt = acc_t(0);
        if (!r.zero) {
          element_grads<div, kCap>(sv[u].e[e], tv[u].e[e], lo + e, r, k, mix, gs, gt);
        }
        out_s.e[e] = static_cast<s_t>(gs);
        out_t.e[e] = static_cast<t_t>(gt);
      }
      if (gs_row != nullptr) store_group<VEC>(gs_row, lo, 0, vocab, full, g.vec_gs, out_s);
      if (gt_row != nullptr) store_group<VEC>(gt_row, lo, 0, vocab, full, g.vec_gt, out_t);
    }
  }
}

// grid (rows, column chunks of groups_per_chunk groups).
template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxBackwardThreads, 1)
    kd_loss_gradient_kernel(const KdLossParams p, const int64_t groups_per_chunk) {
  constexpr int VEC = group_width<s_t, t_t>();
  const RowConsts<acc_t> k = math::make_row_consts<acc_t>(p.temperature, p.alpha, p.beta, p.softcap);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const GradRow<acc_t> r = grad_row<acc_t>(p, k, row);
    const RowPtrs<s_t, t_t> in = row_ptrs<s_t, t_t>(p, row);
    const RowGroups g = row_groups<VEC>(
        p.vocab, in.s, in.t,
        p.grad_student != nullptr ? static_cast<const s_t*>(p.grad_student) + row * p.vocab : nullptr,
        p.grad_teacher != nullptr ? static_cast<const t_t*>(p.grad_teacher) + row * p.vocab : nullptr);
    for (int64_t chunk = blockIdx.y; chunk * groups_per_chunk < g.count; chunk += gridDim.y) {
      const int64_t g_begin = chunk * groups_per_chunk;
      const int64_t g_end = std::min<int64_t>(g.count, g_begin + groups_per_chunk);
      gradient_groups<div, kCap, VEC, s_t, t_t>(p, row, k, r, g, g_begin, g_end, threadIdx.x, blockDim.x);
    }
  }
}

// grad[row, :] *= scale[row * stride]; a block whose row scale is exactly 1 returns
// at once, so the backward of the common loss.backward() moves no data.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kMaxBackwardThreads, 1)
    kd_loss_scale_grad_kernel(T* __restrict__ grad, const acc_t* __restrict__ scale, const int64_t stride,
                              const int64_t rows, const int64_t vocab) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const acc_t w = scale[row * stride];
    if (w == acc_t(1)) continue;
    T* g = grad + row * vocab;
    for (int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; j < vocab;
         j += int64_t(gridDim.y) * blockDim.x) {
      g[j] = static_cast<T>(static_cast<acc_t>(g[j]) * w);
    }
  }
}

// ---------------------------------------------------------------------------------------
// One pass over HBM when a row fits in shared memory: the block
// copies the row of each input into shared memory once (asynchronous 16-byte copies,
// each input on its own alignment), takes the maxima, sums, JSD terms and the
// gradient from there, and writes the gradient with the gradient's own alignment. The
// exponentials are recomputed from shared memory for the gradient, which costs no
// memory traffic (the kernel is bandwidth-bound).

// Copies row[0, n) into shared memory at dst_base + (row's offset within 16 bytes), so
// that the copy has the alignment of the source and 16-byte chunks map to 16-byte
// chunks; returns where element 0 landed. Every thread of the block takes part.
template <typename T>
__device__ __forceinline__ const T* stage_row(const T* __restrict__ row, int64_t n, T* dst_base) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  const int head = static_cast<int>((reinterpret_cast<uintptr_t>(row) & 15u) / sizeof(T));
  T* dst = dst_base + head;
  const int64_t first = std::min<int64_t>(n, (kPer - head) % kPer);  // elements before a 16-byte boundary
  const int64_t chunks = (n - first) / kPer;
  for (int64_t j = threadIdx.x; j < first; j += blockDim.x) dst[j] = row[j];
  const char* src = reinterpret_cast<const char*>(row + first);
  char* out = reinterpret_cast<char*>(dst + first);
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) __pipeline_memcpy_async(out + 16 * c, src + 16 * c, 16);
  for (int64_t j = first + chunks * kPer + threadIdx.x; j < n; j += blockDim.x) dst[j] = row[j];
  return dst;
}

template <typename acc_t>
struct MaxPair {
  acc_t s, t;
};

template <typename acc_t>
__device__ __forceinline__ MaxPair<acc_t> shfl_xor(const MaxPair<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.s, mask), __shfl_xor_sync(0xffffffffu, v.t, mask)};
}

struct MaxOp {
  template <typename acc_t>
  KDFAST_HD MaxPair<acc_t> operator()(const MaxPair<acc_t>& a, const MaxPair<acc_t>& b) const {
    return {max_acc(a.s, b.s), max_acc(a.t, b.t)};
  }
};

// Bytes of shared memory the one-pass kernel needs for `n` elements of each input.
template <typename s_t, typename t_t>
int64_t staged_row_bytes(int64_t n) {
  auto padded = [](int64_t bytes) { return (bytes + 16 + 15) / 16 * 16; };  // + one alignment head
  return padded(n * int64_t(sizeof(s_t))) + padded(n * int64_t(sizeof(t_t)));
}

// Combines a block's partial result with those of the other blocks of its cluster (a
// row split over a thread-block cluster, sm_90): each block publishes its value in its
// shared memory, and after a cluster barrier every thread folds all of them in rank
// order, so every block gets the same bits. Without a cluster the value is returned.
// The caller's next write to `slot` comes after another cluster barrier, so no block
// overwrites a value a peer is still reading.
template <bool kCluster, typename T, typename Op>
__device__ __forceinline__ T cluster_combine(const T& v, T* slot, const Op& op) {
  if constexpr (!kCluster) {
    return v;
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) *slot = v;
    cluster.sync();
    T r = *cluster.map_shared_rank(slot, 0);
    for (unsigned rank = 1; rank < cluster.num_blocks(); ++rank) r = op(r, *cluster.map_shared_rank(slot, rank));
    return r;
#else
    return v;  // never launched: clusters need sm_90
#endif
  }
}

template <bool kCluster>
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kCluster) cooperative_groups::this_cluster().sync();
#endif
}

template <bool kCluster>
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kCluster) return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
  return 0;
}

// One pass over HBM. Without a cluster, block b owns rows b, b + gridDim.x, ... and
// stages whole rows (rows that fit in one block's shared memory). With a cluster of C
// blocks (sm_90), the cluster owns the row and block `rank` stages elements
// [rank * slice, (rank + 1) * slice); maxima, sums and JSD terms are combined over the
// cluster through distributed shared memory. Dynamic shared memory:
// staged_row_bytes(slice).
template <Divergence div, bool kCap, bool kCluster, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxForwardThreads, 1)
    kd_loss_fused_staged_kernel(const KdLossParams p, const int64_t slice, const int cluster_size) {
  using Ops = math::ScalarOps<acc_t>;
  extern __shared__ __align__(16) unsigned char staged[];
  __shared__ MaxPair<acc_t> smem_max[kMaxWarps];
  __shared__ RowSums<acc_t> smem_sums[kMaxWarps];
  __shared__ KlPair<acc_t> smem_kl[kMaxWarps];
  __shared__ MaxPair<acc_t> part_max;  // this block's partials, read by its cluster peers
  __shared__ RowSums<acc_t> part_sums;
  __shared__ KlPair<acc_t> part_kl;
  const RowConsts<acc_t> k = math::make_row_consts<acc_t>(p.temperature, p.alpha, p.beta, p.softcap);
  const math::Mixture<acc_t> mix = math::make_mixture<acc_t>(k.beta);
  const int64_t vocab = p.vocab;
  const int rank = cluster_rank<kCluster>();
  const int64_t begin = std::min<int64_t>(vocab, rank * slice);
  const int64_t end = std::min<int64_t>(vocab, begin + slice);
  const int64_t n = end - begin;
  s_t* s_base = reinterpret_cast<s_t*>(staged);
  t_t* t_base = reinterpret_cast<t_t*>(staged + (slice * int64_t(sizeof(s_t)) + 16 + 15) / 16 * 16);
  const auto merge = [&](const RowSums<acc_t>& a, const RowSums<acc_t>& b) {
    return math::merge_sums<div>(a, b, k.inv_temp, k.with_s1);
  };
  const int64_t owners = gridDim.x / cluster_size;
  for (int64_t row = blockIdx.x / cluster_size; row < p.rows; row += owners) {
    const bool ignored = row_ignored(p, row);  // uniform over the block and the cluster
    GradRow<acc_t> gr{};
    gr.zero = ignored;
    const s_t* s = nullptr;  // s[j - begin] is element j of the row
    const t_t* t = nullptr;
    if (!ignored) {
      const RowPtrs<s_t, t_t> in = row_ptrs<s_t, t_t>(p, row);
      s = stage_row(in.s + begin, n, s_base);
      t = stage_row(in.t + begin, n, t_base);
      __pipeline_commit();
      __pipeline_wait_prior(0);
      __syncthreads();
      MaxPair<acc_t> m{math::neg_inf<acc_t>(), math::neg_inf<acc_t>()};
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        m = MaxOp{}(m, MaxPair<acc_t>{logit<kCap>(s[j], k), logit<kCap>(t[j], k)});
      }
      m = cluster_combine<kCluster>(block_allreduce(m, MaxOp{}, smem_max), &part_max, MaxOp{});
      // Sums relative to the final maxima (no rescaling), as in the streaming pass.
      RowSums<acc_t> st{m.s, m.t, acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      const acc_t shift_s = m.s == math::neg_inf<acc_t>() ? acc_t(0) : m.s;
      const acc_t shift_t = m.t == math::neg_inf<acc_t>() ? acc_t(0) : m.t;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const acc_t cs = logit<kCap>(s[j], k);
        const acc_t xs = (cs - shift_s) * k.inv_temp, xt = (logit<kCap>(t[j], k) - shift_t) * k.inv_temp;
        const acc_t es = Ops::exp(xs), et = Ops::exp(xt);
        st.z_s += es;
        st.z_t += et;
        if constexpr (div == Divergence::ForwardKL) st.w += math::weighted_diff<Ops>(et, xt, xs);
        if constexpr (div == Divergence::ReverseKL) st.w += math::weighted_diff<Ops>(es, xs, xt);
        if (k.with_s1) st.z_s1 += Ops::exp(cs - shift_s);
      }
      st = cluster_combine<kCluster>(block_allreduce(st, merge, smem_sums), &part_sums, merge);
      const bool defined = math::row_defined(st.max_s, st.max_t);  // uniform over the cluster
      RowStats<acc_t> r{};
      KlPair<acc_t> kl{acc_t(0), acc_t(0)};
      if (defined) r = math::row_stats<div>(st, k);
      if constexpr (div == Divergence::JSD) {
        if (defined) {
          for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            const acc_t log_q = (logit<kCap>(s[j], k) - r.max_s) * k.inv_temp - r.log_z_s;
            const acc_t log_p = (logit<kCap>(t[j], k) - r.max_t) * k.inv_temp - r.log_z_t;
            math::jsd_terms<Ops>(log_q, log_p, Ops::exp(log_q), Ops::exp(log_p), mix, kl.pm, kl.qm);
          }
          kl = cluster_combine<kCluster>(block_allreduce(kl, KlSum{}, smem_kl), &part_kl, KlSum{});
          math::set_jsd(r, kl.pm, kl.qm);
        }
      }
      if (rank == 0 && threadIdx.x == 0) write_row<div, kCap, s_t>(p, row, st, kl, k);
      if (!defined || !label_in_range(p, row)) {  // rank 0 reports the label (write_row)
        const acc_t nan = acc_t(NAN);
        r = RowStats<acc_t>{nan, nan, nan, nan, nan, nan, nan};
      }
      gr.label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
      const acc_t w =
          p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
      gr.r = r;
      gr.g = math::grad_consts(r, k, w);
      gr.ce_w = k.alpha * w;
    } else if (rank == 0 && threadIdx.x == 0) {
      write_ignored_row<acc_t>(p, row);
    }
    if (p.grad_student != nullptr || p.grad_teacher != nullptr) {
      // Gradient of elements [begin, end), in groups of VEC on the 16-byte grid of the
      // student's gradient row (the teacher's shares it unless their sizes differ).
      constexpr int VEC = group_width<s_t, t_t>();
      s_t* gs_row = p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + row * vocab : nullptr;
      t_t* gt_row = p.grad_teacher != nullptr ? static_cast<t_t*>(p.grad_teacher) + row * vocab : nullptr;
      const int64_t head = gs_row != nullptr
                               ? static_cast<int64_t>((reinterpret_cast<uintptr_t>(gs_row) & 15u) / sizeof(s_t))
                               : static_cast<int64_t>((reinterpret_cast<uintptr_t>(gt_row) & 15u) / sizeof(t_t));
      const int64_t base = -head;
      const bool vec_gs = gs_row == nullptr || aligned16(gs_row + base);
      const bool vec_gt = gt_row == nullptr || aligned16(gt_row + base);
      const int64_t g_first = (begin - base) / VEC;
      const int64_t g_end = (end - base + VEC - 1) / VEC;
      for (int64_t gi = g_first + threadIdx.x; gi < g_end; gi += blockDim.x) {
        const int64_t lo = base + gi * VEC;
        const bool full = lo >= begin && lo + VEC <= end;
        Group<s_t, VEC> out_s;
        Group<t_t, VEC> out_t;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int64_t j = lo + e;
          acc_t gs = acc_t(0), gt = acc_t(0);
          if (!gr.zero && j >= begin && j < end) {
            element_grads<div, kCap>(s[j - begin], t[j - begin], j, gr, k, mix, gs, gt);
          }
          out_s.e[e] = static_cast<s_t>(gs);
          out_t.e[e] = static_cast<t_t>(gt);
        }
        if (gs_row != nullptr) store_group<VEC>(gs_row, lo, begin, end, full, vec_gs, out_s);
        if (gt_row != nullptr) store_group<VEC>(gt_row, lo, begin, end, full, vec_gt, out_t);
      }
    }
    __syncthreads();  // the staged slice is overwritten by the next row
  }
  cluster_barrier<kCluster>();  // peers may still read this block's partials
}

// ---------------------------------------------------------------------------------------
// Host side: launch configuration and dtype / divergence / soft-cap dispatch.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block size: a multiple of 32 giving each thread about kGroupsPerThreadTarget groups.
int threads_for(int64_t groups, int max_threads) {
  const int64_t want = ceil_div(ceil_div(groups, kGroupsPerThreadTarget), kWarp) * kWarp;
  return static_cast<int>(std::min<int64_t>(max_threads, std::max<int64_t>(kWarp, want)));
}

// Blocks per row: more than one only when rows alone cannot fill the GPU and each part
// still has kMinGroupsPerSplit groups to stream.
int choose_splits(int64_t rows, int64_t groups) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = int64_t(sms) * 4;
  if (rows >= target_blocks) return 1;
  const int64_t by_rows = ceil_div(target_blocks, rows);
  const int64_t by_length = groups / kMinGroupsPerSplit;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({by_rows, by_length, int64_t(kMaxSplits)})));
}

struct ForwardLauncher {
  const KdLossParams& p;
  at::TensorOptions acc_options;

  template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
  void run() const {
    constexpr int VEC = group_width<s_t, t_t>();
    const int64_t groups = ceil_div(p.vocab, VEC) + 1;  // upper bound over row alignments
    const int splits = choose_splits(p.rows, groups);
    const int threads = threads_for(ceil_div(groups, splits), kMaxForwardThreads);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxGridX)), static_cast<unsigned>(splits));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (splits == 1) {
      kd_loss_forward_kernel<div, kCap, s_t, t_t, acc_t><<<grid, threads, 0, stream>>>(p, 1, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // O(rows x splits) workspace; the caching allocator keeps it alive for this stream's work.
    const at::Tensor sums = at::empty({p.rows * splits * kSumCols}, acc_options);
    kd_loss_forward_kernel<div, kCap, s_t, t_t, acc_t><<<grid, threads, 0, stream>>>(p, splits, sums.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor kl;
    if constexpr (div == Divergence::JSD) {
      kl = at::empty({p.rows * splits * 2}, acc_options);
      kd_loss_jsd_split_kernel<kCap, s_t, t_t, acc_t>
          <<<grid, threads, 0, stream>>>(p, splits, sums.const_data_ptr<acc_t>(), kl.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    kd_loss_finalize_kernel<div, kCap, s_t, acc_t><<<grid.x, kWarp, 0, stream>>>(
        p, splits, sums.const_data_ptr<acc_t>(), kl.defined() ? kl.const_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct GradientLauncher {
  const KdLossParams& p;

  template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
  void run() const {
    constexpr int VEC = group_width<s_t, t_t>();
    const int64_t groups = ceil_div(p.vocab, VEC) + 1;  // upper bound over row alignments
    const int threads = threads_for(groups, kMaxBackwardThreads);
    const int64_t groups_per_chunk = int64_t(threads) * kBackwardGroupsPerThread;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxGridX)),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(groups, groups_per_chunk), kMaxGridY)));
    kd_loss_gradient_kernel<div, kCap, s_t, t_t, acc_t>
        <<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(p, groups_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

bool env_enabled(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::string(env) != "0";
}

// The one-pass kernel: one block per row when a row fits in a block's shared memory,
// else (sm_90) a cluster of 2, 4 or 8 blocks per row when a slice fits; sets *launched
// to false, launching nothing, when neither fits (or KDFAST_CUDA_STAGED=0 /
// KDFAST_CUDA_CLUSTER=0).
struct StagedLauncher {
  const KdLossParams& p;
  bool* launched;

  // Whether `bytes` of dynamic shared memory fit a block of this kernel. The first call
  // per kernel and device opts the kernel into all the shared memory a block may have;
  // later calls (e.g. during CUDA-graph capture, after the usual warm-up) only compare.
  template <typename Kernel>
  static bool fit_shared_memory(Kernel kernel, int64_t bytes, const cudaDeviceProp* prop) {
    static std::mutex mutex;
    static std::map<std::pair<const void*, int>, int64_t> limits;  // (kernel, device) -> limit
    const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), c10::cuda::current_device()};
    int64_t limit = 0;
    {
      const std::lock_guard<std::mutex> lock(mutex);
      auto it = limits.find(key);
      if (it == limits.end()) {
        cudaFuncAttributes attr{};
        C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
        const int64_t l = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - int64_t(attr.sharedSizeBytes);
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l)));
        it = limits.emplace(key, l).first;
      }
      limit = it->second;
    }
    return bytes <= limit;
  }

  template <Divergence div, bool kCap, typename s_t, typename t_t, typename acc_t>
  void run() const {
    static const bool enabled = env_enabled("KDFAST_CUDA_STAGED");
    static const bool clusters = env_enabled("KDFAST_CUDA_CLUSTER");
    *launched = false;
    if (!enabled) return;
    constexpr int VEC = group_width<s_t, t_t>();
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    auto single = kd_loss_fused_staged_kernel<div, kCap, false, s_t, t_t, acc_t>;
    const int64_t bytes = staged_row_bytes<s_t, t_t>(p.vocab);
    if (fit_shared_memory(single, bytes, prop)) {
      const int threads = threads_for(ceil_div(p.vocab, VEC), kMaxForwardThreads);
      int blocks_per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, single, threads, bytes));
      const int64_t resident = int64_t(std::max(blocks_per_sm, 1)) * prop->multiProcessorCount;
      const unsigned grid = static_cast<unsigned>(std::min<int64_t>(p.rows, resident * 8));
      single<<<grid, threads, bytes, stream>>>(p, p.vocab, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      *launched = true;
      return;
    }
    if (!clusters || prop->major < 9) return;
    auto clustered = kd_loss_fused_staged_kernel<div, kCap, true, s_t, t_t, acc_t>;
    for (int size = 2; size <= 8; size *= 2) {
      // Slices are whole 16-element runs, so each starts with the row's own alignment.
      const int64_t slice = ceil_div(ceil_div(p.vocab, size), 16) * 16;
      const int64_t slice_bytes = staged_row_bytes<s_t, t_t>(slice);
      if (!fit_shared_memory(clustered, slice_bytes, prop)) continue;
      cudaLaunchConfig_t config{};
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = static_cast<unsigned>(size);
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      config.attrs = attr;
      config.numAttrs = 1;
      config.blockDim = dim3(static_cast<unsigned>(threads_for(ceil_div(slice, VEC), kMaxForwardThreads)));
      config.dynamicSmemBytes = static_cast<size_t>(slice_bytes);
      config.stream = stream;
      config.gridDim = dim3(static_cast<unsigned>(size));
      int active = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&active, clustered, &config));
      if (active < 1) continue;
      const int64_t owners = std::min<int64_t>(p.rows, int64_t(active) * 8);
      config.gridDim = dim3(static_cast<unsigned>(owners * size));
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, clustered, p, slice, size));
      *launched = true;
      return;
    }
  }
};

template <Divergence div, typename s_t, typename t_t, typename acc_t, typename Launcher>
void dispatch_cap(const Launcher& launcher, bool cap) {
  if (cap) {
    launcher.template run<div, true, s_t, t_t, acc_t>();
  } else {
    launcher.template run<div, false, s_t, t_t, acc_t>();
  }
}

template <typename s_t, typename t_t, typename acc_t, typename Launcher>
void dispatch_divergence(const Launcher& launcher, const KdLossParams& p) {
  const bool cap = p.softcap > 0;
  switch (p.divergence) {
    case Divergence::ForwardKL: dispatch_cap<Divergence::ForwardKL, s_t, t_t, acc_t>(launcher, cap); return;
    case Divergence::ReverseKL: dispatch_cap<Divergence::ReverseKL, s_t, t_t, acc_t>(launcher, cap); return;
    case Divergence::JSD: dispatch_cap<Divergence::JSD, s_t, t_t, acc_t>(launcher, cap); return;
  }
  TORCH_CHECK(false, "kd_loss: unknown divergence code ", static_cast<int64_t>(p.divergence));
}

template <typename s_t, typename Launcher>
void dispatch_teacher(const Launcher& launcher, const KdLossParams& p, at::ScalarType t) {
  switch (t) {
    case at::kFloat: dispatch_divergence<s_t, float, float>(launcher, p); return;
    case at::kHalf: dispatch_divergence<s_t, c10::Half, float>(launcher, p); return;
    case at::kBFloat16: dispatch_divergence<s_t, c10::BFloat16, float>(launcher, p); return;
    default: TORCH_CHECK(false, "kd_loss: unsupported teacher_logits dtype ", t);
  }
}

// Calls launcher.run<div, cap, s_t, t_t, acc_t>() for the options and the input dtypes.
template <typename Launcher>
void dispatch_kd(const Launcher& launcher, const KdLossParams& p, at::ScalarType s, at::ScalarType t) {
  switch (s) {
    case at::kDouble:
      TORCH_CHECK(t == at::kDouble, "kd_loss: float64 student_logits need float64 teacher_logits, got ", t);
      dispatch_divergence<double, double, double>(launcher, p);
      return;
    case at::kFloat: dispatch_teacher<float>(launcher, p, t); return;
    case at::kHalf: dispatch_teacher<c10::Half>(launcher, p, t); return;
    case at::kBFloat16: dispatch_teacher<c10::BFloat16>(launcher, p, t); return;
    default: TORCH_CHECK(false, "kd_loss: unsupported student_logits dtype ", s);
  }
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "kd_loss: ", name, " must be a CUDA tensor here, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double alpha, int64_t divergence, double beta, int64_t ignore_index, double softcap,
    int64_t reduction, bool student_requires_grad, bool teacher_requires_grad) {
  check_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits");
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "kd_loss: reduction must be 0 (batchmean), 1 (sum) or 2 (none), got ", reduction);
  const c10::cuda::CUDAGuard device_guard(student.device());
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap);
  KdLossParams& p = problem.params;
  const auto red = static_cast<Reduction>(reduction);
  KdLossFusedOutputs out = prepare_kd_loss_fused(problem, red, student_requires_grad, teacher_requires_grad);
  const auto acc = problem.student.options().dtype(problem.acc_dtype);
  // batchmean divides by the counted rows: a device tensor, never read on the host.
  at::Tensor count;
  if (red == Reduction::BatchMean) {
    count = problem.labels.defined() ? problem.labels.ne(ignore_index).sum().clamp_min(1).to(problem.acc_dtype)
                                     : at::full({}, static_cast<double>(std::max<int64_t>(p.rows, 1)), acc);
  }
  const bool with_grad = student_requires_grad || teacher_requires_grad;
  if (p.rows > 0) {
    const at::Tensor scale = count.defined() && with_grad ? count.reciprocal() : at::Tensor();
    p.grad_loss = scale.defined() ? scale.const_data_ptr() : nullptr;
    p.grad_loss_stride = 0;
    bool done = false;
    // One pass when the rows fit in shared memory; else the streaming forward, then the
    // gradient kernel on the statistics it wrote (the inputs are read twice). The same
    // kernel serves a call with and without gradients, so the loss does not depend on
    // whether a gradient is computed.
    dispatch_kd(StagedLauncher{p, &done}, p, problem.student.scalar_type(), problem.teacher.scalar_type());
    if (!done) {
      dispatch_kd(ForwardLauncher{p, acc}, p, problem.student.scalar_type(), problem.teacher.scalar_type());
      if (with_grad) {
        p.stats_in = out.stats.const_data_ptr();
        dispatch_kd(GradientLauncher{p}, p, problem.student.scalar_type(), problem.teacher.scalar_type());
      }
    }
  }
  if (red == Reduction::Sum) out.loss.copy_(out.rows_loss.sum());
  if (red == Reduction::BatchMean) out.loss.copy_(out.rows_loss.sum() / count);
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature, double alpha,
    int64_t divergence, double beta, int64_t ignore_index, double softcap, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits");
  const c10::cuda::CUDAGuard device_guard(student.device());
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap);
  KdLossParams& p = problem.params;
  const KdLossBackwardInputs inputs = prepare_kd_loss_backward(problem, grad_loss, stats);
  at::Tensor grad_s = empty_gradient_like(student, student_requires_grad);
  at::Tensor grad_t = empty_gradient_like(teacher, teacher_requires_grad);
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  dispatch_kd(GradientLauncher{p}, p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

void kd_loss_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_cuda(), "kd_loss_scale_grad_: grad must be a CUDA tensor here, got ", grad.device());
  const int64_t rows = check_scale_grad(grad, scale);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t vocab = grad.size(-1);
  const at::Tensor w = scale.contiguous();
  const int threads = threads_for(ceil_div(vocab, 4), kMaxBackwardThreads);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridX)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(vocab, int64_t(threads) * 8), kMaxGridY)));
  const int64_t stride = w.numel() == 1 ? 0 : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto grad_tag, auto acc_tag) {
    using T = decltype(grad_tag);
    using acc_t = decltype(acc_tag);
    kd_loss_scale_grad_kernel<T, acc_t>
        <<<grid, threads, 0, stream>>>(static_cast<T*>(grad.data_ptr()), w.const_data_ptr<acc_t>(), stride, rows, vocab);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const bool dbl = w.scalar_type() == at::kDouble;
  switch (grad.scalar_type()) {
    case at::kDouble: dbl ? launch(double{}, double{}) : launch(double{}, float{}); return;
    case at::kFloat: dbl ? launch(float{}, double{}) : launch(float{}, float{}); return;
    case at::kHalf: dbl ? launch(c10::Half{}, double{}) : launch(c10::Half{}, float{}); return;
    case at::kBFloat16: dbl ? launch(c10::BFloat16{}, double{}) : launch(c10::BFloat16{}, float{}); return;
    default: TORCH_CHECK(false, "kd_loss_scale_grad_: unsupported grad dtype ", grad.scalar_type());
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("kd_loss_fused", &kdfast::cuda::kd_loss_fused_cuda);
  m.impl("kd_loss_backward", &kdfast::cuda::kd_loss_backward_cuda);
  m.impl("kd_loss_scale_grad_", &kdfast::cuda::kd_loss_scale_grad_cuda);
}
