// Host-side helpers shared by the ops of every backend: dtype checks, row layouts of
// [..., D] tensors, gradient buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include "common_math.h"

namespace kdfast {

// float32, float16, bfloat16 or float64.
bool is_supported_float(at::ScalarType t);

// Returns x itself when its rows (the last dimension) can be addressed in place with a
// two-level RowLayout (stride(-1) == 1 or a last dimension of 1), else a contiguous copy;
// fills layout for the returned tensor.
at::Tensor rows_addressable(const at::Tensor& x, RowLayout& layout);

// Leading shape of a [..., D] tensor, i.e. the shape of a per-row result.
c10::IntArrayRef row_shape(const at::Tensor& x);

// Gradient-sized output (contiguous unless `format` says otherwise, like `like`), or an
// empty tensor when not wanted. Large CPU buffers get a transparent-huge-page hint
// (KDFAST_CPU_HUGEPAGES=0: none).
at::Tensor empty_gradient_like(const at::Tensor& like, bool wanted,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous);

}  // namespace kdfast
