// A stack of torch.nn.TransformerEncoderLayers at inference (eval: no dropout, no autograd) as
// one op on the CPU:
//   torch.ops.fastrec.encoder_inference_cpp(x, weights, heads, eps1, eps2, gelu, norm_first,
//                                           causal, lengths, last_query) -> y
// At batch 1 a layer is a few MFLOP, and the dozen ATen calls of each layer and the Python
// around them cost more than the arithmetic; called from C++ they cost about a microsecond each.
// weights: 12 tensors per layer, in_proj_weight (3E, E), in_proj_bias, out_proj.weight,
// out_proj.bias, norm1.weight, norm1.bias, linear1.weight, linear1.bias, linear2.weight,
// linear2.bias, norm2.weight, norm2.bias (biases and norm weights may be None). x (B, L, E)
// batch-first. lengths (integer (B,), optional, in [0, L], [1, L] with last_query): keys past a
// row's length are masked. last_query: the last layer computes only the query at each row's last
// real position (lengths[b] - 1, or L - 1 without lengths), y (B, 1, E), for a model that reads
// one position per row (keys and values still come from every position). The readable reference
// is encoder_torch in fastrec/ops/encoder.py.
//
// Two implementations: fp32 with L <= 256 runs the hand-vectorised kernels of namespace serving
// below (one task per sequence, with its own attention on feature-major scratch); other dtypes
// and longer sequences run ATen calls (encoder_layer), whose attention is the attention op's
// kernel (attention_forward_cpp, declared in attention.h). at::parallel_for runs in parallel
// only when this file is compiled with -fopenmp.
#if !defined(_OPENMP)
#pragma message("fastrec encoder.cpp built without -fopenmp: at::parallel_for will run serially")
#endif
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

