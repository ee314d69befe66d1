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
#include <string>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LEANLM_AVX2 1  // the packed GEMV's intrinsics; a portable scalar loop otherwise
#endif

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

// ---------------------------------------------------------------------------------------------------------------------
// Weights. Every fused op reads its weights through one descriptor, `Weight`, made once per decode layout
// (leanlm/kernels.py decode_weight), so that no op exists once per format:
//
//   float32  the layer's (N, K) weight as the decode layout stores it: column-major, i.e. a contiguous W^T (K, N)
//            that gemv above streams; an embedding in any strides (only its rows are read); LTE's (n, C, 2E) table
//   int8     qweight int8 (N, K), scales fp16 (N, G): w = s q            (int6: the same storage, q in [-32, 31])
//   int4     qweight uint8 (N, K/2) in GGUF's nibble order, scales and mins fp16 (N, G): w = s q + m, q in [0, 15]
//   ternary  qweight uint8 (N, K/4), 2-bit codes c = q + 1, scales fp16 (N, G): w = s q, q in {-1, 0, 1}
//
// (leanlm/quant.py defines the packed formats; G groups of g = K / G consecutive inputs per output row.)
//
// Packed GEMV, fp32 activations (nothing rounds x): row n's dot product is
//   sum over groups g of  s_g (q_g . x_g)  [+ m_g sum(x_g) for int4]  [- s_g sum(x_g) for ternary, which reads c]
// so the inner loop only converts small integers to float and multiply-adds them with x (AVX2: 32 inputs at a time
// into two vector accumulators per row, the scale applied once per group), and the sums of x per group are taken
// once per input vector. Rows are split over torch's threads, each thread a contiguous block of rows (its own
// outputs: no partial sums to merge), two rows at a time so that each load of x serves both.

enum Fmt : int { kF32 = 0, kI8 = 1, kI4 = 2, kT2 = 3 };

struct Weight {
  Fmt fmt = kF32;
  std::string name;                         // float32, int8, int6, int4, ternary
  int64_t N = 0, K = 0, G = 1;              // outputs, inputs, groups per row (packed)
  torch::Tensor w, q, s, m;                 // the data, held so that the pointers below stay valid
  bool colmajor = false;                    // float32 (N, K) stored as a contiguous W^T: what gemv reads
  const float* wp = nullptr;
  const uint8_t* qp = nullptr;              // packed row n starts at qp + n * rowbytes
  const at::Half* sp = nullptr;             // row n's scales (and mins) start at sp + n * G
  const at::Half* mp = nullptr;
  int64_t rowbytes = 0;
  int64_t group() const { return K / G; }
};

// inputs [k0, k1) of one group g (a group, or the part of it an LTE expert covers), and sum(x[k0:k1)) for the
// int4 and ternary offset terms
struct Seg {
  int64_t k0, k1, g;
  float xsum;
};

template <Fmt F>
constexpr int64_t BITS = F == kI8 ? 8 : F == kI4 ? 4 : 2;  // bits per stored weight

// the stored integer of input k of a packed row (int4: the nibble q; ternary: the code c = q + 1)
template <Fmt F>
inline int qat(const uint8_t* row, int64_t k) {
  if constexpr (F == kI8) return reinterpret_cast<const int8_t*>(row)[k];
  const int64_t run = k / 32, b = k % 32;
  if constexpr (F == kI4) {
    const uint8_t byte = row[run * 16 + (b & 15)];
    return b < 16 ? byte & 15 : byte >> 4;
  }
  return (row[run * 8 + (b & 7)] >> (2 * (b >> 3))) & 3;
}

#ifdef LEANLM_AVX2
// 32 stored integers from input k (a multiple of 32 for int4 and ternary) as 4 x 8 floats, inputs in order
template <Fmt F>
inline void q32(const uint8_t* row, int64_t k, __m256* q) {
  if constexpr (F == kI8) {  // (the loads fold into vpmovsxbd)
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + 8 * j))));
  } else if constexpr (F == kI4) {
    // byte b of the run: input b (low nibble), input b + 16 (high nibble); each byte widened to 32 bits, then
    // masked (inputs b) or shifted (inputs b + 16)
    const auto* p = reinterpret_cast<const __m128i*>(row + k / 2);
    const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p));
    const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2 + 8)));
    const __m256i nib = _mm256_set1_epi32(15);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, nib));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, nib));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
  } else {  // byte b of the run, bits 2j..2j+1: input b + 8j
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 4)));
    const __m256i three = _mm256_set1_epi32(3);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, three));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 2), three));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4), three));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 6));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// fp16 -> float (F16C's one-instruction conversion where the CPU has it; c10::Half's is a dozen integer ops)
