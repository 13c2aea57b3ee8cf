// topk_logits and sample_logits: parameters and host-side preparation shared by the CPU
// and CUDA backends. The math is written once in topk_sample_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common.h"
#include "topk_sample_math.h"

namespace kdfast {

// Limits of both ops (kdfast/_args.py has the same): k and num_samples at most 4096, and a
// vocabulary below 2^31 (indices fit int32; the CUDA kernels keep them as int32).
constexpr int64_t kMaxTopk = 4096;
constexpr int64_t kMaxSamples = 4096;
constexpr int64_t kMaxVocab = (int64_t(1) << 31) - 1;

// Everything a kernel needs; plain data so it can be passed by value to a CUDA kernel.
struct TopkParams {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t k = 1;
  RowLayout layout;
  const void* logits = nullptr;
  double temperature = 1.0;
  void* indices = nullptr;  // [rows, k] contiguous, int64 or int32
  bool indices_int64 = true;
  void* logprobs = nullptr;  // [rows, k] contiguous, acc_t (double for float64 logits, else float)
};

struct SampleParams {
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t num_samples = 1;
  RowLayout layout;
  const void* logits = nullptr;
  double temperature = 1.0;
  double weight_scale = 1.0;       // topk_sample::weight_scale(vocab)
  const int64_t* seed = nullptr;   // one value, on the logits' device
  void* indices = nullptr;         // [rows, num_samples] contiguous, int64 or int32
  bool indices_int64 = true;
  float* probs = nullptr;          // [rows, num_samples] contiguous
};

// Validated, kernel-ready view of the arguments and the outputs; keeps the (possibly
// copied) logits alive while a kernel runs.
struct TopkProblem {
  at::Tensor logits;  // stride(-1) == 1 (or V == 1)
  at::Tensor indices;
  at::Tensor logprobs;
  TopkParams params;
};

struct SampleProblem {
  at::Tensor logits;
  at::Tensor seed;
  at::Tensor indices;
  at::Tensor probs;
  SampleParams params;
};

// Check every argument (messages name the Python API's arguments), allocate the outputs
// on the logits' device and fill the parameters.
TopkProblem prepare_topk(const at::Tensor& logits, int64_t k, double temperature, at::ScalarType index_dtype);
SampleProblem prepare_sample(const at::Tensor& logits, int64_t num_samples, double temperature,
                             const at::Tensor& seed, at::ScalarType index_dtype);

}  // namespace kdfast
