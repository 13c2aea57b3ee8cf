// topk_logits / sample_logits CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ); built
// like kd_loss_kernel_avx512.cpp with the AVX-512 flags of setup.py.
#ifndef __AVX512F__
#error "topk_sample_kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq (see setup.py)"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "topk_sample_kernel.h"

KDFAST_DEFINE_TOPK_SAMPLE_CPU_KERNELS(avx512)
