// Facts about this build that kdfast._C reports (and the CPU dispatch uses).
#pragma once

#include <string>
#include <vector>

#ifndef KDFAST_VERSION
#define KDFAST_VERSION "0.0.0+unknown"
#endif

namespace kdfast {

// Instruction sets the CPU kernels were compiled for, e.g. {"DEFAULT", "AVX2", "AVX512"}.
std::vector<std::string> cpu_capabilities_built();

// The best compiled instruction set this CPU runs, capped by at::get_cpu_capability()
// (so ATEN_CPU_CAPABILITY=avx2 / default selects a narrower kernel).
std::string cpu_capability_in_use();

}  // namespace kdfast
