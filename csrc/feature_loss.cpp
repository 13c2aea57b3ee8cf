// Host-side argument checks and layout computation of feature_loss, shared by every backend.
#include "feature_loss.h"

#include <ATen/ATen.h>

#include "common.h"

namespace kdfast {

FeatureLossProblem prepare_feature_loss(const at::Tensor& student, const at::Tensor& teacher,
                                        const c10::optional<at::Tensor>& mask, int64_t kind, bool normalize) {
  TORCH_CHECK(student.dim() >= 1, "feature_loss: student must have at least 1 dimension [..., D], got a scalar");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "feature_loss: student and teacher must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(), "feature_loss: student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(is_supported_float(student.scalar_type()),
              "feature_loss: student must be float32, float16, bfloat16 or float64, got ", student.scalar_type());
  TORCH_CHECK(is_supported_float(teacher.scalar_type()),
              "feature_loss: teacher must be float32, float16, bfloat16 or float64, got ", teacher.scalar_type());
  TORCH_CHECK((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble),
              "feature_loss: float64 student and teacher must both be float64, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(student.size(-1) >= 1, "feature_loss: the feature (last) dimension of student must be >= 1");
  TORCH_CHECK(kind >= 0 && kind <= 3,
              "feature_loss: kind must be 0 (mse), 1 (l1), 2 (smooth_l1) or 3 (cosine), got ", kind);

  FeatureLossProblem problem;
  FeatureLossParams& p = problem.params;
  problem.student = rows_addressable(student, p.student_layout);
  problem.teacher = rows_addressable(teacher, p.teacher_layout);
  p.dim = student.size(-1);
  p.rows = student.numel() / p.dim;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "feature_loss: mask must be a bool tensor, got ", m.scalar_type());
    TORCH_CHECK(m.device() == student.device(), "feature_loss: mask must be on the device of student (",
                student.device(), "), got ", m.device());
    TORCH_CHECK(m.sizes() == row_shape(student), "feature_loss: mask must have the leading shape of student ",
                row_shape(student), ", got ", m.sizes());
    problem.mask = m.reshape({p.rows}).contiguous();
    p.mask = problem.mask.const_data_ptr<bool>();
  }
  problem.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.student = problem.student.const_data_ptr();
  p.teacher = problem.teacher.const_data_ptr();
  p.kind = static_cast<FeatureKind>(kind);
  p.normalize = normalize;
  return problem;
}

Reduction check_feature_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "feature_loss: reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  return static_cast<Reduction>(reduction);
}

FeatureLossFusedOutputs prepare_feature_loss_fused(FeatureLossProblem& problem, Reduction reduction,
                                                   bool student_requires_grad, bool teacher_requires_grad) {
  auto& p = problem.params;
  FeatureLossFusedOutputs out =
      allocate_fused_row_outputs(problem.student, problem.teacher, p.rows, kFeatureStatsCols, problem.acc_dtype,
                                 reduction, student_requires_grad, teacher_requires_grad);
  point_params_at(p, out, student_requires_grad, teacher_requires_grad);
  return out;
}

FeatureLossBackwardInputs prepare_feature_loss_backward(FeatureLossProblem& problem, const at::Tensor& grad_loss,
                                                        const at::Tensor& stats) {
  auto& p = problem.params;
  FeatureLossBackwardInputs in = check_row_backward_inputs("feature_loss", "student", problem.student.device(),
                                                problem.acc_dtype, p.rows, kFeatureStatsCols, grad_loss, stats);
  p.grad_loss = in.grad_loss.const_data_ptr();
  p.grad_loss_stride = 1;
  p.stats_in = in.stats.const_data_ptr();
  p.loss = nullptr;
  p.stats = nullptr;
  return in;
}

}  // namespace kdfast
