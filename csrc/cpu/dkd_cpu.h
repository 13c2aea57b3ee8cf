// Entry points of the dkd_loss CPU kernels, one pair per instruction set the build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../dkd.h"

namespace kdfast {
namespace cpu {

// forward: loss, stats and (when p.grad_* are set) gradients in one pass over the logits;
// backward: gradients recomputed from the stats.
#define KDFAST_DECLARE_DKD_CPU_KERNELS(SUFFIX)                                              \
  void dkd_forward_##SUFFIX(const DkdParams& p, c10::ScalarType s, c10::ScalarType t); \
  void dkd_backward_##SUFFIX(const DkdParams& p, c10::ScalarType s, c10::ScalarType t);

KDFAST_DECLARE_DKD_CPU_KERNELS(default)
#ifdef KDFAST_CPU_AVX2
KDFAST_DECLARE_DKD_CPU_KERNELS(avx2)
#endif
#ifdef KDFAST_CPU_AVX512
KDFAST_DECLARE_DKD_CPU_KERNELS(avx512)
#endif

#undef KDFAST_DECLARE_DKD_CPU_KERNELS

}  // namespace cpu
}  // namespace kdfast
