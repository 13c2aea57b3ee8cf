// CPU kernels of topk_logits and sample_logits, written once with at::vec::Vectorized and
// compiled once per instruction set (topk_sample_kernel_{default,avx2,avx512}.cpp define
// CPU_CAPABILITY). The shared rules (ordering keys, random numbers, integer weights,
// degenerate rows) come from ../topk_sample_math.h, the same as CUDA's.
//
// A row is processed by one thread, in blocks of kRowBlock elements (L1-resident).
//
// topk_logits, one read of the row from memory and one from cache: (1) per block its
// maximum and an online log-sum-exp (the running sum is rescaled when the block raises the
// maximum, then the block's exponentials are added, re-read from L1); (2) with the k-th
// largest block maximum (for a large k: lane maximum) as a first threshold (k distinct
// elements reach it, so every element of the top k does), a vectorised test of each vector against the threshold:
// only lanes above it go, one by one, into a buffer of 2k + 64 candidates, cut back to its
// k best when full (nth_element), which raises the threshold. Rows with fewer lanes than k
// start with every element a candidate. At the end the k best are sorted and written with
// their log-probabilities.
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
#include <functional>
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

// Bit l set where lane l of v is above thr or NaN (not <= thr): a possible candidate.
template <typename acc_t>
inline uint32_t lanes_above(const Vectorized<acc_t>& v, const Vectorized<acc_t>& thr) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(v, thr, _CMP_NLE_UQ);
  } else {
    return _mm512_cmp_pd_mask(v, thr, _CMP_NLE_UQ);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, thr, _CMP_NLE_UQ)));
  } else {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(v, thr, _CMP_NLE_UQ)));
  }
#else
  return static_cast<uint32_t>((v <= thr).zero_mask());  // lanes of (v <= thr) are 0 where v > thr or NaN
#endif
}

// Lane-wise maximum that may drop NaN lanes (one instruction; the callers detect NaN apart).
template <typename acc_t>
inline Vectorized<acc_t> max_lanes(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_max_ps(a, b);
  } else {
    return _mm512_max_pd(a, b);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm256_max_ps(a, b);
  } else {
    return _mm256_max_pd(a, b);
  }
#else
  return at::vec::maximum(a, b);
#endif
}

// Bit l set where lane l of a or of b is NaN.
template <typename acc_t>
inline uint32_t unordered_lanes(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
  } else {
    return _mm512_cmp_pd_mask(a, b, _CMP_UNORD_Q);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)));
  } else {
    return static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(a, b, _CMP_UNORD_Q)));
  }
#else
  return static_cast<uint32_t>((a == a).zero_mask() | (b == b).zero_mask());  // (x == x) is 0 on NaN lanes
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

// A candidate of the top k: its key and index. For float keys one uint64 (key << 32 |
// ~index, index < 2^31), whose integer order is the ranking: the buffer's nth_element and
// sort compare integers.
template <typename acc_t>
struct CandidateOf;
template <>
struct CandidateOf<float> {
  using type = uint64_t;
  static type make(uint32_t key, int64_t index) {
    return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(index));
  }
  static uint32_t key(type c) { return static_cast<uint32_t>(c >> 32); }
  static int64_t index(type c) { return static_cast<uint32_t>(~static_cast<uint32_t>(c)); }
  static bool before(type a, type b) { return a > b; }
};
template <>
struct CandidateOf<double> {
  struct type {
    uint64_t key;
    int64_t index;
  };
  static type make(uint64_t key, int64_t index) { return {key, index}; }
  static uint64_t key(const type& c) { return c.key; }
  static int64_t index(const type& c) { return c.index; }
  static bool before(const type& a, const type& b) { return ts::ranks_before(a.key, a.index, b.key, b.index); }
};

template <typename T, typename acc_t>
struct TopkRows {
  using Vec = Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  using K = ts::key_t<acc_t>;
  static constexpr int64_t W = Vec::size();
  static_assert(W <= 32, "lane masks are 32-bit");

