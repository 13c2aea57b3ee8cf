// Host-side helpers shared by the ops of every backend.
#include "common.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace kdfast {
namespace {

// Tries to describe the rows of x (stride(-1) == 1) with a two-level RowLayout.
bool two_level_layout(const at::Tensor& x, RowLayout& out) {
  // (size, stride) of the leading dims, size-1 dims dropped, mergeable dims merged.
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < x.dim() - 1; ++d) {
    const int64_t size = x.size(d), stride = x.stride(d);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().second == stride * size) {
      dims.back() = {dims.back().first * size, stride};
    } else {
      dims.emplace_back(size, stride);
    }
  }
  if (dims.empty()) {
    out = RowLayout{1, 0, 0};
  } else if (dims.size() == 1) {
    out = RowLayout{1, dims[0].second, 0};
  } else if (dims.size() == 2) {
    out = RowLayout{dims[1].first, dims[0].second, dims[1].second};
  } else {
    return false;
  }
  return true;
}

}  // namespace

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Returns x itself when its rows can be addressed in place, else a contiguous copy.
at::Tensor rows_addressable(const at::Tensor& x, RowLayout& layout) {
  const int64_t vocab = x.size(-1);
  if ((vocab == 1 || x.stride(-1) == 1) && two_level_layout(x, layout)) return x;
  at::Tensor c = x.contiguous();
  TORCH_INTERNAL_ASSERT(two_level_layout(c, layout));
  return c;
}

c10::IntArrayRef row_shape(const at::Tensor& logits) {
  return logits.sizes().slice(0, logits.dim() - 1);
}

at::Tensor empty_gradient_like(const at::Tensor& like, bool wanted, at::MemoryFormat format) {
  if (!wanted) return at::empty({0}, like.options());
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(format));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // A gradient-sized CPU buffer is written once, right after allocation; with 4 KiB
  // pages its first-touch faults cost more than the kernel, so hint transparent huge
  // pages (a no-op where THP is off; KDFAST_CPU_HUGEPAGES=0 disables the hint).
  static const bool enabled = [] {
    const char* env = std::getenv("KDFAST_CPU_HUGEPAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (enabled && out.is_cpu() && out.nbytes() >= 4 * kHugePage) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + out.nbytes()) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint
  }
#endif
  return out;
}

FusedRowOutputs allocate_fused_row_outputs(const at::Tensor& student, const at::Tensor& teacher, int64_t rows,
                                           int64_t stats_cols, at::ScalarType acc, Reduction reduction,
                                           bool student_requires_grad, bool teacher_requires_grad) {
  const auto opts = student.options().dtype(acc);
  FusedRowOutputs out;
  if (reduction == Reduction::None) {
    out.loss = at::empty(row_shape(student), opts);
    out.rows_loss = out.loss.view({rows});
  } else {
    out.loss = at::empty({}, opts);
    out.rows_loss = at::empty({rows}, opts);
  }
  out.stats = at::empty({rows, stats_cols}, opts);
  out.grad_student = empty_gradient_like(student, student_requires_grad);
  out.grad_teacher = empty_gradient_like(teacher, teacher_requires_grad);
  return out;
}

RowBackwardInputs check_row_backward_inputs(const char* op, const char* student_name, at::Device device,
                                            at::ScalarType acc, int64_t rows, int64_t stats_cols,
                                            const at::Tensor& grad_loss, const at::Tensor& stats) {
  TORCH_CHECK(grad_loss.device() == device, op, "_backward: grad_loss must be on the device of ", student_name,
              " (", device, "), got ", grad_loss.device());
  TORCH_CHECK(stats.device() == device, op, "_backward: stats must be on the device of ", student_name, " (",
              device, "), got ", stats.device());
  TORCH_CHECK(grad_loss.scalar_type() == acc, op, "_backward: grad_loss must be ", acc, ", got ",
              grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.numel() == rows, op, "_backward: grad_loss must have ", rows,
              " elements (one per row), got ", grad_loss.numel());
  TORCH_CHECK(stats.scalar_type() == acc && stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == stats_cols,
              op, "_backward: stats must be ", acc, " [", rows, ", ", stats_cols, "] from ", op, "_fused, got ",
              stats.scalar_type(), " ", stats.sizes());
  return {grad_loss.reshape({rows}).contiguous(), stats.contiguous()};
}

}  // namespace kdfast
