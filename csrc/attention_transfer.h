// attention_transfer: parameters and host-side preparation shared by every backend.
// The math is written once in attention_transfer_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "attention_transfer_math.h"
#include "common.h"

namespace kdfast {

// Where element (n, c, j) of an [N, C, H, W] feature map lies, j = h * W + w:
//   n * sample_stride + c * channel_stride + j * position_stride.
// channels_inner: channel_stride == 1 and the map (and its gradient) is channels_last
// dense [N, H, W, C]; else position_stride == 1 (NCHW rows, any sample / channel
// strides) and the gradient is contiguous [N, C, H, W].
struct MapLayout {
  int64_t sample_stride = 0;
  int64_t channel_stride = 0;
  int64_t position_stride = 1;
  bool channels_inner = false;

  KDFAST_MATH_FN int64_t offset(int64_t n, int64_t c, int64_t j) const {
    return n * sample_stride + c * channel_stride + j * position_stride;
  }
  // Offset of the same element in the gradient (dense, see above).
  KDFAST_MATH_FN int64_t grad_offset(int64_t n, int64_t c, int64_t j, int64_t channels,
                                     int64_t positions) const {
    return channels_inner ? (n * positions + j) * channels + c : (n * channels + c) * positions + j;
  }
};

// Everything a kernel needs; plain data so it can be passed by value to a CUDA kernel.
struct AttentionTransferParams {
  int64_t samples = 0;    // N
  int64_t positions = 0;  // P = H * W
  int64_t channels_s = 0;
  int64_t channels_t = 0;
  MapLayout student_layout;
  MapLayout teacher_layout;
  const void* student = nullptr;
  const void* teacher = nullptr;
  double p = 2.0;
  PowerKind kind = PowerKind::Two;

  void* stats = nullptr;           // [N, kAtStatsCols] acc_t, written by the forward
  const void* stats_in = nullptr;  // [N, kAtStatsCols] acc_t, read by the backward
  // The gradient of the loss (acc_t, one value), nullptr for 1 (the fused forward).
  const void* grad_loss = nullptr;
  void* grad_student = nullptr;  // like student (MapLayout::grad_offset), or nullptr
  void* grad_teacher = nullptr;
};

// Validated, kernel-ready view of the op arguments. Keeps the (possibly copied)
// tensors alive while a kernel runs.
struct AttentionTransferProblem {
  at::Tensor student;
  at::Tensor teacher;
  at::ScalarType acc_dtype;  // of loss / stats / grad_loss
  AttentionTransferParams params;
};

// Checks every argument (names match the Python API: student_feat, teacher_feat, p) and
// fills the layouts; inputs in neither layout are copied to contiguous.
AttentionTransferProblem prepare_attention_transfer(const at::Tensor& student, const at::Tensor& teacher,
                                                    double p);

// A gradient buffer in the layout the kernels write for x (see MapLayout), or an empty
// tensor when not wanted.
at::Tensor attention_gradient_like(const at::Tensor& x, const MapLayout& layout, bool wanted);

// Checks the backward-only inputs (device, dtype, shape) and points params at them;
// the returned tensors must outlive the kernel.
struct AttentionTransferBackwardInputs {
  at::Tensor grad_loss;  // 1 element
  at::Tensor stats;      // [N, kAtStatsCols] contiguous
};
AttentionTransferBackwardInputs prepare_attention_transfer_backward(AttentionTransferProblem& problem,
                                                                    const at::Tensor& grad_loss,
                                                                    const at::Tensor& stats);

}  // namespace kdfast
