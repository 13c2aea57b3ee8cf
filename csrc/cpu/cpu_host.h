// What the CPU host functions of every op share: picking the kernels of the instruction
// set in use, the device check, the label check and count, and the reduction of the
// per-row losses.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "../build_info.h"

#ifdef KDFAST_CPU_AVX512
#define KDFAST_IF_CPU_AVX512(...) __VA_ARGS__
#else
#define KDFAST_IF_CPU_AVX512(...)
#endif
#ifdef KDFAST_CPU_AVX2
#define KDFAST_IF_CPU_AVX2(...) __VA_ARGS__
#else
#define KDFAST_IF_CPU_AVX2(...)
#endif

// The Kernels struct of the instruction set cpu_capability_in_use() names (which already
// accounts for what this build compiled and for ATEN_CPU_CAPABILITY). ENTRIES(isa) is the
// op's brace list of entry points of one instruction set, e.g.
//   #define DKD_ENTRIES(isa) {&dkd_forward_##isa, &dkd_backward_##isa}
// Entry points of an instruction set this build did not compile are never named.
#define KDFAST_SELECT_CPU_KERNELS(Kernels, ENTRIES)                            \
  ([]() -> Kernels {                                                           \
    const std::string cap = ::kdfast::cpu_capability_in_use();                 \
    KDFAST_IF_CPU_AVX512(if (cap == "AVX512") return Kernels ENTRIES(avx512);) \
    KDFAST_IF_CPU_AVX2(if (cap == "AVX2") return Kernels ENTRIES(avx2);)       \
    return Kernels ENTRIES(default);                                           \
  }())

namespace kdfast {
namespace cpu {

// "<op>: <name> must be a CPU tensor here, got <device>" unless x is on the CPU.
void check_cpu(const at::Tensor& x, const char* op, const char* name);

// Checks labels[0, rows) (a plain loop: no tensor ops on the hot path of small calls):
// each is in [0, vocab) or ignore_index, else fail(row, label, vocab, ignore_index).
// Returns the number of rows whose label is not ignore_index.
using LabelFailure = void (*)(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index);
int64_t count_labeled_rows(const int64_t* labels, int64_t rows, int64_t vocab, int64_t ignore_index,
                           LabelFailure fail);

// Sum of the per-row losses (float32 or float64) in double: a sum over thousands of rows
// keeps float32's precision.
double sum_rows(const at::Tensor& rows_loss);

// The one gradient weight of every row (d loss / d loss_i), as the kernels read it
// (params.grad_loss with stride 0) in the accumulation dtype; must outlive the kernel.
struct UniformRowWeight {
  double as_double;
  float as_float;
  explicit UniformRowWeight(double w) : as_double(w), as_float(static_cast<float>(w)) {}
  const void* ptr(at::ScalarType acc) const {
    return acc == at::kDouble ? static_cast<const void*>(&as_double) : &as_float;
  }
};

// Writes value into the 0-dim float32 / float64 loss.
void store_loss(const at::Tensor& loss, double value);

}  // namespace cpu
}  // namespace kdfast
