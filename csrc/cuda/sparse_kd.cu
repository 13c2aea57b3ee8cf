// CUDA kernels of sparse_kd_loss and their host functions; the math lives in
// ../sparse_kd_math.h, shared with the CPU kernels.
//
// One block per row (a grid-stride loop over rows):
//   1. one pass over the student row: each thread keeps an online maximum and sum (one
//      exponential per element), block-merged; every thread then holds the row's
//      normaliser (the reductions have a fixed order: bitwise reproducible);
//   2. the teacher's support, one entry per thread: its mass, then the divergence terms
//      (block sums); for the residual tail, the student's mass off the support as the
//      float64 sum of the row's exponentials minus that of the support's (the same
//      float32 values in both, so the difference has no cancellation error);
//   3. the gradient (fused call with a gradient, or the recomputing backward): the row
//      written densely with the coefficient off the support (the label's term
//      included), then, after a barrier, each support entry overwritten by the thread
//      that owns it (the entries of a row are distinct, so no two threads write one
//      element).
// Passes 2 (residual) and 3 read the row again (mostly from L2). No dense teacher, no
// host synchronisation (CUDA-graph capturable): labels and teacher indices are checked on
// the device (a device-side assertion; the bad row is never indexed there and gets NaN),
// and the batchmean count stays a device tensor.
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

#include "../sparse_kd.h"
#include "../sparse_kd_math.h"
#include "common.cuh"

#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

namespace kdfast {
namespace math {

// Warp shuffle of a running normaliser, found by block_allreduce (common.cuh) through
// argument-dependent lookup.
template <typename acc_t>
__device__ __forceinline__ OnlineNorm<acc_t> shfl_xor(const OnlineNorm<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.max, mask), __shfl_xor_sync(0xffffffffu, v.z, mask),
          __shfl_xor_sync(0xffffffffu, v.z1, mask)};
}

}  // namespace math

namespace cuda {
namespace {

constexpr int kSparseMaxThreads = 512;
constexpr int kSparseMaxWarps = kSparseMaxThreads / kWarp;
constexpr int kSparseElementsPerThread = 8;  // sizes blocks for short rows

template <typename acc_t>
struct NormMerge {
  acc_t inv_temp;
  bool with_s1;
  __device__ __forceinline__ math::OnlineNorm<acc_t> operator()(const math::OnlineNorm<acc_t>& a,
                                                                const math::OnlineNorm<acc_t>& b) const {
    return math::merge_norm(a, b, inv_temp, with_s1);
  }
};

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// The block's shared memory for its reductions.
template <typename acc_t>
struct SparseShared {
  math::OnlineNorm<acc_t> norm[kSparseMaxWarps];
  acc_t acc[kSparseMaxWarps];
  double wide[kSparseMaxWarps];
};

template <typename acc_t>
__device__ __forceinline__ acc_t sparse_row_weight(const SparseKdParams& p, int64_t row) {
  return p.grad_loss == nullptr ? acc_t(1) : static_cast<const acc_t*>(p.grad_loss)[row * p.grad_loss_stride];
}

// A label of a counted row, checked on the device: an invalid one trips a device-side
// assertion and is never used as an index (its row is NaN where asserts are compiled out).
__device__ __forceinline__ bool sparse_label_ok(const SparseKdParams& p, int64_t label) {
  const bool ok = label >= 0 && label < p.vocab;
  CUDA_KERNEL_ASSERT_MSG(ok, "sparse_kd_loss: labels must be in [0, V) or equal ignore_index");
  return ok;
}

// A teacher index other than -1, checked on the device like the labels.
__device__ __forceinline__ bool sparse_index_ok(const SparseKdParams& p, int64_t index) {
  const bool ok = index >= 0 && index < p.vocab;
  CUDA_KERNEL_ASSERT_MSG(ok, "sparse_kd_loss: teacher_indices must be in [0, V) or -1 (padding)");
  return ok;
}

template <typename s_t, typename acc_t>
__device__ __forceinline__ void sparse_fill_row(s_t* gs, int64_t vocab, acc_t value) {
  if (gs == nullptr) return;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) gs[j] = static_cast<s_t>(value);
}

// Loss and stats of a row written by thread 0 (value everywhere: ignored / undefined rows).
template <typename acc_t>
__device__ __forceinline__ void sparse_fill_outputs(const SparseKdParams& p, int64_t row, acc_t value) {
  if (threadIdx.x != 0) return;
  static_cast<acc_t*>(p.loss)[row] = value;
  math::fill_sparse_stats(static_cast<acc_t*>(p.stats) + row * kSparseStatsCols, value);
}

// Pass 3: the gradient of one counted, defined row from its statistics.
template <typename s_t, typename acc_t>
__device__ __forceinline__ void sparse_gradient_row(const SparseKdParams& p, int64_t row, const s_t* s, s_t* gs,
                                                    int64_t label, const math::SparseRowStats<acc_t>& r,
                                                    const math::SparseConsts<acc_t>& k, acc_t weight) {
  using Ops = math::ScalarOps<acc_t>;
  const math::SparseGradConsts<acc_t> g = math::sparse_grad_consts(r, k, weight);
  for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    const acc_t x = static_cast<acc_t>(s[j]);
    const acc_t q = Ops::exp(math::log_prob(x, r.max_s, k.inv_temp, r.log_z));
    const acc_t q1 = k.with_s1 ? Ops::exp(math::log_prob(x, r.max_s, acc_t(1), r.log_z1)) : q;
    gs[j] = static_cast<s_t>(math::dense_grad(g, q, q1, j == label));
  }
  __syncthreads();  // the dense values are written before the support's overwrite them
  for (int64_t kk = threadIdx.x; kk < p.support; kk += blockDim.x) {
    const int64_t i = sparse_index(p, row, kk);
    if (i == -1 || !sparse_index_ok(p, i)) continue;
    const math::TeacherProb<acc_t> t = math::teacher_prob(sparse_value<acc_t>(p, row, kk), k.logprobs);
    const acc_t x = static_cast<acc_t>(s[i]);
    const acc_t q = Ops::exp(math::log_prob(x, r.max_s, k.inv_temp, r.log_z));
    const acc_t q1 = k.with_s1 ? Ops::exp(math::log_prob(x, r.max_s, acc_t(1), r.log_z1)) : q;
    gs[i] = static_cast<s_t>(math::support_grad(g, t.p, q, q1, i == label));
  }
}

