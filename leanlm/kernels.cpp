// leanlm's optional fused CPU decode kernels, built on first use by torch.utils.cpp_extension (leanlm/kernels.py)
// when a caller asks for kernel="cpp" (`leanlm generate/bench --kernel cpp`). Each op does one token of one row.
//
// Why kernels: a one-token decode step on a CPU is bound by the number of ops, not by their size. A dense block of
// the CPU presets is ~40 PyTorch ops (norm, projection, RoPE, cache writes, attention, residuals), ~0.4 ms of
// dispatch and small-tensor traffic next to ~0.3 ms of streaming its weights; that fixed cost is paid by every
// token that enters a block, so it also caps what skipping work can save (SUBLLM's decode at 4k, docs/design.md).
// Mid-step it is worse than a microbenchmark shows: after megabytes of weights have streamed through the caches, a
// small PyTorch op costs 0.1-0.2 ms (its dispatch path is cold; F.rms_norm on 256 values: 24 us warm, 156 us cold),
// while a call into this module costs ~10 us. So the small ops around the blocks are here too (embedding, final
// norm and lm head, SUBLLM's score and upsample).
//
// attn_decode: x + o_proj(attention(rope(qkv_proj(rmsnorm(x))))), writing the new key/value into the cache
// mlp_decode:  x + down_proj(silu(gate) * up) with [gate; up] = gate_up_proj(rmsnorm(x))
// lte_decode:  LTE's FFN (below)
// embed_decode, head_decode: the token's embedding; lm_head(rmsnorm(x))
// score / upsample: SUBLLM's stage boundary for one token
//
// Weights come in the decode layout (model.decode_layout): every Linear weight (out, in) is stored column-major,
// i.e. as a contiguous (in, out) matrix W^T, so y = x W^T streams W^T row by row.
//
// LTE's one-token decode FFN: in PyTorch the sparse FFN is ~10 ops (router, threshold, nonzero, index build, two
// embedding_bags, SiLU * up, sum) whose dispatch and index traffic eat most of what skipping half the weights saves;
// embedding_bag also reads a 64-float row per index, well below the memory bandwidth a GEMV gets. Here the router,
// the selection and both projections run in one pass that streams each selected expert's weights exactly once:
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

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// g (2E,) = x (C,) @ W (C, 2E); the fixed width lets the compiler keep g in vector registers
template <int64_t E2>
void gate_up_fixed(const float* x, const float* W, int64_t C, float* g) {
  float acc[E2] = {0}, acc2[E2] = {0};  // even and odd rows: twice the independent chains, more loads in flight
  int64_t c = 0;
  for (; c + 2 <= C; c += 2) {
    const float x0 = x[c], x1 = x[c + 1];
    const float* w = W + c * E2;
    for (int64_t j = 0; j < E2; ++j) acc[j] += x0 * w[j];
    for (int64_t j = 0; j < E2; ++j) acc2[j] += x1 * w[E2 + j];
  }
  for (; c < C; ++c)
    for (int64_t j = 0; j < E2; ++j) acc[j] += x[c] * W[c * E2 + j];
  for (int64_t j = 0; j < E2; ++j) g[j] = acc[j] + acc2[j];
}

// a (N,) += x (M,) @ W (M, N): four rows per pass over a (a stays in L1, W streams once). The GEMV below, LTE's
// generic gate/up (any expert width) and its down projection (an expert's E rows of the transposed down_proj) all
// come down to this.
void acc_rows(const float* x, const float* W, int64_t M, int64_t N, float* a) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const float x0 = x[m], x1 = x[m + 1], x2 = x[m + 2], x3 = x[m + 3];
    const float *w0 = W + m * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
    for (int64_t j = 0; j < N; ++j) a[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
  }
  for (; m < M; ++m) {
    const float xm = x[m];
    const float* w = W + m * N;
    for (int64_t j = 0; j < N; ++j) a[j] += xm * w[j];
  }
}

// Sums over a vector in 16 independent lanes: the compiler may not reorder a float reduction by itself (no
// -ffast-math), and one serial chain of fused multiply-adds would run at a fraction of the vector units' rate.
float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int64_t l = 0; l < 16; ++l) s += acc[l];
  return s;
}

