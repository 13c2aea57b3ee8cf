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
  m.def("kd_loss_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
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