  using C = CandidateOf<acc_t>;
  using Candidate = typename C::type;
  struct Before {  // a function object, so that nth_element / sort inline the comparison
    bool operator()(const Candidate& a, const Candidate& b) const { return C::before(a, b); }
  };

  const TopkParams& p;
  const acc_t inv_temp;
  const int64_t capacity;
  std::vector<Candidate> buf;  // this thread's candidates
  std::vector<K> block_keys;   // the key of each block's maximum
  std::vector<acc_t> lane_max; // each block's 2W lane maxima (disjoint strided subsets)
  std::vector<K> lane_keys;

  // State of the row in progress.
  bool limited = false;  // only keys above `threshold` enter
  bool closed = false;   // the k best are NaN: nothing can enter any more
  bool nan = false;
  K threshold = 0;
  Vec threshold_vec{acc_t(0)};

  explicit TopkRows(const TopkParams& params)
      : p(params),
        inv_temp(static_cast<acc_t>(1.0 / params.temperature)),
        capacity(2 * params.k + 64),
        block_keys((params.vocab + kRowBlock - 1) / kRowBlock),
        lane_max(block_keys.size() * 2 * W) {
    buf.reserve(capacity);
  }

  // The k-th largest of keys (reordered): a first threshold when each key is that of a
  // distinct element (a block's or a lane's maximum): k elements reach it, so every element
  // of the top k does.
  K kth_largest(std::vector<K>& keys) const {
    std::nth_element(keys.begin(), keys.begin() + (p.k - 1), keys.end(), std::greater<K>());
    return keys[p.k - 1];
  }

  // Only keys above `key` enter from now on. The vector test compares values: its bound
  // lets through every lane whose key is above, also where denormals read as zero (DAZ)
  // and for -0.0 / +0.0 (equal as values, not as keys); a NaN bound lets every lane through.
  void raise_threshold(K key) {
    threshold = key;
    limited = true;
    closed = key == ~K(0);
    const acc_t t = ts::key_value<acc_t>(key);
    const acc_t tiny = std::numeric_limits<acc_t>::min();
    threshold_vec = Vec(t == t && std::fabs(t) < 2 * tiny ? -tiny : t);
  }

  // Keeps the k best candidates (unsorted) and raises the threshold to the k-th: a later
  // element equal to it ranks after it (higher index), so only keys strictly above enter.
  void cut() {
    std::nth_element(buf.begin(), buf.begin() + (p.k - 1), buf.end(), Before{});
    buf.resize(p.k);
    raise_threshold(C::key(buf[p.k - 1]));
  }

  // The lanes of the vector of n elements that may enter the buffer (never a lane past n:
  // a NaN bound lets every lane through).
  uint32_t candidates(const Vec& v, int64_t n) const {
    if (closed) return 0;
    const uint32_t valid = n == 32 ? ~uint32_t(0) : (uint32_t(1) << n) - 1;
    return limited ? lanes_above(v, threshold_vec) & valid : valid;
  }

  // The elements start + l of the row for the bits l of lanes, one by one.
  void collect(const T* x, int64_t start, uint32_t lanes) {
    while (lanes != 0) {
      const int l = __builtin_ctz(lanes);
      lanes &= lanes - 1;
      const acc_t v = static_cast<acc_t>(x[start + l]);
      nan |= v != v;
      const K key = ts::order_key<acc_t>(v);
      if (limited && key <= threshold) continue;
      buf.push_back(C::make(key, start + l));
      if (static_cast<int64_t>(buf.size()) == capacity) cut();
    }
  }

