// CUDA kernels of topk_logits and sample_logits and their host functions; the shared
// rules (ordering keys, Philox, integer weights, degenerate rows) live in
// ../topk_sample_math.h, the same as the CPU kernels'.
//
// topk_logits: one block per row (a grid-stride loop over rows).
//   1. the maximum key and the histogram of the key's top 8 bits, in one pass (HBM);
//   2. a radix select of the k-th key, 8 bits per pass over the row (L2): each pass
//      histograms the next digit of the keys that share the digits chosen so far; it stops
//      early when a whole bin is needed, and after the bits the input dtype can set (bf16
//      keys have 16, float16 19: 2 or 3 passes in all; float32 4; float64 8);
//   3. a collection pass (L2) that also sums exp((x - max) / T): keys above the selected
//      prefix go to the first k - need slots (any order), keys equal to it are ranked in
//      index order (warp ballots, a block scan per tile) and the first `need` taken;
//   4. a bitonic sort of the k winners in shared memory, by (key descending, index
//      ascending), and the outputs.
// Histograms use warp-aggregated shared atomics (__match_any_sync), so clustered values
// do not serialise a warp on one bin.
//
// sample_logits: one block per row.
//   1. the maximum key (HBM);
//   2. the integer weights' sum of every tile of 32 * epl elements (a warp per tile, L2),
//      then their exclusive prefix (exact integer arithmetic in double: any order gives
//      the same bits);
//   3. the draws: Philox words turned into targets in [0, Z), sorted (bitonic);
//   4. the walk, a warp per target: a binary search of its tile, then the tile's weights
//      and a warp scan find the token (L2);
//   5. the distinct tokens (ascending, as the targets are) with their counts, then padding.
// No host synchronisation (the seed is read on the device): CUDA-graph capturable.
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
#include <limits>
#include <tuple>

#include "../topk_sample.h"
#include "../topk_sample_math.h"
#include "common.cuh"

