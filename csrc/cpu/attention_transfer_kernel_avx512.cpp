// attention_transfer CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ); built like
// kd_loss_kernel_avx512.cpp.
#ifndef __AVX512F__
#error "attention_transfer_kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (see setup.py)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "attention_transfer_kernel.h"

KDFAST_DEFINE_ATTENTION_TRANSFER_CPU_KERNELS(avx512)
