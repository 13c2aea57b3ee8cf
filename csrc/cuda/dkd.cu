// CUDA kernels of dkd_loss and their host functions; the math lives in ../dkd_math.h,
// shared with the CPU kernels.
//
// One block per row (a grid-stride loop over rows), in passes over the row:
//   1. the non-target maxima of both inputs, block-reduced,
//   2. the non-target sums, block-reduced; every thread then derives the same row
//      statistics and loss (the reductions have a fixed order: bitwise reproducible),
//   3. the gradient (fused call with a gradient, or the recomputing backward), each
//      element written once, the target element by the thread that owns it.
// Passes 2 and 3 read the row again (mostly from L2). No host synchronisation (CUDA-graph
// capturable): labels are checked on the device (a device-side assertion; the bad row is
// never indexed and gets NaN), and the batchmean count stays a device tensor.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../dkd.h"
#include "../dkd_math.h"
#include "common.cuh"

#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace kdfast {
namespace math {

// Warp shuffle of the non-target sums, found by block_allreduce (common.cuh) through
// argument-dependent lookup.
template <typename acc_t>
__device__ __forceinline__ DkdSums<acc_t> shfl_xor(const DkdSums<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.z_s, mask), __shfl_xor_sync(0xffffffffu, v.z_t, mask),
          __shfl_xor_sync(0xffffffffu, v.z_diff, mask), __shfl_xor_sync(0xffffffffu, v.w, mask)};
}

}  // namespace math

namespace cuda {
namespace {

constexpr int kDkdMaxThreads = 512;
constexpr int kDkdMaxWarps = kDkdMaxThreads / kWarp;
constexpr int kDkdElementsPerThread = 8;  // sizes blocks for short rows

template <typename acc_t>
KDFAST_HD acc_t fmax_acc(acc_t a, acc_t b) {
  // fmax drops a NaN operand: a NaN logit never becomes the maximum, it reaches the sums.
  if constexpr (std::is_same_v<acc_t, float>) return ::fmaxf(a, b);
  return ::fmax(a, b);
}

template <typename acc_t>
struct DkdMax {
  acc_t s, t;
};

template <typename acc_t>
__device__ __forceinline__ DkdMax<acc_t> shfl_xor(const DkdMax<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.s, mask), __shfl_xor_sync(0xffffffffu, v.t, mask)};
}

struct DkdMaxOp {
  template <typename acc_t>
  KDFAST_HD DkdMax<acc_t> operator()(const DkdMax<acc_t>& a, const DkdMax<acc_t>& b) const {
    return {fmax_acc(a.s, b.s), fmax_acc(a.t, b.t)};
  }
};

using math::DkdSums;

struct DkdSumOp {
  template <typename acc_t>
  KDFAST_HD DkdSums<acc_t> operator()(const DkdSums<acc_t>& a, const DkdSums<acc_t>& b) const {
    return {a.z_s + b.z_s, a.z_t + b.z_t, a.z_diff + b.z_diff, a.w + b.w};
  }
};

template <typename s_t, typename t_t>
struct DkdRow {
  const s_t* s;
  const t_t* t;
  s_t* gs;  // nullptr when not requested
  t_t* gt;
};

template <typename s_t, typename t_t>
__device__ __forceinline__ DkdRow<s_t, t_t> dkd_row(const DkdParams& p, int64_t row) {
  return {static_cast<const s_t*>(p.student) + p.student_layout.offset(row),
          static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row),
          p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + row * p.vocab : nullptr,
          p.grad_teacher != nullptr ? static_cast<t_t*>(p.grad_teacher) + row * p.vocab : nullptr};
}

// The label of a counted row, checked on the device: an invalid one trips a device-side
// assertion and is never used as an index (its row is NaN where asserts are compiled out).
__device__ __forceinline__ bool dkd_label_ok(const DkdParams& p, int64_t label) {
  const bool ok = label >= 0 && label < p.vocab;
  CUDA_KERNEL_ASSERT_MSG(ok, "dkd_loss: labels must be in [0, V) or equal ignore_index");
  return ok;
}

