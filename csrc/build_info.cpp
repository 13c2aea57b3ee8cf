#include "build_info.h"

#include <ATen/Version.h>

namespace kdfast {

std::vector<std::string> cpu_capabilities_built() {
  std::vector<std::string> built{"DEFAULT"};
#ifdef KDFAST_CPU_AVX2
  built.emplace_back("AVX2");
#endif
#ifdef KDFAST_CPU_AVX512
  built.emplace_back("AVX512");
#endif
  return built;
}

std::string cpu_capability_in_use() {
  const std::string torch_cap = at::get_cpu_capability();
#ifdef KDFAST_CPU_AVX512
  if (torch_cap == "AVX512") return "AVX512";
#endif
#ifdef KDFAST_CPU_AVX2
  if (torch_cap == "AVX2" || torch_cap == "AVX512") return "AVX2";
#endif
  return "DEFAULT";
}

}  // namespace kdfast