float sum(const float* a, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t l = 0; l < 16; ++l) acc[l] += a[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += a[i];
  for (int64_t l = 0; l < 16; ++l) s += acc[l];
  return s;
}

float max(const float* a, int64_t n) {
  float acc[16];
  for (int64_t l = 0; l < 16; ++l) acc[l] = a[0];
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t l = 0; l < 16; ++l) acc[l] = acc[l] > a[i + l] ? acc[l] : a[i + l];
  float m = a[0];
  for (; i < n; ++i) m = m > a[i] ? m : a[i];
  for (int64_t l = 0; l < 16; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// exp(x) for float x, branch-free so that loops over it vectorize (std::exp is a scalar libm call, ~10x slower in
// softmax over thousands of keys): x = n ln2 + r with |r| <= ln2/2, exp(r) by Cephes expf's degree-6 polynomial
// (relative error ~1e-7), times 2^n built in the exponent bits. Inputs are clamped to [-87, 88] (no inf/denormals).
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// out (C,) = x * rsqrt(mean(x^2) + eps) * w: HF's LlamaRMSNorm in fp32
void rmsnorm(const float* x, const float* w, int64_t C, float eps, float* out) {
  const float ss = dot(x, x, C);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = x[c] * r * w[c];
}

// y (N,) = x (M,) @ Wt (M, N). The rows are split over torch's threads, so each thread streams one contiguous piece
// of the matrix (the memory prefetchers' best case: 15% more bandwidth here than interleaved column slices); each
// sums into its own partial output (acc_rows), and the partials are added at the end.
void gemv(const float* x, const float* Wt, int64_t M, int64_t N, float* y) {
  const int64_t T = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, M / 16));
  std::vector<float> part(static_cast<size_t>(T) * N);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = M * t / T, m1 = M * (t + 1) / T;
      float* a = part.data() + t * N;
      for (int64_t j = 0; j < N; ++j) a[j] = 0.f;
      acc_rows(x + m0, Wt + m0 * N, m1 - m0, N, a);
    }
  });
  for (int64_t j = 0; j < N; ++j) y[j] = part[j];
  for (int64_t t = 1; t < T; ++t)
    for (int64_t j = 0; j < N; ++j) y[j] += part[t * N + j];
}

// out (D,) = x * cos + roll(x, D/2) * sin, with sin signed [-sin, sin] (leanlm.model.RotaryEmbedding)
void rope(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) out[d] = x[d] * cos[d] + x[d + h] * sin[d];
  for (int64_t d = h; d < D; ++d) out[d] = x[d] * cos[d] + x[d - h] * sin[d];
}

// o (H, D) = softmax(q k^T) v for H = K * G query heads (q pre-scaled) over the first S rows of the (K, L, D) caches.
// Flash-decoding: the keys are cut into chunks, each (kv head, chunk) pair is a task that reads its keys and values
// once for all G query heads of the group and keeps a running max, sum and output; the chunks are merged at the end.
// Splitting the keys (not only the heads) keeps every thread busy whatever K is (3 for SmolLM2 on 2 threads).
void attention(const float* q, const float* kc, const float* vc, int64_t K, int64_t G, int64_t L, int64_t D,
               int64_t S, float* o) {
  constexpr int64_t CH = 256;  // keys per chunk
  const int64_t nch = (S + CH - 1) / CH, H = K * G;
  std::vector<float> pm(K * nch * G), pl(K * nch * G), po(K * nch * G * D);
  at::parallel_for(0, K * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(G * CH);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t kh = t / nch, c0 = (t % nch) * CH, n = std::min(S, c0 + CH) - c0;
      const float* kb = kc + (kh * L + c0) * D;
      const float* vb = vc + (kh * L + c0) * D;
      const float* qg = q + kh * G * D;
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = kb + j * D;
        for (int64_t g = 0; g < G; ++g) {
          s[g * CH + j] = dot(qg + g * D, kr, D);
        }
      }
      float* m = pm.data() + t * G;
      float* l = pl.data() + t * G;
      float* ot = po.data() + t * G * D;
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * CH;
        const float mx = max(sg, n);
        for (int64_t j = 0; j < n; ++j) sg[j] = exp_fast(sg[j] - mx);
        m[g] = mx;
        l[g] = sum(sg, n);
      }
      for (int64_t i = 0; i < G * D; ++i) ot[i] = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float* vr = vb + j * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * CH + j];
          float* og = ot + g * D;
          for (int64_t d = 0; d < D; ++d) og[d] += p * vr[d];
        }
      }
    }
  });
  for (int64_t h = 0; h < H; ++h) {  // merge the chunks of query head h = kh * G + g
    const int64_t kh = h / G, g = h % G;
    float mx = -INFINITY;
    for (int64_t c = 0; c < nch; ++c) mx = std::max(mx, pm[(kh * nch + c) * G + g]);
    float* oh = o + h * D;
    for (int64_t d = 0; d < D; ++d) oh[d] = 0.f;
    float den = 0.f;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t t = kh * nch + c;
      const float w = std::exp(pm[t * G + g] - mx);
      den += w * pl[t * G + g];
      const float* ot = po.data() + (t * G + g) * D;
      for (int64_t d = 0; d < D; ++d) oh[d] += w * ot[d];
    }
    for (int64_t d = 0; d < D; ++d) oh[d] /= den;
  }
}