inline float half(const at::Half& h) {
#ifdef LEANLM_AVX2
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// out[r] = row (n + r) . x over the segments, for R = 1 or 2 rows. Per segment and row one vector chain sums q . x
// (four multiply-adds per 32 inputs) and one multiply-add applies the group's scale: fewer chains measured faster
// than more here, as the integer-to-float conversions, not the adds, fill the vector ports.
// B32: every segment is one run of 32 inputs (groups of 32, LTE's experts of 32), so the inner loop is one step.
template <Fmt F, int R, bool B32>
void dot_rows(const Weight& W, int64_t n, const float* x, const std::vector<Seg>& segs, float* out) {
  const int64_t G = W.G;
  const uint8_t* rows[R];
  const at::Half *sr[R], *mr[R];
  float off[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = W.qp + (n + r) * W.rowbytes;
    sr[r] = W.sp + (n + r) * G;
    mr[r] = F == kI4 ? W.mp + (n + r) * G : nullptr;
    off[r] = 0.f;
  }
#ifdef LEANLM_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (const Seg& s : segs) {
    __m256 t[R];
    for (int r = 0; r < R; ++r) t[r] = _mm256_setzero_ps();
    int64_t k = s.k0;
    for (; B32 ? k == s.k0 : k + 32 <= s.k1; k += 32) {
      const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      const __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
      for (int r = 0; r < R; ++r) {
        // the same inputs four rows on: the hardware prefetcher alone left a quarter of the rate on the table when
        // the weights stream from memory (a 100 MB int4 matrix: 9.4 -> 12.8 G weights/s on one core)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + 4 * W.rowbytes + k * BITS<F> / 8), _MM_HINT_T0);
        __m256 q[4];
        q32<F>(rows[r], k, q);
        t[r] = _mm256_fmadd_ps(q[0], x0, t[r]);
        t[r] = _mm256_fmadd_ps(q[1], x1, t[r]);
        t[r] = _mm256_fmadd_ps(q[2], x2, t[r]);
        t[r] = _mm256_fmadd_ps(q[3], x3, t[r]);
      }
    }
    if constexpr (F == kI8 && !B32) {  // int8 groups need not be multiples of 32 (per channel: any K)
      if (k < s.k1) {
        for (; k + 8 <= s.k1; k += 8) {
          const __m256 xv = _mm256_loadu_ps(x + k);
          for (int r = 0; r < R; ++r) {
            const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[r] + k));
            t[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), xv, t[r]);
          }
        }
        for (int r = 0; r < R; ++r) {
          float u = 0.f;
          for (int64_t j = k; j < s.k1; ++j) u += static_cast<float>(qat<F>(rows[r], j)) * x[j];
          off[r] += half(sr[r][s.g]) * u;
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float sg = half(sr[r][s.g]);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sg), t[r], acc[r]);
      if constexpr (F == kI4) off[r] += half(mr[r][s.g]) * s.xsum;
      if constexpr (F == kT2) off[r] -= sg * s.xsum;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + off[r];
#else
  for (int r = 0; r < R; ++r) {
    float acc = 0.f;
    for (const Seg& s : segs) {
      float t = 0.f;
      for (int64_t k = s.k0; k < s.k1; ++k) t += static_cast<float>(qat<F>(rows[r], k)) * x[k];
      const float sg = half(sr[r][s.g]);
      acc += sg * t;
      if constexpr (F == kI4) off[r] += half(mr[r][s.g]) * s.xsum;
      if constexpr (F == kT2) off[r] -= sg * s.xsum;
    }
    out[r] = acc + off[r];
  }
#endif
}

template <Fmt F>
void rows_packed_t(const Weight& W, const float* x, const std::vector<Seg>& segs, int64_t n0, int64_t n1, float* y) {
  const bool b32 = std::all_of(segs.begin(), segs.end(), [](const Seg& s) { return s.k1 - s.k0 == 32; });
  int64_t n = n0;
  if (b32) {
    for (; n + 2 <= n1; n += 2) dot_rows<F, 2, true>(W, n, x, segs, y + (n - n0));
    if (n < n1) dot_rows<F, 1, true>(W, n, x, segs, y + (n - n0));
    return;
  }
  for (; n + 2 <= n1; n += 2) dot_rows<F, 2, false>(W, n, x, segs, y + (n - n0));
  if (n < n1) dot_rows<F, 1, false>(W, n, x, segs, y + (n - n0));
}

