// Caser's convolution block on the CPU: every horizontal filter height at once, and the vertical
// convolution, forward and backward:
//   torch.ops.fastrec.caser_forward_cpp(E, w_h, b_h, w_v, b_v, act_h, act_v)
//       -> (out_h, out_v, z_h, argmax, z_v)
//   torch.ops.fastrec.caser_backward_cpp(grad_h, grad_v, E, w_h, b_h, w_v, z_h, argmax, z_v,
//                                        act_h, act_v)
//       -> (grad_E, grad_w_h, grad_b_h, grad_w_v, grad_b_v)
// Contract (shared by every backend): fastrec/ops/caser.py. In short, for E
// (B, L, d), heights k = 0..L-1 with w_h[k] (nh, 1, k+1, d):
//   z[b, k, f, t] = b_h[k, f] + sum_{i <= k} E[b, t + i, :] . w_h[k][f, 0, i, :],  t < L - k
//   out_h[b, k * nh + f] = max_t act_h(z[b, k, f, t]) (first maximum wins; the last NaN wins),
//   z_h / argmax = z and t at that maximum (argmax | kNonfinite where some z[b, k, f, t] is not
//   finite); out_v[b, v * d + j] = act_v(b_v[v] + sum_l w_v[v, 0, l, 0] E[b, l, j]); z_v its
//   pre-activation (empty when act_v is "none").
//
// Forward, height by height: the window of rows t..t+k of E[b] is one contiguous run of
// (k+1) d values, so z for one height is a GEMM whose rows are (b, t) pairs (overlapping,
// stride d) and whose columns are the nh filters. The filters are packed per height into chunks
// of kLanes columns (kk-major), and the micro-kernel keeps R rows x C chunks of accumulators in
// registers: each weight vector feeds R FMAs, each broadcast E value C FMAs. Rows run across
// batch rows in (b, t) order, so short heights (t < L - k small) still fill the tile; the
// activation, max over t and argmax are applied to each finished tile. Only valid windows are
// computed: nh d (L (L+1) (L+2) / 6) multiply-adds per batch row.
// Backward: only the argmax window of each (b, k, f) gets a gradient g = grad_h * act_h'(z_h),
// so grad_E[b, t*:t*+k+1, :] += g w_h[k][f] and grad_w_h[k][f] += g E[b, t*:t*+k+1, :] are two
// axpys of (k+1) d values (skipped where g = 0: ReLU's zeros). The other windows' terms, which
// torch's dense backward also adds, are 0 * act'(z) and 0 * (an operand): zero unless a z or an
// operand is not finite, so they are added only for the (b, k, f) the forward flagged
// (kNonfinite): there the backward recomputes their z and runs every window, as torch does, and
// NaN and inf land where torch's are. Batch rows are split into one
// chunk per thread, each with its own weight-gradient buffer, summed at the end (the result
// depends only on the thread count). Batch rows are visited in blocks so that a filter's weights
// stay in L1 across the block.
#if !defined(_OPENMP)
#pragma message("fastrec caser.cpp built without -fopenmp: at::parallel_for will run serially")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "conv_common.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastrec {
namespace caser {
namespace {

// 32-byte vectors (8 floats, 4 doubles): on AVX-512 parts that split 512-bit operations in two
// they give the same FMA rate as 64-byte vectors, and they waste no lanes at nh = 8.
template <typename T>
using V32 = Vec<T, 32>;
template <typename T>
constexpr int64_t kLanes = kN<T, 32>;

// grad * act'(z) (relu: exactly 0 where z <= 0, else grad, a NaN z included, as torch's
// threshold_backward).
template <typename T>
inline T act_backward(T grad, T z, Act act) {
  if (act == Act::kNone) return grad;
  if (act == Act::kRelu) return z <= T(0) ? T(0) : grad;
  return grad * act_derivative(act, z);
}

// The bit of argmax that marks a (b, k, f) with a z that is not finite somewhere in t; the
// other bits hold t.
constexpr int32_t kNonfinite = int32_t(1) << 30;
constexpr int32_t kArgMask = kNonfinite - 1;

struct Dims {
  int64_t B = 0, L = 0, d = 0, nh = 0, nv = 0;
  int64_t chunks = 0;  // ceil(nh / kLanes): filter chunks of the packed weights
  // Offset of height k in the packed weights: chunks * kLanes * d * k (k + 1) / 2.
  int64_t packed_offset(int64_t k, int64_t lanes) const { return chunks * lanes * d * k * (k + 1) / 2; }
  // Offset of height k in the natural concatenation of the w_h[k] (nh, (k+1) d).
  int64_t weight_offset(int64_t k) const { return nh * d * k * (k + 1) / 2; }
};

// Packed horizontal weights: for height k, chunk c, window position kk < (k+1) d, lane u:
// packed[offset(k) + (c * (k+1) d + kk) * kLanes + u] = w_h[k][c * kLanes + u, 0, kk / d, kk % d]
// (zero for filters past nh).
template <typename T>
std::vector<T> pack_horizontal(const Dims& m, const std::vector<const T*>& w) {
  constexpr int64_t VL = kLanes<T>;
  std::vector<T> packed(m.packed_offset(m.L, VL), T(0));
  for (int64_t k = 0; k < m.L; ++k) {  // serial: small next to the GEMM, and no thread wake-up
    const int64_t K = (k + 1) * m.d;
    T* dst = packed.data() + m.packed_offset(k, VL);
    for (int64_t f = 0; f < m.nh; ++f) {
      const int64_t c = f / VL, u = f % VL;
      const T* src = w[k] + f * K;
      T* col = dst + c * K * VL + u;
      for (int64_t kk = 0; kk < K; ++kk) col[kk * VL] = src[kk];
    }
  }
  return packed;
}

// acc[r][c] = sum_kk rows[r][kk] * w[c * K * VL + kk * VL + (0..VL)] over kk < K.
template <int R, int C, typename T>
__attribute__((always_inline)) inline void window_dots(const T* const (&rows)[R],
                                                       const T* __restrict w, int64_t K,
                                                       V32<T> (&acc)[R][C]) {
  constexpr int64_t VL = kLanes<T>;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V32<T>{};
  for (int64_t kk = 0; kk < K; ++kk) {
    V32<T> wv[C];
    for (int c = 0; c < C; ++c) wv[c] = vload<T, 32>(w + (c * K + kk) * VL);
    for (int r = 0; r < R; ++r) {
      const T e = rows[r][kk];
      for (int c = 0; c < C; ++c) acc[r][c] += e * wv[c];
    }
  }
}

template <typename T>
inline V32<T> act_forward_vec(V32<T> z, Act act) {
  if (act == Act::kNone) return z;
  if (act == Act::kRelu) return ((z > V32<T>{}) | (z != z)) ? z : V32<T>{};
  for (int64_t u = 0; u < kLanes<T>; ++u) z[u] = act_forward(act, z[u]);
  return z;
}

// The running max over t of one full chunk of filters: z = acc + bias, a = act(z); where a beats
// the stored maximum (or t == 0; a NaN always wins, as in max_pool1d) store a, z and t; mark a z
// that is not finite (z - z is NaN there).
template <typename T>
inline void update_max(V32<T> z, const T* bias, Act act, int64_t t, T* out_h, T* z_h,
                       int32_t* argmax) {
  if (bias) z += vload<T, 32>(bias);
  const V32<T> a = act_forward_vec<T>(z, act);
  const auto bad = (z - z) != V32<T>{};
  if (t == 0) {
    vstore<T, 32>(out_h, a);
    vstore<T, 32>(z_h, z);
    for (int64_t u = 0; u < kLanes<T>; ++u) argmax[u] = bad[u] ? kNonfinite : 0;
    return;
  }
  const V32<T> best = vload<T, 32>(out_h);
  const auto take = (a > best) | (a != a);
  vstore<T, 32>(out_h, take ? a : best);
  vstore<T, 32>(z_h, take ? z : vload<T, 32>(z_h));
  for (int64_t u = 0; u < kLanes<T>; ++u) {
    const int32_t flag = (argmax[u] & kNonfinite) | (bad[u] ? kNonfinite : 0);
    argmax[u] = flag | (take[u] ? static_cast<int32_t>(t) : argmax[u] & kArgMask);
  }
}

// Height k, chunks [c0, c0 + C), batch rows [b0, b1): every window, then the epilogue.
template <int R, int C, typename T>
void horizontal_height(const Dims& m, int64_t k, int64_t c0, int64_t b0, int64_t b1, Act act,
                       const T* E, const T* packed, const T* bias, T* out_h, T* z_h,
                       int32_t* argmax) {
  constexpr int64_t VL = kLanes<T>;
  const int64_t K = (k + 1) * m.d, T_out = m.L - k, rows_total = (b1 - b0) * T_out;
  const T* w = packed + m.packed_offset(k, VL) + c0 * K * VL;
  const int64_t f0 = c0 * VL, f1 = std::min(m.nh, (c0 + C) * VL);
  alignas(32) T tile[R][C * VL];
  int64_t b_next = b0, t_next = 0;  // (b, t) of the tile's first row, advanced without divisions
  for (int64_t row0 = 0; row0 < rows_total; row0 += R) {
    const int64_t n = std::min<int64_t>(R, rows_total - row0);
    const T* rows[R];
    int64_t rb[R], rt[R];
    for (int r = 0; r < R; ++r) {
      rb[r] = r < n ? b_next : b0;  // rows past the end recompute the first row (discarded)
      rt[r] = r < n ? t_next : 0;
      rows[r] = E + rb[r] * m.L * m.d + rt[r] * m.d;
      if (r < n && ++t_next == T_out) {
        t_next = 0;
        ++b_next;
      }
    }
    V32<T> acc[R][C];
    window_dots<R, C, T>(rows, w, K, acc);
    for (int r = 0; r < R; ++r) std::memcpy(tile[r], acc[r], sizeof(acc[r]));
    for (int64_t r = 0; r < n; ++r) {
      const int64_t b = rb[r], t = rt[r];
      const int64_t base = b * m.L * m.nh + k * m.nh;
      for (int c = 0; c < C; ++c) {
        const int64_t fs = f0 + c * VL;
        if (fs + VL <= m.nh) {
          update_max(acc[r][c], bias ? bias + k * m.nh + fs : nullptr, act, t, out_h + base + fs,
                     z_h + base + fs, argmax + base + fs);
          continue;
        }
        for (int64_t f = fs; f < f1; ++f) {  // a partial chunk (nh not a multiple of kLanes)
          const T z = tile[r][f - f0] + (bias ? bias[k * m.nh + f] : T(0));
          const T a = act_forward(act, z);
          const int32_t flag = (t == 0 ? 0 : argmax[base + f] & kNonfinite) | (std::isfinite(z) ? 0 : kNonfinite);
          if (t == 0 || a > out_h[base + f] || std::isnan(a)) {
            out_h[base + f] = a;
            z_h[base + f] = z;
            argmax[base + f] = static_cast<int32_t>(t);
          }
          argmax[base + f] = flag | (argmax[base + f] & kArgMask);
        }
      }
    }
  }
}

template <typename T>
void vertical_forward_row(const Dims& m, int64_t b, Act act, const T* E, const T* w_v,
                          const T* b_v, T* out_v, T* z_v) {
  const T* e = E + b * m.L * m.d;
  for (int64_t v = 0; v < m.nv; ++v) {
    T* o = out_v + (b * m.nv + v) * m.d;
    const T bv = b_v ? b_v[v] : T(0);
    for (int64_t j = 0; j < m.d; ++j) o[j] = bv;
    for (int64_t l = 0; l < m.L; ++l) {
      const T wl = w_v[v * m.L + l];
      const T* __restrict el = e + l * m.d;
      for (int64_t j = 0; j < m.d; ++j) o[j] += wl * el[j];
    }
    if (act != Act::kNone) {
      T* zo = z_v + (b * m.nv + v) * m.d;
      for (int64_t j = 0; j < m.d; ++j) {
        zo[j] = o[j];
        o[j] = act_forward(act, o[j]);
      }
    }
  }
}

constexpr int64_t kBatchBlock = 16;  // backward: batch rows per block (a filter stays in L1)

// Register tiles of the forward: R rows x C chunks (6 x 2 where two chunks remain, else 8 x 1).
constexpr int kRowsOf2 = 6, kRowsOf1 = 8;

// Forward: batch rows per block, so that the block's rows of E (read by every height) stay in
// L1 (about 16 KB of it), and a multiple of the tile's rows, so that every height's (b, t) rows
// fill whole tiles (a partial tile computes rows that are thrown away).
template <typename T>
int64_t forward_batch_block(const Dims& m) {
  const int64_t rows = m.chunks == 1 ? kRowsOf1 : m.chunks % 2 == 0 ? kRowsOf2 : kRowsOf1 * kRowsOf2 / 2;
  const int64_t target = std::clamp<int64_t>(16384 / std::max<int64_t>(1, m.L * m.d * int64_t(sizeof(T))), 4, 64);
  return rows * std::max<int64_t>(1, target / rows);
}

template <typename T>
void forward_rows(const Dims& m, int64_t begin, int64_t end, Act act_h, Act act_v, const T* E,
                  const T* packed, const T* b_h, const T* w_v, const T* b_v, T* out_h, T* out_v,
                  T* z_h, int32_t* argmax, T* z_v) {
  const int64_t block = forward_batch_block<T>(m);
  for (int64_t b0 = begin; b0 < end; b0 += block) {
    const int64_t b1 = std::min(end, b0 + block);
    for (int64_t k = 0; k < m.L; ++k) {
      int64_t c = 0;
      for (; c + 2 <= m.chunks; c += 2)
        horizontal_height<kRowsOf2, 2, T>(m, k, c, b0, b1, act_h, E, packed, b_h, out_h, z_h, argmax);
      if (c < m.chunks)
        horizontal_height<kRowsOf1, 1, T>(m, k, c, b0, b1, act_h, E, packed, b_h, out_h, z_h, argmax);
    }
    for (int64_t b = b0; b < b1; ++b) vertical_forward_row(m, b, act_v, E, w_v, b_v, out_v, z_v);
  }
}

// y1[0..n) += a * x1[0..n) and y2[0..n) += a * x2[0..n), in one pass.
template <typename T>
inline void axpy2(T* __restrict y1, const T* __restrict x1, T* __restrict y2, const T* __restrict x2,
                  T a, int64_t n) {
  constexpr int64_t VL = kLanes<T>;
  const V32<T> av = vsplat<T, 32>(a);
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    vstore<T, 32>(y1 + j, vload<T, 32>(y1 + j) + av * vload<T, 32>(x1 + j));
    vstore<T, 32>(y2 + j, vload<T, 32>(y2 + j) + av * vload<T, 32>(x2 + j));
  }
  for (; j < n; ++j) {
    y1[j] += a * x1[j];
    y2[j] += a * x2[j];
  }
}

// y[0..n) += a * x[0..n)
template <typename T>
inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// The terms of torch's dense backward that the sparse one leaves out, for one flagged (b, k, f):
// every window t but the maximum's (and that one too where its g is 0), with dz = 0 * act'(z_t)
// (z_t recomputed; exactly 0 for none and relu), added to grad_E and grad_w_h like the
// maximum's. Returns their sum, the bias gradient's share.
template <typename T>
T nonfinite_windows(int64_t K, int64_t windows, int64_t d, Act act, T bias, const T* w,
                    const T* e_row, T* ge_row, T* gw, int64_t t_star, T g) {
  T sum = T(0);
  const bool recompute = act != Act::kNone && act != Act::kRelu;
  for (int64_t t = 0; t < windows; ++t) {
    if (t == t_star && g != T(0)) continue;  // the sparse backward added it
    const T* e = e_row + t * d;
    T dz = T(0);
    if (recompute) {
      T z = bias;
      for (int64_t kk = 0; kk < K; ++kk) z += e[kk] * w[kk];
      dz = act_backward(T(0), z, act);
    }
    axpy2(ge_row + t * d, w, gw, e, dz, K);
    sum += dz;
  }
  return sum;
}

// Batch rows [begin, end): grad_E rows (owned) and this chunk's weight-gradient buffers.
template <typename T>
void backward_rows(const Dims& m, int64_t begin, int64_t end, Act act_h, Act act_v,
                   const T* grad_h, const T* grad_v, const T* E, const T* w_h, const T* b_h,
                   const T* w_v, const T* z_h, const int32_t* argmax, const T* z_v, T* grad_E,
                   T* gw_h, T* gb_h, T* gw_v, T* gb_v) {
  const int64_t d = m.d, L = m.L;
  std::vector<T> g(kBatchBlock), dzv(m.nv * d);
  std::vector<int64_t> at(kBatchBlock);
  for (int64_t b0 = begin; b0 < end; b0 += kBatchBlock) {
    const int64_t b1 = std::min(end, b0 + kBatchBlock);
    for (int64_t k = 0; k < L; ++k) {
      const int64_t K = (k + 1) * d;
      for (int64_t f = 0; f < m.nh; ++f) {
        const T* w = w_h + m.weight_offset(k) + f * K;
        T* gw = gw_h + m.weight_offset(k) + f * K;
        T gb = T(0);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t idx = b * L * m.nh + k * m.nh + f;
          const T gz = act_backward(grad_h[idx], z_h[idx], act_h);
          const int64_t t_star = argmax[idx] & kArgMask;
          gb += gz;
          if (gz != T(0)) {
            const int64_t start = (b * L + t_star) * d;
            axpy2(grad_E + start, w, gw, E + start, gz, K);
          }
          if (argmax[idx] & kNonfinite)
            gb += nonfinite_windows(K, L - k, d, act_h, b_h ? b_h[k * m.nh + f] : T(0), w,
                                    E + b * L * d, grad_E + b * L * d, gw, t_star, gz);
        }
        gb_h[k * m.nh + f] += gb;
      }
    }
    for (int64_t b = b0; b < b1; ++b) {
      const T* e = E + b * L * d;
      T* ge = grad_E + b * L * d;
      for (int64_t v = 0; v < m.nv; ++v) {
        const int64_t off = (b * m.nv + v) * d;
        T sum = T(0);
        for (int64_t j = 0; j < d; ++j) {
          const T dz = act_v == Act::kNone ? grad_v[off + j] : act_backward(grad_v[off + j], z_v[off + j], act_v);
          dzv[v * d + j] = dz;
          sum += dz;
        }
        gb_v[v] += sum;
      }
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t v = 0; v < m.nv; ++v) {
          const T* dz = dzv.data() + v * d;
          axpy(ge + l * d, w_v[v * L + l], dz, d);
          T dot = T(0);
          for (int64_t j = 0; j < d; ++j) dot += dz[j] * e[l * d + j];
          gw_v[v * L + l] += dot;
        }
      }
    }
  }
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dt) {
  TORCH_CHECK(t.scalar_type() == dt, "fastrec caser (cpp): ", name, " must be ", dt, " like E, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastrec caser (cpp): ", name, " must be a CPU tensor, got ",
              t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "fastrec caser (cpp): ", name, " must be ", shape, ", got ",
              t.sizes());
}