void check(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim, "-d tensor");
}

// a contiguous fp32 CPU tensor of n values, any shape: the model passes (1, 1, C) activations and (1, 1, 1, D) RoPE
// rows as they are (each view in Python costs a dispatch, and a decode step is bound by those)
void check_numel(const torch::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu(), name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_contiguous() && t.numel() == n, name, " must be contiguous with ", n, " values");
}

}  // namespace

// x (C values), router_t (C, n), offset (n,), experts (n, C, 2E), down_t (n * E, C) -> (FFN(x), experts selected),
// shaped like x. With norm_w (C,): (x + FFN(rmsnorm(x)), k), the whole FFN half of a block (model.Block's fused path).
std::tuple<torch::Tensor, int64_t> lte_decode(torch::Tensor x, torch::Tensor router_t, torch::Tensor offset,
                                              torch::Tensor experts, torch::Tensor down_t,
                                              c10::optional<torch::Tensor> norm_w, double eps) {
  check(router_t, "router_t", 2);
  check(offset, "offset", 1);
  check(experts, "experts", 3);
  check(down_t, "down_t", 2);
  const int64_t C = router_t.size(0), n = experts.size(0), E2 = experts.size(2), E = E2 / 2;
  check_numel(x, "x", C);
  TORCH_CHECK(router_t.size(1) == n && offset.size(0) == n, "router shape mismatch");
  TORCH_CHECK(experts.size(1) == C && down_t.size(0) == n * E && down_t.size(1) == C, "expert shape mismatch");
  const float* R = router_t.data_ptr<float>();
  const float* W = experts.data_ptr<float>();
  const float* D = down_t.data_ptr<float>();
  std::vector<float> hn;
  const float* xp = x.data_ptr<float>();  // the FFN's input: x, or rmsnorm(x) for a block
  if (norm_w) {
    check(*norm_w, "norm_w", 1);
    TORCH_CHECK(norm_w->size(0) == C, "norm_w shape mismatch");
    hn.resize(C);
    rmsnorm(xp, norm_w->data_ptr<float>(), C, static_cast<float>(eps), hn.data());
    xp = hn.data();
  }

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

  torch::Tensor y = norm_w ? x.clone() : torch::zeros_like(x);  // the residual, or nothing
  if (k == 0) return {y, 0};
  const int threads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * C, 0.f);  // one output row per thread
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    float* a = partial.data() + static_cast<int64_t>(at::get_thread_num()) * C;
    std::vector<float> g(E2), h(E);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = sel[i];
      const float* We = W + e * C * E2;
      // a fixed-width loop for experts of 32 and 16, the generic one otherwise: for experts of 8 the fixed loop
      // (4 vector chains) ran 2x slower than the generic one (measured: docs/lab/lte.md)
      switch (E2) {
        case 64: gate_up_fixed<64>(xp, We, C, g.data()); break;
        case 32: gate_up_fixed<32>(xp, We, C, g.data()); break;
        default:
          std::fill(g.begin(), g.end(), 0.f);
          acc_rows(xp, We, C, E2, g.data());
      }
      for (int64_t j = 0; j < E; ++j) h[j] = g[j] / (1.f + exp_fast(-g[j])) * g[E + j];
      acc_rows(h.data(), D + e * E * C, E, C, a);
    }
  });
  float* yp = y.data_ptr<float>();
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) yp[c] += partial[static_cast<size_t>(t) * C + c];
  return {y, k};
}

