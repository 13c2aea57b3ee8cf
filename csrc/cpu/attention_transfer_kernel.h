// CPU kernels of attention_transfer, written once with at::vec::Vectorized and compiled
// once per instruction set (attention_transfer_kernel_{default,avx2,avx512}.cpp define
// CPU_CAPABILITY). The formulas come from ../attention_transfer_math.h (shared with CUDA).
//
// A thread takes one sample at a time, in phases:
//   1. the attention maps A_t and A_s: channel sums of |x|^p, vectorised along the
//      positions (NCHW rows: a few channels per step, the sums in an L1-resident buffer
//      of H * W values) or along the channels (channels_last); the only phase that reads
//      the inputs from memory,
//   2. the sample's statistics (norms, inner products, squared distance) from the maps,
//   3. with gradients: the position weights w[j] (in place of the maps), then
//      dL/dx[c, j] = w[j] |x|^(p-1) sign(x), re-reading the sample while it is still in
//      cache (L2 / L3: a 256 x 56 x 56 float32 sample is 3.2 MB) and writing the
//      gradient with streaming stores (GradStore).
// The gradient needs the whole sample's norms, so the sample cannot be split into
// cache-sized blocks between phases 1 and 3; each input is still read from memory once.
// Per thread, two buffers of H * W accumulators; nothing else is allocated.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "../attention_transfer.h"
#include "../attention_transfer_math.h"
#include "attention_transfer_cpu.h"
#include "vec_common.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

// The vector policy of attention_transfer_math.h: kd_loss's, with abs and pow. In float
// pow(x, y) of x >= 0 is exp(y log x) (x = 0 gives exp(-inf) = 0), with 1-ulp log and
// exp: a relative error of about |y log x| ulp (1e-6 for |x| ~ 1e3, y = 2.5) at half
// the cost of a general pow, which bounds the kernels for p other than 1 and 2. float64
// (gradcheck) keeps the 1-ulp pow.
template <typename acc_t>
struct AtVecOps : VecOps<acc_t> {
  using V = Vectorized<acc_t>;
  static V abs(const V& x) { return x.abs(); }
  static V pow(const V& x, const V& y) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return (y * x.log()).exp();
    } else {
      return x.pow(y);
    }
  }
};

// Whole vectors of a gradient that is written once and not read again in the call: on
// the AVX builds, streaming (non-temporal) stores where the address is on their grid
// (kAlign bytes), which skip reading the cache line before writing it (a third less
// memory traffic for the write). Call stream_fence() before the thread finishes.
template <typename T, typename acc_t>
struct GradStore {
  static constexpr bool kStreams = false;
  static constexpr uintptr_t kAlign = 1;
  static void store(const Vectorized<acc_t>& v, T* p) { VecIO<T, acc_t>::store(v, p, Vectorized<acc_t>::size()); }
};
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <typename acc_t>
struct StreamingGradStore {
  static constexpr bool kStreams = true;
  static constexpr uintptr_t kAlign = sizeof(Vectorized<acc_t>);
  static void store(const Vectorized<acc_t>& v, acc_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) _mm512_stream_ps(p, v); else _mm512_stream_pd(p, v);
#else
    if constexpr (std::is_same_v<acc_t, float>) _mm256_stream_ps(p, v); else _mm256_stream_pd(p, v);
#endif
  }
};
// float16 / bfloat16: the W converted elements are the low half of at::vec's conversion.
template <typename T>
struct StreamingReducedGradStore {
  static constexpr bool kStreams = true;
  static constexpr uintptr_t kAlign = sizeof(Vectorized<float>) / 2;
  static void store(const Vectorized<float>& v, T* p) {
    const Vectorized<T> h = at::vec::convert_from_float<T>(v, v);
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(h));
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(h));
#endif
  }
};
template <>
struct GradStore<float, float> : StreamingGradStore<float> {};
template <>
struct GradStore<double, double> : StreamingGradStore<double> {};
template <>
struct GradStore<c10::BFloat16, float> : StreamingReducedGradStore<c10::BFloat16> {};
template <>
struct GradStore<c10::Half, float> : StreamingReducedGradStore<c10::Half> {};
#endif

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();  // streaming stores are weakly ordered: visible before the thread reports done
#endif
}

// Reading one feature map (element type T) of a sample and writing its gradient.
template <PowerKind kind, typename T, typename acc_t>
struct MapKernel {
  using Vec = Vectorized<acc_t>;
  using Ops = AtVecOps<acc_t>;
  using IO = VecIO<T, acc_t>;
  static constexpr int64_t W = Vec::size();

