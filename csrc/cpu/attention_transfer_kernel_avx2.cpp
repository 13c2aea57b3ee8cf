// attention_transfer CPU kernels for x86-64 with AVX2 + FMA (built like
// kd_loss_kernel_avx2.cpp, with its own -m flags).
#ifndef __AVX2__
#error "attention_transfer_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (see setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "attention_transfer_kernel.h"

KDFAST_DEFINE_ATTENTION_TRANSFER_CPU_KERNELS(avx2)