template <typename acc_t>
__device__ __forceinline__ acc_t dkd_row_weight(const DkdParams& p, int64_t row) {
  return p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
}

// Every gradient element of the row set to value (ignored rows: 0; undefined rows: NaN).
template <typename s_t, typename t_t, typename acc_t>
__device__ __forceinline__ void dkd_fill_row(const DkdRow<s_t, t_t>& in, int64_t vocab, acc_t value) {
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    if (in.gs != nullptr) in.gs[j] = static_cast<s_t>(value);
    if (in.gt != nullptr) in.gt[j] = static_cast<t_t>(value);
  }
}

// Loss and stats of a row written by thread 0 (value everywhere: ignored / undefined rows).
template <typename acc_t>
__device__ __forceinline__ void dkd_fill_outputs(const DkdParams& p, int64_t row, acc_t value) {
  if (threadIdx.x != 0) return;
  static_cast<acc_t*>(p.loss)[row] = value;
  math::fill_dkd_stats(static_cast<acc_t*>(p.stats) + row * kDkdStatsCols, value);
}

// Pass 3: the gradient of one counted, defined row from its statistics.
template <typename s_t, typename t_t, typename acc_t>
__device__ __forceinline__ void dkd_gradient_row(const DkdParams& p, const DkdRow<s_t, t_t>& in, int64_t label,
                                                 const math::DkdStats<acc_t>& r, const math::DkdConsts<acc_t>& k,
                                                 acc_t weight) {
  using Ops = math::ScalarOps<acc_t>;
  const math::DkdGradConsts<acc_t> g = math::dkd_grad_consts(r, k, weight);
  for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    if (j == label) {
      if (in.gs != nullptr) in.gs[j] = static_cast<s_t>(g.tckd_s);
      if (in.gt != nullptr) in.gt[j] = static_cast<t_t>(g.tckd_t);
      continue;
    }
    const acc_t xs = (static_cast<acc_t>(in.s[j]) - r.max_s) * k.inv_temp;
    const acc_t xt = (static_cast<acc_t>(in.t[j]) - r.max_t) * k.inv_temp;
    const acc_t ps = Ops::exp(xs - r.log_z_s), pt = Ops::exp(xt - r.log_z_t);
    if (in.gs != nullptr) in.gs[j] = static_cast<s_t>(math::dkd_student_grad<Ops>(ps, pt, g));
    if (in.gt != nullptr) in.gt[j] = static_cast<t_t>(math::dkd_teacher_grad<Ops>(pt, xt, xs, g));
  }
}