namespace kdfast {
namespace cuda {
namespace {

namespace ts = ::kdfast::topk_sample;

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRadixBins = 256;
constexpr int kMaxTiles = 1024;  // sample_logits: tiles per row (their prefix lives in shared memory)

// Low bits of a float32 (float64) key that the input dtype never sets: a bf16 value is a
// float32 with 16 zero low bits, a float16 one has 13 (NaN's key aside, which is unique).
template <typename T>
struct LowZeroBits {
  static constexpr int value = 0;
};
template <>
struct LowZeroBits<c10::BFloat16> {
  static constexpr int value = 16;
};
template <>
struct LowZeroBits<c10::Half> {
  static constexpr int value = 13;
};

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarp; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarp; }
__device__ __forceinline__ int num_warps() { return static_cast<int>(blockDim.x) / kWarp; }

template <typename acc_t>
__device__ __forceinline__ acc_t exp_acc(acc_t x) {
  return math::ScalarOps<acc_t>::exp(x);
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t load_acc(const T* row, int64_t j) {
  return static_cast<acc_t>(row[j]);
}

// Maximum of an unsigned key over the block (every thread gets it); smem: kMaxWarps keys.
template <typename K>
__device__ __forceinline__ K block_max_key(K v, K* smem) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
    const K o = __shfl_xor_sync(kFullMask, v, mask);
    v = o > v ? o : v;
  }
  if (lane_id() == 0) smem[warp_id()] = v;
  __syncthreads();
  K r = smem[0];
  for (int w = 1; w < num_warps(); ++w) r = smem[w] > r ? smem[w] : r;
  __syncthreads();
  return r;
}

// Inclusive scan over the warp's lanes (lane 0 first).
template <typename V>
__device__ __forceinline__ V warp_inclusive_scan(V v) {
#pragma unroll
  for (int d = 1; d < kWarp; d <<= 1) {
    const V o = __shfl_up_sync(kFullMask, v, d);
    if (lane_id() >= d) v += o;
  }
  return v;
}

// Exclusive scan of v over the block in thread order; total gets the block's sum.
// smem: kMaxWarps ints. Every thread must call it.
__device__ __forceinline__ int block_exclusive_scan(int v, int* smem, int& total) {
  const int incl = warp_inclusive_scan(v);
  if (lane_id() == kWarp - 1) smem[warp_id()] = incl;
  __syncthreads();
  int base = 0, sum = 0;
  for (int w = 0; w < num_warps(); ++w) {
    if (w < warp_id()) base += smem[w];
    sum += smem[w];
  }
  __syncthreads();
  total = sum;
  return base + incl - v;
}

// hist[digit] += 1 for every lane with digit >= 0, one atomic per distinct digit of the
// warp. Every lane of the warp must call it.
__device__ __forceinline__ void histogram_add(int* hist, int digit) {
  const unsigned peers = __match_any_sync(kFullMask, digit);
  if (digit >= 0 && lane_id() == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
}

// The radix select's state: the keys whose bits under `mask` equal `prefix` are the
// candidates; `need` of them belong to the top k (the others above them are in).
template <typename K>
struct RadixState {
  K prefix;
  K mask;
  int shift;  // bit position of the digit the next pass resolves (+ 8)
  int need;
  int done;   // 1: no further pass needed
};

// Picks the bin of the k-th key from hist (warp 0 scans the bins from the top), narrows
// st to it. Called by every thread; hist must be complete (a barrier before).
template <typename K>
__device__ __forceinline__ void select_bin(const int* hist, RadixState<K>& st, int low_zero_bits,
                                           RadixState<K>* shared_state) {
  if (warp_id() == 0) {
    const int lane = lane_id();
    int counts[kRadixBins / kWarp];
    int local = 0;
#pragma unroll
    for (int v = 0; v < kRadixBins / kWarp; ++v) {
      counts[v] = hist[kRadixBins - 1 - lane * (kRadixBins / kWarp) - v];
      local += counts[v];
    }
    const int incl = warp_inclusive_scan(local);
    int above = incl - local;
    if (above < st.need && st.need <= incl) {  // exactly one lane holds the bin
#pragma unroll
      for (int v = 0; v < kRadixBins / kWarp; ++v) {
        if (above + counts[v] >= st.need) {
          const int bin = kRadixBins - 1 - lane * (kRadixBins / kWarp) - v;
          RadixState<K> next = st;
          next.prefix |= static_cast<K>(bin) << st.shift;
          next.mask |= static_cast<K>(kRadixBins - 1) << st.shift;
          next.need = st.need - above;
          next.done = (counts[v] == next.need || st.shift <= low_zero_bits) ? 1 : 0;
          *shared_state = next;
          break;
        }
        above += counts[v];
      }
    }
  }
  __syncthreads();
  st = *shared_state;
  __syncthreads();
}

template <typename index_t>
__device__ __forceinline__ void store_index(void* out, int64_t pos, int64_t value) {
  static_cast<index_t*>(out)[pos] = static_cast<index_t>(value);
}

__device__ __forceinline__ void write_index(void* out, bool int64, int64_t pos, int64_t value) {
  if (int64) {
    store_index<int64_t>(out, pos, value);
  } else {
    store_index<int32_t>(out, pos, value);
  }
}

// ---------------------------------------------------------------------------------------
// topk_logits

// Dynamic shared memory: keys[kpad], indices[kpad] (int32), hist[256].
template <typename acc_t>
size_t topk_smem_bytes(int kpad) {
  return static_cast<size_t>(kpad) * (sizeof(ts::key_t<acc_t>) + sizeof(int32_t)) + kRadixBins * sizeof(int);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) topk_logits_kernel(const TopkParams p, int kpad) {
  using K = ts::key_t<acc_t>;
  constexpr int kKeyBits = 8 * static_cast<int>(sizeof(K));
  extern __shared__ __align__(16) unsigned char smem_raw[];
  K* keys = reinterpret_cast<K*>(smem_raw);
  int32_t* slots = reinterpret_cast<int32_t*>(keys + kpad);
  int* hist = reinterpret_cast<int*>(slots + kpad);
  __shared__ K smem_keys[kMaxWarps];
  __shared__ acc_t smem_acc[kMaxWarps];
  __shared__ int smem_int[kMaxWarps];
  __shared__ RadixState<K> shared_state;
  __shared__ int n_above;

  const int64_t vocab = p.vocab, k = p.k;
  const acc_t inv_temp = static_cast<acc_t>(1.0 / p.temperature);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + p.layout.offset(row);
    for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) hist[b] = 0;
    if (threadIdx.x == 0) n_above = 0;
    __syncthreads();

    // 1. maximum key and the top digit's histogram. Loops run the same iterations in
    //    every thread (warp-wide histogram_add).
    RadixState<K> st{K(0), K(0), kKeyBits - 8, static_cast<int>(k), 0};
    K kmax = 0;
    for (int64_t j0 = 0; j0 < vocab; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      int digit = -1;
      if (j < vocab) {
        const K key = ts::order_key<acc_t>(load_acc<T, acc_t>(x, j));
        kmax = key > kmax ? key : kmax;
        digit = static_cast<int>(key >> st.shift);
      }
      histogram_add(hist, digit);
    }
    kmax = block_max_key(kmax, smem_keys);  // its barriers also complete the histogram
    select_bin(hist, st, LowZeroBits<T>::value, &shared_state);

    // 2. the next digits, until the k-th key's bin is decided (shift >= 8 always holds
    //    there; the bound only guards against a broken invariant looping forever).
    while (!st.done && st.shift >= 8) {
      st.shift -= 8;
      for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) hist[b] = 0;
      __syncthreads();
      for (int64_t j0 = 0; j0 < vocab; j0 += blockDim.x) {
        const int64_t j = j0 + threadIdx.x;
        int digit = -1;
        if (j < vocab) {
          const K key = ts::order_key<acc_t>(load_acc<T, acc_t>(x, j));
          if ((key & st.mask) == st.prefix) digit = static_cast<int>((key >> st.shift) & K(kRadixBins - 1));
        }
        histogram_add(hist, digit);
      }
      __syncthreads();
      select_bin(hist, st, LowZeroBits<T>::value, &shared_state);
    }

