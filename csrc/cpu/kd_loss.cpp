// CPU host functions of kd_loss: argument checks, output allocation, and dispatch to
// the kernels of the best instruction set this CPU supports.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../build_info.h"
#include "../kd_loss.h"
#include "kd_loss_cpu.h"

namespace kdfast {
namespace cpu {
namespace {

using KernelFn = void (*)(const KdLossParams&, c10::ScalarType, c10::ScalarType);

// The kernels of the best instruction set that this CPU runs and this build compiled,
// chosen once (torch reads ATEN_CPU_CAPABILITY once too).
std::pair<KernelFn, KernelFn> pick_kernels() {
  const std::string cap = cpu_capability_in_use();
#ifdef KDFAST_CPU_AVX512
  if (cap == "AVX512") return {&kd_loss_forward_avx512, &kd_loss_backward_avx512};
#endif
#ifdef KDFAST_CPU_AVX2
  if (cap == "AVX2" || cap == "AVX512") return {&kd_loss_forward_avx2, &kd_loss_backward_avx2};
#endif
  return {&kd_loss_forward_default, &kd_loss_backward_default};
}

const std::pair<KernelFn, KernelFn>& select_kernels() {
  static const std::pair<KernelFn, KernelFn> kernels = pick_kernels();
  return kernels;
}

// A gradient-sized output is written once, right after allocation; with 4 KiB pages
// its first-touch faults cost more than the kernel, so hint transparent huge pages
// (a no-op where THP is off; KDFAST_CPU_HUGEPAGES=0 disables the hint).
at::Tensor empty_gradient(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("KDFAST_CPU_HUGEPAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + out.nbytes()) & ~(kHugePage - 1);
  if (enabled && end >= begin + 4 * kHugePage) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: failure is harmless
  }
#endif
  return out;
}

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "kd_loss: ", name, " must be a CPU tensor here, got ", x.device());
}

std::tuple<at::Tensor, at::Tensor> kd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                       const c10::optional<at::Tensor>& labels,
                                                       double temperature, double alpha, int64_t divergence,
                                                       double beta, int64_t ignore_index) {
  check_cpu(student, "student_logits");
  check_cpu(teacher, "teacher_logits");
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index);
  KdLossParams& p = problem.params;
  KdLossForwardOutputs out = prepare_kd_loss_forward(problem);
  if (p.rows > 0) select_kernels().first(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {out.loss, out.stats};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const c10::optional<at::Tensor>& labels, const at::Tensor& stats, double temperature, double alpha,
    int64_t divergence, double beta, int64_t ignore_index, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_cpu(student, "student_logits");
  check_cpu(teacher, "teacher_logits");
  KdLossProblem problem =
      prepare_kd_loss(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index);
  KdLossParams& p = problem.params;
  const KdLossBackwardInputs inputs = prepare_kd_loss_backward(problem, grad_loss, stats);
  at::Tensor grad_s = student_requires_grad ? empty_gradient(student) : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_requires_grad ? empty_gradient(teacher) : at::empty({0}, teacher.options());
  if (p.rows == 0 || !(student_requires_grad || teacher_requires_grad)) return {grad_s, grad_t};
  p.grad_student = student_requires_grad ? grad_s.data_ptr() : nullptr;
  p.grad_teacher = teacher_requires_grad ? grad_t.data_ptr() : nullptr;
  select_kernels().second(p, problem.student.scalar_type(), problem.teacher.scalar_type());
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_loss_forward", &kdfast::cpu::kd_loss_forward_cpu);
  m.impl("kd_loss_backward", &kdfast::cpu::kd_loss_backward_cpu);
}