// x (C values, e.g. (1, 1, C)), norm_w (C,), qkv_t (C, (H + 2K) D), cos/sin (D values) of the token's position,
// k_cache/v_cache (1, K, L, D) with slots [0, slot) filled, o_t (H D, C) -> x + attention output, shaped like x; the
// token's key and value are written at `slot`
torch::Tensor attn_decode(torch::Tensor x, torch::Tensor norm_w, double eps, torch::Tensor qkv_t, torch::Tensor cos,
                          torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache, int64_t slot,
                          torch::Tensor o_t) {
  check(norm_w, "norm_w", 1);
  check(qkv_t, "qkv_t", 2);
  check(k_cache, "k_cache", 4);
  check(v_cache, "v_cache", 4);
  check(o_t, "o_t", 2);
  const int64_t C = norm_w.size(0), K = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  const int64_t HD = o_t.size(0), H = HD / D, G = H / K;
  check_numel(x, "x", C);
  check_numel(cos, "cos", D);
  check_numel(sin, "sin", D);
  TORCH_CHECK(k_cache.size(0) == 1 && v_cache.sizes() == k_cache.sizes(), "caches must be (1, K, L, D), alike");
  TORCH_CHECK(H % K == 0 && HD == H * D && o_t.size(1) == C, "attention shape mismatch");
  TORCH_CHECK(qkv_t.size(0) == C && qkv_t.size(1) == (H + 2 * K) * D, "qkv shape mismatch");
  TORCH_CHECK(0 <= slot && slot < L, "cache slot ", slot, " outside the cache's ", L, " slots");
  const float* xp = x.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();

  std::vector<float> hn(C), qkv((H + 2 * K) * D), q(H * D), att(H * D);
  rmsnorm(xp, norm_w.data_ptr<float>(), C, static_cast<float>(eps), hn.data());
  gemv(hn.data(), qkv_t.data_ptr<float>(), C, (H + 2 * K) * D, qkv.data());
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));  // SDPA's default
  for (int64_t h = 0; h < H; ++h) {
    rope(qkv.data() + h * D, cp, sp, D, q.data() + h * D);
    for (int64_t d = 0; d < D; ++d) q[h * D + d] *= scale;
  }
  for (int64_t kh = 0; kh < K; ++kh) {
    rope(qkv.data() + (H + kh) * D, cp, sp, D, kc + (kh * L + slot) * D);
    std::copy_n(qkv.data() + (H + K + kh) * D, D, vc + (kh * L + slot) * D);
  }
  attention(q.data(), kc, vc, K, G, L, D, slot + 1, att.data());
  torch::Tensor y = torch::empty_like(x);
  float* yp = y.data_ptr<float>();
  gemv(att.data(), o_t.data_ptr<float>(), HD, C, yp);
  for (int64_t c = 0; c < C; ++c) yp[c] += xp[c];
  return y;
}

// x (C values), norm_w (C,), gate_up_t (C, 2F) = [gate | up] columns, down_t (F, C) -> x + FFN output, shaped like x
torch::Tensor mlp_decode(torch::Tensor x, torch::Tensor norm_w, double eps, torch::Tensor gate_up_t,
                         torch::Tensor down_t) {
  check(norm_w, "norm_w", 1);
  check(gate_up_t, "gate_up_t", 2);
  check(down_t, "down_t", 2);
  const int64_t C = norm_w.size(0), F = down_t.size(0);
  check_numel(x, "x", C);
  TORCH_CHECK(gate_up_t.size(0) == C && gate_up_t.size(1) == 2 * F && down_t.size(1) == C, "mlp shape mismatch");
  const float* xp = x.data_ptr<float>();
  std::vector<float> hn(C), gu(2 * F);
  rmsnorm(xp, norm_w.data_ptr<float>(), C, static_cast<float>(eps), hn.data());
  gemv(hn.data(), gate_up_t.data_ptr<float>(), C, 2 * F, gu.data());
  for (int64_t j = 0; j < F; ++j) gu[j] = gu[j] / (1.f + exp_fast(-gu[j])) * gu[F + j];
  torch::Tensor y = torch::empty_like(x);
  float* yp = y.data_ptr<float>();
  gemv(gu.data(), down_t.data_ptr<float>(), F, C, yp);
  for (int64_t c = 0; c < C; ++c) yp[c] += xp[c];
  return y;
}

