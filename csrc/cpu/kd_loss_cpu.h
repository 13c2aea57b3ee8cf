// Entry points of the CPU kernels, one pair per instruction set the build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../kd_loss.h"

namespace kdfast {
namespace cpu {

// forward: loss, stats and (when p.grad_* are set) gradients in one pass over the logits;
// backward: gradients recomputed from the stats; scale_grad: grad[r, :] *= scale[r * stride].
#define KDFAST_DECLARE_KD_LOSS_CPU_KERNELS(SUFFIX)                                                  \
  void kd_loss_forward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t);     \
  void kd_loss_backward_##SUFFIX(const KdLossParams& p, c10::ScalarType s, c10::ScalarType t);    \
  void kd_loss_scale_grad_##SUFFIX(void* grad, c10::ScalarType dtype, int64_t rows, int64_t vocab, \
                                   const double* scale, int64_t scale_stride);

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
