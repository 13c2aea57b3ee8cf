// sparse_kd_loss CPU kernels for x86-64 with AVX2 + FMA. The build compiles this file
// alone with -mavx2 -mfma -mf16c and links it after the portable objects, so inline
// functions shared with them keep their portable copy.
#ifndef __AVX2__
#error "sparse_kd_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (see setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "sparse_kd_kernel.h"

KDFAST_DEFINE_SPARSE_KD_CPU_KERNELS(avx2)
