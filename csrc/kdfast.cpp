// Operator schemas of the kdfast namespace (nothing else lives here) and the
// kdfast._C Python module, which registers them on import and reports build facts.
#include <torch/library.h>

#include <string>
#include <vector>

#ifndef KDFAST_NO_PYTHON
#include <torch/extension.h>
#endif

#include "build_info.h"

TORCH_LIBRARY(kdfast, m) {
  // Temperature-softmax distillation loss, reduced (reduction: 0 batchmean, 1 sum,
  // 2 none), with the O(rows) row statistics a recomputing backward needs, and, for the
  // inputs flagged, d loss / d input computed in the same pass over the logits (empty
  // tensors otherwise). Math in docs/kd_loss_math.md.
  m.def(
      "kd_loss_fused(Tensor student, Tensor teacher, Tensor? labels, float temperature, float alpha, "
      "int divergence, float beta, int ignore_index, float softcap, int reduction, "
      "bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor loss, Tensor stats, Tensor grad_student, Tensor grad_teacher)");
  // Gradients of the per-row loss, scaled by grad_loss, recomputed from the row
  // statistics in one pass over the inputs.
  m.def(
      "kd_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, "
      "Tensor stats, float temperature, float alpha, int divergence, float beta, int ignore_index, "
      "float softcap, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  // grad[r, :] *= scale[r] (or the one value of scale), in place; rows whose scale is
  // exactly 1 are not touched, so the common backward of a kept gradient moves no data.
  // Used by the kept-gradient backward of every fused op (kdfast/ops/_kept.py).
  m.def("kd_loss_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");

  // Every fused op below follows kd_loss_fused's contract: (reduced loss, O(rows)
  // statistics, d loss / d student, d loss / d teacher), the gradients computed in the
  // same pass as the loss for the inputs flagged (empty tensors otherwise) at an incoming
  // gradient of 1; its *_backward recomputes them from the statistics.

  // Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, both times T^2,
  // per row of [..., V] logits with an int64 target per row (reduction: 0 batchmean,
  // 1 sum, 2 none; rows whose label is ignore_index contribute 0 and are not counted).
  m.def(
      "dkd_loss_fused(Tensor student, Tensor teacher, Tensor labels, float alpha, float beta, "
      "float temperature, int ignore_index, int reduction, bool student_requires_grad, "
      "bool teacher_requires_grad) -> (Tensor loss, Tensor stats, Tensor grad_student, Tensor grad_teacher)");
  // grad_loss: the gradient of each row's loss, [rows] (the reduction's weights included).
  m.def(
      "dkd_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor labels, Tensor stats, "
      "float alpha, float beta, float temperature, int ignore_index, bool student_requires_grad, "
      "bool teacher_requires_grad) -> (Tensor grad_student, Tensor grad_teacher)");

  // Feature matching per row of [..., D] features (kind: 0 mse, 1 l1, 2 smooth_l1 with
  // beta 1, 3 cosine = 1 - cosine similarity; normalize: L2-normalise both rows first;
  // mask: bool [...] selecting rows; reduction: 0 mean, 1 sum, 2 none).
  m.def(
      "feature_loss_fused(Tensor student, Tensor teacher, Tensor? mask, int kind, bool normalize, "
      "int reduction, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor loss, Tensor stats, Tensor grad_student, Tensor grad_teacher)");
  // grad_loss: the gradient of each row's loss, [rows] (the reduction's weights included).
  m.def(
      "feature_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? mask, Tensor stats, "
      "int kind, bool normalize, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");

  // Attention transfer (Zagoruyko & Komodakis, ICLR 2017) of one pair of [N, C, H, W]
  // feature maps (channel counts may differ): mean((a(s) - a(t))^2) over N * H * W with
  // a(x) = normalize(mean_C |x|^p) over the H * W positions of each sample.
  m.def(
      "attention_transfer_fused(Tensor student, Tensor teacher, float p, bool student_requires_grad, "
      "bool teacher_requires_grad) -> (Tensor loss, Tensor stats, Tensor grad_student, Tensor grad_teacher)");
  // grad_loss: 0-dim.
  m.def(
      "attention_transfer_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, float p, "
      "bool student_requires_grad, bool teacher_requires_grad) -> (Tensor grad_student, Tensor grad_teacher)");

  // --- sparse teacher: what a teacher cache stores, and the loss that reads it ---------

  // The k largest logits of each row of [..., V] (1 <= k <= V), sorted descending (ties:
  // lower index first), as indices [..., k] of index_dtype (int32 or int64) and their
  // log-probabilities under the full-vocabulary log_softmax(logits / temperature),
  // [..., k] float32 (float64 for float64 logits).
  m.def(
      "topk_logits(Tensor logits, int k, float temperature, ScalarType index_dtype) "
      "-> (Tensor indices, Tensor logprobs)");
  // num_samples draws per row of [..., V], with replacement, from softmax(logits /
  // temperature), by a counter-based generator keyed by seed (an int64 0-dim tensor on the
  // logits' device, read on the device: no host synchronisation). Each distinct token once
  // in ascending index order with weight count / num_samples, then padding (index -1,
  // weight 0): indices [..., num_samples] of index_dtype, probs [..., num_samples] float32.
  m.def(
      "sample_logits(Tensor logits, int num_samples, float temperature, Tensor seed, "
      "ScalarType index_dtype) -> (Tensor indices, Tensor probs)");
  // Distillation loss from a sparse teacher: student [..., V] logits normalised over the
  // full vocabulary at temperature; teacher [..., K] indices (-1: padding) and values
  // (logprobs or probs). tail: 0 renormalize, 1 residual. Times T^2 (1 - alpha), plus alpha
  // times the cross-entropy at temperature 1 (labels, ignore_index and reduction as in
  // kd_loss_fused). Returns (loss, O(rows) statistics, d loss / d student computed in the
  // same pass when student_requires_grad, else an empty tensor).
  m.def(
      "sparse_kd_loss_fused(Tensor student, Tensor teacher_indices, Tensor teacher_values, "
      "Tensor? labels, float temperature, float alpha, bool logprobs, int tail, int ignore_index, "
      "int reduction, bool student_requires_grad) -> (Tensor loss, Tensor stats, Tensor grad_student)");
  // grad_loss: the gradient of each row's loss, [rows] (the reduction's weights included).
  m.def(
      "sparse_kd_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher_indices, "
      "Tensor teacher_values, Tensor? labels, Tensor stats, float temperature, float alpha, "
      "bool logprobs, int tail, int ignore_index) -> Tensor");
}

#ifndef KDFAST_NO_PYTHON
PYBIND11_MODULE(_C, m) {
  m.doc() = "kdfast compiled kernels; importing this module registers the kdfast ops.";
  m.attr("__version__") = KDFAST_VERSION;
#ifdef KDFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = std::string(KDFAST_CUDA_ARCHS);
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = std::string();
#endif
  m.def("cpu_capabilities_built", &kdfast::cpu_capabilities_built,
        "CPU instruction sets the kernels were compiled for, e.g. ['DEFAULT', 'AVX2', 'AVX512'].");
  m.def("cpu_capability", &kdfast::cpu_capability_in_use,
        "The CPU instruction set the kernels use on this machine (honours ATEN_CPU_CAPABILITY).");
}
#endif  // KDFAST_NO_PYTHON
