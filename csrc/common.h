// Host-side helpers shared by the ops of every backend: dtype checks, row layouts of
// [..., D] tensors, gradient buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include "common_math.h"

namespace kdfast {

// float32, float16, bfloat16 or float64.
bool is_supported_float(at::ScalarType t);

// Returns x itself when its rows (the last dimension) can be addressed in place with a
// two-level RowLayout (stride(-1) == 1 or a last dimension of 1), else a contiguous copy;
// fills layout for the returned tensor.
at::Tensor rows_addressable(const at::Tensor& x, RowLayout& layout);

// Leading shape of a [..., D] tensor, i.e. the shape of a per-row result.
c10::IntArrayRef row_shape(const at::Tensor& x);

// Gradient-sized output (contiguous unless `format` says otherwise, like `like`), or an
// empty tensor when not wanted. Large CPU buffers get a transparent-huge-page hint
// (KDFAST_CPU_HUGEPAGES=0: none).
at::Tensor empty_gradient_like(const at::Tensor& like, bool wanted,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous);

// Outputs of a fused row op (kd_loss_fused, dkd_loss_fused, feature_loss_fused): the
// reduced loss, O(rows) statistics and the gradients computed in the same pass.
struct FusedRowOutputs {
  at::Tensor loss;          // reduced loss: 0-dim, or [...] (the leading shape) for Reduction::None
  at::Tensor stats;         // [rows, stats_cols]
  at::Tensor grad_student;  // like student (contiguous), or empty when not requested
  at::Tensor grad_teacher;
  at::Tensor rows_loss;     // [rows] per-row loss (a view of loss for Reduction::None)
};

// Allocates a fused row op's outputs; loss and stats in acc (float32, float64 for float64).
FusedRowOutputs allocate_fused_row_outputs(const at::Tensor& student, const at::Tensor& teacher, int64_t rows,
                                           int64_t stats_cols, at::ScalarType acc, Reduction reduction,
                                           bool student_requires_grad, bool teacher_requires_grad);

// Points a kernel's parameters at the outputs (loss, stats, requested gradients), with
// no gradient weight yet (grad_loss == nullptr, stride 0: the host sets the weight).
template <class Params>
void point_params_at(Params& p, const FusedRowOutputs& out, bool student_requires_grad,
                     bool teacher_requires_grad) {
  p.loss = out.rows_loss.data_ptr();
  p.stats = out.stats.data_ptr();
  p.grad_student = student_requires_grad ? out.grad_student.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? out.grad_teacher.data_ptr() : nullptr;
  p.grad_loss = nullptr;
  p.grad_loss_stride = 0;
}

// The inputs of a recomputing *_backward op that its fused op does not have: one
// gradient per row's loss and the fused op's statistics, checked (device, dtype, one
// per row) and made flat / contiguous. The tensors must outlive the kernel.
struct RowBackwardInputs {
  at::Tensor grad_loss;  // [rows]
  at::Tensor stats;      // [rows, stats_cols]
};

// op: e.g. "dkd_loss" (messages name op + "_backward" and op + "_fused"); student_name:
// the public name of the student argument.
RowBackwardInputs check_row_backward_inputs(const char* op, const char* student_name, at::Device device,
                                            at::ScalarType acc, int64_t rows, int64_t stats_cols,
                                            const at::Tensor& grad_loss, const at::Tensor& stats);

}  // namespace kdfast
