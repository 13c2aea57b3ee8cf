// Entry points of the feature_loss CPU kernels, one pair per instruction set the build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../feature_loss.h"

namespace kdfast {
namespace cpu {

// forward: per-row loss, stats and (when p.grad_* are set) gradients in one call;
// backward: gradients recomputed with the per-row weights p.grad_loss and p.stats_in.
#define KDFAST_DECLARE_FEATURE_LOSS_CPU_KERNELS(SUFFIX)                                             \
  void feature_loss_forward_##SUFFIX(const FeatureLossParams& p, c10::ScalarType s, c10::ScalarType t); \
  void feature_loss_backward_##SUFFIX(const FeatureLossParams& p, c10::ScalarType s, c10::ScalarType t);

KDFAST_DECLARE_FEATURE_LOSS_CPU_KERNELS(default)
#ifdef KDFAST_CPU_AVX2
KDFAST_DECLARE_FEATURE_LOSS_CPU_KERNELS(avx2)
#endif
#ifdef KDFAST_CPU_AVX512
KDFAST_DECLARE_FEATURE_LOSS_CPU_KERNELS(avx512)
#endif

#undef KDFAST_DECLARE_FEATURE_LOSS_CPU_KERNELS

}  // namespace cpu
}  // namespace kdfast
