// Host-side argument checks and layout computation of attention_transfer, shared by
// every backend.
#include "attention_transfer.h"

#include <ATen/ATen.h>

#include <cmath>

namespace kdfast {
namespace {

// The layout of x when the kernels can read it in place (see MapLayout).
bool in_place_layout(const at::Tensor& x, MapLayout& out) {
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t positions = height * width;
  // channels_last: the gradient is channels_last too. A map of one position is read
  // along its channels as well (its contiguous gradient is the same memory).
  if (channels > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && (!x.is_contiguous() || positions == 1)) {
    out = MapLayout{x.stride(0), 1, channels, true};
    return true;
  }
  // Rows of H * W positions with stride 1 (slices along N and C included).
  bool rows = true;
  if (positions > 1) {
    rows = width == 1 ? x.stride(2) == 1 : (x.stride(3) == 1 && (height == 1 || x.stride(2) == width));
  }
  if (!rows) return false;
  out = MapLayout{x.stride(0), x.stride(1), 1, false};
  return true;
}

at::Tensor readable(const at::Tensor& x, MapLayout& layout) {
  if (in_place_layout(x, layout)) return x;
  at::Tensor c = x.contiguous();
  TORCH_INTERNAL_ASSERT(in_place_layout(c, layout));
  return c;
}

void check_feature_map(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, "attention_transfer_loss: ", name, " must be a 4-D [N, C, H, W] feature map, got shape ",
              x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), "attention_transfer_loss: ", name,
              " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, "attention_transfer_loss: ",
              name, " must have N, C, H, W >= 1, got shape ", x.sizes());
}

}  // namespace

AttentionTransferProblem prepare_attention_transfer(const at::Tensor& student, const at::Tensor& teacher,
                                                    double p) {
  check_feature_map(student, "student_feat");
  check_feature_map(teacher, "teacher_feat");
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(2) == teacher.size(2) &&
                  student.size(3) == teacher.size(3),
              "attention_transfer_loss: student_feat and teacher_feat must have the same N, H and W "
              "(channel counts may differ), got shapes ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(),
              "attention_transfer_loss: student_feat and teacher_feat must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK((student.scalar_type() == at::kDouble) == (teacher.scalar_type() == at::kDouble),
              "attention_transfer_loss: float64 student_feat and teacher_feat must both be float64, got ",
              student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK(std::isfinite(p) && p >= 1.0, "attention_transfer_loss: p must be finite and >= 1, got ", p);

  AttentionTransferProblem problem;
  AttentionTransferParams& k = problem.params;
  problem.student = readable(student, k.student_layout);
  problem.teacher = readable(teacher, k.teacher_layout);
  problem.acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  k.samples = student.size(0);
  k.positions = student.size(2) * student.size(3);
  k.channels_s = student.size(1);
  k.channels_t = teacher.size(1);
  k.student = problem.student.const_data_ptr();
  k.teacher = problem.teacher.const_data_ptr();
  k.p = p;
  k.kind = power_kind(p);
  return problem;
}

at::Tensor attention_gradient_like(const at::Tensor& x, const MapLayout& layout, bool wanted) {
  const bool channels_last = layout.channels_inner && !x.is_contiguous();
  return empty_gradient_like(x, wanted, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

AttentionTransferBackwardInputs prepare_attention_transfer_backward(AttentionTransferProblem& problem,
                                                                    const at::Tensor& grad_loss,
                                                                    const at::Tensor& stats) {
  AttentionTransferParams& k = problem.params;
  const at::Device device = problem.student.device();
  TORCH_CHECK(grad_loss.device() == device,
              "attention_transfer_backward: grad_loss must be on the device of student_feat (", device, "), got ",
              grad_loss.device());
  TORCH_CHECK(stats.device() == device,
              "attention_transfer_backward: stats must be on the device of student_feat (", device, "), got ",
              stats.device());
  TORCH_CHECK(grad_loss.scalar_type() == problem.acc_dtype && grad_loss.numel() == 1,
              "attention_transfer_backward: grad_loss must be one ", problem.acc_dtype, " value, got ",
              grad_loss.scalar_type(), " of shape ", grad_loss.sizes());
  TORCH_CHECK(stats.scalar_type() == problem.acc_dtype && stats.dim() == 2 && stats.size(0) == k.samples &&
                  stats.size(1) == kAtStatsCols,
              "attention_transfer_backward: stats must be ", problem.acc_dtype, " [", k.samples, ", ",
              kAtStatsCols, "] from attention_transfer_fused, got ", stats.scalar_type(), " ", stats.sizes());
  AttentionTransferBackwardInputs in{grad_loss.reshape({1}).contiguous(), stats.contiguous()};
  k.grad_loss = in.grad_loss.const_data_ptr();
  k.stats_in = in.stats.const_data_ptr();
  return in;
}

}  // namespace kdfast
