// CPU kernels of topk_logits and sample_logits, written once with at::vec::Vectorized and
// compiled once per instruction set (topk_sample_kernel_{default,avx2,avx512}.cpp define
// CPU_CAPABILITY). The shared rules (ordering keys, random numbers, integer weights,
// degenerate rows) come from ../topk_sample_math.h, the same as CUDA's.
//
// A row is processed by one thread, in blocks of kRowBlock elements (L1-resident).
//
// topk_logits, one read of the row: per block, (1) the block's maximum and the candidate
// test of each vector against the running threshold (the k-th best key kept so far): only
// a vector with a lane above it (or a NaN) goes element by element into a buffer of 2k + 64
// candidates, which is cut back to its k best when full (nth_element), raising the
// threshold; (2) an online log-sum-exp: the running sum is rescaled when the block raises
// the maximum, then the block's exponentials are added (the block is re-read from L1).
// At the end the k best candidates are sorted and written with their log-probabilities.
//
// sample_logits, a max pass (from memory), a weight pass (from L2: the integer weights'
// sums per block) and a walk that recomputes only the blocks holding a draw.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../topk_sample.h"
#include "../topk_sample_math.h"
#include "topk_sample_cpu.h"
#include "vec_common.h"

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

namespace ts = ::kdfast::topk_sample;

constexpr int64_t kRowBlock = 256;  // elements per block: 1 KiB of float32, in L1

// Whether some lane of v is above thr or NaN (not <= thr): the vector may hold a candidate.
template <typename acc_t>
inline bool any_above(const Vectorized<acc_t>& v, const Vectorized<acc_t>& thr) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(v, thr, _CMP_NLE_UQ) != 0;
  } else {
    return _mm512_cmp_pd_mask(v, thr, _CMP_NLE_UQ) != 0;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm256_movemask_ps(_mm256_cmp_ps(v, thr, _CMP_NLE_UQ)) != 0;
  } else {
    return _mm256_movemask_pd(_mm256_cmp_pd(v, thr, _CMP_NLE_UQ)) != 0;
  }
#else
  return (v <= thr).zero_mask() != 0;  // a lane of (v <= thr) is 0 where v > thr or NaN
#endif
}

template <typename index_t>
inline void store_index(void* indices, int64_t pos, int64_t value) {
  static_cast<index_t*>(indices)[pos] = static_cast<index_t>(value);
}

inline void write_index(void* indices, bool int64, int64_t pos, int64_t value) {
  if (int64) {
    store_index<int64_t>(indices, pos, value);
  } else {
    store_index<int32_t>(indices, pos, value);
  }
}

// Rows per parallel task: enough elements to amortise scheduling.
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

// ---------------------------------------------------------------------------------------
// topk_logits

template <typename T, typename acc_t>
struct TopkRows {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  using K = ts::key_t<acc_t>;
  static constexpr int64_t W = Vec::size();

  struct Candidate {
    K key;
    int64_t index;
  };
  static bool before(const Candidate& a, const Candidate& b) {
    return ts::ranks_before(a.key, a.index, b.key, b.index);
  }

  const TopkParams& p;
  const acc_t inv_temp;
  const int64_t capacity;
  std::vector<Candidate> buf;  // this thread's candidates

  // State of the row in progress.
  bool limited = false;  // the buffer has been cut back: only keys above `threshold` enter
  bool closed = false;   // the k best are NaN: nothing can enter any more
  bool nan = false;
  K threshold = 0;
  Vec threshold_vec{acc_t(0)};

  explicit TopkRows(const TopkParams& params)
      : p(params), inv_temp(static_cast<acc_t>(1.0 / params.temperature)), capacity(2 * params.k + 64) {
    buf.reserve(capacity);
  }

  // Keeps the k best candidates (unsorted) and raises the threshold to the k-th.
  void cut() {
    std::nth_element(buf.begin(), buf.begin() + (p.k - 1), buf.end(), before);
    buf.resize(p.k);
    threshold = buf[p.k - 1].key;
    limited = true;
    closed = threshold == ~K(0);
    threshold_vec = Vec(ts::key_value<acc_t>(threshold));
  }

