// kd_loss: parameters and host-side preparation shared by every backend.
// The math is specified in docs/kd_loss_math.md and written once in kd_loss_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "common.h"
#include "kd_loss_math.h"

namespace kdfast {

// Everything a kernel needs; plain data so it can be passed by value to a CUDA kernel.
struct KdLossParams {
  int64_t rows = 0;
  int64_t vocab = 0;
  RowLayout student_layout;
  RowLayout teacher_layout;
  const void* student = nullptr;
  const void* teacher = nullptr;
  const int64_t* labels = nullptr;  // [rows] or nullptr
  int64_t ignore_index = -100;
  double temperature = 1.0;
  double alpha = 0.0;
  double beta = 0.5;
  double softcap = 0.0;  // 0: no soft-capping
  Divergence divergence = Divergence::ForwardKL;

  // Forward outputs (acc_t = double for float64 inputs, float otherwise).
  void* loss = nullptr;   // [rows] per-row loss
  void* stats = nullptr;  // [rows, kStatsCols], or nullptr when nobody reads them

  // Gradients: row r's loss receives the gradient grad_loss[r * grad_loss_stride]
  // (acc_t; stride 0 broadcasts one value, nullptr means 1). The forward writes the
  // gradients in the same pass when grad_student / grad_teacher are set; the backward
  // recomputes them from stats_in.
  const void* grad_loss = nullptr;
  int64_t grad_loss_stride = 1;
  const void* stats_in = nullptr;  // [rows, kStatsCols], acc_t (backward)
  void* grad_student = nullptr;    // [rows, V] contiguous, student dtype, or nullptr
  void* grad_teacher = nullptr;    // [rows, V] contiguous, teacher dtype, or nullptr
};

// Validated, kernel-ready view of the op arguments. Keeps the (possibly copied)
// tensors alive while a kernel runs.
struct KdLossProblem {
  at::Tensor student;  // stride(-1) == 1 (or V == 1)
  at::Tensor teacher;
  at::Tensor labels;   // int64 [rows] contiguous, or undefined
  at::ScalarType acc_dtype;  // dtype of loss / stats / grad_loss
  KdLossParams params;
};

// Checks every argument (names match the Python API) and fills the layouts.
// Shared by the CPU and CUDA host functions; does not check label values.
KdLossProblem prepare_kd_loss(const at::Tensor& student, const at::Tensor& teacher,
                              const c10::optional<at::Tensor>& labels, double temperature,
                              double alpha, int64_t divergence, double beta,
                              int64_t ignore_index, double softcap);

// Outputs of kd_loss_fused, allocated by prepare_kd_loss_fused.
using KdLossFusedOutputs = FusedRowOutputs;

// Allocates the outputs and points params at them (no gradient weight yet).
KdLossFusedOutputs prepare_kd_loss_fused(KdLossProblem& problem, Reduction reduction,
                                         bool student_requires_grad, bool teacher_requires_grad);

// Backward-only inputs, checked against the prepared problem (device, dtype, one
// grad_loss value and one stats row per row) and made flat / contiguous; fills
// params.grad_loss and params.stats_in. The returned tensors must outlive the kernel.
using KdLossBackwardInputs = RowBackwardInputs;
KdLossBackwardInputs prepare_kd_loss_backward(KdLossProblem& problem, const at::Tensor& grad_loss,
                                              const at::Tensor& stats);

// Checks kd_loss_scale_grad_'s arguments; returns the number of rows of grad.
int64_t check_scale_grad(const at::Tensor& grad, const at::Tensor& scale);

// The error for a label outside [0, vocab) that is not ignore_index.
[[noreturn]] void fail_label(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index);

}  // namespace kdfast