    // 3. collect the winners; sum the exponentials.
    const acc_t max = ts::key_value<acc_t>(kmax);
    const ts::RowKind kind = ts::row_kind(max);
    const int above = static_cast<int>(k) - st.need;  // keys above the prefix: all in
    acc_t sum = 0;
    int tie_base = 0;  // ties (keys equal to the prefix) seen in earlier tiles
    for (int64_t j0 = 0; j0 < vocab; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      const bool valid = j < vocab;
      const acc_t v = valid ? load_acc<T, acc_t>(x, j) : -std::numeric_limits<acc_t>::infinity();
      const K key = ts::order_key<acc_t>(v);
      const K masked = key & st.mask;
      if (valid && masked > st.prefix) {
        const int slot = atomicAdd(&n_above, 1);
        keys[slot] = key;
        slots[slot] = static_cast<int32_t>(j);
      }
      if (tie_base < st.need) {  // uniform over the block
        const bool tie = valid && masked == st.prefix;
        int tiles_ties = 0;
        const int rank = block_exclusive_scan(tie ? 1 : 0, smem_int, tiles_ties) + tie_base;
        if (tie && rank < st.need) {
          keys[above + rank] = key;
          slots[above + rank] = static_cast<int32_t>(j);
        }
        tie_base += tiles_ties;
      }
      if (kind == ts::RowKind::Normal) sum += exp_acc<acc_t>((v - max) * inv_temp);
    }
    for (int i = static_cast<int>(k) + threadIdx.x; i < kpad; i += blockDim.x) {
      keys[i] = K(0);  // below every real key
      slots[i] = std::numeric_limits<int32_t>::max();
    }
    sum = block_allreduce(sum, [](acc_t a, acc_t b) { return a + b; }, smem_acc);  // barriers included

