// CPU host functions of feature_loss: argument checks, output allocation, the mask count
// and the reduction, and dispatch to the kernels of the best instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "../feature_loss.h"
#include "cpu_host.h"
#include "feature_loss_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using KernelFn = void (*)(const FeatureLossParams&, c10::ScalarType, c10::ScalarType);

struct Kernels {
  KernelFn forward;
  KernelFn backward;
};

#define FEATURE_LOSS_ENTRIES(isa) {&feature_loss_forward_##isa, &feature_loss_backward_##isa}

const Kernels& kernels() {
  static const Kernels k = KDFAST_SELECT_CPU_KERNELS(Kernels, FEATURE_LOSS_ENTRIES);
  return k;
}

int64_t count_selected(const FeatureLossParams& p) {
  if (p.mask == nullptr) return p.rows;
  int64_t selected = 0;
  for (int64_t r = 0; r < p.rows; ++r) selected += p.mask[r] ? 1 : 0;
  return selected;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& mask, int64_t kind,
    bool normalize, int64_t reduction, bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "feature_loss", "student");
  check_cpu(teacher, "feature_loss", "teacher");
  const Reduction red = check_feature_reduction(reduction);
  FeatureLossProblem problem = prepare_feature_loss(student, teacher, mask, kind, normalize);
  FeatureLossParams& p = problem.params;
  FeatureLossFusedOutputs out = prepare_feature_loss_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // The gradient is written already times d loss / d loss_i: the mean's weight, or 1.
  const UniformRowWeight weight(
      red == Reduction::BatchMean ? math::feature_mean_weight(p.kind, count_selected(p), p.dim) : 1.0);
  p.grad_loss = weight.ptr(problem.acc_dtype);
  p.grad_loss_stride = 0;
  if (p.rows > 0) kernels().forward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  if (red != Reduction::None) store_loss(out.loss, sum_rows(out.rows_loss) * weight.as_double);
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> feature_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& mask, const at::Tensor& stats, int64_t kind, bool normalize,
    bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "feature_loss", "student");
  check_cpu(teacher, "feature_loss", "teacher");
  FeatureLossProblem problem = prepare_feature_loss(student, teacher, mask, kind, normalize);
  FeatureLossParams& p = problem.params;
  const FeatureLossBackwardInputs inputs = prepare_feature_loss_backward(problem, grad_loss, stats);
  at::Tensor grad_s = empty_gradient_like(student, student_requires_grad);
  at::Tensor grad_t = empty_gradient_like(teacher, teacher_requires_grad);
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  kernels().backward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("feature_loss_fused", &kdfast::cpu::feature_loss_fused_cpu);
  m.impl("feature_loss_backward", &kdfast::cpu::feature_loss_backward_cpu);
}
