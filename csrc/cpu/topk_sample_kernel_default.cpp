// topk_logits / sample_logits CPU kernels for any CPU (at::vec's portable Vectorized).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "topk_sample_kernel.h"

KDFAST_DEFINE_TOPK_SAMPLE_CPU_KERNELS(default)