    // 4. bitonic sort, best first.
    for (int size = 2; size <= kpad; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int i = threadIdx.x; i < kpad / 2; i += blockDim.x) {
          const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
          const bool best_first = (lo & size) == 0;
          const bool hi_first = ts::ranks_before(keys[hi], slots[hi], keys[lo], slots[lo]);
          if (hi_first == best_first) {
            const K tk = keys[lo];
            keys[lo] = keys[hi];
            keys[hi] = tk;
            const int32_t ti = slots[lo];
            slots[lo] = slots[hi];
            slots[hi] = ti;
          }
        }
        __syncthreads();
      }
    }
    const acc_t log_sum = kind == ts::RowKind::Normal ? math::ScalarOps<acc_t>::log(sum) : acc_t(0);
    acc_t* out = static_cast<acc_t*>(p.logprobs) + row * k;
    for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
      write_index(p.indices, p.indices_int64, row * k + i, slots[i]);
      out[i] = kind == ts::RowKind::Normal ? ts::logprob<acc_t>(ts::key_value<acc_t>(keys[i]), max, inv_temp, log_sum)
                                           : ts::degenerate_logprob<acc_t>(kind);
    }
    __syncthreads();  // shared memory is reused by the next row
  }
}

// ---------------------------------------------------------------------------------------
// sample_logits

// Dynamic shared memory: tile prefix [tiles + 1] (double), targets [spad] (uint64).
size_t sample_smem_bytes(int64_t tiles, int spad) {
  return static_cast<size_t>(tiles + 1) * sizeof(double) + static_cast<size_t>(spad) * sizeof(uint64_t);
}

