// LTE's one-token decode FFN as one fused CPU op (leanlm/lte.py, LTEMLP; built on first use by
// torch.utils.cpp_extension when model.lte.decode_kernel = "cpp").
//
// Why a kernel: in PyTorch the sparse FFN is ~10 ops (router, threshold, nonzero, index build, two embedding_bags,
// SiLU * up, sum) whose dispatch and index traffic eat most of what skipping half the weights saves; embedding_bag
// also reads a 64-float row per index, well below the memory bandwidth a GEMV gets. Here the router, the selection
// and both projections run in one pass that streams each selected expert's weights exactly once:
//
//   logits = R^T x + offset            R: (C, n) = router.weight transposed (the decode layout's column-major data)
//   sel    = { e : logits[e] > 0 }     (sigmoid(logit) > 0.5)
//   for e in sel:  g = W_e^T x         W_e: (C, 2E) = expert e's gate/up block of the (n, C, 2E) expert table
//                  h = silu(g[:E]) * g[E:]
//                  y += D_e^T h        D_e: (E, C) = expert e's rows of the transposed down projection (F, C)
//
// The selected experts are split over torch's intra-op threads, each summing into its own row of partial outputs.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// g (2E,) = x (C,) @ W (C, 2E); the fixed width lets the compiler keep g in vector registers
template <int64_t E2>
void gate_up_fixed(const float* x, const float* W, int64_t C, float* g) {
  float acc[E2] = {0};
  for (int64_t c = 0; c < C; ++c) {
    const float xc = x[c];
    const float* w = W + c * E2;
    for (int64_t j = 0; j < E2; ++j) acc[j] += xc * w[j];
  }
  for (int64_t j = 0; j < E2; ++j) g[j] = acc[j];
}

void gate_up_any(const float* x, const float* W, int64_t C, int64_t E2, float* g) {
  for (int64_t j = 0; j < E2; ++j) g[j] = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float xc = x[c];
    const float* w = W + c * E2;
    for (int64_t j = 0; j < E2; ++j) g[j] += xc * w[j];
  }
}

// a (C,) += sum_j h[j] * D[j, :], four rows per pass over a (a stays in L1, D streams once)
void down_acc(const float* h, const float* D, int64_t E, int64_t C, float* a) {
  int64_t j = 0;
  for (; j + 4 <= E; j += 4) {
    const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
    const float *d0 = D + j * C, *d1 = d0 + C, *d2 = d1 + C, *d3 = d2 + C;
    for (int64_t c = 0; c < C; ++c) a[c] += h0 * d0[c] + h1 * d1[c] + h2 * d2[c] + h3 * d3[c];
  }
  for (; j < E; ++j) {
    const float hj = h[j];
    const float* d = D + j * C;
    for (int64_t c = 0; c < C; ++c) a[c] += hj * d[c];
  }
}

void check(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim, "-d tensor");
}

}  // namespace

// x (C,), router_t (C, n), offset (n,), experts (n, C, 2E), down_t (n * E, C) -> (y (C,), experts selected)
std::tuple<torch::Tensor, int64_t> lte_decode(
    torch::Tensor x, torch::Tensor router_t, torch::Tensor offset, torch::Tensor experts, torch::Tensor down_t) {
  check(x, "x", 1);
  check(router_t, "router_t", 2);
  check(offset, "offset", 1);
  check(experts, "experts", 3);
  check(down_t, "down_t", 2);
  const int64_t C = x.size(0), n = experts.size(0), E2 = experts.size(2), E = E2 / 2;
  TORCH_CHECK(router_t.size(0) == C && router_t.size(1) == n && offset.size(0) == n, "router shape mismatch");
  TORCH_CHECK(experts.size(1) == C && down_t.size(0) == n * E && down_t.size(1) == C, "expert shape mismatch");
  const float* xp = x.data_ptr<float>();
  const float* R = router_t.data_ptr<float>();
  const float* W = experts.data_ptr<float>();
  const float* D = down_t.data_ptr<float>();

  std::vector<float> logit(offset.data_ptr<float>(), offset.data_ptr<float>() + n);
  for (int64_t c = 0; c < C; ++c) {
    const float xc = xp[c];
    const float* r = R + c * n;
    for (int64_t e = 0; e < n; ++e) logit[e] += xc * r[e];
  }
  std::vector<int64_t> sel;
  for (int64_t e = 0; e < n; ++e)
    if (logit[e] > 0.f) sel.push_back(e);
  const int64_t k = static_cast<int64_t>(sel.size());

  torch::Tensor y = torch::zeros({C}, x.options());
  if (k == 0) return {y, 0};
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * C, 0.f);  // one output row per thread
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    float* a = partial.data() + static_cast<int64_t>(at::get_thread_num()) * C;
    std::vector<float> g(E2), h(E);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = sel[i];
      const float* We = W + e * C * E2;
      if (E2 == 64)
        gate_up_fixed<64>(xp, We, C, g.data());
      else
        gate_up_any(xp, We, C, E2, g.data());
      for (int64_t j = 0; j < E; ++j) h[j] = g[j] / (1.f + std::exp(-g[j])) * g[E + j];
      down_acc(h.data(), D + e * E * C, E, C, a);
    }
  });
  float* yp = y.data_ptr<float>();
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) yp[c] += partial[static_cast<size_t>(t) * C + c];
  return {y, k};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lte_decode", &lte_decode, "LTE one-token decode FFN: router, selection, gate/up, SiLU*up, down");
}
