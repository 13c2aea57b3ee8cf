// dkd_loss CPU kernels for x86-64 with AVX2 + FMA; built alone with -mavx2 -mfma -mf16c
// (setup.py) and linked after the portable objects, like kd_loss_kernel_avx2.cpp.
#ifndef __AVX2__
#error "dkd_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (see setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "dkd_kernel.h"

KDFAST_DEFINE_DKD_CPU_KERNELS(avx2)
