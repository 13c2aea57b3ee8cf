// CPU host functions of dkd_loss: argument checks, output allocation, label checks and
// the reduction, and dispatch to the kernels of the best instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "../build_info.h"
#include "../dkd.h"
#include "dkd_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using DkdKernelFn = void (*)(const DkdParams&, c10::ScalarType, c10::ScalarType);

struct DkdKernels {
  DkdKernelFn forward;
  DkdKernelFn backward;
};

// The kernels of the best instruction set this CPU runs and this build compiled, chosen
// once (torch reads ATEN_CPU_CAPABILITY once too).
DkdKernels pick_dkd_kernels() {
  const std::string cap = cpu_capability_in_use();
#ifdef KDFAST_CPU_AVX512
  if (cap == "AVX512") return {&dkd_forward_avx512, &dkd_backward_avx512};
#endif
#ifdef KDFAST_CPU_AVX2
  if (cap == "AVX2" || cap == "AVX512") return {&dkd_forward_avx2, &dkd_backward_avx2};
#endif
  return {&dkd_forward_default, &dkd_backward_default};
}

const DkdKernels& dkd_kernels() {
  static const DkdKernels k = pick_dkd_kernels();
  return k;
}

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "dkd_loss: ", name, " must be a CPU tensor here, got ", x.device());
}

// Checks the labels (a plain loop: no tensor ops on the hot path of small calls) and
// returns the number of counted rows.
int64_t count_rows(const DkdParams& p) {
  int64_t counted = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t y = p.labels[r];
    if (y == p.ignore_index) continue;
    if (y < 0 || y >= p.vocab) fail_dkd_label(r, y, p.vocab, p.ignore_index);
    ++counted;
  }
  return counted;
}

template <typename acc_t>
void reduce_rows(const DkdFusedOutputs& out, Reduction reduction, int64_t counted) {
  const acc_t* rows = out.rows_loss.const_data_ptr<acc_t>();
  double total = 0;  // double: a sum over thousands of rows keeps float32's precision
  for (int64_t r = 0; r < out.rows_loss.numel(); ++r) total += static_cast<double>(rows[r]);
  if (reduction == Reduction::BatchMean) total /= static_cast<double>(std::max<int64_t>(counted, 1));
  *out.loss.data_ptr<acc_t>() = static_cast<acc_t>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dkd_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels, double alpha, double beta,
    double temperature, int64_t ignore_index, int64_t reduction, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cpu(student, "student_logits");
  check_cpu(teacher, "teacher_logits");
  const Reduction red = check_dkd_reduction(reduction);
  DkdProblem problem = prepare_dkd(student, teacher, labels, alpha, beta, temperature, ignore_index);
  DkdParams& p = problem.params;
  const int64_t counted = count_rows(p);
  DkdFusedOutputs out = prepare_dkd_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // d loss / d loss_i: 1 / counted rows for batchmean, 1 otherwise; the kept gradient
  // carries it, so the backward of loss.backward() moves no data.
  const double scale = red == Reduction::BatchMean ? 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)) : 1.0;
  const float scale_f = static_cast<float>(scale);
  p.grad_loss = problem.acc_dtype == at::kDouble ? static_cast<const void*>(&scale) : &scale_f;
  p.grad_loss_stride = 0;
  if (p.rows > 0) dkd_kernels().forward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  if (red != Reduction::None) {
    if (problem.acc_dtype == at::kDouble) {
      reduce_rows<double>(out, red, counted);
    } else {
      reduce_rows<float>(out, red, counted);
    }
  }
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> dkd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                         const at::Tensor& teacher, const at::Tensor& labels,
                                                         const at::Tensor& stats, double alpha, double beta,
                                                         double temperature, int64_t ignore_index,
                                                         bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "student_logits");
  check_cpu(teacher, "teacher_logits");
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
