// sparse_kd_loss: host-side argument checks and output allocation shared by every backend.
#include "sparse_kd.h"

#include <ATen/ATen.h>

#include <cmath>

namespace kdfast {

SparseKdProblem prepare_sparse_kd(const at::Tensor& student, const at::Tensor& teacher_indices,
                                  const at::Tensor& teacher_values, const c10::optional<at::Tensor>& labels,
                                  double temperature, double alpha, bool logprobs, int64_t tail,
                                  int64_t ignore_index) {
  TORCH_CHECK(student.dim() >= 1, "sparse_kd_loss: student_logits must have shape [..., V], got a scalar");
  TORCH_CHECK(is_supported_float(student.scalar_type()),
              "sparse_kd_loss: student_logits must be float32, float16, bfloat16 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(student.size(-1) >= 1, "sparse_kd_loss: the vocabulary (last) dimension of student_logits must be >= 1");
  TORCH_CHECK(teacher_indices.scalar_type() == at::kLong || teacher_indices.scalar_type() == at::kInt,
              "sparse_kd_loss: teacher_indices must be int32 or int64, got ", teacher_indices.scalar_type());
  TORCH_CHECK(is_supported_float(teacher_values.scalar_type()),
              "sparse_kd_loss: teacher_values must be float32, float16, bfloat16 or float64, got ",
              teacher_values.scalar_type());
  TORCH_CHECK((student.scalar_type() == at::kDouble) == (teacher_values.scalar_type() == at::kDouble),
              "sparse_kd_loss: float64 student_logits and teacher_values must both be float64, got ",
              student.scalar_type(), " and ", teacher_values.scalar_type());
  for (const at::Tensor* x : {&teacher_indices, &teacher_values}) {
    const char* name = x == &teacher_indices ? "teacher_indices" : "teacher_values";
    TORCH_CHECK(x->dim() == student.dim() && x->sizes().slice(0, x->dim() - 1) == row_shape(student),
                "sparse_kd_loss: ", name, " must have shape [..., K] with the leading shape of student_logits ",
                row_shape(student), ", got ", x->sizes());
    TORCH_CHECK(x->device() == student.device(), "sparse_kd_loss: ", name,
                " must be on the device of student_logits (", student.device(), "), got ", x->device());
  }
  TORCH_CHECK(teacher_indices.sizes() == teacher_values.sizes(),
              "sparse_kd_loss: teacher_indices and teacher_values must have the same shape, got ",
              teacher_indices.sizes(), " and ", teacher_values.sizes());
  TORCH_CHECK(teacher_indices.size(-1) >= 1, "sparse_kd_loss: teacher_indices must have K >= 1 entries per row");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "sparse_kd_loss: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(alpha >= 0 && alpha <= 1, "sparse_kd_loss: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(tail == 0 || tail == 1, "sparse_kd_loss: tail must be 0 (renormalize) or 1 (residual), got ", tail);

  SparseKdProblem problem;
  SparseKdParams& p = problem.params;
  problem.student = rows_addressable(student, p.student_layout);
  problem.indices = rows_addressable(teacher_indices, p.index_layout);
  problem.values = rows_addressable(teacher_values, p.value_layout);
  p.vocab = student.size(-1);
  p.rows = student.numel() / p.vocab;
  p.support = teacher_indices.size(-1);

  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.scalar_type() == at::kLong, "sparse_kd_loss: labels must be int64, got ", l.scalar_type());
    TORCH_CHECK(l.device() == student.device(), "sparse_kd_loss: labels must be on the device of student_logits (",
                student.device(), "), got ", l.device());
    TORCH_CHECK(l.sizes() == row_shape(student), "sparse_kd_loss: labels must have the leading shape of student_logits ",
                row_shape(student), ", got ", l.sizes());
    problem.labels = l.reshape({p.rows}).contiguous();
    p.labels = problem.labels.const_data_ptr<int64_t>();
  } else {
    TORCH_CHECK(alpha == 0, "sparse_kd_loss: alpha > 0 needs labels, got alpha=", alpha, " and labels=None");
  }

  problem.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.student = problem.student.const_data_ptr();
  p.indices = problem.indices.const_data_ptr();
  p.values = problem.values.const_data_ptr();
  p.index64 = teacher_indices.scalar_type() == at::kLong;
  p.value_dtype = teacher_values.scalar_type();
  p.ignore_index = ignore_index;
  p.temperature = temperature;
  p.alpha = alpha;
  p.logprobs = logprobs;
  p.tail = static_cast<SparseTail>(tail);
  return problem;
}

Reduction check_sparse_kd_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "sparse_kd_loss: reduction must be 0 (batchmean), 1 (sum) or 2 (none), got ", reduction);
  return static_cast<Reduction>(reduction);
}

FusedRowOutputs prepare_sparse_kd_fused(SparseKdProblem& problem, Reduction reduction, bool student_requires_grad) {
  auto& p = problem.params;
  // The teacher gets no gradient: its slot of the shared outputs stays empty.
  FusedRowOutputs out = allocate_fused_row_outputs(problem.student, problem.student, p.rows, kSparseStatsCols,
                                                   problem.acc_dtype, reduction, student_requires_grad, false);
  p.loss = out.rows_loss.data_ptr();
  p.stats = out.stats.data_ptr();
  p.grad_student = student_requires_grad ? out.grad_student.data_ptr() : nullptr;
  p.grad_loss = nullptr;
  p.grad_loss_stride = 0;
  return out;
}

RowBackwardInputs prepare_sparse_kd_backward(SparseKdProblem& problem, const at::Tensor& grad_loss,
                                             const at::Tensor& stats) {
  auto& p = problem.params;
  RowBackwardInputs in = check_row_backward_inputs("sparse_kd_loss", "student_logits", problem.student.device(),
                                                   problem.acc_dtype, p.rows, kSparseStatsCols, grad_loss, stats);
  p.grad_loss = in.grad_loss.const_data_ptr();
  p.grad_loss_stride = 1;
  p.stats_in = in.stats.const_data_ptr();
  return in;
}

void fail_sparse_kd_label(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK_VALUE(false, "sparse_kd_loss: labels must be in [0, ", vocab, ") or equal ignore_index (", ignore_index,
                    "), got ", label, " at row ", row, " (flattened)");
}

void fail_sparse_kd_index(int64_t row, int64_t k, int64_t index, int64_t vocab) {
  TORCH_CHECK_VALUE(false, "sparse_kd_loss: teacher_indices must be in [0, ", vocab, ") or -1 (padding), got ",
                    index, " at row ", row, " (flattened), entry ", k);
}

}  // namespace kdfast
