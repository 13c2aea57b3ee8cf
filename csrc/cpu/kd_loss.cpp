// CPU host functions of kd_loss: argument checks, output allocation, label checks and
// the reduction, and dispatch to the kernels of the best instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "../kd_loss.h"
#include "cpu_host.h"
#include "kd_loss_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using KernelFn = void (*)(const KdLossParams&, c10::ScalarType, c10::ScalarType);
using ScaleFn = void (*)(void*, c10::ScalarType, int64_t, int64_t, const double*, int64_t);

struct Kernels {
  KernelFn forward;
  KernelFn backward;
  ScaleFn scale_grad;
};

#define KD_LOSS_ENTRIES(isa) {&kd_loss_forward_##isa, &kd_loss_backward_##isa, &kd_loss_scale_grad_##isa}

const Kernels& kernels() {
  static const Kernels k = KDFAST_SELECT_CPU_KERNELS(Kernels, KD_LOSS_ENTRIES);
  return k;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double alpha, int64_t divergence, double beta, int64_t ignore_index, double softcap,
    int64_t reduction, bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "kd_loss", "student_logits");
  check_cpu(teacher, "kd_loss", "teacher_logits");
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "kd_loss: reduction must be 0 (batchmean), 1 (sum) or 2 (none), got ", reduction);
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap);
  KdLossParams& p = problem.params;
  const auto red = static_cast<Reduction>(reduction);
  const int64_t counted =
      p.labels == nullptr ? p.rows : count_labeled_rows(p.labels, p.rows, p.vocab, p.ignore_index, &fail_label);
  KdLossFusedOutputs out = prepare_kd_loss_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // d loss / d loss_i: 1 / counted rows for batchmean, 1 otherwise.
  const UniformRowWeight weight(
      red == Reduction::BatchMean ? 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)) : 1.0);
  p.grad_loss = weight.ptr(problem.acc_dtype);
  p.grad_loss_stride = 0;
  if (p.rows > 0) kernels().forward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  if (red != Reduction::None) {
    const double total = sum_rows(out.rows_loss);
    store_loss(out.loss, red == Reduction::BatchMean ? total / static_cast<double>(std::max<int64_t>(counted, 1))
                                                     : total);
  }
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature, double alpha,
    int64_t divergence, double beta, int64_t ignore_index, double softcap, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cpu(student, "kd_loss", "student_logits");
  check_cpu(teacher, "kd_loss", "teacher_logits");
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap);
  KdLossParams& p = problem.params;
  const KdLossBackwardInputs inputs = prepare_kd_loss_backward(problem, grad_loss, stats);
  at::Tensor grad_s = empty_gradient_like(student, student_requires_grad);
  at::Tensor grad_t = empty_gradient_like(teacher, teacher_requires_grad);
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  kernels().backward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

void kd_loss_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_cpu(grad, "kd_loss_scale_grad_", "grad");
  const int64_t rows = check_scale_grad(grad, scale);
  if (rows == 0) return;
  const at::Tensor w = scale.to(at::kDouble).contiguous();
  kernels().scale_grad(grad.data_ptr(), grad.scalar_type(), rows, grad.size(-1), w.const_data_ptr<double>(),
                       w.numel() == 1 ? 0 : 1);
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_loss_fused", &kdfast::cpu::kd_loss_fused_cpu);
  m.impl("kd_loss_backward", &kdfast::cpu::kd_loss_backward_cpu);
  m.impl("kd_loss_scale_grad_", &kdfast::cpu::kd_loss_scale_grad_cpu);
}
