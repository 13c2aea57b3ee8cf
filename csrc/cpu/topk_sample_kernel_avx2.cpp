// topk_logits / sample_logits CPU kernels for x86-64 with AVX2 + FMA; built like
// kd_loss_kernel_avx2.cpp with the AVX2 flags of setup.py.
#ifndef __AVX2__
#error "topk_sample_kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c (see setup.py)"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "topk_sample_kernel.h"

KDFAST_DEFINE_TOPK_SAMPLE_CPU_KERNELS(avx2)
