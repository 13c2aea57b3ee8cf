// sparse_kd_loss CPU kernels for any CPU (at::vec's portable Vectorized).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "sparse_kd_kernel.h"

KDFAST_DEFINE_SPARSE_KD_CPU_KERNELS(default)
