// Entry points of the CPU kernels, one pair per instruction set the build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../kd_loss.h"

namespace kdfast {
namespace cpu {

#define KDFAST_DECLARE_KD_LOSS_CPU_KERNELS(SUFFIX)                                              \
  void kd_loss_forward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t); \
  void kd_loss_backward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t);

KDFAST_DECLARE_KD_LOSS_CPU_KERNELS(default)
#ifdef KDFAST_CPU_AVX2
KDFAST_DECLARE_KD_LOSS_CPU_KERNELS(avx2)
#endif
#ifdef KDFAST_CPU_AVX512
KDFAST_DECLARE_KD_LOSS_CPU_KERNELS(avx512)
#endif

#undef KDFAST_DECLARE_KD_LOSS_CPU_KERNELS

}  // namespace cpu
}  // namespace kdfast
