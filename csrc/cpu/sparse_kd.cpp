// CPU host functions of sparse_kd_loss: argument checks (labels and teacher indices
// included), output allocation, the reduction, and dispatch to the kernels of the best
// instruction set this CPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "../sparse_kd.h"
#include "cpu_host.h"
#include "sparse_kd_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using SparseKernelFn = void (*)(const SparseKdParams&, c10::ScalarType);

struct SparseKernels {
  SparseKernelFn forward;
  SparseKernelFn backward;
};

#define SPARSE_KD_ENTRIES(isa) {&sparse_kd_forward_##isa, &sparse_kd_backward_##isa}

const SparseKernels& sparse_kernels() {
  static const SparseKernels k = KDFAST_SELECT_CPU_KERNELS(SparseKernels, SPARSE_KD_ENTRIES);
  return k;
}

// Every teacher index is -1 or in [0, vocab) (a plain loop: N * K reads, no tensor ops).
void check_indices(const SparseKdParams& p) {
  for (int64_t row = 0; row < p.rows; ++row) {
    for (int64_t k = 0; k < p.support; ++k) {
      const int64_t i = sparse_index(p, row, k);
      if (i < -1 || i >= p.vocab) fail_sparse_kd_index(row, k, i, p.vocab);
    }
  }
}

// Checks labels and indices; returns the number of counted rows.
int64_t check_rows(const SparseKdParams& p) {
  check_indices(p);
  if (p.labels == nullptr) return p.rows;
  return count_labeled_rows(p.labels, p.rows, p.vocab, p.ignore_index, &fail_sparse_kd_label);
}

void check_inputs_on_cpu(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values) {
  check_cpu(student, "sparse_kd_loss", "student_logits");
  check_cpu(indices, "sparse_kd_loss", "teacher_indices");
  check_cpu(values, "sparse_kd_loss", "teacher_values");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kd_loss_fused_cpu(
    const at::Tensor& student, const at::Tensor& teacher_indices, const at::Tensor& teacher_values,
    const c10::optional<at::Tensor>& labels, double temperature, double alpha, bool logprobs, int64_t tail,
    int64_t ignore_index, int64_t reduction, bool student_requires_grad) {
  check_inputs_on_cpu(student, teacher_indices, teacher_values);
  const Reduction red = check_sparse_kd_reduction(reduction);
  SparseKdProblem problem = prepare_sparse_kd(student, teacher_indices, teacher_values, labels, temperature, alpha,
                                              logprobs, tail, ignore_index);
  SparseKdParams& p = problem.params;
  const int64_t counted = check_rows(p);
  FusedRowOutputs out = prepare_sparse_kd_fused(problem, red, student_requires_grad);
  // d loss / d loss_i: 1 / counted rows for batchmean, 1 otherwise; the kept gradient
  // carries it, so the backward of loss.backward() moves no data.
  const double divisor = static_cast<double>(std::max<int64_t>(counted, 1));
  const UniformRowWeight weight(red == Reduction::BatchMean ? 1.0 / divisor : 1.0);
  p.grad_loss = weight.ptr(problem.acc_dtype);
  p.grad_loss_stride = 0;
  if (p.rows > 0) sparse_kernels().forward(p, problem.student.scalar_type());
  if (red != Reduction::None) {
    const double total = sum_rows(out.rows_loss);
    store_loss(out.loss, red == Reduction::BatchMean ? total / divisor : total);
  }
  return {out.loss, out.stats, out.grad_student};
}

at::Tensor sparse_kd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                       const at::Tensor& teacher_indices, const at::Tensor& teacher_values,
                                       const c10::optional<at::Tensor>& labels, const at::Tensor& stats,
                                       double temperature, double alpha, bool logprobs, int64_t tail,
                                       int64_t ignore_index) {
  check_inputs_on_cpu(student, teacher_indices, teacher_values);
  SparseKdProblem problem = prepare_sparse_kd(student, teacher_indices, teacher_values, labels, temperature, alpha,
                                              logprobs, tail, ignore_index);
  SparseKdParams& p = problem.params;
  const RowBackwardInputs inputs = prepare_sparse_kd_backward(problem, grad_loss, stats);
  at::Tensor grad = empty_gradient_like(student, true);
  if (p.rows == 0) return grad;
  check_rows(p);  // the gradient is written at the labels and the teacher indices
  p.grad_student = grad.data_ptr();
  sparse_kernels().backward(p, problem.student.scalar_type());
  return grad;
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sparse_kd_loss_fused", &kdfast::cpu::sparse_kd_loss_fused_cpu);
  m.impl("sparse_kd_loss_backward", &kdfast::cpu::sparse_kd_loss_backward_cpu);
}