#include "attention.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace fastrec {
namespace {

// One layer on weights[base .. base + 12).
at::Tensor encoder_layer(const at::Tensor& x, const std::vector<at::Tensor>& weights, size_t base,
                         int64_t heads, double eps1, double eps2, bool gelu, bool norm_first,
                         bool causal, const std::optional<at::Tensor>& lengths, bool last_query) {
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2), D = E / heads;
  auto opt = [&](size_t i) {
    const at::Tensor& t = weights[base + i];
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  const at::Tensor &w_in = weights[base], &w_out = weights[base + 2], &w1 = weights[base + 6],
                   &w2 = weights[base + 8];
  auto norm = [&](const at::Tensor& t, size_t i, double eps) {
    return at::layer_norm(t, {E}, opt(i), opt(i + 1), eps);
  };
  auto split = [&](const at::Tensor& t) {  // (B, Lt, E) -> (B, heads, Lt, D)
    return t.view({B, t.size(1), heads, D}).transpose(1, 2);
  };
  // Rows whose output is computed: every position, or each row's last real one.
  at::Tensor rows = x;
  if (last_query) {
    at::Tensor last = lengths.has_value() ? lengths->to(at::kLong) - 1
                                          : at::full({B}, L - 1, x.options().dtype(at::kLong));
    rows = x.gather(1, last.view({B, 1, 1}).expand({B, 1, E}));
  }
  const at::Tensor src = norm_first ? norm(x, 4, eps1) : x;
  at::Tensor q, k, v;
  if (last_query) {
    const at::Tensor qsrc = norm_first ? norm(rows, 4, eps1) : rows;
    const std::optional<at::Tensor> b_in = opt(1);
    auto part = [&](int64_t from, int64_t n) {
      return b_in ? std::optional<at::Tensor>(b_in->narrow(0, from, n)) : std::nullopt;
    };
    q = at::linear(qsrc, w_in.narrow(0, 0, E), part(0, E));
    const at::Tensor kv = at::linear(src, w_in.narrow(0, E, 2 * E), part(E, 2 * E));
    k = kv.narrow(2, 0, E);
    v = kv.narrow(2, E, E);
  } else {
    const at::Tensor qkv = at::linear(src, w_in, opt(1));
    q = qkv.narrow(2, 0, E);
    k = qkv.narrow(2, E, E);
    v = qkv.narrow(2, 2 * E, E);
  }
  // A last-position query sees every key up to its own length: the length mask alone (causal
  // would compare its index 0 with the key positions).
  const std::optional<at::Tensor> lens =
      lengths.has_value() ? std::optional<at::Tensor>(lengths->to(at::kInt)) : std::nullopt;
  const at::Tensor attn =
      std::get<0>(attention_forward_cpp(split(q), split(k), split(v), std::nullopt, lens,
                                        std::nullopt, std::nullopt, causal && !last_query,
                                        1.0 / std::sqrt(static_cast<double>(D)), 0.0,
                                        std::nullopt, false));
  const at::Tensor a =
      at::linear(attn.transpose(1, 2).reshape({B, rows.size(1), E}), w_out, opt(3));
  auto feed_forward = [&](const at::Tensor& t) {
    const at::Tensor hidden = at::linear(t, w1, opt(7));
    return at::linear(gelu ? at::gelu(hidden) : at::relu(hidden), w2, opt(9));
  };
  if (norm_first) {
    const at::Tensor y = rows + a;
    return y + feed_forward(norm(y, 10, eps2));
  }
  const at::Tensor y = norm(rows + a, 4, eps1);
  return norm(y + feed_forward(y), 10, eps2);
}

// fp32 path for short sequences (L <= kServingMaxLen): one sequence per task, every step hand
// vectorised. At batch 1 the ATen form of a layer (nine GEMM calls, copies, layer norms, GELU,
// each a few microseconds of dispatch and allocation) costs more than its arithmetic. Here the
// activations of a sequence are stored feature-major, t[e * M + m] for feature e and position
// m (M = L rounded up to 16, padding positions zero), so that the GEMMs, the layer norms, GELU
// and the attention all run on vectors of 16 positions; a last_query layer computes its one
// output row with matrix-vector products. Scratch is one thread-local buffer, reused across
// calls (no page faults per call).
namespace serving {

using V = Vec<float>;
constexpr int64_t kW = kN<float>;
constexpr int64_t kServingMaxLen = 256;

enum class Act { kNone, kRelu, kGelu };

// erfc(x) by the Chebyshev fit of Numerical Recipes (erfcc; relative error below 1.2e-7
// everywhere), so that GELU(x) = x / 2 * erfc(-x / sqrt 2) keeps its relative accuracy in the
// far negative tail.
inline V verfc(V x) {
  const V z = x < 0.0f ? -x : x;
  const V t = 1.0f / (1.0f + 0.5f * z);
  V p = vsplat(0.17087277f);
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  const V e = t * vexp(-z * z - 1.26551223f + t * p);
  return x < 0.0f ? 2.0f - e : e;
}

template <Act A>
inline V activate(V x) {
  if constexpr (A == Act::kRelu) return x > 0.0f ? x : V{};
  if constexpr (A == Act::kGelu) return 0.5f * x * verfc(x * -0.70710678118654752f);
  return x;
}

template <Act A>
inline float activate(float x) {
  if constexpr (A == Act::kRelu) return x > 0.0f ? x : 0.0f;
  if constexpr (A == Act::kGelu) return 0.5f * x * std::erfc(x * -0.70710678118654752f);
  return x;
}

// NB output features x MV vectors of positions: y[n, m] = act(b[n] + sum_k w[n, k] x[k, m]).
template <int NB, int MV, Act A>
inline void gemm_tile(const float* w, const float* b, const float* x, float* y, int64_t K,
                      int64_t M, int64_t n0, int64_t m0) {
  V acc[NB][MV];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MV; ++j) acc[i][j] = vsplat(b ? b[n0 + i] : 0.0f);
  const float* wr = w + n0 * K;
  for (int64_t k = 0; k < K; ++k) {
    V xv[MV];
    for (int j = 0; j < MV; ++j) xv[j] = vload(x + k * M + m0 + j * kW);
    for (int i = 0; i < NB; ++i) {
      const V wv = vsplat(wr[i * K + k]);
      for (int j = 0; j < MV; ++j) acc[i][j] += wv * xv[j];
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MV; ++j) vstore(y + (n0 + i) * M + m0 + j * kW, activate<A>(acc[i][j]));
}

template <int MV, Act A>
void gemm_cols(const float* w, const float* b, const float* x, float* y, int64_t N, int64_t K,
               int64_t M, int64_t m0) {
  constexpr int NB = MV <= 2 ? 8 : 4;  // 16 accumulators either way
  int64_t n = 0;
  for (; n + NB <= N; n += NB) gemm_tile<NB, MV, A>(w, b, x, y, K, M, n, m0);
  for (; n < N; ++n) gemm_tile<1, MV, A>(w, b, x, y, K, M, n, m0);
}

// y (N, M) = act(w (N, K) @ x (K, M) + b), x and y feature-major, M a multiple of 16.
template <Act A>
void gemm(const float* w, const float* b, const float* x, float* y, int64_t N, int64_t K,
          int64_t M) {
  for (int64_t m0 = 0; m0 < M; m0 += 4 * kW) {
    switch ((M - m0) / kW) {
      case 1: gemm_cols<1, A>(w, b, x, y, N, K, M, m0); break;
      case 2: gemm_cols<2, A>(w, b, x, y, N, K, M, m0); break;
      case 3: gemm_cols<3, A>(w, b, x, y, N, K, M, m0); break;
      default: gemm_cols<4, A>(w, b, x, y, N, K, M, m0); break;
    }
  }
}

void gemm(Act act, const float* w, const float* b, const float* x, float* y, int64_t N,
          int64_t K, int64_t M) {
  if (act == Act::kGelu) return gemm<Act::kGelu>(w, b, x, y, N, K, M);
  if (act == Act::kRelu) return gemm<Act::kRelu>(w, b, x, y, N, K, M);
  gemm<Act::kNone>(w, b, x, y, N, K, M);
}

// One row: y (N,) = act(w (N, K) @ x (K,) + b), dot products along k.
template <Act A>
void gemv(const float* w, const float* b, const float* x, float* y, int64_t N, int64_t K) {
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = w + n * K;
    V acc{};
    int64_t k = 0;
    for (; k + kW <= K; k += kW) acc += vload(wr + k) * vload(x + k);
    float s = vhsum<float>(acc);
    for (; k < K; ++k) s += wr[k] * x[k];
    y[n] = activate<A>(s + (b ? b[n] : 0.0f));
  }
}

void gemv(Act act, const float* w, const float* b, const float* x, float* y, int64_t N,
          int64_t K) {
  if (act == Act::kGelu) return gemv<Act::kGelu>(w, b, x, y, N, K);
  if (act == Act::kRelu) return gemv<Act::kRelu>(w, b, x, y, N, K);
  gemv<Act::kNone>(w, b, x, y, N, K);
}

// out = r + a (a may be null), then layer-normalised over the E features of each of the M
// positions when norm (gamma, beta may be null). out may alias r or a.
void add_norm(const float* r, const float* a, float* out, const float* gamma, const float* beta,
              float eps, bool norm, int64_t E, int64_t M) {
  for (int64_t m = 0; m < M; m += kW) {
    V sum{};
    for (int64_t e = 0; e < E; ++e) {
      const V v = vload(r + e * M + m) + (a ? vload(a + e * M + m) : V{});
      vstore(out + e * M + m, v);
      sum += v;
    }
    if (!norm) continue;
    const V mean = sum / static_cast<float>(E);
    V var{};
    for (int64_t e = 0; e < E; ++e) {
      const V d = vload(out + e * M + m) - mean;
      var += d * d;
    }
    var = var / static_cast<float>(E) + eps;
    V rstd;
    for (int64_t w = 0; w < kW; ++w) rstd[w] = 1.0f / std::sqrt(var[w]);
    for (int64_t e = 0; e < E; ++e) {
      const V v = (vload(out + e * M + m) - mean) * rstd;
      vstore(out + e * M + m, v * (gamma ? gamma[e] : 1.0f) + (beta ? beta[e] : 0.0f));
    }
  }
}

// The same for one row (E,).
void add_norm_row(const float* r, const float* a, float* out, const float* gamma,
                  const float* beta, float eps, bool norm, int64_t E) {
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) sum += out[e] = r[e] + (a ? a[e] : 0.0f);
  if (!norm) return;
  const float mean = sum / static_cast<float>(E);
  float var = 0.0f;
  for (int64_t e = 0; e < E; ++e) var += (out[e] - mean) * (out[e] - mean);
  const float rstd = 1.0f / std::sqrt(var / static_cast<float>(E) + eps);
  for (int64_t e = 0; e < E; ++e)
    out[e] = (out[e] - mean) * rstd * (gamma ? gamma[e] : 1.0f) + (beta ? beta[e] : 0.0f);
}

