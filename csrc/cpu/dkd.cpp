// CPU host functions of dkd_loss: argument checks, output allocation, label checks and
// the reduction, and dispatch to the kernels of the best instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "../dkd.h"
#include "cpu_host.h"
#include "dkd_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using DkdKernelFn = void (*)(const DkdParams&, c10::ScalarType, c10::ScalarType);

struct DkdKernels {
  DkdKernelFn forward;
  DkdKernelFn backward;
};

#define DKD_ENTRIES(isa) {&dkd_forward_##isa, &dkd_backward_##isa}

const DkdKernels& dkd_kernels() {
  static const DkdKernels k = KDFAST_SELECT_CPU_KERNELS(DkdKernels, DKD_ENTRIES);
  return k;
}

// Checks the labels; returns the number of counted rows.
int64_t count_rows(const DkdParams& p) {
  return count_labeled_rows(p.labels, p.rows, p.vocab, p.ignore_index, &fail_dkd_label);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkd_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels, double alpha, double beta,
    double temperature, int64_t ignore_index, int64_t reduction, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cpu(student, "dkd_loss", "student_logits");
  check_cpu(teacher, "dkd_loss", "teacher_logits");
  const Reduction red = check_dkd_reduction(reduction);
  DkdProblem problem = prepare_dkd(student, teacher, labels, alpha, beta, temperature, ignore_index);
  DkdParams& p = problem.params;
  const int64_t counted = count_rows(p);
  DkdFusedOutputs out = prepare_dkd_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // d loss / d loss_i: 1 / counted rows for batchmean, 1 otherwise; the kept gradient
  // carries it, so the backward of loss.backward() moves no data.
  const UniformRowWeight weight(
      red == Reduction::BatchMean ? 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)) : 1.0);
  p.grad_loss = weight.ptr(problem.acc_dtype);
  p.grad_loss_stride = 0;
  if (p.rows > 0) dkd_kernels().forward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  if (red != Reduction::None) {
    const double total = sum_rows(out.rows_loss);
    store_loss(out.loss, red == Reduction::BatchMean ? total / static_cast<double>(std::max<int64_t>(counted, 1))
                                                     : total);
  }
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> dkd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& labels,
                                                         const at::Tensor& stats, double alpha, double beta,
                                                         double temperature, int64_t ignore_index,
                                                         bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "dkd_loss", "student_logits");
  check_cpu(teacher, "dkd_loss", "teacher_logits");
  DkdProblem problem = prepare_dkd(student, teacher, labels, alpha, beta, temperature, ignore_index);
  DkdParams& p = problem.params;
  const DkdBackwardInputs inputs = prepare_dkd_backward(problem, grad_loss, stats);
  at::Tensor grad_s = empty_gradient_like(student, student_requires_grad);
  at::Tensor grad_t = empty_gradient_like(teacher, teacher_requires_grad);
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  count_rows(p);  // the gradient of a row is written at its label
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  dkd_kernels().backward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("dkd_loss_fused", &kdfast::cpu::dkd_loss_fused_cpu);
  m.impl("dkd_loss_backward", &kdfast::cpu::dkd_loss_backward_cpu);
}
