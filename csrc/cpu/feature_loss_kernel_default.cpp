// feature_loss CPU kernels for any CPU (at::vec's portable Vectorized).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "feature_loss_kernel.h"

KDFAST_DEFINE_FEATURE_LOSS_CPU_KERNELS(default)