// J key scores of 16 queries: s[jj] = scale * sum_d k[d, j0 + jj] q[d, i0 .. i0 + 16).
template <int J>
inline void score_block(const float* q, const float* k, int64_t D, int64_t M, int64_t i0,
                        int64_t j0, float scale, V* s) {
  V acc[J] = {};
  for (int64_t d = 0; d < D; ++d) {
    const V qv = vload(q + d * M + i0);
    for (int jj = 0; jj < J; ++jj) acc[jj] += vsplat(k[d * M + j0 + jj]) * qv;
  }
  for (int jj = 0; jj < J; ++jj) s[jj] = acc[jj] * scale;
}

// J output features of 16 queries: o[d0 + dd, i0 .. i0 + 16) = inv * sum_j v[d0 + dd, j] p[j].
template <int J>
inline void value_block(const V* p, const float* v, int64_t n_keys, int64_t M, int64_t i0,
                        int64_t d0, V inv, float* o) {
  V acc[J] = {};
  for (int64_t j = 0; j < n_keys; ++j)
    for (int dd = 0; dd < J; ++dd) acc[dd] += vsplat(v[(d0 + dd) * M + j]) * p[j];
  for (int dd = 0; dd < J; ++dd) vstore(o + (d0 + dd) * M + i0, acc[dd] * inv);
}

