// Gathered matrix-vector products for per-token sparse decoding on the CPU (float32). Each reads only the
// weight rows it is given, in place: no copy of the kept weights is made.
#include <ATen/Parallel.h>
#include <torch/extension.h>

// One build runs on any x86-64 CPU: the hot loops are compiled for several instruction sets and the best one
// is picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

namespace {

constexpr int64_t kLanes = 16;  // independent partial sums, so the compiler vectorises without reassociating
constexpr int64_t kBlock = 4;   // rows read at once: four memory streams keep more loads in flight than one

// out[r] = rows[r] · x for the kBlock rows.
VECTOR_CLONES void dot_block(const float* const* rows, const float* x, int64_t n, float* out) {
  float partial[kBlock][kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t u = 0; u < kLanes; ++u)
      for (int64_t r = 0; r < kBlock; ++r) partial[r][u] += rows[r][j + u] * x[j + u];
  for (int64_t r = 0; r < kBlock; ++r) {
    float sum = 0;
    for (int64_t t = j; t < n; ++t) sum += rows[r][t] * x[t];
    for (int64_t u = 0; u < kLanes; ++u) sum += partial[r][u];
    out[r] = sum;
  }
}

// y += Σ_r scale[r] · rows[r] over the first `count` (≤ kBlock) rows.
VECTOR_CLONES void axpy_block(const float* scale, const float* const* rows, int64_t count, float* y, int64_t n) {
  if (count == kBlock) {
    for (int64_t j = 0; j < n; ++j)
      y[j] += scale[0] * rows[0][j] + scale[1] * rows[1][j] + scale[2] * rows[2][j] + scale[3] * rows[3][j];
  } else {
    for (int64_t r = 0; r < count; ++r)
      for (int64_t j = 0; j < n; ++j) y[j] += scale[r] * rows[r][j];
  }
}

void check(const torch::Tensor& t, const char* name, int64_t dim, c10::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dim && t.scalar_type() == dtype, name,
              " must be a contiguous CPU tensor of ", dim, " dimensions and type ", dtype);
}

}  // namespace

// out[index[i], p] = weight[index[i]] · inputs[p] + bias[index[i]] for p in [first[i], last], for every i.
void rows_into(torch::Tensor out, torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor index,
               torch::Tensor inputs, torch::Tensor first, int64_t last) {
  check(out, "out", 2, torch::kFloat);
  check(weight, "weight", 2, torch::kFloat);
  check(index, "index", 1, torch::kLong);
  check(inputs, "inputs", 2, torch::kFloat);
  check(first, "first", 1, torch::kLong);
  if (bias) check(*bias, "bias", 1, torch::kFloat);
  const int64_t kept = index.size(0), width = weight.size(1), positions = out.size(1);
  TORCH_CHECK(inputs.size(1) == width && out.size(0) == weight.size(0) && first.size(0) == kept &&
              last < positions && last < inputs.size(0), "rows_into: shapes do not match");
  const float* w = weight.data_ptr<float>();
  const float* x = inputs.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t* rows = index.data_ptr<int64_t>();
  const int64_t* from = first.data_ptr<int64_t>();
  float* y = out.data_ptr<float>();
  // Each block of kBlock kept rows is read once for all the positions it needs; rows of one head share them.
  at::parallel_for(0, (kept + kBlock - 1) / kBlock, 4, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i = block * kBlock, count = std::min(kBlock, kept - i);
      const float* weights[kBlock];
      int64_t start = last + 1;
      for (int64_t r = 0; r < kBlock; ++r) {
        weights[r] = w + rows[i + std::min(r, count - 1)] * width;  // a short last block repeats its last row
        start = std::min(start, std::max<int64_t>(from[i + std::min(r, count - 1)], 0));
      }
      for (int64_t p = start; p <= last; ++p) {
        float dots[kBlock];
        dot_block(weights, x + p * width, width, dots);
        for (int64_t r = 0; r < count; ++r) {
          const int64_t row = rows[i + r];
          if (p >= from[i + r]) y[row * positions + p] = dots[r] + (b ? b[row] : 0.f);
        }
      }
    }
  });
}

// bias + Σ_i scale[i] · weight_t[index[i]]: the columns index of W = weight_tᵀ times scale.
torch::Tensor columns(torch::Tensor weight_t, c10::optional<torch::Tensor> bias, torch::Tensor index,
                      torch::Tensor scale) {
  check(weight_t, "weight_t", 2, torch::kFloat);
  check(index, "index", 1, torch::kLong);
  check(scale, "scale", 1, torch::kFloat);
  if (bias) check(*bias, "bias", 1, torch::kFloat);
  const int64_t kept = index.size(0), width = weight_t.size(1);
  TORCH_CHECK(scale.size(0) == kept, "columns: index and scale differ in length");
  torch::Tensor out = bias ? bias->clone() : torch::zeros({width}, scale.options());
  const float* w = weight_t.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const int64_t* rows = index.data_ptr<int64_t>();
  float* y = out.data_ptr<float>();
  // Threads split the output, so each sums its own slice of every kept row and no reduction is needed.
  at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < kept; i += kBlock) {
      const int64_t count = std::min(kBlock, kept - i);
      const float* slices[kBlock];
      for (int64_t r = 0; r < count; ++r) slices[r] = w + rows[i + r] * width + begin;
      axpy_block(s + i, slices, count, y + begin, end - begin);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_into", &rows_into);
  m.def("columns", &columns);
}
