// What the CPU host functions of every op share (cpu_host.h).
#include "cpu_host.h"

#include <ATen/ATen.h>

namespace kdfast {
namespace cpu {

void check_cpu(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", x.device());
}

int64_t count_labeled_rows(const int64_t* labels, int64_t rows, int64_t vocab, int64_t ignore_index,
                           LabelFailure fail) {
  int64_t counted = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = labels[r];
    if (y == ignore_index) continue;
    if (y < 0 || y >= vocab) fail(r, y, vocab, ignore_index);
    ++counted;
  }
  return counted;
}

namespace {
template <typename acc_t>
double sum_of(const at::Tensor& rows_loss) {
  const acc_t* rows = rows_loss.const_data_ptr<acc_t>();
  double total = 0;
  for (int64_t r = 0; r < rows_loss.numel(); ++r) total += static_cast<double>(rows[r]);
  return total;
}
}  // namespace

double sum_rows(const at::Tensor& rows_loss) {
  return rows_loss.scalar_type() == at::kDouble ? sum_of<double>(rows_loss) : sum_of<float>(rows_loss);
}

void store_loss(const at::Tensor& loss, double value) {
  if (loss.scalar_type() == at::kDouble) {
    *loss.data_ptr<double>() = value;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(value);
  }
}

}  // namespace cpu
}  // namespace kdfast