// Self-attention of every position, feature-major: q, k, v, o (H * D, M). Query i sees keys
// j < kv_len (and j <= i when causal); a query that sees none gets zeros. s: (M, 16) scratch.
void attention_all(const float* q, const float* k, const float* v, float* o, int64_t H,
                   int64_t D, int64_t M, int64_t kv_len, bool causal, float scale, V* s) {
  V lane;
  for (int64_t w = 0; w < kW; ++w) lane[w] = static_cast<float>(w);
  const V minus_inf = vsplat(-std::numeric_limits<float>::infinity());
  for (int64_t h = 0; h < H; ++h) {
    const float *qh = q + h * D * M, *kh = k + h * D * M, *vh = v + h * D * M;
    float* oh = o + h * D * M;
    for (int64_t i0 = 0; i0 < M; i0 += kW) {
      const int64_t n_keys = causal ? std::min(kv_len, i0 + kW) : kv_len;
      int64_t j = 0;
      for (; j + 8 <= n_keys; j += 8) score_block<8>(qh, kh, D, M, i0, j, scale, s + j);
      for (; j < n_keys; ++j) score_block<1>(qh, kh, D, M, i0, j, scale, s + j);
      V mx = minus_inf;
      const V pos = lane + static_cast<float>(i0);
      for (j = 0; j < n_keys; ++j) {
        if (causal && j > i0) s[j] = pos >= static_cast<float>(j) ? s[j] : minus_inf;
        mx = s[j] > mx ? s[j] : mx;
      }
      mx = mx == minus_inf ? V{} : mx;
      V sum{};
      for (j = 0; j < n_keys; ++j) {
        s[j] = vexp(s[j] - mx);
        sum += s[j];
      }
      const V inv = sum > 0.0f ? 1.0f / sum : V{};
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) value_block<8>(s, vh, n_keys, M, i0, d, inv, oh);
      for (; d < D; ++d) value_block<1>(s, vh, n_keys, M, i0, d, inv, oh);
    }
  }
}