// y[i] = row (n0 + i) of a packed W . x for n0 <= n0 + i < n1, over the inputs the segments cover (one thread)
void rows_packed(const Weight& W, const float* x, const std::vector<Seg>& segs, int64_t n0, int64_t n1, float* y) {
  switch (W.fmt) {
    case kI8: rows_packed_t<kI8>(W, x, segs, n0, n1, y); break;
    case kI4: rows_packed_t<kI4>(W, x, segs, n0, n1, y); break;
    case kT2: rows_packed_t<kT2>(W, x, segs, n0, n1, y); break;
    default: TORCH_CHECK(false, "rows_packed: not a packed weight");
  }
}

// every group of a packed W's rows, with x's sums over them
std::vector<Seg> groups(const Weight& W, const float* x) {
  const int64_t g = W.group();
  std::vector<Seg> segs(W.G);
  for (int64_t i = 0; i < W.G; ++i) segs[i] = {i * g, (i + 1) * g, i, W.fmt == kI8 ? 0.f : sum(x + i * g, g)};
  return segs;
}

// y (N,) = W x over the segments of every row, rows split over torch's threads (at least 16 rows per thread)
void rows_parallel(const Weight& W, const float* x, const std::vector<Seg>& segs, float* y) {
  const int64_t N = W.N;
  const int64_t T = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, N / 16));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
      rows_packed(W, x, segs, n0, n1, y + n0);
    }
  });
}

// y (N,) = W x (K,) for any weight the ops read with a GEMV: float32 column-major, or packed
void matvec(const Weight& W, const float* x, float* y) {
  if (W.fmt == kF32)
    gemv(x, W.wp, W.K, W.N, y);
  else
    rows_parallel(W, x, groups(W, x), y);
}

// an op's check that it can read W with matvec, as a (N, K) weight
void check_matvec(const Weight& W, const char* name, int64_t N, int64_t K) {
  TORCH_CHECK(W.fmt != kF32 || (W.colmajor && W.w.dim() == 2), name, ": a float32 weight must be column-major");
  TORCH_CHECK(W.N == N && W.K == K, name, " is (", W.N, ", ", W.K, "), expected (", N, ", ", K, ")");
}

// out (K,) = row t of W (an embedding): the values leanlm.quant.dequantize gives (q s, then + m: two roundings)
void weight_row(const Weight& W, int64_t t, float* out) {
  if (W.fmt == kF32) {
    const float* src = W.wp + t * W.w.stride(0);
    const int64_t st = W.w.stride(1);
    for (int64_t k = 0; k < W.K; ++k) out[k] = src[k * st];
    return;
  }
  const uint8_t* row = W.qp + t * W.rowbytes;
  const int64_t g = W.group();
  for (int64_t k = 0; k < W.K; ++k) {
    const float s = static_cast<float>(W.sp[t * W.G + k / g]);
    switch (W.fmt) {
      case kI8: out[k] = static_cast<float>(qat<kI8>(row, k)) * s; break;
      case kT2: out[k] = static_cast<float>(qat<kT2>(row, k) - 1) * s; break;
      default: {
        volatile float qs = static_cast<float>(qat<kI4>(row, k)) * s;  // volatile: no fused multiply-add
        out[k] = qs + static_cast<float>(W.mp[t * W.G + k / g]);
      }
    }
  }
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

// -- descriptors (leanlm/kernels.py decode_weight makes them once per decode layout) --------------------------------

// a float32 CPU weight: (N, K) in any strides (matvec needs it column-major), or LTE's (n, C, 2E) expert table
Weight dense(torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.device().is_cpu(), "dense: a float32 CPU tensor");
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 3 && w.is_contiguous()), "dense: (N, K), or a contiguous (n, C, 2E) table");
  Weight W;
  W.name = "float32";
  W.w = w;
  W.wp = w.data_ptr<float>();
  W.N = w.dim() == 2 ? w.size(0) : w.size(0) * w.size(2);
  W.K = w.size(1);
  W.colmajor = w.dim() == 2 && w.t().is_contiguous();
  return W;
}