  const Vec vp, vpm1;
  const int64_t channels, positions;
  const MapLayout layout;

  MapKernel(double p, int64_t channels_, int64_t positions_, const MapLayout& layout_)
      : vp(static_cast<acc_t>(p)),
        vpm1(static_cast<acc_t>(p - 1.0)),
        channels(channels_),
        positions(positions_),
        layout(layout_) {}

  Vec power(const Vec& x) const { return math::power<kind, Ops>(x, vp); }
  Vec slope(const Vec& x) const { return math::power_slope<kind, Ops>(x, vpm1); }
  // n elements, the rest zero (|0|^p adds nothing).
  static Vec load(const T* x, int64_t n) { return load_n<T, acc_t>(x, n, acc_t(0)); }

  // sums[j] = sum_c |x[c, j]|^p for the sample at x; sums has room for the positions
  // rounded up to whole vectors, the extra lanes set to 0.
  void channel_sums(const T* x, acc_t* sums) const {
    if (layout.channels_inner) {
      channel_sums_along_channels(x, sums);
    } else {
      channel_sums_along_positions(x, sums);
    }
  }

  void channel_sums_along_positions(const T* x, acc_t* sums) const {
    const int64_t full = positions / W * W, tail = positions - full;
    const int64_t cs = layout.channel_stride;
    std::fill(sums, sums + full + (tail > 0 ? W : 0), acc_t(0));
    auto add = [&](int64_t j, const Vec& v) { (Vec::loadu(sums + j) + v).store(sums + j); };
    int64_t c = 0;
    // Four channels per step: four input streams and a quarter of the traffic on sums.
    for (; c + 4 <= channels; c += 4) {
      const T* r0 = x + c * cs;
      const T *r1 = r0 + cs, *r2 = r1 + cs, *r3 = r2 + cs;
      for (int64_t j = 0; j < full; j += W) {
        add(j, (power(IO::load(r0 + j)) + power(IO::load(r1 + j))) +
                   (power(IO::load(r2 + j)) + power(IO::load(r3 + j))));
      }
      if (tail > 0) {
        add(full, (power(load(r0 + full, tail)) + power(load(r1 + full, tail))) +
                      (power(load(r2 + full, tail)) + power(load(r3 + full, tail))));
      }
    }
    for (; c < channels; ++c) {
      const T* r = x + c * cs;
      for (int64_t j = 0; j < full; j += W) add(j, power(IO::load(r + j)));
      if (tail > 0) add(full, power(load(r + full, tail)));
    }
  }

  void channel_sums_along_channels(const T* x, acc_t* sums) const {
    const int64_t full = channels / W * W, tail = channels - full;
    for (int64_t j = 0; j < positions; ++j) {
      const T* r = x + j * layout.position_stride;
      Vec a0(acc_t(0)), a1(acc_t(0));
      int64_t c = 0;
      for (; c + 2 * W <= full; c += 2 * W) {
        a0 = a0 + power(IO::load(r + c));
        a1 = a1 + power(IO::load(r + c + W));
      }
      if (c < full) a0 = a0 + power(IO::load(r + c));
      if (tail > 0) a1 = a1 + power(load(r + full, tail));
      sums[j] = hsum(a0 + a1);
    }
    for (int64_t j = positions; j % W != 0; ++j) sums[j] = acc_t(0);
  }

  // g[c, j] = w[j] |x[c, j]|^(p-1) sign(x[c, j]) for the sample at x, g its gradient.
  void gradient(const T* x, const acc_t* w, T* g) const {
    if (layout.channels_inner) {
      for (int64_t j = 0; j < positions; ++j) {
        const T* r = x + j * layout.position_stride;
        T* gr = g + j * channels;
        const Vec wj(w[j]);
        const int64_t full = channels / W * W;
        gradient_run(gr, full, on_grid(gr), [&](int64_t c) { return wj * slope(IO::load(r + c)); });
        if (full < channels) IO::store(wj * slope(load(r + full, channels - full)), gr + full, channels - full);
      }
      return;
    }
    const int64_t full = positions / W * W, tail = positions - full;
    for (int64_t c = 0; c < channels; ++c) {
      const T* r = x + c * layout.channel_stride;
      T* gr = g + c * positions;
      gradient_run(gr, full, on_grid(gr), [&](int64_t j) { return Vec::loadu(w + j) * slope(IO::load(r + j)); });
      if (tail > 0) IO::store(Vec::loadu(w + full) * slope(load(r + full, tail)), gr + full, tail);
    }
  }

