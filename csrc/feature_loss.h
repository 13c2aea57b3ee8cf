// feature_loss: parameters and host-side preparation shared by every backend.
// The math is written once in feature_loss_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "common.h"
#include "feature_loss_math.h"

namespace kdfast {

// Everything a kernel needs; plain data so it can be passed by value to a CUDA kernel.
struct FeatureLossParams {
  int64_t rows = 0;
  int64_t dim = 0;  // D, the features of a row
  RowLayout student_layout;
  RowLayout teacher_layout;
  const void* student = nullptr;
  const void* teacher = nullptr;
  const bool* mask = nullptr;  // [rows] or nullptr (every row selected)
  FeatureKind kind = FeatureKind::MSE;
  bool normalize = false;

  // Forward outputs (acc_t = double for float64 inputs, float otherwise).
  void* loss = nullptr;   // [rows] per-row loss, or nullptr (backward)
  void* stats = nullptr;  // [rows, kFeatureStatsCols], or nullptr

  // Row r's loss receives the gradient grad_loss[r * grad_loss_stride] (acc_t; stride 0
  // broadcasts one value, nullptr means 1). The forward writes the gradients in the same
  // call when grad_student / grad_teacher are set; the backward recomputes them, reading
  // the row sums from stats_in.
  const void* grad_loss = nullptr;
  int64_t grad_loss_stride = 1;
  const void* stats_in = nullptr;  // [rows, kFeatureStatsCols], acc_t (backward)
  void* grad_student = nullptr;    // [rows, D] contiguous, student dtype, or nullptr
  void* grad_teacher = nullptr;    // [rows, D] contiguous, teacher dtype, or nullptr
};

// Validated, kernel-ready view of the op arguments. Keeps the (possibly copied) tensors
// alive while a kernel runs.
struct FeatureLossProblem {
  at::Tensor student;  // stride(-1) == 1 (or D == 1)
  at::Tensor teacher;
  at::Tensor mask;     // bool [rows] contiguous, or undefined
  at::ScalarType acc_dtype;
  FeatureLossParams params;
};

// Checks every argument (names match the Python API) and fills the layouts.
FeatureLossProblem prepare_feature_loss(const at::Tensor& student, const at::Tensor& teacher,
                                        const c10::optional<at::Tensor>& mask, int64_t kind, bool normalize);

// Checks the reduction code.
Reduction check_feature_reduction(int64_t reduction);

using FeatureLossFusedOutputs = FusedRowOutputs;

// Allocates the outputs and points params at them (no gradient weight yet).
FeatureLossFusedOutputs prepare_feature_loss_fused(FeatureLossProblem& problem, Reduction reduction,
                                                   bool student_requires_grad, bool teacher_requires_grad);

// Backward-only inputs, checked and made flat / contiguous; fills params.grad_loss and
// params.stats_in. The returned tensors must outlive the kernel.
using FeatureLossBackwardInputs = RowBackwardInputs;
FeatureLossBackwardInputs prepare_feature_loss_backward(FeatureLossProblem& problem, const at::Tensor& grad_loss,
                                                        const at::Tensor& stats);

}  // namespace kdfast