// Loss and stats of every row, and its gradient when p.grad_* are set (at the row
// weights of p.grad_loss). Every branch below is uniform over the block.
template <typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kDkdMaxThreads, 1) dkd_forward_kernel(const DkdParams p) {
  using Ops = math::ScalarOps<acc_t>;
  __shared__ DkdMax<acc_t> smem_max[kDkdMaxWarps];
  __shared__ DkdSums<acc_t> smem_sums[kDkdMaxWarps];
  const math::DkdConsts<acc_t> k = math::make_dkd_consts<acc_t>(p.temperature, p.alpha, p.beta);
  const bool with_grad = p.grad_student != nullptr || p.grad_teacher != nullptr;
  const acc_t nan = acc_t(NAN);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const DkdRow<s_t, t_t> in = dkd_row<s_t, t_t>(p, row);
    const int64_t label = p.labels[row];
    if (label == p.ignore_index || !dkd_label_ok(p, label)) {
      const acc_t value = label == p.ignore_index ? acc_t(0) : nan;
      dkd_fill_outputs(p, row, value);
      if (with_grad) dkd_fill_row(in, p.vocab, value);
      continue;
    }
    DkdMax<acc_t> m{math::neg_inf<acc_t>(), math::neg_inf<acc_t>()};
    for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
      if (j != label) m = DkdMaxOp{}(m, DkdMax<acc_t>{static_cast<acc_t>(in.s[j]), static_cast<acc_t>(in.t[j])});
    }
    m = block_allreduce(m, DkdMaxOp{}, smem_max);
    const acc_t s_y = static_cast<acc_t>(in.s[label]), t_y = static_cast<acc_t>(in.t[label]);
    acc_t loss = nan;
    math::DkdStats<acc_t> r{};
    if (math::dkd_row_defined(m.s, m.t, s_y, t_y)) {
      DkdSums<acc_t> st{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
        if (j == label) continue;
        const acc_t xs = (static_cast<acc_t>(in.s[j]) - m.s) * k.inv_temp;
        const acc_t xt = (static_cast<acc_t>(in.t[j]) - m.t) * k.inv_temp;
        const acc_t es = Ops::exp(xs), et = Ops::exp(xt);
        st.z_s += es;
        st.z_t += et;
        st.z_diff += es - et;
        st.w += math::weighted_diff<Ops>(et, xt, xs);
      }
      st = block_allreduce(st, DkdSumOp{}, smem_sums);
      r = math::dkd_row_stats(m.s, m.t, st, s_y, t_y, k);
      loss = math::dkd_row_loss(r, k);
    }
    if (loss != loss) {  // NaN in (a NaN logit reaches the sums), or no distribution on a side
      dkd_fill_outputs(p, row, nan);
      if (with_grad) dkd_fill_row(in, p.vocab, nan);
      continue;
    }
    if (threadIdx.x == 0) {
      static_cast<acc_t*>(p.loss)[row] = loss;
      math::store_dkd_stats(r, static_cast<acc_t*>(p.stats) + row * kDkdStatsCols);
    }
    if (with_grad) dkd_gradient_row(p, in, label, r, k, dkd_row_weight<acc_t>(p, row));
  }
}

