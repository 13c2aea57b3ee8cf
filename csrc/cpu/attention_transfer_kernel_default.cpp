// attention_transfer CPU kernels for any CPU (at::vec's portable Vectorized).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "attention_transfer_kernel.h"

KDFAST_DEFINE_ATTENTION_TRANSFER_CPU_KERNELS(default)
