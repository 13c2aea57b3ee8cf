// dkd_loss: host-side argument checks and output allocation shared by every backend.
#include "dkd.h"

#include <ATen/ATen.h>

#include <cmath>

namespace kdfast {

DkdProblem prepare_dkd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                       double alpha, double beta, double temperature, int64_t ignore_index) {
  TORCH_CHECK(student.dim() >= 1, "dkd_loss: student_logits must have shape [..., V], got a scalar");
  TORCH_CHECK(student.sizes() == teacher.sizes(),
              "dkd_loss: student_logits and teacher_logits must have the same shape, got ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(),
              "dkd_loss: student_logits and teacher_logits must be on the same device, got ", student.device(),
              " and ", teacher.device());
  TORCH_CHECK(is_supported_float(student.scalar_type()),
              "dkd_loss: student_logits must be float32, float16, bfloat16 or float64, got ", student.scalar_type());
  TORCH_CHECK(is_supported_float(teacher.scalar_type()),
              "dkd_loss: teacher_logits must be float32, float16, bfloat16 or float64, got ", teacher.scalar_type());
  TORCH_CHECK((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble),
              "dkd_loss: float64 student_logits and teacher_logits must both be float64, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(student.size(-1) >= 2,
              "dkd_loss: the vocabulary (last) dimension of student_logits must be >= 2 (a target and at least "
              "one non-target class), got ",
              student.size(-1));
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "dkd_loss: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(alpha) && alpha >= 0, "dkd_loss: alpha must be finite and >= 0, got ", alpha);
  TORCH_CHECK(std::isfinite(beta) && beta >= 0, "dkd_loss: beta must be finite and >= 0, got ", beta);
  TORCH_CHECK(labels.scalar_type() == at::kLong, "dkd_loss: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == student.device(), "dkd_loss: labels must be on the device of student_logits (",
              student.device(), "), got ", labels.device());
  TORCH_CHECK(labels.sizes() == row_shape(student), "dkd_loss: labels must have the leading shape of student_logits ",
              row_shape(student), ", got ", labels.sizes());

  DkdProblem problem;
  DkdParams& p = problem.params;
  problem.student = rows_addressable(student, p.student_layout);
  problem.teacher = rows_addressable(teacher, p.teacher_layout);
  p.vocab = student.size(-1);
  p.rows = student.numel() / p.vocab;
  problem.labels = labels.reshape({p.rows}).contiguous();
  problem.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.labels = problem.labels.const_data_ptr<int64_t>();
  p.student = problem.student.const_data_ptr();
  p.teacher = problem.teacher.const_data_ptr();
  p.ignore_index = ignore_index;
  p.alpha = alpha;
  p.beta = beta;
  p.temperature = temperature;
  return problem;
}

Reduction check_dkd_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "dkd_loss: reduction must be 0 (batchmean), 1 (sum) or 2 (none), got ", reduction);
  return static_cast<Reduction>(reduction);
}

DkdFusedOutputs prepare_dkd_fused(DkdProblem& problem, Reduction reduction, bool student_requires_grad,
                                  bool teacher_requires_grad) {
  auto& p = problem.params;
  DkdFusedOutputs out =
      allocate_fused_row_outputs(problem.student, problem.teacher, p.rows, kDkdStatsCols, problem.acc_dtype,
                                 reduction, student_requires_grad, teacher_requires_grad);
  point_params_at(p, out, student_requires_grad, teacher_requires_grad);
  return out;
}

DkdBackwardInputs prepare_dkd_backward(DkdProblem& problem, const at::Tensor& grad_loss, const at::Tensor& stats) {
  auto& p = problem.params;
  DkdBackwardInputs in = check_row_backward_inputs("dkd_loss", "student_logits", problem.student.device(),
                                                problem.acc_dtype, p.rows, kDkdStatsCols, grad_loss, stats);
  p.grad_loss = in.grad_loss.const_data_ptr();
  p.grad_loss_stride = 1;
  p.stats_in = in.stats.const_data_ptr();
  return in;
}

void fail_dkd_label(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "dkd_loss: labels must be in [0, ", vocab, ") or equal ignore_index (", ignore_index,
                    "), got ", label, " at row ", row, " (flattened)");
}

}  // namespace kdfast
