// CUDA kernels of kd_loss and their host functions. Math and op contract:
// docs/kd_loss_math.md (the CPU kernels in csrc/cpu/kd_loss_kernel.h compute the same).
//
// Forward: a row is split into groups of VEC elements (16 bytes of the narrower input)
// laid on the 16-byte grid of the row, so every full group is one or two 16-byte loads.
// One block streams a row once (online maxima and sums), or, when rows are few and long,
// `splits` blocks stream a part each, write partial states to an O(rows x splits)
// workspace, and a finalize kernel merges them. JSD makes a second pass for log m_j.
// Backward: elementwise from the row statistics over a 2-D grid (row, column chunk).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../kd_loss.h"

namespace kdfast {
namespace cuda {
namespace {

// Helpers are host-device so the per-thread math can also be exercised on the host.
#define KDFAST_HD __host__ __device__ __forceinline__

constexpr int kWarp = 32;
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
constexpr int kStateCols = 6;  // RowState fields, in the split workspace

// ---------------------------------------------------------------------------------------
// Scalar helpers, overloaded for the float and double accumulators.

KDFAST_HD float exp_acc(float x) { return expf(x); }
KDFAST_HD double exp_acc(double x) { return exp(x); }
KDFAST_HD float log_acc(float x) { return logf(x); }
KDFAST_HD double log_acc(double x) { return log(x); }
// fmax ignores a NaN operand: NaN never becomes a running maximum, it reaches the sums.
KDFAST_HD float max_acc(float a, float b) { return ::fmaxf(a, b); }
KDFAST_HD double max_acc(double a, double b) { return fmax(a, b); }
template <typename acc_t>
KDFAST_HD acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

// RowLayout::offset is host-only; the same two-level formula for device code.
KDFAST_HD int64_t row_offset(const RowLayout& l, int64_t row) {
  if (l.n_inner == 1) return row * l.stride_outer;
  return (row / l.n_inner) * l.stride_outer + (row % l.n_inner) * l.stride_inner;
}

// Elements per group: 16 bytes of the narrower input (the wider one takes two loads).
template <typename s_t, typename t_t>
constexpr int group_width() {
  return 16 / static_cast<int>(sizeof(s_t) < sizeof(t_t) ? sizeof(s_t) : sizeof(t_t));
}

// ---------------------------------------------------------------------------------------
// Groups of a row. Group g covers elements [base + g * VEC, base + (g + 1) * VEC); base is
// in (-VEC, 0] so that full groups start on a 16-byte boundary of every pointer involved.
// When no common boundary exists (e.g. an odd row offset of one input only) the row is
// read with scalar loads in the same groups.

struct RowGroups {
  int64_t base;
  int64_t count;
  bool aligned;
};

KDFAST_HD bool aligned16(const void* p, int64_t bytes) {
  return p == nullptr || ((reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & 15u) == 0;
}

template <int VEC, typename a_t, typename b_t, typename c_t, typename d_t>
KDFAST_HD RowGroups row_groups(int64_t vocab, const a_t* a, const b_t* b, const c_t* c,
                                                const d_t* d) {
  int head = -1;
#pragma unroll
  for (int k = VEC - 1; k >= 0; --k) {  // smallest k wins
    if (aligned16(a, k * int64_t(sizeof(a_t))) && aligned16(b, k * int64_t(sizeof(b_t))) &&
        aligned16(c, k * int64_t(sizeof(c_t))) && aligned16(d, k * int64_t(sizeof(d_t)))) {
      head = k;
    }
  }
  RowGroups g;
  g.aligned = head >= 0;
  g.base = head > 0 ? head - VEC : 0;
  g.count = (vocab - g.base + VEC - 1) / VEC;
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
KDFAST_HD bool full_group(const RowGroups& g, int64_t lo, int64_t vocab) {
  return g.aligned && lo >= 0 && lo + VEC <= vocab;
}

// The raw elements of one group, kept in the input dtype until used (fewer registers
// than converting on load, so more loads stay in flight).
template <typename T, int VEC>
struct alignas(16) Group {
  T e[VEC];
};

// Loads the group starting at element lo of row; missing elements read as -inf, which
// every formula treats as masked vocabulary (zero probability, zero contribution).
template <int VEC, typename T>
KDFAST_HD void load_group(const T* __restrict__ row, int64_t lo, int64_t vocab, bool full,
                                           Group<T, VEC>& out) {
  constexpr int kChunks = VEC * static_cast<int>(sizeof(T)) / 16;
  static_assert(kChunks * 16 == VEC * static_cast<int>(sizeof(T)), "a group is whole 16-byte vectors");
  if (full) {
    const uint4* src = reinterpret_cast<const uint4*>(row + lo);
    uint4* dst = reinterpret_cast<uint4*>(out.e);
#pragma unroll
#ifdef __CUDA_ARCH__
    for (int c = 0; c < kChunks; ++c) dst[c] = __ldg(src + c);
#else
    assert((reinterpret_cast<uintptr_t>(src) & 15u) == 0);  // host simulation: vector loads stay aligned
    for (int c = 0; c < kChunks; ++c) dst[c] = src[c];
#endif
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = lo + k;
      out.e[k] = (j >= 0 && j < vocab) ? row[j] : static_cast<T>(-INFINITY);
    }
  }
}

template <int VEC, typename T>
KDFAST_HD void store_group(T* __restrict__ row, int64_t lo, int64_t vocab, bool full,
                                            const Group<T, VEC>& v) {
  if (full) {
    uint4* dst = reinterpret_cast<uint4*>(row + lo);
    const uint4* src = reinterpret_cast<const uint4*>(v.e);
#pragma unroll
    for (int c = 0; c < VEC * static_cast<int>(sizeof(T)) / 16; ++c) dst[c] = src[c];
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t j = lo + k;
      if (j >= 0 && j < vocab) row[j] = v.e[k];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Streaming state of (part of) a row, relative to running maxima of the raw logits:
//   z_s = sum exp((s - max_s) / T), z_t likewise, z_s1 = sum exp(s - max_s),
//   w = sum e_t (x_t - x_s) (forward KL) or sum e_s (x_s - x_t) (reverse KL),
// with x = (logit - max) / T. max == -inf means only masked (or no) elements so far; the
// sums are then 0 (or NaN) and are shifted by 0 instead of -inf.

template <typename acc_t>
struct RowState {
  acc_t max_s, max_t, z_s, z_t, z_s1, w;
};

template <typename acc_t>
KDFAST_HD RowState<acc_t> empty_state() {
  return {neg_inf<acc_t>(), neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Moves st to larger maxima exactly: sums scale by exp(-delta), w also shifts by delta.
template <Divergence div, typename acc_t>
KDFAST_HD void rescale(RowState<acc_t>& st, acc_t new_max_s, acc_t new_max_t, acc_t inv_temp,
                                        bool with_s1) {
  if (new_max_t != st.max_t) {
    if (st.max_t != neg_inf<acc_t>()) {
      const acc_t delta = (new_max_t - st.max_t) * inv_temp;
      const acc_t r = exp_acc(-delta);
      if (div == Divergence::ForwardKL) st.w = r * (st.w - delta * st.z_t);
      if (div == Divergence::ReverseKL) st.w += delta * st.z_s;
      st.z_t *= r;
    }
    st.max_t = new_max_t;
  }
  if (new_max_s != st.max_s) {
    if (st.max_s != neg_inf<acc_t>()) {
      const acc_t delta = (new_max_s - st.max_s) * inv_temp;
      const acc_t r = exp_acc(-delta);
      if (div == Divergence::ReverseKL) st.w = r * (st.w - delta * st.z_s);
      if (div == Divergence::ForwardKL) st.w += delta * st.z_t;
      st.z_s *= r;
      if (with_s1) st.z_s1 *= exp_acc(st.max_s - new_max_s);
    }
    st.max_s = new_max_s;
  }
}

template <Divergence div, typename acc_t>
KDFAST_HD RowState<acc_t> merge_states(RowState<acc_t> a, RowState<acc_t> b, acc_t inv_temp,
                                                        bool with_s1) {
  const acc_t ms = max_acc(a.max_s, b.max_s), mt = max_acc(a.max_t, b.max_t);
  rescale<div>(a, ms, mt, inv_temp, with_s1);
  rescale<div>(b, ms, mt, inv_temp, with_s1);
  a.z_s += b.z_s;
  a.z_t += b.z_t;
  a.z_s1 += b.z_s1;
  a.w += b.w;
  return a;
}

// Adds one group: the group's maxima first, so the running sums rescale at most once.
template <Divergence div, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD void accumulate(RowState<acc_t>& st, const Group<s_t, VEC>& gs,
                                           const Group<t_t, VEC>& gt, acc_t inv_temp, bool with_s1) {
  acc_t s[VEC], t[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    s[k] = static_cast<acc_t>(gs.e[k]);
    t[k] = static_cast<acc_t>(gt.e[k]);
  }
  acc_t gmax_s = s[0], gmax_t = t[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) {
    gmax_s = max_acc(gmax_s, s[k]);
    gmax_t = max_acc(gmax_t, t[k]);
  }
  if (gmax_s > st.max_s || gmax_t > st.max_t) {
    rescale<div>(st, max_acc(st.max_s, gmax_s), max_acc(st.max_t, gmax_t), inv_temp, with_s1);
  }
  const acc_t shift_s = st.max_s == neg_inf<acc_t>() ? acc_t(0) : st.max_s;
  const acc_t shift_t = st.max_t == neg_inf<acc_t>() ? acc_t(0) : st.max_t;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const acc_t xs = (s[k] - shift_s) * inv_temp;
    const acc_t xt = (t[k] - shift_t) * inv_temp;
    const acc_t es = exp_acc(xs), et = exp_acc(xt);
    st.z_s += es;
    st.z_t += et;
    // A zero weight zeroes its term even when the log difference is NaN (-inf - -inf).
    if (div == Divergence::ForwardKL) st.w += et > acc_t(0) ? et * (xt - xs) : acc_t(0);
    if (div == Divergence::ReverseKL) st.w += es > acc_t(0) ? es * (xs - xt) : acc_t(0);
    if (with_s1) st.z_s1 += exp_acc(s[k] - shift_s);
  }
}

template <typename acc_t>
struct KlPair {
  acc_t pm, qm;  // KL(p||m), KL(q||m) (JSD)
};

template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_xor(const RowState<acc_t>& v, int mask) {
  RowState<acc_t> r;
  r.max_s = __shfl_xor_sync(0xffffffffu, v.max_s, mask);
  r.max_t = __shfl_xor_sync(0xffffffffu, v.max_t, mask);
  r.z_s = __shfl_xor_sync(0xffffffffu, v.z_s, mask);
  r.z_t = __shfl_xor_sync(0xffffffffu, v.z_t, mask);
  r.z_s1 = __shfl_xor_sync(0xffffffffu, v.z_s1, mask);
  r.w = __shfl_xor_sync(0xffffffffu, v.w, mask);
  return r;
}

template <typename acc_t>
__device__ __forceinline__ KlPair<acc_t> shfl_xor(const KlPair<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.pm, mask), __shfl_xor_sync(0xffffffffu, v.qm, mask)};
}

// Reduces v over the block; every thread gets the result. Needs every thread of the block
// (blockDim.x a multiple of 32, at most kMaxForwardThreads); smem holds kMaxWarps values.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, const Op& op, T* smem) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  const int warps = blockDim.x / kWarp;
  for (int k = 1; k < warps; ++k) r = op(r, smem[k]);
  __syncthreads();  // smem is reused by the next reduction
  return r;
}

// ---------------------------------------------------------------------------------------
// Forward pieces shared by the single-block and split paths.

template <typename acc_t>
struct ForwardConsts {
  acc_t inv_temp, temp, alpha, beta;
  bool with_ce, with_s1;
  KDFAST_HD explicit ForwardConsts(const KdLossParams& p)
      : inv_temp(acc_t(1) / static_cast<acc_t>(p.temperature)),
        temp(static_cast<acc_t>(p.temperature)),
        alpha(static_cast<acc_t>(p.alpha)),
        beta(static_cast<acc_t>(p.beta)),
        with_ce(p.alpha > 0),
        with_s1(p.alpha > 0 && p.temperature != 1.0) {}
};

KDFAST_HD bool row_ignored(const KdLossParams& p, int64_t row) {
  return p.labels != nullptr && p.labels[row] == p.ignore_index;
}

// This thread's share of the streaming pass over groups [g_begin, g_end) of a row.
template <Divergence div, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD RowState<acc_t> stream_groups(const s_t* s, const t_t* t, const RowGroups& g,
                                                         int64_t vocab, int64_t g_begin, int64_t g_end,
                                                         const ForwardConsts<acc_t>& k, int tid, int nthreads) {
  RowState<acc_t> st = empty_state<acc_t>();
  const int64_t stride = nthreads;
  for (int64_t g0 = g_begin + tid; g0 < g_end; g0 += stride * kUnroll<acc_t>) {
    Group<s_t, VEC> sv[kUnroll<acc_t>];
    Group<t_t, VEC> tv[kUnroll<acc_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      const int64_t gi = g0 + u * stride;
      if (gi < g_end) {
        const int64_t lo = g.base + gi * VEC;
        const bool full = full_group<VEC>(g, lo, vocab);
        load_group<VEC>(s, lo, vocab, full, sv[u]);
        load_group<VEC>(t, lo, vocab, full, tv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      if (g0 + u * stride < g_end) accumulate<div, VEC>(st, sv[u], tv[u], k.inv_temp, k.with_s1);
    }
  }
  return st;
}

// This thread's share of KL(p||m) and KL(q||m) over groups [g_begin, g_end), given the
// merged row state (JSD second pass).
template <int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD KlPair<acc_t> jsd_groups(const s_t* s, const t_t* t, const RowGroups& g, int64_t vocab,
                                                    int64_t g_begin, int64_t g_end, const RowState<acc_t>& st,
                                                    const ForwardConsts<acc_t>& k, int tid, int nthreads) {
  const acc_t log_z_s = log_acc(st.z_s), log_z_t = log_acc(st.z_t), beta1 = acc_t(1) - k.beta;
  KlPair<acc_t> kl{acc_t(0), acc_t(0)};
  const int64_t stride = nthreads;
  for (int64_t g0 = g_begin + tid; g0 < g_end; g0 += stride * kUnroll<acc_t>) {
    Group<s_t, VEC> sv[kUnroll<acc_t>];
    Group<t_t, VEC> tv[kUnroll<acc_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      const int64_t gi = g0 + u * stride;
      if (gi < g_end) {
        const int64_t lo = g.base + gi * VEC;
        const bool full = full_group<VEC>(g, lo, vocab);
        load_group<VEC>(s, lo, vocab, full, sv[u]);
        load_group<VEC>(t, lo, vocab, full, tv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      if (g0 + u * stride >= g_end) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t log_q = (static_cast<acc_t>(sv[u].e[e]) - st.max_s) * k.inv_temp - log_z_s;
        const acc_t log_p = (static_cast<acc_t>(tv[u].e[e]) - st.max_t) * k.inv_temp - log_z_t;
        const acc_t q = exp_acc(log_q), pr = exp_acc(log_p);
        const acc_t log_m = log_acc(k.beta * pr + beta1 * q);
        kl.pm += pr > acc_t(0) ? pr * (log_p - log_m) : acc_t(0);
        kl.qm += q > acc_t(0) ? q * (log_q - log_m) : acc_t(0);
      }
    }
  }
  return kl;
}

// Writes loss and stats of a counted row from its merged state (one thread).
template <Divergence div, typename s_t, typename acc_t>
KDFAST_HD void write_row(const KdLossParams& p, int64_t row, const RowState<acc_t>& st,
                                          const KlPair<acc_t>& kl, const ForwardConsts<acc_t>& k) {
  const acc_t log_z_s = log_acc(st.z_s), log_z_t = log_acc(st.z_t);
  acc_t d, aux_s = acc_t(0), aux_t = acc_t(0);
  if (div == Divergence::ForwardKL) {
    d = aux_t = st.w / st.z_t - log_z_t + log_z_s;
  } else if (div == Divergence::ReverseKL) {
    d = aux_s = st.w / st.z_s - log_z_s + log_z_t;
  } else {
    aux_t = kl.pm;
    aux_s = kl.qm;
    d = k.beta * aux_t + (acc_t(1) - k.beta) * aux_s;
    // The zero-weight masks would turn an all-NaN / all--inf row into 0.
    if (!isfinite(log_z_s) || !isfinite(log_z_t)) d = acc_t(NAN);
  }
  acc_t loss = (acc_t(1) - k.alpha) * k.temp * k.temp * d;
  acc_t log_z_s1 = acc_t(0);
  if (k.with_ce) {
    log_z_s1 = k.with_s1 ? log_acc(st.z_s1) : log_z_s;
    const s_t* s = static_cast<const s_t*>(p.student) + row_offset(p.student_layout, row);
    // (max_s - s_y) first: exact for nearby values, so logits of +-1e4 lose no precision.
    loss += k.alpha * ((st.max_s - static_cast<acc_t>(s[p.labels[row]])) + log_z_s1);
  }
  static_cast<acc_t*>(p.loss)[row] = loss;
  acc_t* out = static_cast<acc_t*>(p.stats) + row * kStatsCols;
  out[kMaxS] = st.max_s;
  out[kMaxT] = st.max_t;
  out[kLogZS] = log_z_s;
  out[kLogZT] = log_z_t;
  out[kLogZS1] = log_z_s1;
  out[kAuxS] = aux_s;
  out[kAuxT] = aux_t;
}

template <typename acc_t>
KDFAST_HD void write_ignored_row(const KdLossParams& p, int64_t row) {
  static_cast<acc_t*>(p.loss)[row] = acc_t(0);
  acc_t* out = static_cast<acc_t*>(p.stats) + row * kStatsCols;
  for (int c = 0; c < kStatsCols; ++c) out[c] = acc_t(0);
}

template <typename acc_t>
KDFAST_HD void store_state(acc_t* out, const RowState<acc_t>& st) {
  out[0] = st.max_s;
  out[1] = st.max_t;
  out[2] = st.z_s;
  out[3] = st.z_t;
  out[4] = st.z_s1;
  out[5] = st.w;
}

// Merges the `splits` partial states of a row over the block; every thread gets the result.
template <Divergence div, typename acc_t>
__device__ __forceinline__ RowState<acc_t> merge_partials(const acc_t* partial, int splits,
                                                          const ForwardConsts<acc_t>& k, RowState<acc_t>* smem) {
  RowState<acc_t> st = empty_state<acc_t>();
  for (int i = threadIdx.x; i < splits; i += blockDim.x) {
    const acc_t* in = partial + int64_t(i) * kStateCols;
    const RowState<acc_t> part{in[0], in[1], in[2], in[3], in[4], in[5]};
    st = merge_states<div>(st, part, k.inv_temp, k.with_s1);
  }
  auto merge = [&](const RowState<acc_t>& a, const RowState<acc_t>& b) {
    return merge_states<div>(a, b, k.inv_temp, k.with_s1);
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
// row's groups and writes its partial state to partial_states[row, y].
template <Divergence div, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxForwardThreads, 2)
    kd_loss_forward_kernel(const KdLossParams p, const int splits, acc_t* __restrict__ partial_states) {
  constexpr int VEC = group_width<s_t, t_t>();
  __shared__ RowState<acc_t> smem_state[kMaxWarps];
  __shared__ KlPair<acc_t> smem_kl[kMaxWarps];
  const ForwardConsts<acc_t> k(p);
  const auto merge = [&](const RowState<acc_t>& a, const RowState<acc_t>& b) {
    return merge_states<div>(a, b, k.inv_temp, k.with_s1);
  };
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    if (row_ignored(p, row)) {  // uniform over the block
      if (splits == 1 && threadIdx.x == 0) write_ignored_row<acc_t>(p, row);
      continue;
    }
    const s_t* s = static_cast<const s_t*>(p.student) + row_offset(p.student_layout, row);
    const t_t* t = static_cast<const t_t*>(p.teacher) + row_offset(p.teacher_layout, row);
    const RowGroups g = row_groups<VEC>(p.vocab, s, t, static_cast<const s_t*>(nullptr),
                                        static_cast<const t_t*>(nullptr));
    const GroupRange range = split_range(g.count, splits, blockIdx.y);

    RowState<acc_t> st =
        stream_groups<div, VEC>(s, t, g, p.vocab, range.begin, range.end, k, threadIdx.x, blockDim.x);
    st = block_allreduce(st, merge, smem_state);
    if (splits > 1) {
      if (threadIdx.x == 0) store_state(partial_states + (row * splits + blockIdx.y) * kStateCols, st);
      continue;
    }
    KlPair<acc_t> kl{acc_t(0), acc_t(0)};
    if constexpr (div == Divergence::JSD) {
      kl = jsd_groups<VEC>(s, t, g, p.vocab, range.begin, range.end, st, k, threadIdx.x, blockDim.x);
      kl = block_allreduce(kl, KlSum{}, smem_kl);
    }
    if (threadIdx.x == 0) write_row<div, s_t>(p, row, st, kl, k);
  }
}

// Split JSD, second pass: block (row, y) merges the row's partial states, then sums
// KL(p||m) and KL(q||m) over the y-th part of the row into partial_kl[row, y].
template <typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxForwardThreads, 2)
    kd_loss_jsd_split_kernel(const KdLossParams p, const int splits, const acc_t* __restrict__ partial_states,
                             acc_t* __restrict__ partial_kl) {
  constexpr int VEC = group_width<s_t, t_t>();
  __shared__ RowState<acc_t> smem_state[kMaxWarps];
  __shared__ KlPair<acc_t> smem_kl[kMaxWarps];
  const ForwardConsts<acc_t> k(p);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    if (row_ignored(p, row)) continue;
    const RowState<acc_t> st = merge_partials<Divergence::JSD>(partial_states + row * splits * kStateCols, splits,
                                                                k, smem_state);
    const s_t* s = static_cast<const s_t*>(p.student) + row_offset(p.student_layout, row);
    const t_t* t = static_cast<const t_t*>(p.teacher) + row_offset(p.teacher_layout, row);
    const RowGroups g = row_groups<VEC>(p.vocab, s, t, static_cast<const s_t*>(nullptr),
                                        static_cast<const t_t*>(nullptr));
    const GroupRange range = split_range(g.count, splits, blockIdx.y);
    KlPair<acc_t> kl = jsd_groups<VEC>(s, t, g, p.vocab, range.begin, range.end, st, k, threadIdx.x, blockDim.x);
    kl = block_allreduce(kl, KlSum{}, smem_kl);
    if (threadIdx.x == 0) {
      acc_t* out = partial_kl + (row * splits + blockIdx.y) * 2;
      out[0] = kl.pm;
      out[1] = kl.qm;
    }
  }
}

// Split path, last step: one warp per row merges the partials and writes loss and stats.
template <Divergence div, typename s_t, typename acc_t>
__global__ void __launch_bounds__(kWarp)
    kd_loss_finalize_kernel(const KdLossParams p, const int splits, const acc_t* __restrict__ partial_states,
                            const acc_t* __restrict__ partial_kl) {
  __shared__ RowState<acc_t> smem_state[1];
  __shared__ KlPair<acc_t> smem_kl[1];
  const ForwardConsts<acc_t> k(p);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    if (row_ignored(p, row)) {
      if (threadIdx.x == 0) write_ignored_row<acc_t>(p, row);
      continue;
    }
    const RowState<acc_t> st = merge_partials<div>(partial_states + row * splits * kStateCols, splits, k,
                                                   smem_state);
    KlPair<acc_t> kl{acc_t(0), acc_t(0)};
    if constexpr (div == Divergence::JSD) {
      for (int i = threadIdx.x; i < splits; i += blockDim.x) {
        const acc_t* in = partial_kl + (row * splits + i) * 2;
        kl.pm += in[0];
        kl.qm += in[1];
      }
      kl = block_allreduce(kl, KlSum{}, smem_kl);
    }
    if (threadIdx.x == 0) write_row<div, s_t>(p, row, st, kl, k);
  }
}

// ---------------------------------------------------------------------------------------
// Backward: elementwise given the row statistics.

// Per-row constants of the backward.
template <typename acc_t>
struct BackwardRow {
  int64_t label;
  bool ignored;
  acc_t max_s, max_t, lzs, lzt, lzs1, aux_s, aux_t;
  acc_t c;     // (1 - alpha) T grad_loss: T^2 of the loss times d(s/T)/ds
  acc_t ce_w;  // alpha grad_loss
};

template <typename acc_t>
KDFAST_HD BackwardRow<acc_t> backward_row(const KdLossParams& p, int64_t row) {
  BackwardRow<acc_t> r{};
  r.label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
  r.ignored = p.labels != nullptr && r.label == p.ignore_index;
  if (r.ignored) return r;  // zero gradient without reading the stats (they may hold anything)
  const acc_t* st = static_cast<const acc_t*>(p.stats_in) + row * kStatsCols;
  r.max_s = st[kMaxS];
  r.max_t = st[kMaxT];
  r.lzs = st[kLogZS];
  r.lzt = st[kLogZT];
  r.lzs1 = st[kLogZS1];
  r.aux_s = st[kAuxS];
  r.aux_t = st[kAuxT];
  const acc_t w = static_cast<const acc_t*>(p.grad_loss)[row];
  r.c = (acc_t(1) - static_cast<acc_t>(p.alpha)) * static_cast<acc_t>(p.temperature) * w;
  r.ce_w = static_cast<acc_t>(p.alpha) * w;
  return r;
}

// This thread's share of groups [g_begin, g_end) of one row's gradients.
template <Divergence div, int VEC, typename s_t, typename t_t, typename acc_t>
KDFAST_HD void backward_groups(const KdLossParams& p, int64_t row, const BackwardRow<acc_t>& r,
                               const RowGroups& g, int64_t g_begin, int64_t g_end, int tid, int nthreads) {
  const acc_t temp = static_cast<acc_t>(p.temperature);
  const acc_t inv_temp = acc_t(1) / temp;
  const acc_t beta = static_cast<acc_t>(p.beta);
  const acc_t beta1 = acc_t(1) - beta;
  const bool with_ce = p.alpha > 0;
  const int64_t vocab = p.vocab;
  const s_t* s = static_cast<const s_t*>(p.student) + row_offset(p.student_layout, row);
  const t_t* t = static_cast<const t_t*>(p.teacher) + row_offset(p.teacher_layout, row);
  s_t* gs_row = p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + row * vocab : nullptr;
  t_t* gt_row = p.grad_teacher != nullptr ? static_cast<t_t*>(p.grad_teacher) + row * vocab : nullptr;
  const int64_t stride = nthreads;
  for (int64_t g0 = g_begin + tid; g0 < g_end; g0 += stride * kUnroll<acc_t>) {
    Group<s_t, VEC> sv[kUnroll<acc_t>];
    Group<t_t, VEC> tv[kUnroll<acc_t>];
    if (!r.ignored) {
#pragma unroll
      for (int u = 0; u < kUnroll<acc_t>; ++u) {
        const int64_t gi = g0 + u * stride;
        if (gi < g_end) {
          const int64_t lo = g.base + gi * VEC;
          const bool full = full_group<VEC>(g, lo, vocab);
          load_group<VEC>(s, lo, vocab, full, sv[u]);
          load_group<VEC>(t, lo, vocab, full, tv[u]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<acc_t>; ++u) {
      const int64_t gi = g0 + u * stride;
      if (gi >= g_end) continue;
      const int64_t lo = g.base + gi * VEC;
      const bool full = full_group<VEC>(g, lo, vocab);
      Group<s_t, VEC> out_s;
      Group<t_t, VEC> out_t;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_t gs = acc_t(0), gt = acc_t(0);
        if (!r.ignored) {
          const acc_t ds = static_cast<acc_t>(sv[u].e[e]) - r.max_s;
          const acc_t log_q = ds * inv_temp - r.lzs;
          const acc_t log_p = (static_cast<acc_t>(tv[u].e[e]) - r.max_t) * inv_temp - r.lzt;
          const acc_t q = exp_acc(log_q), pr = exp_acc(log_p);
          // A zero weight (p_j or q_j) zeroes its product even when the log difference is NaN.
          if (div == Divergence::ForwardKL) {
            gs = r.c * (q - pr);
            gt = r.c * pr * ((pr > acc_t(0) ? log_p - log_q : acc_t(0)) - r.aux_t);
          } else if (div == Divergence::ReverseKL) {
            gs = r.c * q * ((q > acc_t(0) ? log_q - log_p : acc_t(0)) - r.aux_s);
            gt = r.c * (pr - q);
          } else {
            const acc_t log_m = log_acc(beta * pr + beta1 * q);
            gs = r.c * beta1 * q * ((q > acc_t(0) ? log_q - log_m : acc_t(0)) - r.aux_s);
            gt = r.c * beta * pr * ((pr > acc_t(0) ? log_p - log_m : acc_t(0)) - r.aux_t);
          }
          if (with_ce) {
            gs += r.ce_w * exp_acc(ds - r.lzs1);
            if (lo + e == r.label) gs -= r.ce_w;
          }
        }
        out_s.e[e] = static_cast<s_t>(gs);
        out_t.e[e] = static_cast<t_t>(gt);
      }
      if (gs_row != nullptr) store_group<VEC>(gs_row, lo, vocab, full, out_s);
      if (gt_row != nullptr) store_group<VEC>(gt_row, lo, vocab, full, out_t);
    }
  }
}

// The row's groups, aligned for the inputs and the gradients it writes.
template <int VEC, typename s_t, typename t_t>
KDFAST_HD RowGroups backward_row_groups(const KdLossParams& p, int64_t row) {
  return row_groups<VEC>(
      p.vocab, static_cast<const s_t*>(p.student) + row_offset(p.student_layout, row),
      static_cast<const t_t*>(p.teacher) + row_offset(p.teacher_layout, row),
      p.grad_student != nullptr ? static_cast<const s_t*>(p.grad_student) + row * p.vocab : nullptr,
      p.grad_teacher != nullptr ? static_cast<const t_t*>(p.grad_teacher) + row * p.vocab : nullptr);
}

// grid (rows, column chunks of groups_per_chunk groups).
template <Divergence div, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kMaxBackwardThreads, 4)
    kd_loss_backward_kernel(const KdLossParams p, const int64_t groups_per_chunk) {
  constexpr int VEC = group_width<s_t, t_t>();
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const BackwardRow<acc_t> r = backward_row<acc_t>(p, row);
    const RowGroups g = backward_row_groups<VEC, s_t, t_t>(p, row);
    for (int64_t chunk = blockIdx.y; chunk * groups_per_chunk < g.count; chunk += gridDim.y) {
      const int64_t g_begin = chunk * groups_per_chunk;
      const int64_t g_end = std::min<int64_t>(g.count, g_begin + groups_per_chunk);
      backward_groups<div, VEC, s_t, t_t>(p, row, r, g, g_begin, g_end, threadIdx.x, blockDim.x);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side: launch configuration and dtype / divergence dispatch.

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

  template <Divergence div, typename s_t, typename t_t, typename acc_t>
  void run() const {
    constexpr int VEC = group_width<s_t, t_t>();
    const int64_t groups = ceil_div(p.vocab, VEC) + 1;  // upper bound over row alignments
    const int splits = choose_splits(p.rows, groups);
    const int threads = threads_for(ceil_div(groups, splits), kMaxForwardThreads);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxGridX)), static_cast<unsigned>(splits));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (splits == 1) {
      kd_loss_forward_kernel<div, s_t, t_t, acc_t><<<grid, threads, 0, stream>>>(p, 1, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // O(rows x splits) workspace; the caching allocator keeps it alive for this stream's work.
    const at::Tensor states = at::empty({p.rows * splits * kStateCols}, acc_options);
    kd_loss_forward_kernel<div, s_t, t_t, acc_t><<<grid, threads, 0, stream>>>(p, splits, states.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor kl;
    if constexpr (div == Divergence::JSD) {
      kl = at::empty({p.rows * splits * 2}, acc_options);
      kd_loss_jsd_split_kernel<s_t, t_t, acc_t>
          <<<grid, threads, 0, stream>>>(p, splits, states.const_data_ptr<acc_t>(), kl.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    kd_loss_finalize_kernel<div, s_t, acc_t><<<grid.x, kWarp, 0, stream>>>(
        p, splits, states.const_data_ptr<acc_t>(), kl.defined() ? kl.const_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct BackwardLauncher {
  const KdLossParams& p;

  template <Divergence div, typename s_t, typename t_t, typename acc_t>
  void run() const {
    constexpr int VEC = group_width<s_t, t_t>();
    const int64_t groups = ceil_div(p.vocab, VEC) + 1;  // upper bound over row alignments
    const int threads = threads_for(groups, kMaxBackwardThreads);
    const int64_t groups_per_chunk = int64_t(threads) * kBackwardGroupsPerThread;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(p.rows, kMaxGridX)),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(groups, groups_per_chunk), kMaxGridY)));
    kd_loss_backward_kernel<div, s_t, t_t, acc_t>
        <<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(p, groups_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename s_t, typename t_t, typename acc_t, typename Launcher>
void dispatch_divergence(const Launcher& launcher, Divergence div) {
  switch (div) {
    case Divergence::ForwardKL: launcher.template run<Divergence::ForwardKL, s_t, t_t, acc_t>(); return;
    case Divergence::ReverseKL: launcher.template run<Divergence::ReverseKL, s_t, t_t, acc_t>(); return;
    case Divergence::JSD: launcher.template run<Divergence::JSD, s_t, t_t, acc_t>(); return;
  }
  TORCH_CHECK(false, "kd_loss: unknown divergence code ", static_cast<int64_t>(div));
}

template <typename s_t, typename Launcher>
void dispatch_teacher(const Launcher& launcher, Divergence div, at::ScalarType t) {
  switch (t) {
    case at::kFloat: dispatch_divergence<s_t, float, float>(launcher, div); return;
    case at::kHalf: dispatch_divergence<s_t, c10::Half, float>(launcher, div); return;
    case at::kBFloat16: dispatch_divergence<s_t, c10::BFloat16, float>(launcher, div); return;
    default: TORCH_CHECK(false, "kd_loss: unsupported teacher_logits dtype ", t);
  }
}

// Calls launcher.run<div, s_t, t_t, acc_t>() for the divergence and the input dtypes.
template <typename Launcher>
void dispatch_kd(const Launcher& launcher, Divergence div, at::ScalarType s, at::ScalarType t) {
  switch (s) {
    case at::kDouble:
      TORCH_CHECK(t == at::kDouble, "kd_loss: float64 student_logits need float64 teacher_logits, got ", t);
      dispatch_divergence<double, double, double>(launcher, div);
      return;
    case at::kFloat: dispatch_teacher<float>(launcher, div, t); return;
    case at::kHalf: dispatch_teacher<c10::Half>(launcher, div, t); return;
    case at::kBFloat16: dispatch_teacher<c10::BFloat16>(launcher, div, t); return;
    default: TORCH_CHECK(false, "kd_loss: unsupported student_logits dtype ", s);
  }
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "kd_loss: ", name, " must be a CUDA tensor here, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                        const c10::optional<at::Tensor>& labels,
                                                        double temperature, double alpha, int64_t divergence,
                                                        double beta, int64_t ignore_index) {
  check_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits");
  const c10::cuda::CUDAGuard device_guard(student.device());
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index);
  KdLossParams& p = problem.params;
  KdLossForwardOutputs out = prepare_kd_loss_forward(problem);
  if (p.rows == 0) return {out.loss, out.stats};
  dispatch_kd(ForwardLauncher{p, out.loss.options()}, p.divergence, problem.student.scalar_type(),
              problem.teacher.scalar_type());
  return {out.loss, out.stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature, double alpha,
    int64_t divergence, double beta, int64_t ignore_index, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits");
  const c10::cuda::CUDAGuard device_guard(student.device());
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index);
  KdLossParams& p = problem.params;
  const KdLossBackwardInputs inputs = prepare_kd_loss_backward(problem, grad_loss, stats);

  at::Tensor grad_s = student_requires_grad
                          ? at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_requires_grad
                          ? at::empty(teacher.sizes(), teacher.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, teacher.options());
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  dispatch_kd(BackwardLauncher{p}, p.divergence, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("kd_loss_forward", &kdfast::cuda::kd_loss_forward_cuda);
  m.impl("kd_loss_backward", &kdfast::cuda::kd_loss_backward_cuda);
}