Dims describe(const at::Tensor& E, const at::TensorList& w_h, const at::Tensor& w_v) {
  TORCH_CHECK(E.dim() == 3, "fastrec caser (cpp): E must be 3-D (B, L, d), got ", E.sizes());
  const auto dt = E.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble,
              "fastrec caser (cpp): E must be float32 or float64, got ", dt);
  Dims m;
  m.B = E.size(0);
  m.L = E.size(1);
  m.d = E.size(2);
  TORCH_CHECK(static_cast<int64_t>(w_h.size()) == m.L, "fastrec caser (cpp): w_h must hold L = ",
              m.L, " tensors, got ", w_h.size());
  TORCH_CHECK(m.L >= 1 && w_h[0].dim() == 4, "fastrec caser (cpp): w_h[0] must be 4-D (nh, 1, 1, d)");
  m.nh = w_h[0].size(0);
  for (int64_t k = 0; k < m.L; ++k) {
    check_dtype(w_h[k], "w_h[k]", dt);
    check_shape(w_h[k], "w_h[k]", {m.nh, 1, k + 1, m.d});
  }
  check_dtype(w_v, "w_v", dt);
  TORCH_CHECK(w_v.dim() == 4, "fastrec caser (cpp): w_v must be 4-D (nv, 1, L, 1), got ",
              w_v.sizes());
  m.nv = w_v.size(0);
  check_shape(w_v, "w_v", {m.nv, 1, m.L, 1});
  m.chunks = (m.nh + (dt == at::kFloat ? kLanes<float> : kLanes<double>)-1) /
             (dt == at::kFloat ? kLanes<float> : kLanes<double>);
  return m;
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<T>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> caser_forward_cpp(
    const at::Tensor& E_in, at::TensorList w_h_in, const std::optional<at::Tensor>& b_h_in,
    const at::Tensor& w_v_in, const std::optional<at::Tensor>& b_v_in, c10::string_view act_h_name,
    c10::string_view act_v_name) {
  const Act act_h = parse_act(std::string(act_h_name), "caser", "act_h"),
            act_v = parse_act(std::string(act_v_name), "caser", "act_v");
  const Dims m = describe(E_in, w_h_in, w_v_in);
  const auto dt = E_in.scalar_type();
  check_dtype(E_in, "E", dt);
  const at::Tensor E = E_in.contiguous(), w_v = w_v_in.contiguous();
  std::vector<at::Tensor> w_h;
  for (const auto& w : w_h_in) w_h.push_back(w.contiguous());
  std::optional<at::Tensor> b_h, b_v;
  if (b_h_in.has_value()) {
    check_dtype(*b_h_in, "b_h", dt);
    check_shape(*b_h_in, "b_h", {m.L, m.nh});
    b_h = b_h_in->contiguous();
  }
  if (b_v_in.has_value()) {
    check_dtype(*b_v_in, "b_v", dt);
    check_shape(*b_v_in, "b_v", {m.nv});
    b_v = b_v_in->contiguous();
  }
  const auto opts = E.options();
  at::Tensor out_h = at::empty({m.B, m.L * m.nh}, opts);
  at::Tensor z_h = at::empty({m.B, m.L * m.nh}, opts);
  at::Tensor argmax = at::empty({m.B, m.L * m.nh}, opts.dtype(at::kInt));
  at::Tensor out_v = at::empty({m.B, m.nv * m.d}, opts);
  at::Tensor z_v = at::empty({act_v == Act::kNone ? 0 : m.B * m.nv * m.d}, opts);
  if (act_v != Act::kNone) z_v = z_v.view({m.B, m.nv * m.d});
  if (m.B > 0 && m.nh > 0) {
    AT_DISPATCH_FLOATING_TYPES(dt, "caser_forward_cpp", [&] {
      const std::vector<scalar_t> packed = pack_horizontal<scalar_t>(m, pointers<scalar_t>(w_h));
      const scalar_t* bh = b_h ? b_h->data_ptr<scalar_t>() : nullptr;
      const scalar_t* bv = b_v ? b_v->data_ptr<scalar_t>() : nullptr;
      scalar_t* zv = act_v == Act::kNone ? nullptr : z_v.data_ptr<scalar_t>();
      // Threads take whole batch blocks, so that only the batch's last block can be partial.
      const int64_t block = forward_batch_block<scalar_t>(m), blocks = (m.B + block - 1) / block;
      at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
        const int64_t begin = first * block, end = std::min(m.B, last * block);
        forward_rows<scalar_t>(m, begin, end, act_h, act_v, E.data_ptr<scalar_t>(), packed.data(),
                               bh, w_v.data_ptr<scalar_t>(), bv, out_h.data_ptr<scalar_t>(),
                               out_v.data_ptr<scalar_t>(), z_h.data_ptr<scalar_t>(),
                               argmax.data_ptr<int32_t>(), zv);
      });
    });
  }
  return {out_h, out_v, z_h, argmax, z_v};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>