// x (C values), norm_w (C,), w_t (C, V) = the lm head's weight, column-major -> logits (1, 1, V) of rmsnorm(x): the
// last op of every decode step
torch::Tensor head_decode(torch::Tensor x, torch::Tensor norm_w, double eps, torch::Tensor w_t) {
  check(norm_w, "norm_w", 1);
  check(w_t, "w_t", 2);
  const int64_t C = norm_w.size(0), V = w_t.size(1);
  check_numel(x, "x", C);
  TORCH_CHECK(w_t.size(0) == C, "lm head shape mismatch");
  std::vector<float> hn(C);
  rmsnorm(x.data_ptr<float>(), norm_w.data_ptr<float>(), C, static_cast<float>(eps), hn.data());
  torch::Tensor y = torch::empty({1, 1, V}, x.options());
  gemv(hn.data(), w_t.data_ptr<float>(), C, V, y.data_ptr<float>());
  return y;
}

// idx (one token id, int64), w (V, C) in any strides (row-major, or column-major when tied to a column-major lm
// head) -> the token's embedding (1, 1, C): the first op of a decode step
torch::Tensor embed_decode(torch::Tensor idx, torch::Tensor w) {
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.numel() == 1 && idx.device().is_cpu(), "idx must be one id");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.device().is_cpu() && w.dim() == 2, "w must be (V, C) float32");
  const int64_t V = w.size(0), C = w.size(1), t = idx.data_ptr<int64_t>()[0];
  TORCH_CHECK(0 <= t && t < V, "token id ", t, " outside the vocabulary of ", V);
  torch::Tensor y = torch::empty({1, 1, C}, w.options());
  const float* src = w.data_ptr<float>() + t * w.stride(0);
  float* yp = y.data_ptr<float>();
  const int64_t sc = w.stride(1);
  for (int64_t c = 0; c < C; ++c) yp[c] = src[c * sc];
  return y;
}

// SUBLLM's stage boundary for one token (C values): its score w . x (the scorer, a bias-free linear to a scalar)
double score(torch::Tensor x, torch::Tensor w) {
  check_numel(w, "w", x.numel());
  check_numel(x, "x", w.numel());
  return dot(x.data_ptr<float>(), w.data_ptr<float>(), x.numel());
}

// ... and its upsampling: x + w * b * (y - x) for the kept token's stage output y and the bypass scale b (C,)
torch::Tensor upsample(torch::Tensor x, torch::Tensor y, torch::Tensor b, double w) {
  const int64_t C = x.numel();
  check_numel(x, "x", C);
  check_numel(y, "y", C);
  check_numel(b, "b", C);
  torch::Tensor out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float wf = static_cast<float>(w);
  for (int64_t c = 0; c < C; ++c) op[c] = xp[c] + wf * bp[c] * (yp[c] - xp[c]);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("embed_decode", &embed_decode, "one token's embedding");
  m.def("head_decode", &head_decode, "one-token final RMSNorm and lm head");
  m.def("score", &score, "SUBLLM: one token's score");
  m.def("upsample", &upsample, "SUBLLM: one kept token's upsampling and bypass");
  m.def("attn_decode", &attn_decode, "one-token decode attention half-block: norm, qkv, RoPE, cache write, o_proj");
  m.def("mlp_decode", &mlp_decode, "one-token decode SwiGLU half-block: norm, gate/up, SiLU*up, down, residual");
  m.def("lte_decode", &lte_decode, "LTE one-token decode FFN: router, selection, gate/up, SiLU*up, down");
}