// Attention of one query row q (H * D,) over keys j < kv_len of k, v (H * D, M)
// feature-major; o (H * D,). p: (M,) scratch.
void attention_row(const float* q, const float* k, const float* v, float* o, int64_t H,
                   int64_t D, int64_t M, int64_t kv_len, float scale, float* p) {
  V lane;
  for (int64_t w = 0; w < kW; ++w) lane[w] = static_cast<float>(w);
  const int64_t span = round_up(kv_len, kW);
  for (int64_t h = 0; h < H; ++h) {
    const float *kh = k + h * D * M, *vh = v + h * D * M;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j0 = 0; j0 < span; j0 += kW) {
      V acc{};
      for (int64_t d = 0; d < D; ++d) acc += vsplat(q[h * D + d]) * vload(kh + d * M + j0);
      acc = lane + static_cast<float>(j0) < static_cast<float>(kv_len)
                ? acc * scale
                : vsplat(-std::numeric_limits<float>::infinity());
      vstore(p + j0, acc);
      for (int64_t w = 0; w < kW; ++w) mx = std::max(mx, acc[w]);
    }
    if (mx == -std::numeric_limits<float>::infinity()) mx = 0.0f;
    V sum{};
    for (int64_t j0 = 0; j0 < span; j0 += kW) {
      const V e = vexp(vload(p + j0) - mx);
      vstore(p + j0, e);
      sum += e;
    }
    const float total = vhsum<float>(sum), inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      V acc{};
      for (int64_t j0 = 0; j0 < span; j0 += kW) acc += vload(p + j0) * vload(vh + d * M + j0);
      o[h * D + d] = vhsum<float>(acc) * inv;
    }
  }
}

// A layer's weights as pointers (biases and norm affines may be null).
struct Layer {
  const float *w_in, *b_in, *w_out, *b_out, *g1, *beta1, *w1, *b1, *w2, *b2, *g2, *beta2;
  int64_t F;
};

struct Config {
  int64_t E, H, D, L, M, F_max;
  float eps1, eps2, scale;
  Act act;
  bool norm_first, causal;
};

// Scratch of one task, in floats: x, t, o (E, M); qkv (3E, M); h (F_max, M); s (M, 16); rows.
int64_t scratch_floats(const Config& c) {
  return c.M * (6 * c.E + c.F_max + kW) + 6 * c.E + c.F_max;
}

// Every position of a layer, in place on x (E, M).
void layer_all(const Config& c, const Layer& w, int64_t kv_len, float* x, float* t, float* qkv,
               float* o, float* h, V* s) {
  const int64_t E = c.E, M = c.M;
  const float* src = x;
  if (c.norm_first) {
    add_norm(x, nullptr, t, w.g1, w.beta1, c.eps1, true, E, M);
    src = t;
  }
  gemm(Act::kNone, w.w_in, w.b_in, src, qkv, 3 * E, E, M);
  attention_all(qkv, qkv + E * M, qkv + 2 * E * M, o, c.H, c.D, M, kv_len, c.causal, c.scale, s);
  gemm(Act::kNone, w.w_out, w.b_out, o, t, E, E, M);
  add_norm(x, t, x, w.g1, w.beta1, c.eps1, !c.norm_first, E, M);
  const float* ff_in = x;
  if (c.norm_first) {
    add_norm(x, nullptr, t, w.g2, w.beta2, c.eps2, true, E, M);
    ff_in = t;
  }
  gemm(c.act, w.w1, w.b1, ff_in, h, w.F, E, M);
  gemm(Act::kNone, w.w2, w.b2, h, t, E, w.F, M);
  add_norm(x, t, x, w.g2, w.beta2, c.eps2, !c.norm_first, E, M);
}

// The last layer of last_query: only position `last` of x (E, M) is computed, into row (E,).
void layer_last(const Config& c, const Layer& w, int64_t kv_len, int64_t last, float* x,
                float* t, float* qkv, float* rows, float* p, float* row) {
  const int64_t E = c.E, M = c.M;
  float *q = rows, *a = rows + E, *u = rows + 2 * E, *hid = rows + 3 * E;
  for (int64_t e = 0; e < E; ++e) row[e] = x[e * M + last];
  const float* src = x;
  const float* qsrc = row;
  if (c.norm_first) {
    add_norm(x, nullptr, t, w.g1, w.beta1, c.eps1, true, E, M);
    add_norm_row(row, nullptr, u, w.g1, w.beta1, c.eps1, true, E);
    src = t;
    qsrc = u;
  }
  gemm(Act::kNone, w.w_in + E * E, w.b_in ? w.b_in + E : nullptr, src, qkv, 2 * E, E, M);
  gemv(Act::kNone, w.w_in, w.b_in, qsrc, q, E, E);
  attention_row(q, qkv, qkv + E * M, a, c.H, c.D, M, kv_len, c.scale, p);
  gemv(Act::kNone, w.w_out, w.b_out, a, q, E, E);
  add_norm_row(row, q, row, w.g1, w.beta1, c.eps1, !c.norm_first, E);
  const float* ff_in = row;
  if (c.norm_first) {
    add_norm_row(row, nullptr, u, w.g2, w.beta2, c.eps2, true, E);
    ff_in = u;
  }
  gemv(c.act, w.w1, w.b1, ff_in, hid, w.F, E);
  gemv(Act::kNone, w.w2, w.b2, hid, a, E, w.F);
  add_norm_row(row, a, row, w.g2, w.beta2, c.eps2, !c.norm_first, E);
}