// Passes 1 and 2 of a counted row with a valid label: its statistics and loss (NaN when
// the row has no softmax, holds NaN, or has a bad teacher index).
template <typename s_t, typename acc_t>
__device__ __forceinline__ acc_t sparse_row_forward(const SparseKdParams& p, int64_t row, const s_t* s,
                                                    int64_t label, const math::SparseConsts<acc_t>& k,
                                                    SparseShared<acc_t>& sh, math::SparseRowStats<acc_t>& r) {
  using Ops = math::ScalarOps<acc_t>;
  math::OnlineNorm<acc_t> n = math::empty_norm<acc_t>();
  for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
    math::norm_add(n, static_cast<acc_t>(s[j]), k.inv_temp, k.with_s1);
  }
  n = block_allreduce(n, NormMerge<acc_t>{k.inv_temp, k.with_s1}, sh.norm);
  if (!math::sparse_row_defined(n.max, n.z)) return acc_t(NAN);

  acc_t mass = 0;
  for (int64_t kk = threadIdx.x; kk < p.support; kk += blockDim.x) {
    const int64_t i = sparse_index(p, row, kk);
    if (i == -1) continue;
    mass += sparse_index_ok(p, i) ? math::teacher_prob(sparse_value<acc_t>(p, row, kk), k.logprobs).p : acc_t(NAN);
  }
  mass = block_allreduce(mass, SumOp{}, sh.acc);
  if (mass != mass) return acc_t(NAN);  // NaN in the values, or a bad index

  const math::SupportScale<acc_t> scale = math::support_scale(mass, k);
  const acc_t log_z = Ops::log(n.z);
  acc_t terms = 0;
  double on_support = 0;  // residual: sum_S exp((s_i - m) / T)
  for (int64_t kk = threadIdx.x; kk < p.support; kk += blockDim.x) {
    const int64_t i = sparse_index(p, row, kk);
    if (i == -1) continue;
    const math::TeacherProb<acc_t> t = math::teacher_prob(sparse_value<acc_t>(p, row, kk), k.logprobs);
    const acc_t x = (static_cast<acc_t>(s[i]) - n.max) * k.inv_temp;
    terms += math::support_term(t, x - log_z, scale);
    if (k.residual) on_support += static_cast<double>(Ops::exp(x));
  }
  terms = block_allreduce(terms, SumOp{}, sh.acc);
  acc_t off_support = 0;
  if (k.residual) {
    double all = 0;
    for (int64_t j = threadIdx.x; j < p.vocab; j += blockDim.x) {
      all += static_cast<double>(Ops::exp((static_cast<acc_t>(s[j]) - n.max) * k.inv_temp));
    }
    all = block_allreduce(all, SumOp{}, sh.wide);
    on_support = block_allreduce(on_support, SumOp{}, sh.wide);
    off_support = static_cast<acc_t>((all - on_support) / all);
  }
  r = math::sparse_row_stats(n.max, n.z, n.z1, mass, terms, off_support, k);
  return math::sparse_row_loss(r, k, k.with_ce ? static_cast<acc_t>(s[label]) : acc_t(0));
}

