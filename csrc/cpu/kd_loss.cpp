// CPU host functions of kd_loss: argument checks, output allocation, label checks and
// the reduction, and dispatch to the kernels of the best instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "../build_info.h"
#include "../kd_loss.h"
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

// The kernels of the best instruction set that this CPU runs and this build compiled,
// chosen once (torch reads ATEN_CPU_CAPABILITY once too).
Kernels pick_kernels() {
  const std::string cap = cpu_capability_in_use();
#ifdef KDFAST_CPU_AVX512
  if (cap == "AVX512") return {&kd_loss_forward_avx512, &kd_loss_backward_avx512, &kd_loss_scale_grad_avx512};
#endif
#ifdef KDFAST_CPU_AVX2
  if (cap == "AVX2" || cap == "AVX512") return {&kd_loss_forward_avx2, &kd_loss_backward_avx2, &kd_loss_scale_grad_avx2};
#endif
  return {&kd_loss_forward_default, &kd_loss_backward_default, &kd_loss_scale_grad_default};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "kd_loss: ", name, " must be a CPU tensor here, got ", x.device());
}

// Checks the labels (a plain loop: no tensor ops on the hot path of small calls) and
// returns the number of counted rows.
int64_t count_rows(const KdLossParams& p) {
  if (p.labels == nullptr) return p.rows;
  int64_t counted = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t y = p.labels[r];
    if (y == p.ignore_index) continue;
    if (y < 0 || y >= p.vocab) fail_label(r, y, p.vocab, p.ignore_index);
    ++counted;
  }
  return counted;
}

template <typename acc_t>
void reduce_rows(const KdLossFusedOutputs& out, Reduction reduction, int64_t counted) {
  const acc_t* rows = out.rows_loss.const_data_ptr<acc_t>();
  double total = 0;  // double: a sum over thousands of rows keeps float32's precision
  for (int64_t r = 0; r < out.rows_loss.numel(); ++r) total += static_cast<double>(rows[r]);
  if (reduction == Reduction::BatchMean) total /= static_cast<double>(std::max<int64_t>(counted, 1));
  *out.loss.data_ptr<acc_t>() = static_cast<acc_t>(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
    double temperature, double alpha, int64_t divergence, double beta, int64_t ignore_index, double softcap,
    int64_t reduction, bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "student_logits");
  check_cpu(teacher, "teacher_logits");
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "kd_loss: reduction must be 0 (batchmean), 1 (sum) or 2 (none), got ", reduction);
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, softcap);
  KdLossParams& p = problem.params;
  const auto red = static_cast<Reduction>(reduction);
  const int64_t counted = count_rows(p);
  KdLossFusedOutputs out = prepare_kd_loss_fused(problem, red, student_requires_grad, teacher_requires_grad);
  // d loss / d loss_i: 1 / counted rows for batchmean, 1 otherwise.
  const double scale = red == Reduction::BatchMean ? 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)) : 1.0;
  const float scale_f = static_cast<float>(scale);
  p.grad_loss = problem.acc_dtype == at::kDouble ? static_cast<const void*>(&scale) : &scale_f;
  p.grad_loss_stride = 0;
  if (p.rows > 0) kernels().forward(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  if (red != Reduction::None) {
    if (problem.acc_dtype == at::kDouble) {
      reduce_rows<double>(out, red, counted);
    } else {
      reduce_rows<float>(out, red, counted);
    }
  }
  return {out.loss, out.stats, out.grad_student, out.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature, double alpha,
    int64_t divergence, double beta, int64_t ignore_index, double softcap, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cpu(student, "student_logits");
  check_cpu(teacher, "teacher_logits");
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
  check_cpu(grad, "grad");
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
