// CUDA kernels of attention_transfer and their host functions; the formulas live in
// ../attention_transfer_math.h, shared with the CPU kernels.
//
// Three small kernels, each obviously correct rather than tuned:
//  1. attention_map_kernel: A[n, j] = (1 / C) sum_c |x[n, c, j]|^p of one input into a
//     temporary [N, 2, P] buffer (2 N H W floats: 2 / C of a float32 input). NCHW rows:
//     a warp covers 32 positions (coalesced), the 8 warps of a block split the
//     channels and add up in shared memory; channels_last: a warp per position, its
//     lanes over the channels (coalesced), a shuffle reduction.
//  2. attention_stats_kernel: a block per sample, the norms, inner products and squared
//     distance of the two maps (block_allreduce), written as the per-sample statistics.
//  3. attention_gradient_kernel: per position the weight w[j] from the maps and the
//     statistics, then dL/dx[c, j] = w[j] |x|^(p-1) sign(x), same thread layout as 1.
// The fused forward runs 1 (both inputs), 2, and 3 for the inputs that need a gradient
// (the inputs are read twice); the recomputing backward runs 1 and 3 with the forward's
// statistics and the loss's gradient. The loss is a device-side sum of the statistics:
// no host synchronisation. Every reduction has a fixed order (bitwise reproducible).
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
#include <type_traits>

#include "../attention_transfer.h"
#include "../attention_transfer_math.h"
#include "common.cuh"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kMaxBlocks = int64_t(1) << 24;  // grid-stride loops beyond

KDFAST_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t tiles) { return static_cast<unsigned>(std::max<int64_t>(1, std::min(tiles, kMaxBlocks))); }

// The input a kernel reads (student or teacher) and where its gradient goes.
template <typename T>
struct MapArgs {
  const T* x;
  T* grad;  // or nullptr
  MapLayout layout;
  int64_t channels;
  int which;  // 0 student, 1 teacher: the row of the [N, 2, P] maps
};

// Channel loops unroll 4 deep; not around pow (double pow is a call: values kept across
// it would spill).
template <PowerKind kind>
constexpr int kChannelUnroll = kind == PowerKind::General ? 1 : 4;

template <PowerKind kind, typename T, typename acc_t>
__device__ __forceinline__ acc_t power_of(T v, acc_t p) {
  return math::power<kind, math::AtScalarOps<acc_t>>(static_cast<acc_t>(v), p);
}

