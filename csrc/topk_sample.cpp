// Host-side argument checks and output allocation of topk_logits and sample_logits,
// shared by every backend.
#include "topk_sample.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace kdfast {
namespace {

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() >= 1, op, ": teacher_logits must have shape [..., V], got a 0-dim tensor");
  TORCH_CHECK(is_supported_float(logits.scalar_type()), op,
              ": teacher_logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(-1) >= 1, op, ": teacher_logits must have a vocabulary (last) dimension >= 1");
  TORCH_CHECK(logits.size(-1) <= kMaxVocab, op, ": teacher_logits must have a vocabulary (last) dimension < 2^31, got ",
              logits.size(-1));
}

void check_common(const at::Tensor& logits, double temperature, at::ScalarType index_dtype, const char* op) {
  check_logits(logits, op);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(index_dtype == at::kLong || index_dtype == at::kInt, op,
              ": index_dtype must be torch.int32 or torch.int64, got ", index_dtype);
}

// [..., width] outputs of the leading shape of logits.
std::vector<int64_t> output_shape(const at::Tensor& logits, int64_t width) {
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 1);
  shape.push_back(width);
  return shape;
}

}  // namespace

TopkProblem prepare_topk(const at::Tensor& logits, int64_t k, double temperature, at::ScalarType index_dtype) {
  check_common(logits, temperature, index_dtype, "topk_logits");
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK(k >= 1 && k <= kMaxTopk, "topk_logits: k must be in [1, ", kMaxTopk, "], got ", k);
  TORCH_CHECK(k <= vocab, "topk_logits: k must be <= the vocabulary size ", vocab, ", got ", k);
  TopkProblem problem;
  TopkParams& p = problem.params;
  problem.logits = rows_addressable(logits, p.layout);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> shape = output_shape(logits, k);
  problem.indices = at::empty(shape, logits.options().dtype(index_dtype));
  problem.logprobs = at::empty(shape, logits.options().dtype(acc));
  p.vocab = vocab;
  p.rows = logits.numel() / vocab;
  p.k = k;
  p.logits = problem.logits.const_data_ptr();
  p.temperature = temperature;
  p.indices = problem.indices.data_ptr();
  p.indices_int64 = index_dtype == at::kLong;
  p.logprobs = problem.logprobs.data_ptr();
  return problem;
}

SampleProblem prepare_sample(const at::Tensor& logits, int64_t num_samples, double temperature,
                             const at::Tensor& seed, at::ScalarType index_dtype) {
  check_common(logits, temperature, index_dtype, "sample_logits");
  TORCH_CHECK(num_samples >= 1 && num_samples <= kMaxSamples, "sample_logits: num_samples must be in [1, ",
              kMaxSamples, "], got ", num_samples);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "sample_logits: seed must be a one-element int64 tensor, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  TORCH_CHECK(seed.device() == logits.device(), "sample_logits: seed must be on the device of teacher_logits (",
              logits.device(), "), got ", seed.device());
  const int64_t vocab = logits.size(-1);
  SampleProblem problem;
  SampleParams& p = problem.params;
  problem.logits = rows_addressable(logits, p.layout);
  problem.seed = seed.reshape({1}).contiguous();
  const std::vector<int64_t> shape = output_shape(logits, num_samples);
  problem.indices = at::empty(shape, logits.options().dtype(index_dtype));
  problem.probs = at::empty(shape, logits.options().dtype(at::kFloat));
  p.vocab = vocab;
  p.rows = logits.numel() / vocab;
  p.num_samples = num_samples;
  p.logits = problem.logits.const_data_ptr();
  p.temperature = temperature;
  p.weight_scale = topk_sample::weight_scale(vocab);
  p.seed = problem.seed.const_data_ptr<int64_t>();
  p.indices = problem.indices.data_ptr();
  p.indices_int64 = index_dtype == at::kLong;
  p.probs = problem.probs.data_ptr<float>();
  return problem;
}

}  // namespace kdfast