  static bool on_grid(const T* p) {
    return GradStore<T, acc_t>::kStreams && reinterpret_cast<uintptr_t>(p) % GradStore<T, acc_t>::kAlign == 0;
  }

  // g[i, i + W) = value(i) for the whole vectors i < full.
  template <typename F>
  static void gradient_run(T* g, int64_t full, bool stream, const F& value) {
    if (stream) {
      for (int64_t i = 0; i < full; i += W) GradStore<T, acc_t>::store(value(i), g + i);
    } else {
      for (int64_t i = 0; i < full; i += W) IO::store(value(i), g + i, W);
    }
  }
};

// One (power kind, student dtype, teacher dtype) combination.
template <PowerKind kind, typename s_t, typename t_t, typename acc_t>
struct AttentionTransferKernel {
  using Vec = Vectorized<acc_t>;
  using Ops = AtVecOps<acc_t>;
  static constexpr int64_t W = Vec::size();

  const AttentionTransferParams& p;
  const MapKernel<kind, s_t, acc_t> student;
  const MapKernel<kind, t_t, acc_t> teacher;
  const int64_t padded;  // positions rounded up to whole vectors

  explicit AttentionTransferKernel(const AttentionTransferParams& params)
      : p(params),
        student(params.p, params.channels_s, params.positions, params.student_layout),
        teacher(params.p, params.channels_t, params.positions, params.teacher_layout),
        padded((params.positions + W - 1) / W * W) {}

  const s_t* student_sample(int64_t n) const {
    return static_cast<const s_t*>(p.student) + p.student_layout.offset(n, 0, 0);
  }
  const t_t* teacher_sample(int64_t n) const {
    return static_cast<const t_t*>(p.teacher) + p.teacher_layout.offset(n, 0, 0);
  }

  // The attention maps A = (1 / C) sum_c |x|^p of sample n (padding lanes 0). The
  // teacher first: the student, read last, is the one read again for its gradient.
  void maps(int64_t n, acc_t* map_s, acc_t* map_t) const {
    teacher.channel_sums(teacher_sample(n), map_t);
    student.channel_sums(student_sample(n), map_s);
    const Vec cs(static_cast<acc_t>(p.channels_s)), ct(static_cast<acc_t>(p.channels_t));
    for (int64_t j = 0; j < padded; j += W) {
      (Vec::loadu(map_s + j) / cs).store(map_s + j);
      (Vec::loadu(map_t + j) / ct).store(map_t + j);
    }
  }

  // Statistics of one sample from its maps (kAtStatsCols values into st).
  void sample_stats(const acc_t* map_s, const acc_t* map_t, acc_t* st) const {
    Vec ss(acc_t(0)), tt(acc_t(0));
    for (int64_t j = 0; j < padded; j += W) {
      const Vec ms = Vec::loadu(map_s + j), mt = Vec::loadu(map_t + j);
      ss = ss + ms * ms;
      tt = tt + mt * mt;
    }
    const acc_t norm_s = std::sqrt(hsum(ss)), norm_t = std::sqrt(hsum(tt));
    const Vec den_s(math::norm_denominator(norm_s)), den_t(math::norm_denominator(norm_t));
    Vec sq(acc_t(0)), dot_s(acc_t(0)), dot_t(acc_t(0));
    for (int64_t j = 0; j < padded; j += W) {
      Vec a_s, a_t, d;
      math::normalized<Ops>(Vec::loadu(map_s + j), Vec::loadu(map_t + j), den_s, den_t, a_s, a_t, d);
      sq = sq + d * d;
      dot_s = dot_s + a_s * d;
      dot_t = dot_t + a_t * d;
    }
    st[kAtNormS] = norm_s;
    st[kAtNormT] = norm_t;
    st[kAtDotS] = hsum(dot_s);
    st[kAtDotT] = hsum(dot_t);
    st[kAtSqDist] = hsum(sq);
  }