  // Elements [start, start + n) of the row, one by one. A later element equal to the
  // threshold ranks after it (higher index), so only keys strictly above enter.
  void collect(const T* x, int64_t start, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = static_cast<acc_t>(x[start + i]);
      nan |= v != v;
      const K key = ts::order_key<acc_t>(v);
      if (limited && key <= threshold) continue;
      buf.push_back({key, start + i});
      if (static_cast<int64_t>(buf.size()) == capacity) cut();
    }
  }

  void row(int64_t r) {
    const T* x = static_cast<const T*>(p.logits) + p.layout.offset(r);
    const int64_t vocab = p.vocab;
    buf.clear();
    limited = closed = nan = false;
    threshold = 0;
    const Vec vinv(inv_temp);
    acc_t max = -std::numeric_limits<acc_t>::infinity();
    Vec sum0(acc_t(0)), sum1(acc_t(0));
    for (int64_t b = 0; b < vocab; b += kRowBlock) {
      const int64_t n = std::min(kRowBlock, vocab - b);
      // (1) the block's maximum; candidates.
      Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
      int64_t j = 0;
      for (; j + 2 * W <= n; j += 2 * W) {
        const Vec v0 = VecIO<T, acc_t>::load(x + b + j), v1 = VecIO<T, acc_t>::load(x + b + j + W);
        m0 = Ops::max(m0, v0);
        m1 = Ops::max(m1, v1);
        if (!closed && (!limited || any_above(v0, threshold_vec))) collect(x, b + j, W);
        if (!closed && (!limited || any_above(v1, threshold_vec))) collect(x, b + j + W, W);
      }
      for (; j < n; j += W) {
        const int64_t nj = std::min(W, n - j);
        const Vec v = load_n<T, acc_t>(x + b + j, nj);
        m0 = Ops::max(m0, v);
        if (!closed && (!limited || any_above(v, threshold_vec))) collect(x, b + j, nj);
      }
      // (2) online log-sum-exp (not for rows that hold a NaN or +inf: no softmax).
      if (nan) continue;
      const acc_t block_max = hmax(Ops::max(m0, m1));
      if (block_max > max) {
        if (max != -std::numeric_limits<acc_t>::infinity()) {
          const Vec rescale(static_cast<acc_t>(std::exp((max - block_max) * inv_temp)));
          sum0 = sum0 * rescale;
          sum1 = sum1 * rescale;
        }
        max = block_max;
      }
      if (ts::row_kind(max) != ts::RowKind::Normal) continue;  // all -inf so far, or +inf
      const Vec vmax(max);
      for (j = 0; j + 2 * W <= n; j += 2 * W) {
        // (x - max) is exact near the maximum, so the largest term is exactly exp(0) = 1.
        sum0 = sum0 + Ops::exp((VecIO<T, acc_t>::load(x + b + j) - vmax) * vinv);
        sum1 = sum1 + Ops::exp((VecIO<T, acc_t>::load(x + b + j + W) - vmax) * vinv);
      }
      for (; j < n; j += W) sum0 = sum0 + Ops::exp((load_n<T, acc_t>(x + b + j, std::min(W, n - j)) - vmax) * vinv);
    }
    if (static_cast<int64_t>(buf.size()) > p.k) {
      std::nth_element(buf.begin(), buf.begin() + (p.k - 1), buf.end(), before);
      buf.resize(p.k);
    }
    std::sort(buf.begin(), buf.end(), before);
    const ts::RowKind kind = nan ? ts::RowKind::Undefined : ts::row_kind(max);
    const acc_t log_sum = kind == ts::RowKind::Normal ? std::log(hsum(sum0 + sum1)) : acc_t(0);
    acc_t* out = static_cast<acc_t*>(p.logprobs) + r * p.k;
    for (int64_t i = 0; i < p.k; ++i) {
      write_index(p.indices, p.indices_int64, r * p.k + i, buf[i].index);
      out[i] = kind == ts::RowKind::Normal
                   ? ts::logprob<acc_t>(ts::key_value<acc_t>(buf[i].key), max, inv_temp, log_sum)
                   : ts::degenerate_logprob<acc_t>(kind);
    }
  }
};