// Loss and stats of every row, and its gradient when p.grad_student is set (at the row
// weights of p.grad_loss). Every branch below is uniform over the block.
template <typename s_t, typename acc_t>
__global__ void __launch_bounds__(kSparseMaxThreads, 1) sparse_kd_forward_kernel(const SparseKdParams p) {
  __shared__ SparseShared<acc_t> sh;
  const math::SparseConsts<acc_t> k =
      math::make_sparse_consts<acc_t>(p.temperature, p.alpha, p.logprobs, p.tail);
  const acc_t nan = acc_t(NAN);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const s_t* s = static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
    s_t* gs = p.grad_student != nullptr ? static_cast<s_t*>(p.grad_student) + row * p.vocab : nullptr;
    const int64_t label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
    if (p.labels != nullptr && (label == p.ignore_index || !sparse_label_ok(p, label))) {
      const acc_t value = label == p.ignore_index ? acc_t(0) : nan;
      sparse_fill_outputs(p, row, value);
      sparse_fill_row(gs, p.vocab, value);
      continue;
    }
    math::SparseRowStats<acc_t> r{};
    const acc_t loss = sparse_row_forward(p, row, s, label, k, sh, r);
    if (loss != loss) {
      sparse_fill_outputs(p, row, nan);
      sparse_fill_row(gs, p.vocab, nan);
      continue;
    }
    if (threadIdx.x == 0) {
      static_cast<acc_t*>(p.loss)[row] = loss;
      math::store_sparse_stats(r, static_cast<acc_t*>(p.stats) + row * kSparseStatsCols);
    }
    if (gs != nullptr) sparse_gradient_row(p, row, s, gs, label, r, k, sparse_row_weight<acc_t>(p, row));
  }
}