// maps[n, which, j] = (1 / C) sum_c |x[n, c, j]|^p.
template <PowerKind kind, typename T, typename acc_t, bool kChannelsInner>
__global__ void __launch_bounds__(kThreads) attention_map_kernel(MapArgs<T> in, int64_t samples, int64_t positions,
                                                                 acc_t p, acc_t* __restrict__ maps) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const acc_t channels = static_cast<acc_t>(in.channels);
  if constexpr (!kChannelsInner) {
    __shared__ acc_t partial[kWarps][kWarp];
    const int64_t chunks = ceil_div(positions, kWarp);
    for (int64_t tile = blockIdx.x; tile < samples * chunks; tile += gridDim.x) {
      const int64_t n = tile / chunks, j = (tile % chunks) * kWarp + lane;
      acc_t sum = acc_t(0);
      if (j < positions) {
        const T* x = in.x + in.layout.offset(n, 0, j);
        const int64_t cs = in.layout.channel_stride;
#pragma unroll kChannelUnroll<kind>
        for (int64_t c = warp; c < in.channels; c += kWarps) sum += power_of<kind>(x[c * cs], p);
      }
      partial[warp][lane] = sum;
      __syncthreads();
      if (warp == 0 && j < positions) {
        acc_t total = partial[0][lane];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) total += partial[w][lane];
        maps[(n * 2 + in.which) * positions + j] = total / channels;
      }
      __syncthreads();  // partial is reused by the next tile
    }
  } else {
    const int64_t chunks = ceil_div(positions, kWarps);
    for (int64_t tile = blockIdx.x; tile < samples * chunks; tile += gridDim.x) {
      const int64_t n = tile / chunks, j = (tile % chunks) * kWarps + warp;
      if (j >= positions) continue;  // warp-uniform
      const T* x = in.x + in.layout.offset(n, 0, j);
      acc_t sum = acc_t(0);
#pragma unroll kChannelUnroll<kind>
      for (int64_t c = lane; c < in.channels; c += kWarp) sum += power_of<kind>(x[c], p);
#pragma unroll
      for (int mask = kWarp / 2; mask > 0; mask >>= 1) sum += shfl_xor(sum, mask);
      if (lane == 0) maps[(n * 2 + in.which) * positions + j] = sum / channels;
    }
  }
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// stats[n, :] from maps[n, 0, :] (student) and maps[n, 1, :] (teacher).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_stats_kernel(const acc_t* __restrict__ maps, int64_t samples,
                                                                   int64_t positions, acc_t* __restrict__ stats) {
  using Ops = math::AtScalarOps<acc_t>;
  __shared__ acc_t smem[kWarps];
  for (int64_t n = blockIdx.x; n < samples; n += gridDim.x) {
    const acc_t* map_s = maps + n * 2 * positions;
    const acc_t* map_t = map_s + positions;
    acc_t ss = acc_t(0), tt = acc_t(0);
    for (int64_t j = threadIdx.x; j < positions; j += blockDim.x) {
      ss += map_s[j] * map_s[j];
      tt += map_t[j] * map_t[j];
    }
    const acc_t norm_s = ::sqrt(block_allreduce(ss, Sum{}, smem));
    const acc_t norm_t = ::sqrt(block_allreduce(tt, Sum{}, smem));
    const acc_t den_s = math::norm_denominator(norm_s), den_t = math::norm_denominator(norm_t);
    acc_t sq = acc_t(0), dot_s = acc_t(0), dot_t = acc_t(0);
    for (int64_t j = threadIdx.x; j < positions; j += blockDim.x) {
      acc_t a_s, a_t, d;
      math::normalized<Ops>(map_s[j], map_t[j], den_s, den_t, a_s, a_t, d);
      sq += d * d;
      dot_s += a_s * d;
      dot_t += a_t * d;
    }
    sq = block_allreduce(sq, Sum{}, smem);
    dot_s = block_allreduce(dot_s, Sum{}, smem);
    dot_t = block_allreduce(dot_t, Sum{}, smem);
    if (threadIdx.x == 0) {
      acc_t* st = stats + n * kAtStatsCols;
      st[kAtNormS] = norm_s;
      st[kAtNormT] = norm_t;
      st[kAtDotS] = dot_s;
      st[kAtDotT] = dot_t;
      st[kAtSqDist] = sq;
    }
  }
}

// The weight of position j of sample n for the input `which`.
template <typename acc_t>
__device__ __forceinline__ acc_t position_weight(const AttentionTransferParams& p, const acc_t* maps,
                                                 const acc_t* stats, acc_t weight, int64_t n, int64_t j,
                                                 int which) {
  using Ops = math::AtScalarOps<acc_t>;
  const math::PositionWeightConsts<acc_t> k = math::position_weight_consts<acc_t>(
      stats + n * kAtStatsCols, weight, p.samples, p.positions, p.channels_s, p.channels_t, static_cast<acc_t>(p.p));
  const acc_t* map_s = maps + n * 2 * p.positions;
  acc_t w_s, w_t;
  math::position_weights<Ops>(map_s[j], map_s[p.positions + j], k, w_s, w_t);
  return which == 0 ? w_s : w_t;
}

// grad[n, c, j] = w[n, j] |x[n, c, j]|^(p-1) sign(x[n, c, j]) (the gradient's layout).
template <PowerKind kind, typename T, typename acc_t, bool kChannelsInner>
__global__ void __launch_bounds__(kThreads) attention_gradient_kernel(MapArgs<T> in, AttentionTransferParams p,
                                                                      const acc_t* __restrict__ maps,
                                                                      const acc_t* __restrict__ stats,
                                                                      const acc_t* __restrict__ grad_loss) {
  using Ops = math::AtScalarOps<acc_t>;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const acc_t weight = grad_loss == nullptr ? acc_t(1) : *grad_loss;
  const acc_t pm1 = static_cast<acc_t>(p.p - 1.0);
  const int64_t positions = p.positions, channels = in.channels;
  if constexpr (!kChannelsInner) {
    const int64_t chunks = ceil_div(positions, kWarp);
    for (int64_t tile = blockIdx.x; tile < p.samples * chunks; tile += gridDim.x) {
      const int64_t n = tile / chunks, j = (tile % chunks) * kWarp + lane;
      if (j >= positions) continue;
      const acc_t w = position_weight(p, maps, stats, weight, n, j, in.which);
      const T* x = in.x + in.layout.offset(n, 0, j);
      T* g = in.grad + n * channels * positions + j;
      const int64_t cs = in.layout.channel_stride;
#pragma unroll kChannelUnroll<kind>
      for (int64_t c = warp; c < channels; c += kWarps) {
        g[c * positions] = static_cast<T>(w * math::power_slope<kind, Ops>(static_cast<acc_t>(x[c * cs]), pm1));
      }
    }
  } else {
    const int64_t chunks = ceil_div(positions, kWarps);
    for (int64_t tile = blockIdx.x; tile < p.samples * chunks; tile += gridDim.x) {
      const int64_t n = tile / chunks, j = (tile % chunks) * kWarps + warp;
      if (j >= positions) continue;
      const acc_t w = position_weight(p, maps, stats, weight, n, j, in.which);
      const T* x = in.x + in.layout.offset(n, 0, j);
      T* g = in.grad + (n * positions + j) * channels;
#pragma unroll kChannelUnroll<kind>
      for (int64_t c = lane; c < channels; c += kWarp) {
        g[c] = static_cast<T>(w * math::power_slope<kind, Ops>(static_cast<acc_t>(x[c]), pm1));
      }
    }
  }
}