// The integer weight of element j (0 outside the row).
template <typename T, typename acc_t>
__device__ __forceinline__ double weight_of(const T* x, int64_t j, int64_t vocab, acc_t max, acc_t inv_temp,
                                            double scale) {
  if (j >= vocab) return 0.0;
  return ts::quantized_weight<acc_t>(exp_acc<acc_t>((load_acc<T, acc_t>(x, j) - max) * inv_temp), scale);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) sample_logits_kernel(const SampleParams p, int epl, int64_t tiles,
                                                                    int spad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* prefix = reinterpret_cast<double*>(smem_raw);                       // [tiles + 1]
  uint64_t* targets = reinterpret_cast<uint64_t*>(prefix + tiles + 1);        // [spad]
  __shared__ ts::key_t<acc_t> smem_keys[kMaxWarps];
  __shared__ int smem_int[kMaxWarps];

  const int64_t vocab = p.vocab, draws = p.num_samples;
  const int64_t tile_elems = static_cast<int64_t>(kWarp) * epl;
  const acc_t inv_temp = static_cast<acc_t>(1.0 / p.temperature);
  const double scale = p.weight_scale;
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const int lane = lane_id();
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + p.layout.offset(row);
    int64_t* out_i64 = p.indices_int64 ? static_cast<int64_t*>(p.indices) + row * draws : nullptr;
    int32_t* out_i32 = p.indices_int64 ? nullptr : static_cast<int32_t*>(p.indices) + row * draws;
    float* out_p = p.probs + row * draws;

    // 1. the maximum.
    ts::key_t<acc_t> kmax = 0;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const auto key = ts::order_key<acc_t>(load_acc<T, acc_t>(x, j));
      kmax = key > kmax ? key : kmax;
    }
    kmax = block_max_key(kmax, smem_keys);
    const acc_t max = ts::key_value<acc_t>(kmax);
    int distinct = 0;
    if (ts::row_kind(max) == ts::RowKind::Normal) {
      // 2. tile sums (a warp per tile; lane l holds elements l * epl + [0, epl) of it), then
      //    their exclusive prefix by warp 0 (each lane a contiguous run of tiles).
      for (int64_t t = warp_id(); t < tiles; t += num_warps()) {
        const int64_t first = t * tile_elems + static_cast<int64_t>(lane) * epl;
        double s = 0;
        for (int v = 0; v < epl; ++v) s += weight_of<T, acc_t>(x, first + v, vocab, max, inv_temp, scale);
#pragma unroll
        for (int mask = kWarp / 2; mask > 0; mask >>= 1) s += __shfl_xor_sync(kFullMask, s, mask);
        if (lane == 0) prefix[t] = s;
      }
      __syncthreads();
      if (warp_id() == 0) {
        const int64_t per_lane = (tiles + kWarp - 1) / kWarp;
        const int64_t lo = std::min<int64_t>(tiles, lane * per_lane), hi = std::min<int64_t>(tiles, lo + per_lane);
        double local = 0;
        for (int64_t t = lo; t < hi; ++t) local += prefix[t];
        double run = warp_inclusive_scan(local) - local;
        for (int64_t t = lo; t < hi; ++t) {
          const double w = prefix[t];
          prefix[t] = run;
          run += w;
        }
        if (lane == kWarp - 1) prefix[tiles] = run;  // the total Z
      }
      __syncthreads();
      // 3. targets in [0, Z), sorted (padding above every target).
      const uint64_t total = static_cast<uint64_t>(prefix[tiles]);
      for (int64_t j = 2 * static_cast<int64_t>(threadIdx.x); j < spad; j += 2 * static_cast<int64_t>(blockDim.x)) {
        uint64_t a = ~uint64_t(0), b = ~uint64_t(0);
        if (j < draws) {
          ts::draw_pair(seed, row, j / 2, a, b);
          a = ts::draw_target(a, total);
          b = j + 1 < draws ? ts::draw_target(b, total) : ~uint64_t(0);
        }
        targets[j] = a;
        if (j + 1 < spad) targets[j + 1] = b;
      }
      __syncthreads();
      for (int size = 2; size <= spad; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
          for (int i = threadIdx.x; i < spad / 2; i += blockDim.x) {
            const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
            const bool ascending = (lo & size) == 0;
            if ((targets[lo] > targets[hi]) == ascending) {
              const uint64_t t = targets[lo];
              targets[lo] = targets[hi];
              targets[hi] = t;
            }
          }
          __syncthreads();
        }
      }
      // 4. the walk: a warp per target. The tile is the last one starting at or before
      //    the target; in it, token i covers [W_i, W_i + w_i) (exact integers), and exactly
      //    one element covers the target. Its index replaces the target in `targets`.
      for (int64_t j = warp_id(); j < draws; j += num_warps()) {
        const double target = static_cast<double>(targets[j]);
        __syncwarp();
        int64_t lo = 0, hi = tiles - 1;  // prefix[lo] <= target < prefix[hi + 1]
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) / 2;
          if (prefix[mid] <= target) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        const int64_t first = lo * tile_elems + static_cast<int64_t>(lane) * epl;
        double local = 0;
        for (int v = 0; v < epl; ++v) local += weight_of<T, acc_t>(x, first + v, vocab, max, inv_temp, scale);
        double c = prefix[lo] + (warp_inclusive_scan(local) - local);
        for (int v = 0; v < epl; ++v) {
          const double w = weight_of<T, acc_t>(x, first + v, vocab, max, inv_temp, scale);
          if (c <= target && target < c + w) targets[j] = static_cast<uint64_t>(first + v);
          c += w;
        }
      }
      __syncthreads();
      // 5. distinct tokens (ascending) with counts: each thread a contiguous run of draws;
      //    a run of equal tokens is written by the thread holding its first draw.
      const int64_t per_thread = (draws + blockDim.x - 1) / blockDim.x;
      const int64_t lo = std::min<int64_t>(draws, threadIdx.x * per_thread);
      const int64_t hi = std::min<int64_t>(draws, lo + per_thread);
      int firsts = 0;
      for (int64_t j = lo; j < hi; ++j) firsts += (j == 0 || targets[j] != targets[j - 1]) ? 1 : 0;
      int pos = block_exclusive_scan(firsts, smem_int, distinct);
      for (int64_t j = lo; j < hi; ++j) {
        if (j > 0 && targets[j] == targets[j - 1]) continue;
        int64_t end = j + 1;
        while (end < draws && targets[end] == targets[j]) ++end;
        if (out_i64 != nullptr) {
          out_i64[pos] = static_cast<int64_t>(targets[j]);
        } else {
          out_i32[pos] = static_cast<int32_t>(targets[j]);
        }
        out_p[pos] = static_cast<float>(end - j) / static_cast<float>(draws);
        ++pos;
      }
    }
    // padding (all of a row without a distribution)
    for (int64_t j = distinct + threadIdx.x; j < draws; j += blockDim.x) {
      if (out_i64 != nullptr) {
        out_i64[j] = -1;
      } else {
        out_i32[j] = -1;
      }
      out_p[j] = 0.0f;
    }
    __syncthreads();  // shared memory is reused by the next row
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