// packed tensors of leanlm.quant (Packed.packed()): qweight, scales and (int4) mins of a (N, K) weight
Weight packed(const std::string& fmt, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins) {
  Weight W;
  W.name = fmt;
  const bool int8 = fmt == "int8" || fmt == "int6";
  TORCH_CHECK(int8 || fmt == "int4" || fmt == "ternary", "packed: unknown format ", fmt);
  W.fmt = int8 ? kI8 : fmt == "int4" ? kI4 : kT2;
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && qweight.is_contiguous(), "packed: qweight (N, K')");
  TORCH_CHECK(qweight.scalar_type() == (int8 ? torch::kInt8 : torch::kUInt8), "packed: ", fmt, " qweight dtype");
  W.N = qweight.size(0);
  W.rowbytes = qweight.size(1);
  W.K = W.rowbytes * (int8 ? 1 : W.fmt == kI4 ? 2 : 4);
  auto halves_ok = [&](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat16 && t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(),
                "packed: ", name, " must be a contiguous fp16 CPU (N, G) tensor");
    TORCH_CHECK(t.size(0) == W.N && t.size(1) == W.G, "packed: ", name, " shape mismatch");
  };
  W.G = scales.dim() == 2 ? scales.size(1) : 0;
  TORCH_CHECK(W.G > 0 && W.K % W.G == 0, "packed: scales must be (N, G) with G dividing the ", W.K, " inputs");
  TORCH_CHECK(int8 || W.group() % 32 == 0, "packed: ", fmt, " groups must be multiples of 32 inputs");
  halves_ok(scales, "scales");
  W.q = qweight;
  W.s = scales;
  W.qp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  W.sp = scales.data_ptr<at::Half>();
  TORCH_CHECK(mins.has_value() == (W.fmt == kI4), "packed: int4 (only) has mins");
  if (mins) {
    halves_ok(*mins, "mins");
    W.m = *mins;
    W.mp = mins->data_ptr<at::Half>();
  }
  return W;
}

// x (K values) -> W x (N,): one GEMV on its own (the tests' reference point for each format)
torch::Tensor matvec_op(torch::Tensor x, const Weight& W) {
  check_matvec(W, "W", W.N, W.K);
  check_numel(x, "x", W.K);
  torch::Tensor y = torch::empty({W.N}, x.options());
  matvec(W, x.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// x (C values), router_t (C, n), offset (n,), experts, down -> (FFN(x), experts selected), shaped like x. With
// norm_w (C,): (x + FFN(rmsnorm(x)), k), the whole FFN half of a block (model.Block's fused path).
//   float32: experts = the (n, C, 2E) table, down = down_proj's (C, F) weight, column-major
//   packed:  experts = gate_up_proj (2F, C): expert e's rows are [2Ee, 2E(e+1)) (its E gate rows, then its E up
//            rows); down = down_proj (C, F): expert e's inputs are [Ee, E(e+1)) of every row, and only the selected
//            experts' groups are read (int4 and ternary: E a multiple of 32)
std::tuple<torch::Tensor, int64_t> lte_decode(torch::Tensor x, torch::Tensor router_t, torch::Tensor offset,
                                              const Weight& experts, const Weight& down,
                                              c10::optional<torch::Tensor> norm_w, double eps) {
  check(router_t, "router_t", 2);
  check(offset, "offset", 1);
  const int64_t C = router_t.size(0), n = router_t.size(1), F = down.K, E = F / n, E2 = 2 * E;
  check_numel(x, "x", C);
  TORCH_CHECK(offset.size(0) == n && F == n * E, "router shape mismatch");
  const bool fp32 = experts.fmt == kF32;
  TORCH_CHECK(fp32 == (down.fmt == kF32), "lte_decode: experts and down are both float32 or both packed");
  if (fp32) {
    TORCH_CHECK(experts.w.dim() == 3 && experts.w.size(0) == n && experts.w.size(1) == C && experts.w.size(2) == E2,
                "lte_decode: float32 experts must be the (n, C, 2E) table");
    check_matvec(down, "down", C, F);
  } else {
    TORCH_CHECK(experts.N == n * E2 && experts.K == C && down.N == C, "expert shape mismatch");
    TORCH_CHECK(down.fmt == kI8 || E % 32 == 0, "lte_decode: ", down.name, " experts must be multiples of 32");
  }
  const float* R = router_t.data_ptr<float>();
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
  float* yp = y.data_ptr<float>();
  if (!fp32) {
    // gate/up: the selected experts split over the threads, each reading its 2E packed rows; then down: the rows
    // split over the threads, each row reading the selected experts' inputs (runs of consecutive experts merged)
    std::vector<float> h(F);  // SiLU(gate) * up of the selected experts, at their inputs of down
    const std::vector<Seg> xg = groups(experts, xp);
    at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> g(E2);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t e = sel[i];
        rows_packed(experts, xp, xg, e * E2, (e + 1) * E2, g.data());
        for (int64_t j = 0; j < E; ++j) h[e * E + j] = g[j] / (1.f + exp_fast(-g[j])) * g[E + j];
      }
    });
    std::vector<Seg> segs;  // the selected inputs of down, cut at its group boundaries
    const int64_t gs = down.group();
    for (int64_t i = 0; i < k;) {
      int64_t j = i + 1;
      while (j < k && sel[j] == sel[j - 1] + 1) ++j;
      for (int64_t k0 = sel[i] * E, k1 = (sel[j - 1] + 1) * E; k0 < k1;) {
        const int64_t end = std::min(k1, (k0 / gs + 1) * gs);
        segs.push_back({k0, end, k0 / gs, down.fmt == kI8 ? 0.f : sum(h.data() + k0, end - k0)});
        k0 = end;
      }
      i = j;
    }
    std::vector<float> out(C);
    rows_parallel(down, h.data(), segs, out.data());
    for (int64_t c = 0; c < C; ++c) yp[c] += out[c];
    return {y, k};
  }
  const float* W = experts.wp;
  const float* D = down.wp;  // (F, C): down_proj's weight transposed
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
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < C; ++c) yp[c] += partial[static_cast<size_t>(t) * C + c];
  return {y, k};
}