// Calls f.template operator()<kind, T, acc_t, channels_inner>() for one input.
template <typename F>
void dispatch_input(at::ScalarType dtype, PowerKind kind, bool channels_inner, const F& f) {
  auto with_layout = [&](auto kind_tag, auto type_tag, auto acc_tag) {
    constexpr PowerKind k = decltype(kind_tag)::value;
    using T = decltype(type_tag);
    using acc_t = decltype(acc_tag);
    if (channels_inner) {
      f.template operator()<k, T, acc_t, true>();
    } else {
      f.template operator()<k, T, acc_t, false>();
    }
  };
  auto with_type = [&](auto kind_tag) {
    switch (dtype) {
      case at::kDouble: with_layout(kind_tag, double{}, double{}); return;
      case at::kFloat: with_layout(kind_tag, float{}, float{}); return;
      case at::kHalf: with_layout(kind_tag, c10::Half{}, float{}); return;
      case at::kBFloat16: with_layout(kind_tag, c10::BFloat16{}, float{}); return;
      default: TORCH_CHECK(false, "attention_transfer_loss: unsupported feature map dtype ", dtype);
    }
  };
  using K = PowerKind;
  switch (kind) {
    case K::One: with_type(std::integral_constant<K, K::One>{}); return;
    case K::Two: with_type(std::integral_constant<K, K::Two>{}); return;
    case K::General: with_type(std::integral_constant<K, K::General>{}); return;
  }
}