template <typename T, typename acc_t>
void topk_rows(const TopkParams& p) {
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    TopkRows<T, acc_t> kernel(p);
    for (int64_t r = begin; r < end; ++r) kernel.row(r);
  });
}

// ---------------------------------------------------------------------------------------
// sample_logits

template <typename T, typename acc_t>
struct SampleRows {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  using DVec = Vectorized<double>;
  static constexpr int64_t W = Vec::size();

  const SampleParams& p;
  const acc_t inv_temp;
  const uint64_t seed;
  std::vector<double> block_weight;  // per block of the row: the sum of its integer weights
  std::vector<double> weights;       // the weights of one vector, element by element
  std::vector<uint64_t> targets;

  explicit SampleRows(const SampleParams& params)
      : p(params),
        inv_temp(static_cast<acc_t>(1.0 / params.temperature)),
        seed(static_cast<uint64_t>(*params.seed)),
        block_weight((params.vocab + kRowBlock - 1) / kRowBlock),
        weights(W),
        targets(params.num_samples) {}

  // The integer weights of the vector at x (n <= W elements, -inf padded: weight 0),
  // accumulated into acc (every lane sum stays an exact integer below 2^53) and, when out
  // is set, stored element by element. The weight pass and the walk both call this on the
  // same vectors, so they see the same weights.
  void vector_weights(const T* x, int64_t n, const Vec& vmax, DVec& acc, double* out) const {
    const Vec e = Ops::exp((load_n<T, acc_t>(x, n) - vmax) * Vec(inv_temp));
    alignas(64) double d[W];
    if constexpr (std::is_same_v<acc_t, double>) {
      e.store(d);
    } else {
      alignas(64) float f[W];
      e.store(f);
      for (int64_t l = 0; l < W; ++l) d[l] = static_cast<double>(f[l]);
    }
    const DVec scale(p.weight_scale), round(4503599627370496.0);  // 2^52: see quantized_weight
    for (int64_t l = 0; l < W; l += DVec::size()) {
      const DVec w = (DVec::loadu(d + l) * scale + round) - round;
      acc = acc + w;
      if (out != nullptr) w.store(out + l);
    }
  }

  double block_sum(const T* x, int64_t n, const Vec& vmax) const {
    DVec acc(0.0);
    for (int64_t j = 0; j < n; j += W) vector_weights(x + j, std::min(W, n - j), vmax, acc, nullptr);
    return hsum(acc);
  }

