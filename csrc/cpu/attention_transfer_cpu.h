// Entry points of the attention_transfer CPU kernels, one pair per instruction set the
// build compiled.
#pragma once

#include <c10/core/ScalarType.h>

#include "../attention_transfer.h"

namespace kdfast {
namespace cpu {

// forward: per-sample statistics and (when p.grad_* are set) gradients at a loss
// gradient of 1, one sample per thread at a time; backward: gradients scaled by
// *p.grad_loss from the statistics p.stats_in.
#define KDFAST_DECLARE_ATTENTION_TRANSFER_CPU_KERNELS(SUFFIX)                                                \
  void attention_transfer_forward_##SUFFIX(const AttentionTransferParams& p, c10::ScalarType s, c10::ScalarType t); \
  void attention_transfer_backward_##SUFFIX(const AttentionTransferParams& p, c10::ScalarType s, c10::ScalarType t);

KDFAST_DECLARE_ATTENTION_TRANSFER_CPU_KERNELS(default)
#ifdef KDFAST_CPU_AVX2
KDFAST_DECLARE_ATTENTION_TRANSFER_CPU_KERNELS(avx2)
#endif
#ifdef KDFAST_CPU_AVX512
KDFAST_DECLARE_ATTENTION_TRANSFER_CPU_KERNELS(avx512)
#endif

#undef KDFAST_DECLARE_ATTENTION_TRANSFER_CPU_KERNELS

}  // namespace cpu
}  // namespace kdfast