// Launches attention_map_kernel for one input.
struct MapLauncher {
  const AttentionTransferParams& p;
  const void* x;
  const MapLayout& layout;
  int64_t channels;
  int which;
  void* maps;
  template <PowerKind kind, typename T, typename acc_t, bool kCI>
  void operator()() const {
    const int64_t per_tile = kCI ? kWarps : kWarp;
    const MapArgs<T> in{static_cast<const T*>(x), nullptr, layout, channels, which};
    attention_map_kernel<kind, T, acc_t, kCI>
        <<<grid_for(p.samples * ceil_div(p.positions, per_tile)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            in, p.samples, p.positions, static_cast<acc_t>(p.p), static_cast<acc_t*>(maps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Launches attention_gradient_kernel for one input.
struct GradientLauncher {
  const AttentionTransferParams& p;
  const void* x;
  void* grad;
  const MapLayout& layout;
  int64_t channels;
  int which;
  const void* maps;
  const void* stats;
  const void* grad_loss;  // or nullptr
  template <PowerKind kind, typename T, typename acc_t, bool kCI>
  void operator()() const {
    const int64_t per_tile = kCI ? kWarps : kWarp;
    const MapArgs<T> in{static_cast<const T*>(x), static_cast<T*>(grad), layout, channels, which};
    attention_gradient_kernel<kind, T, acc_t, kCI>
        <<<grid_for(p.samples * ceil_div(p.positions, per_tile)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            in, p, static_cast<const acc_t*>(maps), static_cast<const acc_t*>(stats),
            static_cast<const acc_t*>(grad_loss));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "attention_transfer_loss: ", name, " must be a CUDA tensor here, got ", x.device());
}

// The [N, 2, P] maps of both inputs.
at::Tensor attention_maps(const AttentionTransferProblem& problem) {
  const AttentionTransferParams& p = problem.params;
  at::Tensor maps = at::empty({p.samples, 2, p.positions}, problem.student.options().dtype(problem.acc_dtype));
  dispatch_input(problem.student.scalar_type(), p.kind, p.student_layout.channels_inner,
                 MapLauncher{p, p.student, p.student_layout, p.channels_s, 0, maps.data_ptr()});
  dispatch_input(problem.teacher.scalar_type(), p.kind, p.teacher_layout.channels_inner,
                 MapLauncher{p, p.teacher, p.teacher_layout, p.channels_t, 1, maps.data_ptr()});
  return maps;
}

void launch_gradients(const AttentionTransferProblem& problem, const at::Tensor& maps, const void* stats,
                      const void* grad_loss) {
  const AttentionTransferParams& p = problem.params;
  if (p.grad_student != nullptr) {
    dispatch_input(problem.student.scalar_type(), p.kind, p.student_layout.channels_inner,
                   GradientLauncher{p, p.student, p.grad_student, p.student_layout, p.channels_s, 0,
                                    maps.const_data_ptr(), stats, grad_loss});
  }
  if (p.grad_teacher != nullptr) {
    dispatch_input(problem.teacher.scalar_type(), p.kind, p.teacher_layout.channels_inner,
                   GradientLauncher{p, p.teacher, p.grad_teacher, p.teacher_layout, p.channels_t, 1,
                                    maps.const_data_ptr(), stats, grad_loss});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_transfer_fused_cuda(
    const at::Tensor& student, const at::Tensor& teacher, double p, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cuda(student, "student_feat");
  check_cuda(teacher, "teacher_feat");
  const c10::cuda::CUDAGuard device_guard(student.device());
  AttentionTransferProblem problem = prepare_attention_transfer(student, teacher, p);
  AttentionTransferParams& k = problem.params;
  const auto acc = problem.student.options().dtype(problem.acc_dtype);
  at::Tensor stats = at::empty({k.samples, kAtStatsCols}, acc);
  at::Tensor grad_s = attention_gradient_like(problem.student, k.student_layout, student_requires_grad);
  at::Tensor grad_t = attention_gradient_like(problem.teacher, k.teacher_layout, teacher_requires_grad);
  k.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  k.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  const at::Tensor maps = attention_maps(problem);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (problem.acc_dtype == at::kDouble) {
    attention_stats_kernel<double><<<grid_for(k.samples), kThreads, 0, stream>>>(
        maps.const_data_ptr<double>(), k.samples, k.positions, stats.data_ptr<double>());
  } else {
    attention_stats_kernel<float><<<grid_for(k.samples), kThreads, 0, stream>>>(
        maps.const_data_ptr<float>(), k.samples, k.positions, stats.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_gradients(problem, maps, stats.const_data_ptr(), nullptr);
  // The mean over N * P: a device-side sum (no synchronisation).
  at::Tensor loss = stats.select(1, kAtSqDist).sum().div_(static_cast<double>(k.samples) *
                                                           static_cast<double>(k.positions));
  return {loss, stats, grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_backward_cuda(const at::Tensor& grad_loss,
                                                                    const at::Tensor& student,
                                                                    const at::Tensor& teacher,
                                                                    const at::Tensor& stats, double p,
                                                                    bool student_requires_grad,
                                                                    bool teacher_requires_grad) {
  check_cuda(student, "student_feat");
  check_cuda(teacher, "teacher_feat");
  const c10::cuda::CUDAGuard device_guard(student.device());
  AttentionTransferProblem problem = prepare_attention_transfer(student, teacher, p);
  AttentionTransferParams& k = problem.params;
  const AttentionTransferBackwardInputs inputs = prepare_attention_transfer_backward(problem, grad_loss, stats);
  at::Tensor grad_s = attention_gradient_like(problem.student, k.student_layout, student_requires_grad);
  at::Tensor grad_t = attention_gradient_like(problem.teacher, k.teacher_layout, teacher_requires_grad);
  if (!(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  k.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  k.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  const at::Tensor maps = attention_maps(problem);
  launch_gradients(problem, maps, inputs.stats.const_data_ptr(), inputs.grad_loss.const_data_ptr());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("attention_transfer_fused", &kdfast::cuda::attention_transfer_fused_cuda);
  m.impl("attention_transfer_backward", &kdfast::cuda::attention_transfer_backward_cuda);
}
