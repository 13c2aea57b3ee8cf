// CPU host functions of topk_logits and sample_logits: argument checks, output allocation
// and dispatch to the kernels of the best instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../topk_sample.h"
#include "cpu_host.h"
#include "topk_sample_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

struct TopkSampleKernels {
  void (*topk)(const TopkParams&, c10::ScalarType);
  void (*sample)(const SampleParams&, c10::ScalarType);
};

#define TOPK_SAMPLE_ENTRIES(isa) {&topk_logits_##isa, &sample_logits_##isa}

const TopkSampleKernels& topk_sample_kernels() {
  static const TopkSampleKernels k = KDFAST_SELECT_CPU_KERNELS(TopkSampleKernels, TOPK_SAMPLE_ENTRIES);
  return k;
}

std::tuple<at::Tensor, at::Tensor> topk_logits_cpu(const at::Tensor& logits, int64_t k, double temperature,
                                                   at::ScalarType index_dtype) {
  check_cpu(logits, "topk_logits", "teacher_logits");
  TopkProblem problem = prepare_topk(logits, k, temperature, index_dtype);
  if (problem.params.rows > 0) topk_sample_kernels().topk(problem.params, problem.logits.scalar_type());
  return {problem.indices, problem.logprobs};
}

std::tuple<at::Tensor, at::Tensor> sample_logits_cpu(const at::Tensor& logits, int64_t num_samples,
                                                     double temperature, const at::Tensor& seed,
                                                     at::ScalarType index_dtype) {
  check_cpu(logits, "sample_logits", "teacher_logits");
  SampleProblem problem = prepare_sample(logits, num_samples, temperature, seed, index_dtype);
  if (problem.params.rows > 0) topk_sample_kernels().sample(problem.params, problem.logits.scalar_type());
  return {problem.indices, problem.probs};
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("topk_logits", &kdfast::cpu::topk_logits_cpu);
  m.impl("sample_logits", &kdfast::cpu::sample_logits_cpu);
}
