// sparse_kd_loss CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ); built like
// sparse_kd_kernel_avx2.cpp with the AVX-512 flags of setup.py.
#ifndef __AVX512F__
#error "sparse_kd_kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (see setup.py)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "sparse_kd_kernel.h"

KDFAST_DEFINE_SPARSE_KD_CPU_KERNELS(avx512)
