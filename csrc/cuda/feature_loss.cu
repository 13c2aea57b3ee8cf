// CUDA kernels of feature_loss and their host functions. The formulas live in
// ../feature_loss_math.h, shared with the CPU kernels.
//
// One block per row (blocks stride over the rows), threads striding over the features
// with coalesced element accesses; row sums by block_allreduce (common.cuh), so results
// are bitwise reproducible. The same kernel serves the fused forward (loss, stats and
// gradients at the weight read from a device tensor: the mean's 1 / (selected rows * D)
// or 1 / selected rows) and the recomputing backward (per-row weights, the row sums read
// from the stats). A row's later passes read it back from L2.
//
// No host synchronisation (CUDA-graph capturable): the mask count, the mean's weight
// and the reduction are device tensors.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../feature_loss.h"
#include "../feature_loss_math.h"
#include "common.cuh"

namespace kdfast {
namespace math {

// Warp shuffle of three row sums, found by block_allreduce (common.cuh) through
// argument-dependent lookup.
template <typename acc_t>
__device__ __forceinline__ RowTriple<acc_t> shfl_xor(const RowTriple<acc_t>& v, int mask) {
  return {__shfl_xor_sync(0xffffffffu, v.a, mask), __shfl_xor_sync(0xffffffffu, v.b, mask),
          __shfl_xor_sync(0xffffffffu, v.c, mask)};
}

}  // namespace math

namespace cuda {
namespace {

constexpr int kFeatureThreads = 256;
constexpr int kFeatureWarps = kFeatureThreads / kWarp;
constexpr int kFeatureBlocksPerSM = 8;

template <typename acc_t>
struct SumTriple {
  __device__ __forceinline__ math::RowTriple<acc_t> operator()(const math::RowTriple<acc_t>& x,
                                                              const math::RowTriple<acc_t>& y) const {
    return x + y;
  }
};

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_acc(const T* p, int64_t j) {
  return static_cast<acc_t>(static_cast<float>(p[j]));
}
template <>
__device__ __forceinline__ double load_acc<double, double>(const double* p, int64_t j) {
  return p[j];
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_as(T* p, int64_t j, acc_t v) {
  p[j] = static_cast<T>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ void store_as<double, double>(double* p, int64_t j, double v) {
  p[j] = v;
}

// Loss, stats and gradients (fused forward) or gradients (backward: p.stats_in set,
// p.loss null) of the rows blockIdx.x, blockIdx.x + gridDim.x, ...
template <FeatureKind kind, bool kNormalize, typename s_t, typename t_t, typename acc_t>
__global__ void __launch_bounds__(kFeatureThreads) feature_loss_kernel(const FeatureLossParams p) {
  using Ops = math::ScalarOps<acc_t>;
  using Triple = math::RowTriple<acc_t>;
  constexpr bool kDots = kNormalize || kind == FeatureKind::Cosine;
  constexpr bool kLinear = kind == FeatureKind::Cosine || kind == FeatureKind::MSE;  // with kDots
  __shared__ Triple smem[kFeatureWarps];
  const SumTriple<acc_t> sum;
  const int64_t dim = p.dim;
  const int64_t tid = threadIdx.x, step = blockDim.x;
  auto* const loss = static_cast<acc_t*>(p.loss);
  auto* const stats = static_cast<acc_t*>(p.stats);
  const auto* const stats_in = static_cast<const acc_t*>(p.stats_in);
  const auto* const weights = static_cast<const acc_t*>(p.grad_loss);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    s_t* const gs = p.grad_student == nullptr ? nullptr : static_cast<s_t*>(p.grad_student) + row * dim;
    t_t* const gt = p.grad_teacher == nullptr ? nullptr : static_cast<t_t*>(p.grad_teacher) + row * dim;
    if (p.mask != nullptr && !p.mask[row]) {  // uniform over the block
      for (int64_t j = tid; j < dim; j += step) {
        if (gs != nullptr) gs[j] = static_cast<s_t>(0.0f);
        if (gt != nullptr) gt[j] = static_cast<t_t>(0.0f);
      }
      if (tid == 0 && loss != nullptr) loss[row] = acc_t(0);
      if (tid == 0 && stats != nullptr) {
        for (int c = 0; c < kFeatureStatsCols; ++c) stats[row * kFeatureStatsCols + c] = acc_t(0);
      }
      continue;
    }
    const s_t* const s = static_cast<const s_t*>(p.student) + p.student_layout.offset(row);
    const t_t* const t = static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(row);
    const acc_t w = weights == nullptr ? acc_t(1) : weights[row * p.grad_loss_stride];
    const bool grad = gs != nullptr || gt != nullptr;

    if constexpr (!kDots) {
      // mse / l1 / smooth_l1: loss and gradients in one pass.
      acc_t part = 0;
      for (int64_t j = tid; j < dim; j += step) {
        const acc_t d = load_acc<acc_t>(s, j) - load_acc<acc_t>(t, j);
        part += math::element_loss<kind, Ops>(d);
        if (grad) {
          const acc_t g = math::element_grad<kind, Ops>(d);
          if (gs != nullptr) store_as(gs, j, g * w);
          if (gt != nullptr) store_as(gt, j, g * -w);
        }
      }
      if (loss != nullptr) {
        const Triple total = block_allreduce(Triple{part, acc_t(0), acc_t(0)}, sum, smem);
        if (tid == 0) {
          loss[row] = total.a;
          if (stats != nullptr) {
            for (int c = 0; c < kFeatureStatsCols; ++c) stats[row * kFeatureStatsCols + c] = acc_t(0);
          }
        }
      }
    } else {
      // Pass 1 (or the forward's stats): ||s||^2, ||t||^2, s.t.
      Triple dots;
      if (stats_in != nullptr) {
        const acc_t* in = stats_in + row * kFeatureStatsCols;
        dots = {in[0], in[1], in[2]};
      } else {
        Triple part{acc_t(0), acc_t(0), acc_t(0)};
        for (int64_t j = tid; j < dim; j += step) {
          const acc_t sv = load_acc<acc_t>(s, j), tv = load_acc<acc_t>(t, j);
          part.a += sv * sv;
          part.b += tv * tv;
          part.c += sv * tv;
        }
        dots = block_allreduce(part, sum, smem);
        if (tid == 0 && stats != nullptr) {
          stats[row * kFeatureStatsCols + 0] = dots.a;
          stats[row * kFeatureStatsCols + 1] = dots.b;
          stats[row * kFeatureStatsCols + 2] = dots.c;
        }
      }
      const math::FeatureRow<acc_t> r = math::feature_row<kind, kNormalize>(dots, w);
      acc_t row_loss = r.loss;
      if constexpr (kLinear) {
        // Cosine (loss known) and mse with normalize: gradients a u + b v, mse's loss.
        constexpr bool kLoss = kind == FeatureKind::MSE;
        if (grad || (kLoss && loss != nullptr)) {
          acc_t part = 0;
          for (int64_t j = tid; j < dim; j += step) {
            acc_t u = load_acc<acc_t>(s, j), v = load_acc<acc_t>(t, j);
            if constexpr (kNormalize) {
              u *= r.s.inv;
              v *= r.t.inv;
            }
            if constexpr (kLoss) part += (u - v) * (u - v);
            if (gs != nullptr) store_as(gs, j, r.grad.su * u + r.grad.sv * v);
            if (gt != nullptr) store_as(gt, j, r.grad.tu * u + r.grad.tv * v);
          }
          if (kLoss && loss != nullptr) row_loss = block_allreduce(Triple{part, acc_t(0), acc_t(0)}, sum, smem).a;
        }
      } else {
        // l1 / smooth_l1 with normalize: loss, s.g_u, t.g_u, then the gradients.
        Triple part{acc_t(0), acc_t(0), acc_t(0)};
        for (int64_t j = tid; j < dim; j += step) {
          const acc_t sv = load_acc<acc_t>(s, j), tv = load_acc<acc_t>(t, j);
          const acc_t d = sv * r.s.inv - tv * r.t.inv;
          part.a += math::element_loss<kind, Ops>(d);
          const acc_t g = math::element_grad<kind, Ops>(d);
          part.b += sv * g;
          part.c += tv * g;
        }
        const Triple sums = block_allreduce(part, sum, smem);
        row_loss = sums.a;
        if (grad) {
          const math::ElementChain<acc_t> c = math::element_chain(r, sums.b, sums.c, w);
          for (int64_t j = tid; j < dim; j += step) {
            const acc_t sv = load_acc<acc_t>(s, j), tv = load_acc<acc_t>(t, j);
            const acc_t g = math::element_grad<kind, Ops>(sv * r.s.inv - tv * r.t.inv);
            if (gs != nullptr) store_as(gs, j, c.gu_s * g + c.s_s * sv);
            if (gt != nullptr) store_as(gt, j, c.gu_t * g + c.t_t * tv);
          }
        }
      }
      if (tid == 0 && loss != nullptr) loss[row] = row_loss;
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct FeatureLauncher {
  const FeatureLossParams& p;

  template <FeatureKind kind, bool kNormalize, typename s_t, typename t_t, typename acc_t>
  void run() const {
    // About four features per thread, whole warps, at most kFeatureThreads.
    const int64_t want = ceil_div(ceil_div(p.dim, 4), kWarp) * kWarp;
    const int threads = static_cast<int>(std::clamp<int64_t>(want, kWarp, kFeatureThreads));
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::min<int64_t>(p.rows, sms * kFeatureBlocksPerSM);
    feature_loss_kernel<kind, kNormalize, s_t, t_t, acc_t>
        <<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename s_t, typename t_t, typename acc_t>
void dispatch_kind(const FeatureLauncher& launcher, const FeatureLossParams& p) {
  auto with_norm = [&](auto kind_tag) {
    constexpr FeatureKind kind = decltype(kind_tag)::value;
    if (p.normalize) {
      launcher.run<kind, true, s_t, t_t, acc_t>();
    } else {
      launcher.run<kind, false, s_t, t_t, acc_t>();
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

template <typename s_t>
void dispatch_teacher(const FeatureLauncher& launcher, const FeatureLossParams& p, at::ScalarType t) {
  switch (t) {
    case at::kFloat: dispatch_kind<s_t, float, float>(launcher, p); return;
    case at::kHalf: dispatch_kind<s_t, c10::Half, float>(launcher, p); return;
    case at::kBFloat16: dispatch_kind<s_t, c10::BFloat16, float>(launcher, p); return;
    default: TORCH_CHECK(false, "feature_loss: unsupported teacher dtype ", t);
  }
}

// Runs the kernel for the options and the input dtypes.
void launch_feature_loss(const FeatureLossParams& p, at::ScalarType s, at::ScalarType t) {
  const FeatureLauncher launcher{p};
  switch (s) {
    case at::kDouble:
      TORCH_CHECK(t == at::kDouble, "feature_loss: a float64 student needs a float64 teacher, got ", t);
      dispatch_kind<double, double, double>(launcher, p);
      return;
    case at::kFloat: dispatch_teacher<float>(launcher, p, t); return;
    case at::kHalf: dispatch_teacher<c10::Half>(launcher, p, t); return;
    case at::kBFloat16: dispatch_teacher<c10::BFloat16>(launcher, p, t); return;
    default: TORCH_CHECK(false, "feature_loss: unsupported student dtype ", s);
  }
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "feature_loss: ", name, " must be a CUDA tensor here, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_loss_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask, int64_t kind,
    bool normalize, int64_t reduction, bool student_requires_grad, bool teacher_requires_grad) {
  check_cuda(student, "student");
  check_cuda(teacher, "teacher");
  const Reduction red = check_feature_reduction(reduction);
  const c10::cuda::CUDAGuard device_guard(student.device());
  FeatureLossProblem problem = prepare_feature_loss(student, teacher, mask, kind, normalize);
  FeatureLossParams& p = problem.params;
  FeatureLossFusedOutputs out = prepare_feature_loss_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // The mean's divisor, selected rows (at least 1) times D for the element-wise kinds: a
  // device tensor (float64), never read on the host.
  at::Tensor divisor;
  if (red == Reduction::BatchMean) {
    const double per_row = math::feature_elementwise(p.kind) ? static_cast<double>(p.dim) : 1.0;
    const auto f64 = problem.student.options().dtype(at::kDouble);
    divisor = problem.mask.defined()
                  ? problem.mask.sum().clamp_min(1).to(at::kDouble).mul_(per_row)
                  : at::full({}, static_cast<double>(std::max<int64_t>(p.rows, 1)) * per_row, f64);
  }
  const bool with_grad = student_requires_grad || teacher_requires_grad;
  if (p.rows > 0) {
    const at::Tensor weight = divisor.defined() && with_grad ? divisor.reciprocal().to(problem.acc_dtype) : at::Tensor();
    p.grad_loss = weight.defined() ? weight.const_data_ptr() : nullptr;
    p.grad_loss_stride = 0;
    launch_feature_loss(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  }
  if (red == Reduction::Sum) out.loss.copy_(out.rows_loss.sum());
  if (red == Reduction::BatchMean) out.loss.copy_(out.rows_loss.sum(at::kDouble) / divisor);
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> feature_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& mask, const at::Tensor& stats, int64_t kind, bool normalize,
    bool student_requires_grad, bool teacher_requires_grad) {
  check_cuda(student, "student");
  check_cuda(teacher, "teacher");
  const c10::cuda::CUDAGuard device_guard(student.device());
  FeatureLossProblem problem = prepare_feature_loss(student, teacher, mask, kind, normalize);
  FeatureLossParams& p = problem.params;
  const FeatureLossBackwardInputs inputs = prepare_feature_loss_backward(problem, grad_loss, stats);
  at::Tensor grad_s = empty_gradient_like(student, student_requires_grad);
  at::Tensor grad_t = empty_gradient_like(teacher, teacher_requires_grad);
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  launch_feature_loss(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("feature_loss_fused", &kdfast::cuda::feature_loss_fused_cuda);
  m.impl("feature_loss_backward", &kdfast::cuda::feature_loss_backward_cuda);
}