at::Tensor run(const at::Tensor& x_in, const std::vector<at::Tensor>& weights, const Config& c,
               const int64_t* lengths, bool last_query) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), L = c.L, E = c.E, M = c.M, n_layers = weights.size() / 12;
  std::vector<at::Tensor> keep;  // contiguous weights, alive for the call
  std::vector<Layer> layers;
  auto ptr = [&](const at::Tensor& t) -> const float* {
    if (!t.defined()) return nullptr;
    keep.push_back(t.contiguous());
    return keep.back().data_ptr<float>();
  };
  keep.reserve(weights.size());
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* w = weights.data() + 12 * l;
    layers.push_back({ptr(w[0]), ptr(w[1]), ptr(w[2]), ptr(w[3]), ptr(w[4]), ptr(w[5]), ptr(w[6]),
                      ptr(w[7]), ptr(w[8]), ptr(w[9]), ptr(w[10]), ptr(w[11]), w[6].size(0)});
  }
  const int64_t out_len = last_query ? 1 : L;
  at::Tensor y = at::empty({B, out_len, E}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    const int64_t need = scratch_floats(c) + kW;
    if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
    // 64-byte aligned start; every block below is a multiple of 16 floats except the rows.
    float* base = scratch.data();
    base += (kW - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % kW) % kW;
    float *xt = base, *t = xt + E * M, *o = t + E * M, *qkv = o + E * M, *h = qkv + 3 * E * M;
    V* s = reinterpret_cast<V*>(h + c.F_max * M);
    float* rows = reinterpret_cast<float*>(s + M);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t kv_len = lengths ? lengths[b] : L;
      const float* xb = xp + b * L * E;
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t m = 0; m < L; ++m) xt[e * M + m] = xb[m * E + e];
        std::fill(xt + e * M + L, xt + (e + 1) * M, 0.0f);
      }
      for (int64_t l = 0; l < n_layers; ++l) {
        if (last_query && l + 1 == n_layers) {
          float* row = rows + 4 * E + c.F_max;
          layer_last(c, layers[l], kv_len, kv_len - 1, xt, t, qkv, rows,
                     reinterpret_cast<float*>(s), row);
          std::copy(row, row + E, yp + b * E);
        } else {
          layer_all(c, layers[l], kv_len, xt, t, qkv, o, h, s);
        }
      }
      if (!last_query) {
        float* yb = yp + b * L * E;
        for (int64_t m = 0; m < L; ++m)
          for (int64_t e = 0; e < E; ++e) yb[m * E + e] = xt[e * M + m];
      }
    }
  });
  return y;
}

}  // namespace serving