  // Gradients of sample n from its maps (overwritten by the position weights) and stats.
  void gradients(int64_t n, acc_t* map_s, acc_t* map_t, const acc_t* st, acc_t weight) const {
    const math::PositionWeightConsts<acc_t> k = math::position_weight_consts<acc_t>(
        st, weight, p.samples, p.positions, p.channels_s, p.channels_t, static_cast<acc_t>(p.p));
    const math::PositionWeightConsts<Vec> kv{Vec(k.denom_s), Vec(k.denom_t), Vec(k.k_s),
                                             Vec(k.k_t),     Vec(k.proj_s),  Vec(k.proj_t)};
    for (int64_t j = 0; j < padded; j += W) {
      Vec w_s, w_t;
      math::position_weights<Ops>(Vec::loadu(map_s + j), Vec::loadu(map_t + j), kv, w_s, w_t);
      w_s.store(map_s + j);
      w_t.store(map_t + j);
    }
    if (p.grad_student != nullptr) {
      auto* g = static_cast<s_t*>(p.grad_student) + n * p.channels_s * p.positions;
      student.gradient(student_sample(n), map_s, g);
    }
    if (p.grad_teacher != nullptr) {
      auto* g = static_cast<t_t*>(p.grad_teacher) + n * p.channels_t * p.positions;
      teacher.gradient(teacher_sample(n), map_t, g);
    }
  }

  // Statistics and (when p.grad_* are set) gradients at a loss gradient of 1, samples
  // [begin, end).
  void forward(int64_t begin, int64_t end) const {
    std::unique_ptr<acc_t[]> buffer(new acc_t[2 * padded]);
    acc_t *map_s = buffer.get(), *map_t = map_s + padded;
    auto* stats = static_cast<acc_t*>(p.stats);
    const bool with_grad = p.grad_student != nullptr || p.grad_teacher != nullptr;
    for (int64_t n = begin; n < end; ++n) {
      maps(n, map_s, map_t);
      acc_t* st = stats + n * kAtStatsCols;
      sample_stats(map_s, map_t, st);
      if (with_grad) gradients(n, map_s, map_t, st, acc_t(1));
    }
    if (with_grad) stream_fence();
  }

  // Gradients scaled by the loss's gradient, from the forward's statistics.
  void backward(int64_t begin, int64_t end) const {
    std::unique_ptr<acc_t[]> buffer(new acc_t[2 * padded]);
    acc_t *map_s = buffer.get(), *map_t = map_s + padded;
    const auto* stats = static_cast<const acc_t*>(p.stats_in);
    const acc_t weight = *static_cast<const acc_t*>(p.grad_loss);
    for (int64_t n = begin; n < end; ++n) {
      maps(n, map_s, map_t);
      gradients(n, map_s, map_t, stats + n * kAtStatsCols, weight);
    }
    stream_fence();
  }
};

template <bool kBackward, typename s_t, typename t_t, typename acc_t>
void run(const AttentionTransferParams& p) {
  auto go = [&](auto kind_tag) {
    const AttentionTransferKernel<decltype(kind_tag)::value, s_t, t_t, acc_t> kernel(p);
    // One sample per task: a sample is thousands of elements or more.
    at::parallel_for(0, p.samples, 1, [&](int64_t begin, int64_t end) {
      if constexpr (kBackward) {
        kernel.backward(begin, end);
      } else {
        kernel.forward(begin, end);
      }
    });
  };
  using K = PowerKind;
  switch (p.kind) {
    case K::One: go(std::integral_constant<K, K::One>{}); break;
    case K::Two: go(std::integral_constant<K, K::Two>{}); break;
    case K::General: go(std::integral_constant<K, K::General>{}); break;
  }
}

struct AtForwardLauncher {
  const AttentionTransferParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run<false, s_t, t_t, acc_t>(p); }
};
struct AtBackwardLauncher {
  const AttentionTransferParams& p;
  template <typename s_t, typename t_t, typename acc_t>
  void operator()() const { run<true, s_t, t_t, acc_t>(p); }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per attention_transfer_kernel_*.cpp.
#define KDFAST_DEFINE_ATTENTION_TRANSFER_CPU_KERNELS(SUFFIX)                                      \
  namespace kdfast {                                                                             \
  namespace cpu {                                                                                \
  void attention_transfer_forward_##SUFFIX(const AttentionTransferParams& p, c10::ScalarType s,  \
                                           c10::ScalarType t) {                                  \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::AtForwardLauncher{p});                  \
  }                                                                                              \
  void attention_transfer_backward_##SUFFIX(const AttentionTransferParams& p, c10::ScalarType s, \
                                            c10::ScalarType t) {                                 \
    CPU_CAPABILITY::dispatch_dtypes(s, t, CPU_CAPABILITY::AtBackwardLauncher{p});                 \
  }                                                                                              \
  }                                                                                              \
  }
