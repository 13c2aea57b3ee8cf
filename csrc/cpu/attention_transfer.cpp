// CPU host functions of attention_transfer: argument checks, output allocation, the mean
// over samples and positions, and dispatch to the kernels of the best instruction set
// this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../attention_transfer.h"
#include "cpu_host.h"
#include "attention_transfer_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using KernelFn = void (*)(const AttentionTransferParams&, c10::ScalarType, c10::ScalarType);

struct Kernels {
  KernelFn forward;
  KernelFn backward;
};

#define ATTENTION_TRANSFER_ENTRIES(isa) {&attention_transfer_forward_##isa, &attention_transfer_backward_##isa}

const Kernels& kernels() {
  static const Kernels k = KDFAST_SELECT_CPU_KERNELS(Kernels, ATTENTION_TRANSFER_ENTRIES);
  return k;
}

// loss = sum_n ||a_s - a_t||^2 / (N P), summed in double.
template <typename acc_t>
void mean_loss(const at::Tensor& stats, const AttentionTransferParams& p, at::Tensor& loss) {
  const acc_t* st = stats.const_data_ptr<acc_t>();
  double total = 0;
  for (int64_t n = 0; n < p.samples; ++n) total += static_cast<double>(st[n * kAtStatsCols + kAtSqDist]);
  total /= static_cast<double>(p.samples) * static_cast<double>(p.positions);
  *loss.data_ptr<acc_t>() = static_cast<acc_t>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_transfer_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, double p, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cpu(student, "attention_transfer_loss", "student_feat");
  check_cpu(teacher, "attention_transfer_loss", "teacher_feat");
  AttentionTransferProblem problem = prepare_attention_transfer(student, teacher, p);
  AttentionTransferParams& k = problem.params;
  const auto acc = problem.student.options().dtype(problem.acc_dtype);
  at::Tensor loss = at::empty({}, acc);
  at::Tensor stats = at::empty({k.samples, kAtStatsCols}, acc);
  at::Tensor grad_s = attention_gradient_like(problem.student, k.student_layout, student_requires_grad);
  at::Tensor grad_t = attention_gradient_like(problem.teacher, k.teacher_layout, teacher_requires_grad);
  k.stats = stats.data_ptr();
  k.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  k.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  kernels().forward(k, problem.student.scalar_type(), problem.teacher.scalar_type());
  if (problem.acc_dtype == at::kDouble) {
    mean_loss<double>(stats, k, loss);
  } else {
    mean_loss<float>(stats, k, loss);
  }
  return {loss, stats, grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_backward_cpu(const at::Tensor& grad_loss,
                                                                   const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const at::Tensor& stats, double p,
                                                                   bool student_requires_grad,
                                                                   bool teacher_requires_grad) {
  check_cpu(student, "attention_transfer_loss", "student_feat");
  check_cpu(teacher, "attention_transfer_loss", "teacher_feat");
  AttentionTransferProblem problem = prepare_attention_transfer(student, teacher, p);
  AttentionTransferParams& k = problem.params;
  const AttentionTransferBackwardInputs inputs = prepare_attention_transfer_backward(problem, grad_loss, stats);
  at::Tensor grad_s = attention_gradient_like(problem.student, k.student_layout, student_requires_grad);
  at::Tensor grad_t = attention_gradient_like(problem.teacher, k.teacher_layout, teacher_requires_grad);
  if (!(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  k.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  k.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  kernels().backward(k, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("attention_transfer_fused", &kdfast::cpu::attention_transfer_fused_cpu);
  m.impl("attention_transfer_backward", &kdfast::cpu::attention_transfer_backward_cpu);
}