caser_backward_cpp(const at::Tensor& grad_h_in, const at::Tensor& grad_v_in, const at::Tensor& E_in,
                   at::TensorList w_h_in, const std::optional<at::Tensor>& b_h_in,
                   const at::Tensor& w_v_in, const at::Tensor& z_h_in, const at::Tensor& argmax_in,
                   const at::Tensor& z_v_in, c10::string_view act_h_name,
                   c10::string_view act_v_name) {
  const Act act_h = parse_act(std::string(act_h_name), "caser", "act_h"),
            act_v = parse_act(std::string(act_v_name), "caser", "act_v");
  const Dims m = describe(E_in, w_h_in, w_v_in);
  const auto dt = E_in.scalar_type();
  check_dtype(grad_h_in, "grad_h", dt);
  check_shape(grad_h_in, "grad_h", {m.B, m.L * m.nh});
  check_dtype(grad_v_in, "grad_v", dt);
  check_shape(grad_v_in, "grad_v", {m.B, m.nv * m.d});
  check_dtype(z_h_in, "z_h", dt);
  check_shape(z_h_in, "z_h", {m.B, m.L * m.nh});
  check_shape(argmax_in, "argmax", {m.B, m.L * m.nh});
  TORCH_CHECK(argmax_in.scalar_type() == at::kInt, "fastrec caser (cpp): argmax must be int32, got ",
              argmax_in.scalar_type());
  if (act_v != Act::kNone) {
    check_dtype(z_v_in, "z_v", dt);
    check_shape(z_v_in, "z_v", {m.B, m.nv * m.d});
  }
  std::optional<at::Tensor> b_h;
  if (b_h_in.has_value()) {
    check_dtype(*b_h_in, "b_h", dt);
    check_shape(*b_h_in, "b_h", {m.L, m.nh});
    b_h = b_h_in->contiguous();
  }
  const at::Tensor grad_h = grad_h_in.contiguous(), grad_v = grad_v_in.contiguous(),
                   E = E_in.contiguous(), w_v = w_v_in.contiguous(), z_h = z_h_in.contiguous(),
                   argmax = argmax_in.contiguous(), z_v = z_v_in.contiguous();
  std::vector<at::Tensor> w_h;
  for (const auto& w : w_h_in) w_h.push_back(w.contiguous());
  const auto opts = E.options();
  const int64_t weights = m.weight_offset(m.L);
  // One chunk of batch rows per thread, each with its own weight-gradient buffers.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m.B));
  const int64_t width = weights + m.L * m.nh + m.nv * m.L + m.nv;
  // Outputs are separate tensors (the schema declares no aliasing); zeroing and the reduction of
  // the per-chunk buffers happen inside the one parallel region or serially, since every
  // parallel region costs a thread wake-up.
  at::Tensor grad_E = at::empty({m.B, m.L, m.d}, opts);
  std::vector<at::Tensor> grad_w_h;
  for (int64_t k = 0; k < m.L; ++k) grad_w_h.push_back(at::empty({m.nh, 1, k + 1, m.d}, opts));
  at::Tensor grad_b_h = at::empty({m.L, m.nh}, opts);
  at::Tensor grad_w_v = at::empty({m.nv, 1, m.L, 1}, opts);
  at::Tensor grad_b_v = at::empty({m.nv}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "caser_backward_cpp", [&] {
    using T = scalar_t;
    std::vector<T> w_all(weights);
    for (int64_t k = 0; k < m.L; ++k)
      std::memcpy(w_all.data() + m.weight_offset(k), w_h[k].data_ptr<T>(), m.nh * (k + 1) * m.d * sizeof(T));
    const T* zv = act_v == Act::kNone ? nullptr : z_v.data_ptr<T>();
    const T* bh = b_h ? b_h->data_ptr<T>() : nullptr;
    std::unique_ptr<T[]> partial(new T[chunks * width]);
    T* grad_E_p = grad_E.data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b0 = m.B * c / chunks, b1 = m.B * (c + 1) / chunks;
        T* buf = partial.get() + c * width;
        std::fill(buf, buf + width, T(0));
        std::fill(grad_E_p + b0 * m.L * m.d, grad_E_p + b1 * m.L * m.d, T(0));
        backward_rows<T>(m, b0, b1, act_h, act_v, grad_h.data_ptr<T>(), grad_v.data_ptr<T>(),
                         E.data_ptr<T>(), w_all.data(), bh, w_v.data_ptr<T>(), z_h.data_ptr<T>(),
                         argmax.data_ptr<int32_t>(), zv, grad_E_p, buf, buf + weights,
                         buf + weights + m.L * m.nh, buf + weights + m.L * m.nh + m.nv * m.L);
      }
    });
    // dst[0..n) = sum over chunks (in chunk order) of partial[c][offset + 0..n)
    auto reduce_into = [&](T* dst, int64_t offset, int64_t n) {
      std::memcpy(dst, partial.get() + offset, n * sizeof(T));
      for (int64_t c = 1; c < chunks; ++c) {
        const T* src = partial.get() + c * width + offset;
        for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
      }
    };
    for (int64_t k = 0; k < m.L; ++k)
      reduce_into(grad_w_h[k].data_ptr<T>(), m.weight_offset(k), m.nh * (k + 1) * m.d);
    reduce_into(grad_b_h.data_ptr<T>(), weights, m.L * m.nh);
    reduce_into(grad_w_v.data_ptr<T>(), weights + m.L * m.nh, m.nv * m.L);
    reduce_into(grad_b_v.data_ptr<T>(), weights + m.L * m.nh + m.nv * m.L, m.nv);
  });
  return {grad_E, grad_w_h, grad_b_h, grad_w_v, grad_b_v};
}

}  // namespace
}  // namespace caser
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def(
      "caser_forward_cpp(Tensor E, Tensor[] w_h, Tensor? b_h, Tensor w_v, Tensor? b_v, "
      "str act_h, str act_v) -> (Tensor out_h, Tensor out_v, Tensor z_h, Tensor argmax, "
      "Tensor z_v)");
  m.def(
      "caser_backward_cpp(Tensor grad_h, Tensor grad_v, Tensor E, Tensor[] w_h, Tensor? b_h, "
      "Tensor w_v, Tensor z_h, Tensor argmax, Tensor z_v, str act_h, str act_v) "
      "-> (Tensor grad_E, Tensor[] grad_w_h, Tensor grad_b_h, Tensor grad_w_v, Tensor grad_b_v)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("caser_forward_cpp", &fastrec::caser::caser_forward_cpp);
  m.impl("caser_backward_cpp", &fastrec::caser::caser_backward_cpp);
}
