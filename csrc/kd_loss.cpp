// Host-side argument checks and layout computation shared by every backend.
#include "kd_loss.h"

#include <ATen/ATen.h>

#include <cmath>

#include "common.h"

namespace kdfast {

KdLossProblem prepare_kd_loss(const at::Tensor& student, const at::Tensor& teacher,
                              const c10::optional<at::Tensor>& labels, double temperature,
                              double alpha, int64_t divergence, double beta,
                              int64_t ignore_index, double softcap) {
  TORCH_CHECK(student.dim() >= 1, "kd_loss: student_logits must have at least 1 dimension [..., V], got a scalar");
  TORCH_CHECK(student.sizes() == teacher.sizes(),
              "kd_loss: student_logits and teacher_logits must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(),
              "kd_loss: student_logits and teacher_logits must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(is_supported_float(student.scalar_type()),
              "kd_loss: student_logits must be float32, float16, bfloat16 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(is_supported_float(teacher.scalar_type()),
              "kd_loss: teacher_logits must be float32, float16, bfloat16 or float64, got ",
              teacher.scalar_type());
  TORCH_CHECK((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble),
              "kd_loss: float64 student_logits and teacher_logits must both be float64, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(student.size(-1) >= 1, "kd_loss: the vocabulary (last) dimension of student_logits must be >= 1");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "kd_loss: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(alpha >= 0 && alpha <= 1, "kd_loss: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(divergence >= 0 && divergence <= 2,
              "kd_loss: divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", divergence);
  if (divergence == static_cast<int64_t>(Divergence::JSD)) {
    TORCH_CHECK(beta > 0 && beta < 1, "kd_loss: beta must be in (0, 1) for divergence='jsd', got ", beta);
  }

  TORCH_CHECK(softcap == 0 || (std::isfinite(softcap) && softcap > 0),
              "kd_loss: softcap must be finite and > 0 (0 for none), got ", softcap);

  KdLossProblem problem;
  KdLossParams& p = problem.params;
  problem.student = rows_addressable(student, p.student_layout);
  problem.teacher = rows_addressable(teacher, p.teacher_layout);
  p.vocab = student.size(-1);
  p.rows = p.vocab == 0 ? 0 : student.numel() / p.vocab;

  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.scalar_type() == at::kLong, "kd_loss: labels must be int64, got ", l.scalar_type());
    TORCH_CHECK(l.device() == student.device(), "kd_loss: labels must be on the device of student_logits (",
                student.device(), "), got ", l.device());
    TORCH_CHECK(l.sizes() == row_shape(student),
                "kd_loss: labels must have the leading shape of student_logits ", row_shape(student),
                ", got ", l.sizes());
    problem.labels = l.reshape({p.rows}).contiguous();
    p.labels = problem.labels.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(alpha == 0, "kd_loss: alpha > 0 needs labels, got alpha=", alpha, " and labels=None");
  }

  problem.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.student = problem.student.const_data_ptr();
  p.teacher = problem.teacher.const_data_ptr();
  p.ignore_index = ignore_index;
  p.temperature = temperature;
  p.alpha = alpha;
  p.beta = beta;
  p.softcap = softcap;
  p.divergence = static_cast<Divergence>(divergence);
  return problem;
}

KdLossFusedOutputs prepare_kd_loss_fused(KdLossProblem& problem, Reduction reduction,
                                         bool student_requires_grad, bool teacher_requires_grad) {
  auto& p = problem.params;
  KdLossFusedOutputs out =
      allocate_fused_row_outputs(problem.student, problem.teacher, p.rows, kStatsCols, problem.acc_dtype,
                                 reduction, student_requires_grad, teacher_requires_grad);
  point_params_at(p, out, student_requires_grad, teacher_requires_grad);
  return out;
}

KdLossBackwardInputs prepare_kd_loss_backward(KdLossProblem& problem, const at::Tensor& grad_loss,
                                              const at::Tensor& stats) {
  auto& p = problem.params;
  KdLossBackwardInputs in = check_row_backward_inputs("kd_loss", "student_logits", problem.student.device(),
                                                problem.acc_dtype, p.rows, kStatsCols, grad_loss, stats);
  p.grad_loss = in.grad_loss.const_data_ptr();
  p.stats_in = in.stats.const_data_ptr();
  return in;
}

void fail_label(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "kd_loss: labels must be in [0, ", vocab, ") or equal ignore_index (", ignore_index,
                    "), got ", label, " at row ", row, " (flattened)");
}

int64_t check_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() >= 1 && grad.is_contiguous(),
              "kd_loss_scale_grad_: grad must be a contiguous [..., V] tensor, got sizes ", grad.sizes(),
              " and strides ", grad.strides());
  TORCH_CHECK(scale.device() == grad.device(), "kd_loss_scale_grad_: scale must be on the device of grad (",
              grad.device(), "), got ", scale.device());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble,
              "kd_loss_scale_grad_: scale must be float32 or float64, got ", scale.scalar_type());
  const int64_t vocab = grad.size(-1);
  const int64_t rows = vocab == 0 ? 0 : grad.numel() / vocab;
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == rows,
              "kd_loss_scale_grad_: scale must hold one value or one per row (", rows, "), got ", scale.numel());
  return rows;
}

}  // namespace kdfast
