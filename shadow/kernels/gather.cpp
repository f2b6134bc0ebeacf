// Gathered matrix-vector products for per-token sparse decoding on the CPU (float32). Each reads only the
// weight rows it is given, in place: no copy of the kept weights is made.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
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

// For each kept row i, each request b and each position p in [first(i), last]: store(i, b · span + p,
// weight[index[i]] · inputs[b · span + p]); inputs hold `requests` spans of positions one after another.
template <typename First, typename Store>
void kept_dots(const torch::Tensor& weight, const torch::Tensor& index, const torch::Tensor& inputs, First first,
               int64_t last, int64_t requests, Store store) {
  const int64_t kept = index.size(0), width = weight.size(1), span = inputs.size(0) / requests;
  TORCH_CHECK(inputs.size(1) == width && last < span && span * requests == inputs.size(0),
              "inputs do not match the weight");
  const float* w = weight.data_ptr<float>();
  const float* x = inputs.data_ptr<float>();
  const int64_t* rows = index.data_ptr<int64_t>();
  // Each block of kBlock kept rows is read once for all the positions it needs; rows of one head share them.
  at::parallel_for(0, (kept + kBlock - 1) / kBlock, 4, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t i = block * kBlock, count = std::min(kBlock, kept - i);
      const float* weights[kBlock];
      int64_t start = last + 1;
      for (int64_t r = 0; r < kBlock; ++r) {
        const int64_t row = i + std::min(r, count - 1);  // a short last block repeats its last row
        weights[r] = w + rows[row] * width;
        start = std::min(start, first(row));
      }
      for (int64_t b = 0; b < requests; ++b)
        for (int64_t p = start; p <= last; ++p) {
          float dots[kBlock];
          dot_block(weights, x + (b * span + p) * width, width, dots);
          for (int64_t r = 0; r < count; ++r)
            if (p >= first(i + r)) store(i + r, b * span + p, dots[r]);
        }
    }
  });
}

// out[index[i], b · span + p] = weight[index[i]] · inputs[b · span + p] + bias[index[i]] for p in [first[i], last],
// for every i and each of the `requests` spans of out's columns (and inputs' rows).
void rows_into(torch::Tensor out, torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor index,
               torch::Tensor inputs, torch::Tensor first, int64_t last, int64_t requests) {
  check(out, "out", 2, torch::kFloat);
  check(weight, "weight", 2, torch::kFloat);
  check(index, "index", 1, torch::kLong);
  check(inputs, "inputs", 2, torch::kFloat);
  check(first, "first", 1, torch::kLong);
  if (bias) check(*bias, "bias", 1, torch::kFloat);
  TORCH_CHECK(out.size(0) == weight.size(0) && first.size(0) == index.size(0) && out.size(1) == inputs.size(0),
              "rows_into: out, weight, index, inputs and first do not match");
  const int64_t positions = out.size(1);
  const int64_t* rows = index.data_ptr<int64_t>();
  const int64_t* from = first.data_ptr<int64_t>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  kept_dots(weight, index, inputs, [&](int64_t i) { return std::max<int64_t>(from[i], 0); }, last, requests,
            [&](int64_t i, int64_t p, float dot) { y[rows[i] * positions + p] = dot + (b ? b[rows[i]] : 0.f); });
}

// (x · weightᵀ + bias)[:, index] for a batch x (B, in): only the kept rows are read, each once for the batch.
torch::Tensor rows(torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor index, torch::Tensor x) {
  check(weight, "weight", 2, torch::kFloat);
  check(index, "index", 1, torch::kLong);
  check(x, "x", 2, torch::kFloat);
  if (bias) check(*bias, "bias", 1, torch::kFloat);
  const int64_t kept = index.size(0);
  torch::Tensor out = torch::empty({x.size(0), kept}, x.options());
  const int64_t* rows = index.data_ptr<int64_t>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  kept_dots(weight, index, x, [](int64_t) { return int64_t{0}; }, 0, x.size(0),
            [&](int64_t i, int64_t p, float dot) { y[p * kept + i] = dot + (b ? b[rows[i]] : 0.f); });
  return out;
}