  void row(int64_t r, const T* next) {
    const T* x = static_cast<const T*>(p.logits) + p.layout.offset(r);
    const int64_t vocab = p.vocab, draws = p.num_samples;
    int64_t* out_i64 = p.indices_int64 ? static_cast<int64_t*>(p.indices) + r * draws : nullptr;
    int32_t* out_i32 = p.indices_int64 ? nullptr : static_cast<int32_t*>(p.indices) + r * draws;
    float* out_p = p.probs + r * draws;
    int64_t written = 0;
    auto emit = [&](int64_t token, int64_t count) {
      if (out_i64 != nullptr) {
        out_i64[written] = token;
      } else {
        out_i32[written] = static_cast<int32_t>(token);
      }
      out_p[written++] = static_cast<float>(count) / static_cast<float>(draws);
    };

    const acc_t max = row_max<T, acc_t>(x, vocab);  // NaN when the row holds a NaN
    if (ts::row_kind(max) == ts::RowKind::Normal) {
      const Vec vmax(max);
      double total = 0;
      for (int64_t b = 0, i = 0; b < vocab; b += kRowBlock, ++i) {
        if (next != nullptr) {
          // exp-bound pass: fetch the next row into L2 meanwhile (its max pass then waits less)
          for (int64_t j = 0; j < kRowBlock && b + j < vocab; j += 64 / static_cast<int64_t>(sizeof(T)))
            __builtin_prefetch(next + b + j, 0, 2);
        }
        block_weight[i] = block_sum(x + b, std::min(kRowBlock, vocab - b), vmax);
        total += block_weight[i];
      }
      // total >= 2^s (the maximum's weight) and < 2^52: exact in uint64.
      const uint64_t total_u = static_cast<uint64_t>(total);
      for (int64_t j = 0; j < draws; j += 2) {
        uint64_t a, c;
        ts::draw_pair(seed, r, j / 2, a, c);
        targets[j] = ts::draw_target(a, total_u);
        if (j + 1 < draws) targets[j + 1] = ts::draw_target(c, total_u);
      }
      std::sort(targets.begin(), targets.end());
      // The walk: block i covers [before, before + block_weight[i]) of [0, total), a vector
      // of it the sum of its weights, token t [W_t, W_t + w_t). Every bound is an exact
      // integer, so each target lands in exactly one token of positive weight. Only the
      // vectors up to the last target of a block are recomputed.
      int64_t next_target = 0, token = -1, count = 0;
      double before = 0;
      for (int64_t b = 0, i = 0; b < vocab && next_target < draws; b += kRowBlock, ++i) {
        const double after = before + block_weight[i];
        double c = before;
        before = after;
        for (int64_t j = b; j < std::min(vocab, b + kRowBlock); j += W) {
          if (next_target == draws || static_cast<double>(targets[next_target]) >= after) break;
          const int64_t n = std::min(W, vocab - j);
          DVec acc(0.0);
          vector_weights(x + j, n, vmax, acc, weights.data());
          const double vector_end = c + hsum(acc);
          if (static_cast<double>(targets[next_target]) >= vector_end) {
            c = vector_end;
            continue;
          }
          for (int64_t l = 0; l < n; ++l) {
            c += weights[l];
            while (next_target < draws && static_cast<double>(targets[next_target]) < c) {
              if (j + l != token) {
                if (count > 0) emit(token, count);
                token = j + l;
                count = 0;
              }
              ++count;
              ++next_target;
            }
          }
        }
      }
      TORCH_INTERNAL_ASSERT(next_target == draws, "sample_logits: a draw fell outside the row's weights");
      emit(token, count);
    }
    for (int64_t j = written; j < draws; ++j) {
      if (out_i64 != nullptr) {
        out_i64[j] = -1;
      } else {
        out_i32[j] = -1;
      }
      out_p[j] = 0.0f;
    }
  }
};

template <typename T, typename acc_t>
void sample_rows(const SampleParams& p) {
  at::parallel_for(0, p.rows, grain_rows(p.vocab), [&](int64_t begin, int64_t end) {
    SampleRows<T, acc_t> kernel(p);
    for (int64_t r = begin; r < end; ++r) {
      const T* next = r + 1 < end ? static_cast<const T*>(p.logits) + p.layout.offset(r + 1) : nullptr;
      kernel.row(r, next);
    }
  });
}

// Calls f.template operator()<T, acc_t>() for the logits' dtype.
template <typename F>
void dispatch_logits(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Double: f.template operator()<double, double>(); return;
    case c10::ScalarType::Float: f.template operator()<float, float>(); return;
    case c10::ScalarType::Half: f.template operator()<c10::Half, float>(); return;
    case c10::ScalarType::BFloat16: f.template operator()<c10::BFloat16, float>(); return;
    default: TORCH_CHECK(false, "kdfast: unsupported teacher_logits dtype ", dtype);
  }
}

struct TopkLauncher {
  const TopkParams& p;
  template <typename T, typename acc_t>
  void operator()() const { topk_rows<T, acc_t>(p); }
};
struct SampleLauncher {
  const SampleParams& p;
  template <typename T, typename acc_t>
  void operator()() const { sample_rows<T, acc_t>(p); }
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast

// Defines the entry points of one instruction set; used once per topk_sample_kernel_*.cpp.
#define KDFAST_DEFINE_TOPK_SAMPLE_CPU_KERNELS(SUFFIX)                              \
  namespace kdfast {                                                               \
  namespace cpu {                                                                  \
  void topk_logits_##SUFFIX(const TopkParams& p, c10::ScalarType dtype) {         \
    CPU_CAPABILITY::dispatch_logits(dtype, CPU_CAPABILITY::TopkLauncher{p});       \
  }                                                                                \
  void sample_logits_##SUFFIX(const SampleParams& p, c10::ScalarType dtype) {     \
    CPU_CAPABILITY::dispatch_logits(dtype, CPU_CAPABILITY::SampleLauncher{p});     \
  }                                                                                \
  }                                                                                \
  }
