// Entry points of the topk_logits / sample_logits CPU kernels, one pair per instruction set
// the build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../topk_sample.h"

namespace kdfast {
namespace cpu {

// topk: indices and logprobs of every row in one pass over it; sample: the draws of every
// row (a max pass, a weight pass from cache, and a walk of the blocks holding the draws).
#define KDFAST_DECLARE_TOPK_SAMPLE_CPU_KERNELS(SUFFIX)                      \
  void topk_logits_##SUFFIX(const TopkParams& p, c10::ScalarType dtype); \
  void sample_logits_##SUFFIX(const SampleParams& p, c10::ScalarType dtype);

KDFAST_DECLARE_TOPK_SAMPLE_CPU_KERNELS(default)
#ifdef KDFAST_CPU_AVX2
KDFAST_DECLARE_TOPK_SAMPLE_CPU_KERNELS(avx2)
#endif
#ifdef KDFAST_CPU_AVX512
KDFAST_DECLARE_TOPK_SAMPLE_CPU_KERNELS(avx512)
#endif

#undef KDFAST_DECLARE_TOPK_SAMPLE_CPU_KERNELS

}  // namespace cpu
}  // namespace kdfast