// Gradients recomputed from the forward's statistics, at the row weights of p.grad_loss.
template <typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kDkdMaxThreads, 1) dkd_backward_kernel(const DkdParams p) {
  const math::DkdConsts<acc_t> k = math::make_dkd_consts<acc_t>(p.temperature, p.alpha, p.beta);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const DkdRow<s_t, t_t> in = dkd_row<s_t, t_t>(p, row);
    const int64_t label = p.labels[row];
    if (label == p.ignore_index) {  // stats of ignored rows may hold anything
      dkd_fill_row(in, p.vocab, acc_t(0));
      continue;
    }
    const math::DkdStats<acc_t> r = math::load_dkd_stats(static_cast<const acc_t*>(p.stats_in) + row * kDkdStatsCols);
    if (!dkd_label_ok(p, label) || r.max_s != r.max_s) {  // bad label, or a row the forward marked undefined
      dkd_fill_row(in, p.vocab, acc_t(NAN));
      continue;
    }
    dkd_gradient_row(p, in, label, r, k, dkd_row_weight<acc_t>(p, row));
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

int dkd_threads(int64_t vocab) {
  const int64_t want = (vocab + kDkdElementsPerThread - 1) / kDkdElementsPerThread;
  const int64_t warps = (want + kWarp - 1) / kWarp;
  return static_cast<int>(std::min<int64_t>(kDkdMaxThreads, std::max<int64_t>(1, warps) * kWarp));
}

unsigned dkd_blocks(int64_t rows) {
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<unsigned>(std::min<int64_t>(rows, resident));
}

template <bool kBackward>
struct DkdLaunch {
  const DkdParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void run() const {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if constexpr (kBackward) {
      dkd_backward_kernel<s_t, t_t, acc_t><<<dkd_blocks(p.rows), dkd_threads(p.vocab), 0, stream>>>(p);
    } else {
      dkd_forward_kernel<s_t, t_t, acc_t><<<dkd_blocks(p.rows), dkd_threads(p.vocab), 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename s_t, typename Launcher>
void dkd_dispatch_teacher(const Launcher& launcher, at::ScalarType t) {
  switch (t) {
    case at::kFloat: launcher.template run<s_t, float, float>(); return;
    case at::kHalf: launcher.template run<s_t, c10::Half, float>(); return;
    case at::kBFloat16: launcher.template run<s_t, c10::BFloat16, float>(); return;
    default: TORCH_CHECK(false, "dkd_loss: unsupported teacher_logits dtype ", t);
  }
}

// Calls launcher.run<s_t, t_t, acc_t>() for the input dtypes.
template <typename Launcher>
void dkd_dispatch(const Launcher& launcher, at::ScalarType s, at::ScalarType t) {
  switch (s) {
    case at::kDouble:
      TORCH_CHECK(t == at::kDouble, "dkd_loss: float64 student_logits need float64 teacher_logits, got ", t);
      launcher.template run<double, double, double>();
      return;
    case at::kFloat: dkd_dispatch_teacher<float>(launcher, t); return;
    case at::kHalf: dkd_dispatch_teacher<c10::Half>(launcher, t); return;
    case at::kBFloat16: dkd_dispatch_teacher<c10::BFloat16>(launcher, t); return;
    default: TORCH_CHECK(false, "dkd_loss: unsupported student_logits dtype ", s);
  }
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "dkd_loss: ", name, " must be a CUDA tensor here, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkd_loss_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels, double alpha, double beta,
    double temperature, int64_t ignore_index, int64_t reduction, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits");
  const Reduction red = check_dkd_reduction(reduction);
  const c10::cuda::CUDAGuard device_guard(student.device());
  DkdProblem problem = prepare_dkd(student, teacher, labels, alpha, beta, temperature, ignore_index);
  DkdParams& p = problem.params;
  DkdFusedOutputs out = prepare_dkd_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // batchmean divides by the counted rows: a device tensor, never read on the host.
  at::Tensor count;
  if (red == Reduction::BatchMean) {
    count = problem.labels.ne(ignore_index).sum().clamp_min(1).to(problem.acc_dtype);
  }
  if (p.rows > 0) {
    const bool with_grad = student_requires_grad || teacher_requires_grad;
    const at::Tensor scale = count.defined() && with_grad ? count.reciprocal() : at::Tensor();
    p.grad_loss = scale.defined() ? scale.const_data_ptr() : nullptr;
    p.grad_loss_stride = 0;
    dkd_dispatch(DkdLaunch<false>{p}, problem.student.scalar_type(), problem.teacher.scalar_type());
  }
  if (red == Reduction::Sum) out.loss.copy_(out.rows_loss.sum());
  if (red == Reduction::BatchMean) out.loss.copy_(out.rows_loss.sum() / count);
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> dkd_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                                          const at::Tensor& teacher, const at::Tensor& labels,
                                                          const at::Tensor& stats, double alpha, double beta,
                                                          double temperature, int64_t ignore_index,
                                                          bool student_requires_grad, bool teacher_requires_grad) {
  check_cuda(student, "student_logits");
  check_cuda(teacher, "teacher_logits");
  const c10::cuda::CUDAGuard device_guard(student.device());
  DkdProblem problem = prepare_dkd(student, teacher, labels, alpha, beta, temperature, ignore_index);
  DkdParams& p = problem.params;
  const DkdBackwardInputs inputs = prepare_dkd_backward(problem, grad_loss, stats);
  at::Tensor grad_s = empty_gradient_like(student, student_requires_grad);
  at::Tensor grad_t = empty_gradient_like(teacher, teacher_requires_grad);
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  dkd_dispatch(DkdLaunch<true>{p}, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("dkd_loss_fused", &kdfast::cuda::dkd_loss_fused_cuda);
  m.impl("dkd_loss_backward", &kdfast::cuda::dkd_loss_backward_cuda);
}