// x (C values, e.g. (1, 1, C)), norm_w (C,), qkv ((H + 2K) D, C), cos/sin (D values) of the token's position,
// k_cache/v_cache (1, K, L, D) with slots [0, slot) filled, o (C, H D) -> x + attention output, shaped like x; the
// token's key and value are written at `slot`
torch::Tensor attn_decode(torch::Tensor x, torch::Tensor norm_w, double eps, const Weight& qkv, torch::Tensor cos,
                          torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache, int64_t slot,
                          const Weight& o) {
  check(norm_w, "norm_w", 1);
  check(k_cache, "k_cache", 4);
  check(v_cache, "v_cache", 4);
  const int64_t C = norm_w.size(0), K = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  const int64_t HD = o.K, H = HD / D, G = H / K;
  check_numel(x, "x", C);
  check_numel(cos, "cos", D);
  check_numel(sin, "sin", D);
  TORCH_CHECK(k_cache.size(0) == 1 && v_cache.sizes() == k_cache.sizes(), "caches must be (1, K, L, D), alike");
  TORCH_CHECK(H % K == 0 && HD == H * D, "attention shape mismatch");
  check_matvec(o, "o", C, HD);
  check_matvec(qkv, "qkv", (H + 2 * K) * D, C);
  TORCH_CHECK(0 <= slot && slot < L, "cache slot ", slot, " outside the cache's ", L, " slots");
  const float* xp = x.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();

  std::vector<float> hn(C), qkvv((H + 2 * K) * D), q(H * D), att(H * D);
  rmsnorm(xp, norm_w.data_ptr<float>(), C, static_cast<float>(eps), hn.data());
  matvec(qkv, hn.data(), qkvv.data());
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));  // SDPA's default
  for (int64_t h = 0; h < H; ++h) {
    rope(qkvv.data() + h * D, cp, sp, D, q.data() + h * D);
    for (int64_t d = 0; d < D; ++d) q[h * D + d] *= scale;
  }
  for (int64_t kh = 0; kh < K; ++kh) {
    rope(qkvv.data() + (H + kh) * D, cp, sp, D, kc + (kh * L + slot) * D);
    std::copy_n(qkvv.data() + (H + K + kh) * D, D, vc + (kh * L + slot) * D);
  }
  attention(q.data(), kc, vc, K, G, L, D, slot + 1, att.data());
  torch::Tensor y = torch::empty_like(x);
  float* yp = y.data_ptr<float>();
  matvec(o, att.data(), yp);
  for (int64_t c = 0; c < C; ++c) yp[c] += xp[c];
  return y;
}

