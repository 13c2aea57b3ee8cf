// dkd_loss: parameters and host-side preparation shared by the CPU and CUDA backends.
// The math is written once in dkd_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common.h"
#include "dkd_math.h"

namespace kdfast {

// Everything a kernel needs; plain data so it can be passed by value to a CUDA kernel.
struct DkdParams {
  int64_t rows = 0;
  int64_t vocab = 0;
  RowLayout student_layout;
  RowLayout teacher_layout;
  const void* student = nullptr;
  const void* teacher = nullptr;
  const int64_t* labels = nullptr;  // [rows]
  int64_t ignore_index = -100;
  double alpha = 1.0;
  double beta = 8.0;
  double temperature = 4.0;

  // Forward outputs (acc_t = double for float64 inputs, float otherwise).
  void* loss = nullptr;   // [rows] per-row loss
  void* stats = nullptr;  // [rows, kDkdStatsCols]

  // Row r's loss receives the gradient grad_loss[r * grad_loss_stride] (acc_t; stride 0
  // broadcasts one value, nullptr means 1). The forward writes the gradients in the same
  // pass when grad_student / grad_teacher are set; the backward recomputes them from stats_in.
  const void* grad_loss = nullptr;
  int64_t grad_loss_stride = 1;
  const void* stats_in = nullptr;  // [rows, kDkdStatsCols], acc_t (backward)
  void* grad_student = nullptr;    // [rows, V] contiguous, student dtype, or nullptr
  void* grad_teacher = nullptr;    // [rows, V] contiguous, teacher dtype, or nullptr
};

// Validated, kernel-ready view of the op arguments; keeps the (possibly copied) tensors
// alive while a kernel runs.
struct DkdProblem {
  at::Tensor student;  // stride(-1) == 1
  at::Tensor teacher;
  at::Tensor labels;   // int64 [rows] contiguous
  at::ScalarType acc_dtype;
  DkdParams params;
};

// Checks every argument (names match the Python API) and fills the layouts. Does not
// check label values (the CPU host checks them; CUDA asserts on the device).
DkdProblem prepare_dkd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                       double alpha, double beta, double temperature, int64_t ignore_index);

// Checks the reduction code of dkd_loss_fused.
Reduction check_dkd_reduction(int64_t reduction);

using DkdFusedOutputs = FusedRowOutputs;

// Allocates the outputs and points params at them (no gradient weight yet).
DkdFusedOutputs prepare_dkd_fused(DkdProblem& problem, Reduction reduction, bool student_requires_grad,
                                  bool teacher_requires_grad);

// Backward-only inputs, checked against the problem and made flat / contiguous; fills
// params.grad_loss and params.stats_in. The returned tensors must outlive the kernel.
using DkdBackwardInputs = RowBackwardInputs;
DkdBackwardInputs prepare_dkd_backward(DkdProblem& problem, const at::Tensor& grad_loss, const at::Tensor& stats);

// The error for a label outside [0, vocab) that is not ignore_index.
[[noreturn]] void fail_dkd_label(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index);

}  // namespace kdfast