// Every weight of every layer: given where required, on the CPU, of x's dtype and shape.
void check_layers(const std::vector<at::Tensor>& weights, const at::Tensor& x) {
  const int64_t E = x.size(2);
  static const char* names[12] = {"in_proj_weight", "in_proj_bias", "out_proj.weight",
                                  "out_proj.bias",  "norm1.weight", "norm1.bias",
                                  "linear1.weight", "linear1.bias", "linear2.weight",
                                  "linear2.bias",   "norm2.weight", "norm2.bias"};
  for (size_t base = 0; base < weights.size(); base += 12) {
    const at::Tensor& w1 = weights[base + 6];
    const int64_t F = w1.defined() && w1.dim() == 2 ? w1.size(0) : -1;
    const std::vector<std::vector<int64_t>> shapes = {{3 * E, E}, {3 * E}, {E, E}, {E}, {E}, {E},
                                                      {F, E},     {F},     {E, F}, {E}, {E}, {E}};
    for (size_t i = 0; i < 12; ++i) {
      const at::Tensor& w = weights[base + i];
      const bool optional = i % 2 == 1 || i == 4 || i == 10;  // biases, norm weights
      TORCH_CHECK(w.defined() || optional, "fastrec encoder (cpp): layer ", base / 12, " ",
                  names[i], " must be given (only biases and norm weights may be None)");
      if (!w.defined()) continue;
      TORCH_CHECK(w.sizes() == c10::IntArrayRef(shapes[i]) && F > 0, "fastrec encoder (cpp): layer ",
                  base / 12, " ", names[i], " must be ", c10::IntArrayRef(shapes[i]), " for E = ", E,
                  ", got ", w.sizes());
      TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device().is_cpu(),
                  "fastrec encoder (cpp): layer ", base / 12, " ", names[i],
                  " must be a CPU tensor of x's dtype ", x.scalar_type(), ", got ",
                  w.scalar_type(), " on ", w.device());
    }
  }
}

at::Tensor encoder_inference_cpp(const at::Tensor& x,
                                 const c10::List<std::optional<at::Tensor>>& weight_list,
                                 int64_t heads, double eps1, double eps2, bool gelu,
                                 bool norm_first, bool causal,
                                 const std::optional<at::Tensor>& lengths, bool last_query) {
  const size_t n = weight_list.size();
  TORCH_CHECK(n > 0 && n % 12 == 0,
              "fastrec encoder (cpp): weights must hold 12 tensors per layer, got ", n);
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(),
              "fastrec encoder (cpp): x must be a CPU tensor (B, L, E), got ", x.sizes());
  TORCH_CHECK(heads > 0 && x.size(2) % heads == 0, "fastrec encoder (cpp): heads must divide E = ",
              x.size(2), ", got ", heads);
  std::vector<at::Tensor> weights;
  for (const std::optional<at::Tensor>& w : weight_list) weights.push_back(w.value_or(at::Tensor()));
  check_layers(weights, x);
  const int64_t B = x.size(0), L = x.size(1);
  at::Tensor lens;  // int64 (B,)
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B && !lengths->is_floating_point(),
                "fastrec encoder (cpp): lengths must be an integer tensor (B,) = (", B, "), got ",
                lengths->scalar_type(), " ", lengths->sizes());
    lens = lengths->to(at::kLong).contiguous();
    const int64_t* lp = lens.data_ptr<int64_t>();
    const int64_t lo = last_query ? 1 : 0;
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(lp[b] >= lo && lp[b] <= L, "fastrec encoder (cpp): lengths must lie in [", lo,
                  ", L = ", L, "], got ", lp[b], " at row ", b);
  }
  TORCH_CHECK(!last_query || L > 0, "fastrec encoder (cpp): last_query needs L >= 1");
  if (x.scalar_type() == at::kFloat && L <= serving::kServingMaxLen) {
    int64_t F_max = 0;
    for (size_t base = 0; base < n; base += 12) F_max = std::max(F_max, weights[base + 6].size(0));
    const int64_t E = x.size(2), D = E / heads;
    const serving::Config c{E, heads, D, L, round_up(std::max<int64_t>(L, 1), serving::kW), F_max,
                            static_cast<float>(eps1), static_cast<float>(eps2),
                            static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))),
                            gelu ? serving::Act::kGelu : serving::Act::kRelu, norm_first, causal};
    return serving::run(x, weights, c, lens.defined() ? lens.data_ptr<int64_t>() : nullptr,
                        last_query);
  }
  at::Tensor y = x;
  const std::optional<at::Tensor> len_opt = lens.defined() ? std::optional<at::Tensor>(lens) : std::nullopt;
  for (size_t base = 0; base < n; base += 12)
    y = encoder_layer(y, weights, base, heads, eps1, eps2, gelu, norm_first, causal, len_opt,
                      last_query && base + 12 == n);
  return y;
}


}  // namespace
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def(
      "encoder_inference_cpp(Tensor x, Tensor?[] weights, int heads, float eps1, "
      "float eps2, bool gelu, bool norm_first, bool causal, Tensor? lengths, bool last_query) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("encoder_inference_cpp", &fastrec::encoder_inference_cpp);
}
