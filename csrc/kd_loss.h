// kd_loss: parameters shared by the host code of every backend.
// The math is specified in docs/kd_loss_math.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace kdfast {

enum class Divergence : int64_t { ForwardKL = 0, ReverseKL = 1, JSD = 2 };

// Columns of the per-row statistics tensor written by the forward op.
constexpr int64_t kStatsCols = 7;
enum StatsCol : int64_t {
  kMaxS = 0, kMaxT = 1, kLogZS = 2, kLogZT = 3, kLogZS1 = 4, kAuxS = 5, kAuxT = 6
};

// Where row r of a [..., V] tensor starts, in elements:
//   (r / n_inner) * stride_outer + (r % n_inner) * stride_inner.
// Two levels cover 2-D tensors and slices such as logits[:, :-1, :] without a copy.
struct RowLayout {
  int64_t n_inner = 1;
  int64_t stride_outer = 0;
  int64_t stride_inner = 0;

  template <typename index_t>
  inline index_t offset(index_t row) const {
    // Branch keeps the common 2-D case free of a 64-bit division.
    if (n_inner == 1) return row * static_cast<index_t>(stride_outer);
    return (row / static_cast<index_t>(n_inner)) * static_cast<index_t>(stride_outer) +
           (row % static_cast<index_t>(n_inner)) * static_cast<index_t>(stride_inner);
  }
};

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
  Divergence divergence = Divergence::ForwardKL;

  // forward outputs (acc_t = double for float64 inputs, float otherwise)
  void* loss = nullptr;   // [rows]
  void* stats = nullptr;  // [rows, kStatsCols]

  // backward inputs / outputs
  const void* grad_loss = nullptr;     // [rows], acc_t
  const void* stats_in = nullptr;      // [rows, kStatsCols], acc_t
  void* grad_student = nullptr;        // [rows, V] contiguous, student dtype, or nullptr
  void* grad_teacher = nullptr;        // [rows, V] contiguous, teacher dtype, or nullptr
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
                              int64_t ignore_index);

// Forward outputs: checks the label values, allocates the per-row loss ([...]) and the
// stats ([rows, kStatsCols]) in the accumulation dtype, and points params at them.
struct KdLossForwardOutputs {
  at::Tensor loss;
  at::Tensor stats;
};
KdLossForwardOutputs prepare_kd_loss_forward(KdLossProblem& problem);

// Backward-only inputs, checked against the prepared problem (device, dtype, one
// grad_loss value and one stats row per row) and made flat / contiguous; fills
// params.grad_loss and params.stats_in. The returned tensors must outlive the kernel.
struct KdLossBackwardInputs {
  at::Tensor grad_loss;  // [rows]
  at::Tensor stats;      // [rows, kStatsCols]
};
KdLossBackwardInputs prepare_kd_loss_backward(KdLossProblem& problem, const at::Tensor& grad_loss,
                                              const at::Tensor& stats);

// Raises if a label is outside [0, vocab) and differs from ignore_index.
// Synchronises with the device on CUDA (one small reduction).
void check_label_range(const at::Tensor& labels, int64_t vocab, int64_t ignore_index);

// Leading shape of a [..., V] tensor, i.e. the shape of the per-row loss.
c10::IntArrayRef row_shape(const at::Tensor& logits);

}  // namespace kdfast