// Gradients recomputed from the forward's statistics, at the row weights of p.grad_loss.
template <typename s_t, typename acc_t>
__global__ void __launch_bounds__(kSparseMaxThreads, 1) sparse_kd_backward_kernel(const SparseKdParams p) {
  const math::SparseConsts<acc_t> k =
      math::make_sparse_consts<acc_t>(p.temperature, p.alpha, p.logprobs, p.tail);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const s_t* s = static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
    s_t* gs = static_cast<s_t*>(p.grad_student) + row * p.vocab;
    const int64_t label = p.labels != nullptr ? p.labels[row] : int64_t(-1);
    if (p.labels != nullptr && label == p.ignore_index) {  // stats of ignored rows may hold anything
      sparse_fill_row(gs, p.vocab, acc_t(0));
      continue;
    }
    const math::SparseRowStats<acc_t> r =
        math::load_sparse_stats(static_cast<const acc_t*>(p.stats_in) + row * kSparseStatsCols);
    // A bad label, or a row the forward marked undefined (which covers bad indices).
    if ((p.labels != nullptr && !sparse_label_ok(p, label)) || r.max_s != r.max_s) {
      sparse_fill_row(gs, p.vocab, acc_t(NAN));
      continue;
    }
    sparse_gradient_row(p, row, s, gs, label, r, k, sparse_row_weight<acc_t>(p, row));
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

int sparse_threads(int64_t vocab) {
  const int64_t want = (vocab + kSparseElementsPerThread - 1) / kSparseElementsPerThread;
  const int64_t warps = (want + kWarp - 1) / kWarp;
  return static_cast<int>(std::min<int64_t>(kSparseMaxThreads, std::max<int64_t>(1, warps) * kWarp));
}

unsigned sparse_blocks(int64_t rows) {
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<unsigned>(std::min<int64_t>(rows, resident));
}

template <bool kBackward>
struct SparseLaunch {
  const SparseKdParams& p;
  template <typename s_t, typename acc_t>
  void run() const {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if constexpr (kBackward) {
      sparse_kd_backward_kernel<s_t, acc_t><<<sparse_blocks(p.rows), sparse_threads(p.vocab), 0, stream>>>(p);
    } else {
      sparse_kd_forward_kernel<s_t, acc_t><<<sparse_blocks(p.rows), sparse_threads(p.vocab), 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Calls launcher.run<s_t, acc_t>() for the student dtype (the teacher's values are read
// per entry in any float dtype).
template <typename Launcher>
void sparse_dispatch(const Launcher& launcher, at::ScalarType s) {
  switch (s) {
    case at::kDouble: launcher.template run<double, double>(); return;
    case at::kFloat: launcher.template run<float, float>(); return;
    case at::kHalf: launcher.template run<c10::Half, float>(); return;
    case at::kBFloat16: launcher.template run<c10::BFloat16, float>(); return;
    default: TORCH_CHECK(false, "sparse_kd_loss: unsupported student_logits dtype ", s);
  }
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "sparse_kd_loss: ", name, " must be a CUDA tensor here, got ", x.device());
}

void check_inputs_on_cuda(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values) {
  check_cuda(student, "student_logits");
  check_cuda(indices, "teacher_indices");
  check_cuda(values, "teacher_values");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kd_loss_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher_indices, const at::Tensor& teacher_values,
    const c10::optional<at::Tensor>& labels, double temperature, double alpha, bool logprobs, int64_t tail,
    int64_t ignore_index, int64_t reduction, bool student_requires_grad) {
  check_inputs_on_cuda(student, teacher_indices, teacher_values);
  const Reduction red = check_sparse_kd_reduction(reduction);
  const c10::cuda::CUDAGuard device_guard(student.device());
  SparseKdProblem problem = prepare_sparse_kd(student, teacher_indices, teacher_values, labels, temperature, alpha,
                                              logprobs, tail, ignore_index);
  SparseKdParams& p = problem.params;
  FusedRowOutputs out = prepare_sparse_kd_fused(problem, red, student_requires_grad);
  // batchmean divides by the counted rows: a device tensor, never read on the host.
  at::Tensor count;
  if (red == Reduction::BatchMean) {
    count = problem.labels.defined()
                ? problem.labels.ne(ignore_index).sum().clamp_min(1).to(problem.acc_dtype)
                : at::full({}, static_cast<double>(std::max<int64_t>(p.rows, 1)), out.loss.options());
  }
  if (p.rows > 0) {
    const at::Tensor scale = count.defined() && student_requires_grad ? count.reciprocal() : at::Tensor();
    p.grad_loss = scale.defined() ? scale.const_data_ptr() : nullptr;
    p.grad_loss_stride = 0;
    sparse_dispatch(SparseLaunch<false>{p}, problem.student.scalar_type());
  }
  if (red == Reduction::Sum) out.loss.copy_(out.rows_loss.sum());
  if (red == Reduction::BatchMean) out.loss.copy_(out.rows_loss.sum() / count);
  return {out.loss, out.stats, out.grad_student};
}

at::Tensor sparse_kd_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                        const at::Tensor& teacher_indices, const at::Tensor& teacher_values,
                                        const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                                        double temperature, double alpha, bool logprobs, int64_t tail,
                                        int64_t ignore_index) {
  check_inputs_on_cuda(student, teacher_indices, teacher_values);
  const c10::cuda::CUDAGuard device_guard(student.device());
  SparseKdProblem problem = prepare_sparse_kd(student, teacher_indices, teacher_values, labels, temperature, alpha,
                                              logprobs, tail, ignore_index);
  SparseKdParams& p = problem.params;
  const RowBackwardInputs inputs = prepare_sparse_kd_backward(problem, grad_loss, stats);
  at::Tensor grad = empty_gradient_like(student, true);
  if (p.rows == 0) return grad;
  p.grad_student = grad.data_ptr();
  sparse_dispatch(SparseLaunch<true>{p}, problem.student.scalar_type());
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("sparse_kd_loss_fused", &kdfast::cuda::sparse_kd_loss_fused_cuda);
  m.impl("sparse_kd_loss_backward", &kdfast::cuda::sparse_kd_loss_backward_cuda);
}