  void row(int64_t r) {
    const T* x = static_cast<const T*>(p.logits) + p.layout.offset(r);
    const int64_t vocab = p.vocab, blocks = static_cast<int64_t>(block_keys.size());
    const Vec vinv(inv_temp);
    buf.clear();
    limited = closed = nan = false;
    threshold = 0;

    // Pass 1 (from memory), per block: its maximum, NaN, and the online log-sum-exp (the
    // running sum is rescaled when the block raises the maximum; the block's
    // exponentials are then added, re-read from L1).
    acc_t max = -std::numeric_limits<acc_t>::infinity();
    Vec sum(acc_t(0));
    for (int64_t b = 0, i = 0; b < vocab; b += kRowBlock, ++i) {
      const int64_t n = std::min(kRowBlock, vocab - b);
      Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0;
      uint32_t nan_lanes = 0;
      int64_t j = 0;
      for (; j + 2 * W <= n; j += 2 * W) {
        const Vec v0 = VecIO<T, acc_t>::load(x + b + j), v1 = VecIO<T, acc_t>::load(x + b + j + W);
        m0 = max_lanes(m0, v0);
        m1 = max_lanes(m1, v1);
        nan_lanes |= unordered_lanes(v0, v1);
      }
      for (; j < n; j += W) {  // -inf padded: a lane maximum is an element or -inf
        const Vec v = load_n<T, acc_t>(x + b + j, std::min(W, n - j));
        m0 = max_lanes(m0, v);
        nan_lanes |= unordered_lanes(v, v);
      }
      m0.store(&lane_max[i * 2 * W]);
      m1.store(&lane_max[i * 2 * W + W]);
      const acc_t block_max = hmax(max_lanes(m0, m1));
      block_keys[i] = ts::order_key<acc_t>(block_max);
      nan |= nan_lanes != 0;
      if (nan) continue;  // no softmax: no sum
      if (block_max > max) {
        if (max != -std::numeric_limits<acc_t>::infinity()) {
          sum = sum * Vec(static_cast<acc_t>(std::exp((max - block_max) * inv_temp)));
        }
        max = block_max;
      }
      if (ts::row_kind(max) != ts::RowKind::Normal) continue;  // all -inf so far, or +inf
      const Vec vmax(max);
      Vec s0(acc_t(0)), s1(acc_t(0));  // two independent chains of exp and add
      for (j = 0; j + 2 * W <= n; j += 2 * W) {
        // (x - max) is exact near the maximum, so the largest term is exactly exp(0) = 1.
        s0 = s0 + Ops::exp((VecIO<T, acc_t>::load(x + b + j) - vmax) * vinv);
        s1 = s1 + Ops::exp((VecIO<T, acc_t>::load(x + b + j + W) - vmax) * vinv);
      }
      for (; j < n; j += W) s0 = s0 + Ops::exp((load_n<T, acc_t>(x + b + j, std::min(W, n - j)) - vmax) * vinv);
      sum = sum + (s0 + s1);
    }

    // A first threshold, the k-th largest block maximum (or, for a k above the number of
    // blocks, lane maximum): only keys >= it enter (it is >= 1: no key is 0). Rows with a
    // NaN, or fewer lanes than k, start with every element a candidate.
    if (!nan && blocks >= p.k) {
      raise_threshold(kth_largest(block_keys) - 1);
    } else if (!nan && static_cast<int64_t>(lane_max.size()) >= p.k) {
      lane_keys.resize(lane_max.size());
      for (size_t i = 0; i < lane_max.size(); ++i) lane_keys[i] = ts::order_key<acc_t>(lane_max[i]);
      raise_threshold(kth_largest(lane_keys) - 1);
    }
    // Pass 2 (from cache): a vectorised test of each vector against the threshold; only the
    // lanes above it go one by one into the buffer of 2k + 64 candidates, cut back to its k
    // best when full (which raises the threshold).
    int64_t j = 0;
    for (; j + 2 * W <= vocab; j += 2 * W) {
      const Vec v0 = VecIO<T, acc_t>::load(x + j), v1 = VecIO<T, acc_t>::load(x + j + W);
      if (const uint32_t lanes = candidates(v0, W)) collect(x, j, lanes);
      if (const uint32_t lanes = candidates(v1, W)) collect(x, j + W, lanes);
    }
    for (; j < vocab; j += W) {
      const int64_t n = std::min(W, vocab - j);
      if (const uint32_t lanes = candidates(load_n<T, acc_t>(x + j, n), n)) collect(x, j, lanes);
    }

    if (static_cast<int64_t>(buf.size()) > p.k) {
      std::nth_element(buf.begin(), buf.begin() + (p.k - 1), buf.end(), Before{});
      buf.resize(p.k);
    }
    std::sort(buf.begin(), buf.end(), Before{});
    const ts::RowKind kind = nan ? ts::RowKind::Undefined : ts::row_kind(max);
    const acc_t log_sum = kind == ts::RowKind::Normal ? std::log(hsum(sum)) : acc_t(0);
    acc_t* out = static_cast<acc_t*>(p.logprobs) + r * p.k;
    for (int64_t i = 0; i < p.k; ++i) {
      write_index(p.indices, p.indices_int64, r * p.k + i, C::index(buf[i]));
      out[i] = kind == ts::RowKind::Normal
                   ? ts::logprob<acc_t>(ts::key_value<acc_t>(C::key(buf[i])), max, inv_temp, log_sum)
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

  // A sum of integer weights, exact (every partial sum is an integer below 2^53).
#if defined(CPU_CAPABILITY_AVX512)
  struct WeightSum {
    __m512i v = _mm512_setzero_si512();
    double total() const { return static_cast<double>(_mm512_reduce_add_epi64(v)); }
  };
#else
  struct WeightSum {
    DVec v{0.0};
    double total() const { return hsum(v); }
  };
#endif

  // The integer weights of the vector at x (n <= W elements, -inf padded: weight 0), added
  // to acc and, when out is set, stored element by element. The weight pass and the walk
  // both call this on the same vectors, so they see the same weights.
  void vector_weights(const T* x, int64_t n, const Vec& vmax, WeightSum& acc, double* out) const {
    const Vec e = Ops::exp((load_n<T, acc_t>(x, n) - vmax) * Vec(inv_temp));
#if defined(CPU_CAPABILITY_AVX512)
    // e * 2^s is exact in acc_t (a power-of-two scale) and the conversion rounds it to the
    // nearest integer, ties to even: the integer quantized_weight computes in double.
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    alignas(64) int64_t w[W];
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m512 y = _mm512_mul_ps(e, _mm512_set1_ps(static_cast<float>(p.weight_scale)));
      const __m512i lo = _mm512_cvt_roundps_epi64(_mm512_castps512_ps256(y), kRound);
      const __m512i hi = _mm512_cvt_roundps_epi64(_mm512_extractf32x8_ps(y, 1), kRound);
      acc.v = _mm512_add_epi64(acc.v, _mm512_add_epi64(lo, hi));
      if (out == nullptr) return;
      _mm512_store_si512(w, lo);
      _mm512_store_si512(w + 8, hi);
    } else {
      const __m512i q = _mm512_cvt_roundpd_epi64(_mm512_mul_pd(e, _mm512_set1_pd(p.weight_scale)), kRound);
      acc.v = _mm512_add_epi64(acc.v, q);
      if (out == nullptr) return;
      _mm512_store_si512(w, q);
    }
    for (int64_t l = 0; l < W; ++l) out[l] = static_cast<double>(w[l]);
#else
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
      acc.v = acc.v + w;
      if (out != nullptr) w.store(out + l);
    }
#endif
  }

  double block_sum(const T* x, int64_t n, const Vec& vmax) const {
    WeightSum acc;
    for (int64_t j = 0; j < n; j += W) vector_weights(x + j, std::min(W, n - j), vmax, acc, nullptr);
    return acc.total();
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
          WeightSum acc;
          vector_weights(x + j, n, vmax, acc, weights.data());
          const double vector_end = c + acc.total();
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
