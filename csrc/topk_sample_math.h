// Math of topk_logits and sample_logits written once for the CPU and CUDA kernels:
// the ordering rule of the top k, the counter-based random numbers of the sampler, the
// integer weights its inverse-CDF walk runs on, and the degenerate-row rules.
//
// Ordering (topk_logits): descending value, ties broken by the lower index; NaN ranks
// above +inf (as torch.sort / torch.topk order it) and -0.0 equals +0.0. Implemented as
// an unsigned key per value (order_key) whose integer order is that order, so the CUDA
// radix select and the CPU candidate buffer compare integers.
//
// Random numbers (sample_logits): Philox-4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel
// random numbers: as easy as 1, 2, 3", SC 2011), keyed by the 64-bit seed (low word
// first), counter (j / 2 low, j / 2 high, row low, row high) for draw j of row `row`
// (flattened): draw j is the 64-bit word made of output words 2 (j % 2) (low half) and
// 2 (j % 2) + 1 (high half). The CPU and CUDA kernels draw the same numbers for the same
// seed.
//
// Sampling by inverse CDF on integer weights: w_i = round(exp((x_i - max) / T) * 2^s) with
// s = 51 - ceil(log2 V), so every weight and every partial sum is an integer below 2^52,
// exact in double whatever the order of the additions (vector lanes, warps, blocks). A
// draw r (uniform on [0, 2^64)) picks the target t = floor(r Z / 2^64) in [0, Z), Z = sum
// of the w, and the token i with W_i <= t < W_i + w_i (W_i: the sum of the weights before
// i). Tokens get probability w_i / Z: the softmax up to one rounding of exp and a
// quantisation of 2^-s relative to the largest probability (tokens below half a unit get
// none; a row's total quantisation error is at most V 2^-(s+1) <= 2^-52 of the max).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common_math.h"

namespace kdfast {
namespace topk_sample {

// --- ordering keys ---------------------------------------------------------------------

template <typename acc_t>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};
template <typename acc_t>
using key_t = typename KeyOf<acc_t>::type;

template <typename To, typename From>
KDFAST_MATH_FN To bit_cast_value(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_value: sizes differ");
#if defined(__CUDA_ARCH__)
  // register moves (a memcpy can cost a stack frame in device code)
  if constexpr (std::is_same_v<From, float>) {
    return __float_as_uint(v);
  } else if constexpr (std::is_same_v<To, float>) {
    return __uint_as_float(v);
  } else if constexpr (std::is_same_v<From, double>) {
    return static_cast<To>(__double_as_longlong(v));
  } else {
    return __longlong_as_double(static_cast<long long>(v));
  }
#else
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
#endif
}

// The key of x: unsigned, larger for a value that ranks first. All NaNs share the largest
// key; -0.0 and +0.0 share one key (x + 0 turns -0.0 into +0.0).
template <typename acc_t>
KDFAST_MATH_FN key_t<acc_t> order_key(acc_t x) {
  using K = key_t<acc_t>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  if (x != x) return ~K(0);
  const K bits = bit_cast_value<K>(x + acc_t(0));
  return (bits & sign) ? ~bits : (bits | sign);
}

// The value of a key (a NaN for the NaN key).
template <typename acc_t>
KDFAST_MATH_FN acc_t key_value(key_t<acc_t> key) {
  using K = key_t<acc_t>;
  constexpr K sign = K(1) << (8 * sizeof(K) - 1);
  if (key == ~K(0)) return std::numeric_limits<acc_t>::quiet_NaN();
  return bit_cast_value<acc_t>((key & sign) ? (key & ~sign) : ~key);
}

// Whether candidate (key_a, index_a) ranks before (key_b, index_b).
template <typename K>
KDFAST_MATH_FN bool ranks_before(K key_a, int64_t index_a, K key_b, int64_t index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// --- what a row's softmax is -----------------------------------------------------------

// Normal: a finite maximum (logprobs finite or -inf). Empty: every logit is -inf (no
// distribution: topk logprobs -inf, sample all padding). Undefined: a NaN or +inf logit
// (topk logprobs NaN, sample all padding).
enum class RowKind : int { Normal = 0, Empty = 1, Undefined = 2 };

// The kind of a row from its maximum (NaN when the row holds a NaN).
template <typename acc_t>
KDFAST_MATH_FN RowKind row_kind(acc_t max) {
  if (max != max || max == std::numeric_limits<acc_t>::infinity()) return RowKind::Undefined;
  if (max == -std::numeric_limits<acc_t>::infinity()) return RowKind::Empty;
  return RowKind::Normal;
}

// log-probability of x at temperature 1 / inv_temp in a row with maximum max and
// sum_i exp((x_i - max) / T) = sum (Normal rows; sum >= 1).
template <typename acc_t>
KDFAST_MATH_FN acc_t logprob(acc_t x, acc_t max, acc_t inv_temp, acc_t log_sum) {
  return (x - max) * inv_temp - log_sum;
}

// The log-probability of every entry of a row that is not Normal.
template <typename acc_t>
KDFAST_MATH_FN acc_t degenerate_logprob(RowKind kind) {
  return kind == RowKind::Empty ? -std::numeric_limits<acc_t>::infinity()
                                : std::numeric_limits<acc_t>::quiet_NaN();
}

// --- sampling: integer weights -----------------------------------------------------------

// 2^s with s = 51 - ceil(log2 vocab): V weights of at most 2^s sum to at most 2^51.
inline double weight_scale(int64_t vocab) {
  int bits = 0;
  while ((int64_t(1) << bits) < vocab) ++bits;
  double scale = 1.0;
  for (int i = 0; i < 51 - bits; ++i) scale *= 2.0;
  return scale;
}

// round(e * scale) as an integer-valued double, e = exp((x - max) / T) in [0, 1]. The
// product is exact (scale is a power of two); 2^52 + y rounds y < 2^52 to the nearest
// integer (ties to even) on every IEEE machine, without SSE4.1 or a libm call.
template <typename acc_t>
KDFAST_MATH_FN double quantized_weight(acc_t e, double scale) {
  constexpr double kRound = 4503599627370496.0;  // 2^52
  const double y = static_cast<double>(e) * scale;
  return (y + kRound) - kRound;
}

// The target of draw r in [0, total): floor(r * total / 2^64), total <= 2^52.
KDFAST_MATH_FN uint64_t draw_target(uint64_t r, uint64_t total) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(r, total);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * total) >> 64);
#endif
}

// --- Philox-4x32-10 ------------------------------------------------------------------------

struct Philox4x32 {
  uint32_t v[4];
};

KDFAST_MATH_FN void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32 with 10 rounds of counter ctr under key (k0, k1).
KDFAST_MATH_FN Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, ctr.v[0], hi0, lo0);
    mulhilo32(kMul1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// Draws 2 block and 2 block + 1 of row `row` under seed: the two 64-bit words of one
// Philox block, (v1 << 32 | v0) and (v3 << 32 | v2).
KDFAST_MATH_FN void draw_pair(uint64_t seed, int64_t row, int64_t block, uint64_t& first, uint64_t& second) {
  const uint64_t r = static_cast<uint64_t>(row);
  const Philox4x32 out = philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(block), static_cast<uint32_t>(static_cast<uint64_t>(block) >> 32),
                  static_cast<uint32_t>(r), static_cast<uint32_t>(r >> 32)}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  first = (static_cast<uint64_t>(out.v[1]) << 32) | out.v[0];
  second = (static_cast<uint64_t>(out.v[3]) << 32) | out.v[2];
}

}  // namespace topk_sample
}  // namespace kdfast