// bias + Σ_i scale[:, i] · weight_t[index[i]] for a batch of scales (B, kept): the columns index of W = weight_tᵀ
// times each request's scale.
torch::Tensor columns(torch::Tensor weight_t, c10::optional<torch::Tensor> bias, torch::Tensor index,
                      torch::Tensor scale) {
  check(weight_t, "weight_t", 2, torch::kFloat);
  check(index, "index", 1, torch::kLong);
  check(scale, "scale", 2, torch::kFloat);
  if (bias) check(*bias, "bias", 1, torch::kFloat);
  const int64_t kept = index.size(0), width = weight_t.size(1), batch = scale.size(0);
  TORCH_CHECK(scale.size(1) == kept, "columns: index and scale differ in length");
  torch::Tensor out = bias ? bias->repeat({batch, 1}) : torch::zeros({batch, width}, scale.options());
  const float* w = weight_t.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const int64_t* rows = index.data_ptr<int64_t>();
  float* y = out.data_ptr<float>();
  // Threads split the output, so each sums its own slice of every kept row and no reduction is needed; a block
  // of slices serves every request while it is in the cache.
  at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < kept; i += kBlock) {
      const int64_t count = std::min(kBlock, kept - i);
      const float* slices[kBlock];
      for (int64_t r = 0; r < count; ++r) slices[r] = w + rows[i + r] * width + begin;
      for (int64_t b = 0; b < batch; ++b)
        axpy_block(s + b * kept + i, slices, count, y + b * width + begin, end - begin);
    }
  });
  return out;
}

// Attention of one query position over the cache, for the heads `heads` only. keys, values: (H · head_dim,
// positions), one row per unit (rows contiguous, perhaps a column slice of a larger store), so each head's block
// is read in place; query: the kept heads' (n · head_dim) query, already scaled. Returns their (n · head_dim)
// attention output over positions [0, length).
torch::Tensor attend(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor heads,
                     int64_t head_dim, int64_t length) {
  check(query, "query", 1, torch::kFloat);
  check(heads, "heads", 1, torch::kLong);
  for (const auto* t : {&keys, &values})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->stride(1) == 1 && t->scalar_type() == torch::kFloat,
                "keys and values must be CPU float tensors of 2 dimensions with contiguous rows");
  const int64_t kept = heads.size(0), positions = keys.stride(0);
  TORCH_CHECK(head_dim % kBlock == 0 && query.size(0) == kept * head_dim && values.sizes() == keys.sizes() &&
              values.strides() == keys.strides() && length <= keys.size(1) && length > 0,
              "attend: query, keys, values and heads do not match");
  torch::Tensor out = torch::empty_like(query);
  const float* q = query.data_ptr<float>();
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const int64_t* h = heads.data_ptr<int64_t>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, kept, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(length);
    for (int64_t j = begin; j < end; ++j) {
      const float* head_keys = k + h[j] * head_dim * positions;
      const float* head_values = v + h[j] * head_dim * positions;
      std::fill(weights.begin(), weights.end(), 0.f);
      for (int64_t d = 0; d < head_dim; d += kBlock) {  // scores = Σ_d q[d] · keys[d, :length]
        const float* rows[kBlock];
        for (int64_t r = 0; r < kBlock; ++r) rows[r] = head_keys + (d + r) * positions;
        axpy_block(q + j * head_dim + d, rows, kBlock, weights.data(), length);
      }
      const float top = *std::max_element(weights.begin(), weights.end());
      float total = 0;
      for (float& w : weights) total += (w = std::exp(w - top));
      for (int64_t d = 0; d < head_dim; d += kBlock) {  // out[d] = softmax · values[d, :length]
        const float* rows[kBlock];
        for (int64_t r = 0; r < kBlock; ++r) rows[r] = head_values + (d + r) * positions;
        dot_block(rows, weights.data(), length, y + j * head_dim + d);
        for (int64_t r = 0; r < kBlock; ++r) y[j * head_dim + d + r] /= total;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_into", &rows_into, "", pybind11::arg("out"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("index"), pybind11::arg("inputs"), pybind11::arg("first"), pybind11::arg("last"),
        pybind11::arg("requests") = 1);
  m.def("rows", &rows);
  m.def("columns", &columns);
  m.def("attend", &attend);
}
