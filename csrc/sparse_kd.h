// sparse_kd_loss: parameters and host-side preparation shared by the CPU and CUDA
// backends. The math is written once in sparse_kd_math.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "common.h"
#include "sparse_kd_math.h"

namespace kdfast {

// Everything a kernel needs; plain data so it can be passed by value to a CUDA kernel.
struct SparseKdParams {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t support = 0;  // K, entries per row of teacher_indices / teacher_values
  RowLayout student_layout;
  RowLayout index_layout;
  RowLayout value_layout;
  const void* student = nullptr;
  const void* indices = nullptr;  // int32 or int64 (index64)
  const void* values = nullptr;   // value_dtype
  bool index64 = true;
  c10::ScalarType value_dtype = c10::ScalarType::Float;
  const int64_t* labels = nullptr;  // [rows] or nullptr
  int64_t ignore_index = -100;
  double temperature = 1.0;
  double alpha = 0.0;
  bool logprobs = true;
  SparseTail tail = SparseTail::Renormalize;

  // Forward outputs (acc_t = double for float64 inputs, float otherwise).
  void* loss = nullptr;   // [rows] per-row loss
  void* stats = nullptr;  // [rows, kSparseStatsCols]

  // Row r's loss receives the gradient grad_loss[r * grad_loss_stride] (acc_t; stride 0
  // broadcasts one value, nullptr means 1). The forward writes the gradient in the same
  // pass when grad_student is set; the backward recomputes it from stats_in.
  const void* grad_loss = nullptr;
  int64_t grad_loss_stride = 1;
  const void* stats_in = nullptr;  // [rows, kSparseStatsCols], acc_t (backward)
  void* grad_student = nullptr;    // [rows, V] contiguous, student dtype, or nullptr
};

// Entry k of row r of teacher_indices (as int64) and teacher_values (in acc_t).
KDFAST_MATH_FN int64_t sparse_index(const SparseKdParams& p, int64_t row, int64_t k) {
  const int64_t off = p.index_layout.offset(row) + k;
  return p.index64 ? static_cast<const int64_t*>(p.indices)[off]
                   : static_cast<int64_t>(static_cast<const int32_t*>(p.indices)[off]);
}

template <typename acc_t>
KDFAST_MATH_FN acc_t sparse_value(const SparseKdParams& p, int64_t row, int64_t k) {
  const int64_t off = p.value_layout.offset(row) + k;
  switch (p.value_dtype) {
    case c10::ScalarType::Double: return static_cast<acc_t>(static_cast<const double*>(p.values)[off]);
    case c10::ScalarType::Half: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p.values)[off]));
    case c10::ScalarType::BFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p.values)[off]));
    default: return static_cast<acc_t>(static_cast<const float*>(p.values)[off]);
  }
}

// Validated, kernel-ready view of the op arguments; keeps the (possibly copied)
// tensors alive while a kernel runs.
struct SparseKdProblem {
  at::Tensor student;  // stride(-1) == 1 (or V == 1)
  at::Tensor indices;  // stride(-1) == 1 (or K == 1)
  at::Tensor values;
  at::Tensor labels;   // int64 [rows] contiguous, or undefined
  at::ScalarType acc_dtype;
  SparseKdParams params;
};

// Checks every argument (names match the Python API) and fills the layouts. Shared by
// the CPU and CUDA host functions; checks neither label nor index values (the CPU host
// checks them; CUDA asserts on the device).
SparseKdProblem prepare_sparse_kd(const at::Tensor& student, const at::Tensor& teacher_indices,
                                  const at::Tensor& teacher_values, const c10::optional<at::Tensor>& labels,
                                  double temperature, double alpha, bool logprobs, int64_t tail,
                                  int64_t ignore_index);

// Checks the reduction code of sparse_kd_loss_fused.
Reduction check_sparse_kd_reduction(int64_t reduction);

// Outputs of sparse_kd_loss_fused (grad_teacher is always empty: the teacher gets no
// gradient); allocates them and points params at them (no gradient weight yet).
FusedRowOutputs prepare_sparse_kd_fused(SparseKdProblem& problem, Reduction reduction, bool student_requires_grad);

// Backward-only inputs, checked against the problem and made flat / contiguous; fills
// params.grad_loss and params.stats_in. The returned tensors must outlive the kernel.
RowBackwardInputs prepare_sparse_kd_backward(SparseKdProblem& problem, const at::Tensor& grad_loss,
                                             const at::Tensor& stats);

// The errors for a label outside [0, vocab) that is not ignore_index, and for a teacher
// index outside [-1, vocab).
[[noreturn]] void fail_sparse_kd_label(int64_t row, int64_t label, int64_t vocab, int64_t ignore_index);
[[noreturn]] void fail_sparse_kd_index(int64_t row, int64_t k, int64_t index, int64_t vocab);

}  // namespace kdfast
