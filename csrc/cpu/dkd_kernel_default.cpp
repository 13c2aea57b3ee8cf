// dkd_loss CPU kernels for any CPU (at::vec's portable Vectorized).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "dkd_kernel.h"

KDFAST_DEFINE_DKD_CPU_KERNELS(default)
