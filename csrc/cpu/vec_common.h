// Vector building blocks shared by every CPU kernel of kdfast (kd_loss, dkd_loss,
// feature_loss, attention_transfer): loads and stores of any input dtype as float (or
// double) vectors, horizontal reductions, the fast exp of non-positive arguments, the
// lane-mask policy and the at::vec policy of the shared math headers (VecOps), and the
// (student dtype, teacher dtype) dispatch.
//
// Included by the per-op kernel headers, which are compiled once per instruction set
// (files *_kernel_{default,avx2,avx512}.cpp define CPU_CAPABILITY first).
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

namespace kdfast {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Loads / stores a Vectorized<acc_t> worth of elements of type T.
template <typename T, typename acc_t>
struct VecIO {
  using Vec = Vectorized<acc_t>;
  static Vec load(const T* p) { return Vec::loadu(p); }
  static void store(const Vec& v, T* p, int64_t n) { v.store(p, static_cast<int>(n)); }
};

template <typename T>
struct ReducedVecIO {
  using Vec = Vectorized<float>;
  static Vec load(const T* p) {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
  static void store(const Vec& v, T* p, int64_t n) {
    at::vec::convert_from_float<T>(v, v).store(p, static_cast<int>(n));
  }
};
template <>
struct VecIO<c10::BFloat16, float> : ReducedVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half, float> : ReducedVecIO<c10::Half> {};

// Loads n <= Vec::size() elements, the missing lanes set to pad. The default, -inf, is
// what the softmax kernels treat as a masked-out vocabulary entry (zero probability,
// zero contribution); sums of products pad with 0.
template <typename T, typename acc_t>
inline Vectorized<acc_t> load_tail(const T* p, int64_t n,
                                   acc_t pad = -std::numeric_limits<acc_t>::infinity()) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  alignas(64) acc_t buf[W];
  for (int64_t k = 0; k < W; ++k) buf[k] = k < n ? static_cast<acc_t>(p[k]) : pad;
  return Vectorized<acc_t>::loadu(buf);
}

template <typename T, typename acc_t>
inline Vectorized<acc_t> load_n(const T* p, int64_t n, acc_t pad = -std::numeric_limits<acc_t>::infinity()) {
  return n == Vectorized<acc_t>::size() ? VecIO<T, acc_t>::load(p) : load_tail<T, acc_t>(p, n, pad);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

// exp of float lanes that are <= 0 or -inf, which is every exp the kernels take
// (logits minus their row maximum, log-probabilities, log-ratios of a mixture): the
// hot loops are bound by it. Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a
// degree-5 polynomial fitted for relative error (at most 1.8e-7, exp(0) exactly 1;
// at::vec's exp_u20 is about 1.2e-6) in five FMAs, and the 2^n scaling
// that turns everything below about -88 (-inf included) into exactly 0. NaN lanes give
// a finite value; rows holding NaN never reach here (the max pass flags them).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;  // ln 2 = kLn2Hi + kLn2Lo, n * kLn2Hi exact for |n| < 2^15
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr int kExpPolyTerms = 6;  // exp(r) on |r| <= ln2 / 2, highest degree first
constexpr float kExpPoly[kExpPolyTerms] = {8.2880296e-3f, 4.1898429e-2f, 1.6667673e-1f,
                                           4.9999145e-1f, 9.9999970e-1f, 1.0f};

inline Vectorized<float> exp_nonpositive(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(v, _mm512_set1_ps(-104.0f));  // 2^-150 scaling rounds to 0
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < kExpPolyTerms; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  return _mm512_scalef_ps(p, n);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = _mm256_max_ps(v, _mm256_set1_ps(-88.0f));  // n <= -127 makes 2^n exactly 0
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < kExpPolyTerms; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
#else
  return v.exp_u20();  // portable build: at::vec's polynomial (<= 20 ulp, 0 for -inf)
#endif
}

// Lane masks of the vector policy. at::vec's comparisons return all-ones lanes, and its
// blendv turns them back into a mask register: with AVX-512 the policy keeps comparison
// results in mask registers instead (one instruction per select, not three).
template <typename acc_t>
struct VecMasks {
  using V = Vectorized<acc_t>;
  using Mask = V;
  static Mask gt(const V& a, const V& b) { return a > b; }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static bool any(const Mask& m) { return m.zero_mask() != (1 << V::size()) - 1; }
};
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct VecMasks<float> {
  using V = Vectorized<float>;
  using Mask = __mmask16;
  static Mask gt(const V& a, const V& b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static Mask lt(const V& a, const V& b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static Mask eq(const V& a, const V& b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static V select(Mask m, const V& a, const V& b) { return _mm512_mask_blend_ps(m, b, a); }
  static bool any(Mask m) { return m != 0; }
};
template <>
struct VecMasks<double> {
  using V = Vectorized<double>;
  using Mask = __mmask8;
  static Mask gt(const V& a, const V& b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  static Mask lt(const V& a, const V& b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  static Mask eq(const V& a, const V& b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  static V select(Mask m, const V& a, const V& b) { return _mm512_mask_blend_pd(m, b, a); }
  static bool any(Mask m) { return m != 0; }
};
#endif

// The vector policy of kd_loss_math.h: exp_nonpositive in float, Sleef's 1-ulp exp in
// double, where the kernels serve gradcheck.
template <typename acc_t>
struct VecOps : VecMasks<acc_t> {
  using Scalar = acc_t;
  using V = Vectorized<acc_t>;
  static V exp(const V& x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return exp_nonpositive(x);
    } else {
      return x.exp();
    }
  }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
};

// Scalar max over n elements of a row (NaN propagates).
template <typename T, typename acc_t>
inline acc_t row_max(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Plain maxima (a NaN operand is dropped) and the NaN lanes collected in a mask
    // register apart: two instructions per vector instead of at::vec's three.
    __m512 x0 = m0, x1 = m0, x2 = m0, x3 = m0;
    __mmask16 nan = 0;
    for (; j + 4 * W <= n; j += 4 * W) {
      const __m512 v0 = VecIO<T, acc_t>::load(p + j), v1 = VecIO<T, acc_t>::load(p + j + W);
      const __m512 v2 = VecIO<T, acc_t>::load(p + j + 2 * W), v3 = VecIO<T, acc_t>::load(p + j + 3 * W);
      x0 = _mm512_max_ps(x0, v0);
      x1 = _mm512_max_ps(x1, v1);
      x2 = _mm512_max_ps(x2, v2);
      x3 = _mm512_max_ps(x3, v3);
      nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v2, v3, _CMP_UNORD_Q);
    }
    if (nan != 0) return std::numeric_limits<acc_t>::quiet_NaN();
    m0 = x0;
    m1 = x1;
    m2 = x2;
    m3 = x3;
  }
#endif
  for (; j + 4 * W <= n; j += 4 * W) {
    m0 = at::vec::maximum(m0, VecIO<T, acc_t>::load(p + j));
    m1 = at::vec::maximum(m1, VecIO<T, acc_t>::load(p + j + W));
    m2 = at::vec::maximum(m2, VecIO<T, acc_t>::load(p + j + 2 * W));
    m3 = at::vec::maximum(m3, VecIO<T, acc_t>::load(p + j + 3 * W));
  }
  for (; j < n; j += W) m0 = at::vec::maximum(m0, load_n<T, acc_t>(p + j, std::min(W, n - j)));
  return hmax(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// Calls f.template operator()<s_t, t_t, acc_t>() for the (student, teacher) dtypes.
template <typename F>
void dispatch_dtypes(c10::ScalarType s, c10::ScalarType t, const F& f) {
  using c10::BFloat16;
  using c10::Half;
  using c10::ScalarType;
  auto with_teacher = [&](auto s_tag) {
    using s_t = decltype(s_tag);
    switch (t) {
      case ScalarType::Float: f.template operator()<s_t, float, float>(); return;
      case ScalarType::Half: f.template operator()<s_t, Half, float>(); return;
      case ScalarType::BFloat16: f.template operator()<s_t, BFloat16, float>(); return;
      default: TORCH_CHECK(false, "kdfast: unsupported teacher dtype ", t);
    }
  };
  switch (s) {
    case ScalarType::Double:
      TORCH_CHECK(t == ScalarType::Double, "kdfast: a float64 student needs a float64 teacher");
      f.template operator()<double, double, double>();
      return;
    case ScalarType::Float: with_teacher(float{}); return;
    case ScalarType::Half: with_teacher(Half{}); return;
    case ScalarType::BFloat16: with_teacher(BFloat16{}); return;
    default: TORCH_CHECK(false, "kdfast: unsupported student dtype ", s);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace kdfast