// x (C values), norm_w (C,), gate_up (2F, C) = [gate; up] rows, down (C, F) -> x + FFN output, shaped like x
torch::Tensor mlp_decode(torch::Tensor x, torch::Tensor norm_w, double eps, const Weight& gate_up,
                         const Weight& down) {
  check(norm_w, "norm_w", 1);
  const int64_t C = norm_w.size(0), F = down.K;
  check_numel(x, "x", C);
  check_matvec(gate_up, "gate_up", 2 * F, C);
  check_matvec(down, "down", C, F);
  const float* xp = x.data_ptr<float>();
  std::vector<float> hn(C), gu(2 * F);
  rmsnorm(xp, norm_w.data_ptr<float>(), C, static_cast<float>(eps), hn.data());
  if (gate_up.fmt == kF32) {
    matvec(gate_up, hn.data(), gu.data());
    for (int64_t j = 0; j < F; ++j) gu[j] = gu[j] / (1.f + exp_fast(-gu[j])) * gu[F + j];
  } else {  // packed rows: each thread takes the same slice of the gate and the up rows and applies SiLU * up to it
    const std::vector<Seg> segs = groups(gate_up, hn.data());
    const int64_t T = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, F / 16));
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = F * t / T, j1 = F * (t + 1) / T;
        rows_packed(gate_up, hn.data(), segs, j0, j1, gu.data() + j0);
        rows_packed(gate_up, hn.data(), segs, F + j0, F + j1, gu.data() + F + j0);
        for (int64_t j = j0; j < j1; ++j) gu[j] = gu[j] / (1.f + exp_fast(-gu[j])) * gu[F + j];
      }
    });
  }
  torch::Tensor y = torch::empty_like(x);
  float* yp = y.data_ptr<float>();
  matvec(down, gu.data(), yp);
  for (int64_t c = 0; c < C; ++c) yp[c] += xp[c];
  return y;
}

// x (C values), norm_w (C,), head (V, C) = the lm head's weight -> logits (1, 1, V) of rmsnorm(x): the last op of
// every decode step
torch::Tensor head_decode(torch::Tensor x, torch::Tensor norm_w, double eps, const Weight& head) {
  check(norm_w, "norm_w", 1);
  const int64_t C = norm_w.size(0), V = head.N;
  check_numel(x, "x", C);
  check_matvec(head, "lm head", V, C);
  std::vector<float> hn(C);
  rmsnorm(x.data_ptr<float>(), norm_w.data_ptr<float>(), C, static_cast<float>(eps), hn.data());
  torch::Tensor y = torch::empty({1, 1, V}, x.options());
  matvec(head, hn.data(), y.data_ptr<float>());
  return y;
}

// idx (one token id, int64), table (V, C): the embedding (float32 in any strides, e.g. column-major when tied to a
// column-major lm head, or packed) -> the token's embedding (1, 1, C): the first op of a decode step
torch::Tensor embed_decode(torch::Tensor idx, const Weight& table) {
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && idx.numel() == 1 && idx.device().is_cpu(), "idx must be one id");
  TORCH_CHECK(table.fmt != kF32 || table.w.dim() == 2, "the embedding must be (V, C)");
  const int64_t V = table.N, t = idx.data_ptr<int64_t>()[0];
  TORCH_CHECK(0 <= t && t < V, "token id ", t, " outside the vocabulary of ", V);
  torch::Tensor y = torch::empty({1, 1, table.K}, torch::dtype(torch::kFloat32));
  weight_row(table, t, y.data_ptr<float>());
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
  pybind11::class_<Weight>(m, "Weight", "a weight as the fused ops read it (float32 or packed): dense() or packed()")
      .def_readonly("format", &Weight::name)
      .def_readonly("out_features", &Weight::N)
      .def_readonly("in_features", &Weight::K)
      .def_property_readonly("group", &Weight::group)
      .def("__repr__", [](const Weight& W) {
        return "Weight(" + W.name + ", " + std::to_string(W.N) + " x " + std::to_string(W.K) + ")";
      });
  m.def("dense", &dense, "a float32 weight (N, K): column-major for the GEMV ops, any strides for embed_decode");
  m.def("packed", &packed, "a packed weight: format, qweight, scales, mins (int4) as leanlm.quant stores them");
  m.def("matvec", &matvec_op, "W x for one vector x: the GEMV every fused op runs");
  m.def("embed_decode", &embed_decode, "one token's embedding");
  m.def("head_decode", &head_decode, "one-token final RMSNorm and lm head");
  m.def("score", &score, "SUBLLM: one token's score");
  m.def("upsample", &upsample, "SUBLLM: one kept token's upsampling and bypass");
  m.def("attn_decode", &attn_decode, "one-token decode attention half-block: norm, qkv, RoPE, cache write, o_proj");
  m.def("mlp_decode", &mlp_decode, "one-token decode SwiGLU half-block: norm, gate/up, SiLU*up, down, residual");
  m.def("lte_decode", &lte_decode, "LTE one-token decode FFN: router, selection, gate/up, SiLU*up, down");
}
