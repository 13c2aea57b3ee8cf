// Entry points of the sparse_kd_loss CPU kernels, one pair per instruction set the build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../sparse_kd.h"

namespace kdfast {
namespace cpu {

// forward: loss, stats and (when p.grad_student is set) the gradient in one pass over the
// student logits; backward: the gradient recomputed from the stats. s: the student dtype.
#define KDFAST_DECLARE_SPARSE_KD_CPU_KERNELS(SUFFIX)                            \
  void sparse_kd_forward_##SUFFIX(const SparseKdParams& p, c10::ScalarType s); \
  void sparse_kd_backward_##SUFFIX(const SparseKdParams& p, c10::ScalarType s);

KDFAST_DECLARE_SPARSE_KD_CPU_KERNELS(default)
#ifdef KDFAST_CPU_AVX2
KDFAST_DECLARE_SPARSE_KD_CPU_KERNELS(avx2)
#endif
#ifdef KDFAST_CPU_AVX512
KDFAST_DECLARE_SPARSE_KD_CPU_KERNELS(avx512)
#endif

#undef KDFAST_DECLARE_SPARSE_KD_CPU_KERNELS

}  // namespace cpu
}  // namespace kdfast