int threads_for(int64_t vocab) {
  const int64_t want = (vocab + 15) / 16;  // about 16 elements per thread and pass
  const int64_t warps = std::max<int64_t>(4, (want + kWarp - 1) / kWarp);
  return static_cast<int>(std::min<int64_t>(kMaxWarps, warps) * kWarp);
}

unsigned blocks_for(int64_t rows, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = sms * std::max(1, 2048 / threads);
  return static_cast<unsigned>(std::min<int64_t>(rows, resident));
}

// Calls f.template operator()<T, acc_t>() for the logits' dtype.
template <typename F>
void dispatch_logits(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kDouble: f.template operator()<double, double>(); return;
    case at::kFloat: f.template operator()<float, float>(); return;
    case at::kHalf: f.template operator()<c10::Half, float>(); return;
    case at::kBFloat16: f.template operator()<c10::BFloat16, float>(); return;
    default: TORCH_CHECK(false, "kdfast: unsupported teacher_logits dtype ", dtype);
  }
}

// Lets a kernel use more than the default 48 KB of dynamic shared memory when it asks.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

struct TopkLaunch {
  const TopkParams& p;
  template <typename T, typename acc_t>
  void operator()() const {
    const int kpad = next_pow2(p.k);
    const int threads = threads_for(p.vocab);
    const size_t smem = topk_smem_bytes<acc_t>(kpad);
    auto kernel = &topk_logits_kernel<T, acc_t>;
    allow_smem(kernel, smem);
    kernel<<<blocks_for(p.rows, threads), threads, smem, at::cuda::getCurrentCUDAStream()>>>(p, kpad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct SampleLaunch {
  const SampleParams& p;
  template <typename T, typename acc_t>
  void operator()() const {
    const int64_t epl = std::max<int64_t>(4, (p.vocab + int64_t(kWarp) * kMaxTiles - 1) / (int64_t(kWarp) * kMaxTiles));
    const int64_t tiles = (p.vocab + kWarp * epl - 1) / (kWarp * epl);
    const int spad = next_pow2(p.num_samples);
    const int threads = threads_for(p.vocab);
    const size_t smem = sample_smem_bytes(tiles, spad);
    auto kernel = &sample_logits_kernel<T, acc_t>;
    allow_smem(kernel, smem);
    kernel<<<blocks_for(p.rows, threads), threads, smem, at::cuda::getCurrentCUDAStream()>>>(
        p, static_cast<int>(epl), tiles, spad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor> topk_logits_cuda(const at::Tensor& logits, int64_t k, double temperature,
                                                    at::ScalarType index_dtype) {
  check_cuda(logits, "topk_logits", "teacher_logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  TopkProblem problem = prepare_topk(logits, k, temperature, index_dtype);
  if (problem.params.rows > 0) dispatch_logits(problem.logits.scalar_type(), TopkLaunch{problem.params});
  return {problem.indices, problem.logprobs};
}

std::tuple<at::Tensor, at::Tensor> sample_logits_cuda(const at::Tensor& logits, int64_t num_samples,
                                                      double temperature, const at::Tensor& seed,
                                                      at::ScalarType index_dtype) {
  check_cuda(logits, "sample_logits", "teacher_logits");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  SampleProblem problem = prepare_sample(logits, num_samples, temperature, seed, index_dtype);
  if (problem.params.rows > 0) dispatch_logits(problem.logits.scalar_type(), SampleLaunch{problem.params});
  return {problem.indices, problem.probs};
}

}  // namespace
}  // namespace cuda
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("topk_logits", &kdfast::cuda::topk_logits_cuda);
  m.impl("sample_logits", &kdfast::cuda::sample_logits_cuda);
}
