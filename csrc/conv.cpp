// Fused 2-D convolution on the CPU: conv + bias + activation + max-pool in one pass, and its
// backward (the contract is in fastrec/ops/conv.py):
//   torch.ops.fastrec.conv_forward_cpp(x, w, bias, stride, padding, dilation, groups, act, pool)
//       -> (y, saved_z, argmax)
//   torch.ops.fastrec.conv_backward_cpp(grad_y, x, w, saved_z, argmax, stride, padding,
//                                       dilation, groups, act, pool, output_mask)
//       -> (dx, dw, db)
//
// Forward is an implicit GEMM per (group, tile: a band of output rows of one image, or several
// whole images when one image has few outputs, as in full-width kernels): the tile's slice of the
// unfolded input (K = C/groups * KH * KW rows by the tile's output pixels) is packed into a
// small per-thread buffer (never a whole im2col tensor), multiplied by the packed weights with a
// register-blocked microkernel (MR output channels by NV SIMD vectors of pixels, accumulated in
// registers), and the tile's conv outputs, still in cache, go through bias, activation and the
// pool window max (torch's max_pool2d rule: the first maximum in row-major window order wins,
// NaN wins) before anything is written to the output. A tile holds whole pool windows: its rows
// are a multiple of pool_h, and only the conv outputs some window covers are computed.
//
// Backward: the pool/activation backward scatters grad_y * act'(z) to the argmax positions of a
// dense dz (zeros elsewhere), then the input and weight gradients are at::convolution_backward
// of dz (oneDNN's GEMMs), and db is dz summed over (N, H, W).
//
// fp32 and fp64 compute natively (fp64 is the gradcheck path); fp16 / bf16 are converted to
// fp32 and back (accumulation in fp32).
#if !defined(_OPENMP)
#pragma message("fastrec conv.cpp built without -fopenmp: at::parallel_for will run serially")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastrec {
namespace {

// ---------------------------------------------------------------------------------------------
// Geometry and activations
// ---------------------------------------------------------------------------------------------

enum class Act { kNone, kRelu, kGelu, kTanh, kSigmoid };

Act parse_act(const std::string& act) {
  if (act == "none") return Act::kNone;
  if (act == "relu") return Act::kRelu;
  if (act == "gelu") return Act::kGelu;
  if (act == "tanh") return Act::kTanh;
  if (act == "sigmoid") return Act::kSigmoid;
  TORCH_CHECK(false, "fastrec conv (cpp): act must be one of none, relu, gelu, tanh, sigmoid, got '",
              act, "'");
}

struct Geometry {
  int64_t N, C, H, W;         // input
  int64_t O, KH, KW;          // weight (O, C / G, KH, KW)
  int64_t sh, sw, ph, pw, dh, dw, G;
  int64_t Cg, Og, K;          // channels per group in / out, GEMM depth Cg * KH * KW
  int64_t Ho, Wo;             // conv output
  int64_t pool_h, pool_w, Hp, Wp;  // pool window (= stride) and pooled output
  int64_t Hc, Wc;             // conv outputs some pool window covers: Hp * pool_h, Wp * pool_w
  bool pooled;
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       at::IntArrayRef pool) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4,
              "fastrec conv (cpp): x must be (N, C, H, W) and w (O, C/groups, KH, KW), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && pool.size() == 2,
              "fastrec conv (cpp): stride, padding, dilation and pool must have two entries");
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = w.size(0), g.KH = w.size(2), g.KW = w.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1];
  g.dh = dilation[0], g.dw = dilation[1], g.G = groups;
  TORCH_CHECK(g.G >= 1 && g.C % g.G == 0 && g.O % g.G == 0 && w.size(1) * g.G == g.C,
              "fastrec conv (cpp): groups = ", g.G, " must divide C = ", g.C, " and O = ", g.O,
              " with w.size(1) = C / groups, got w ", w.sizes());
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0 &&
                  pool[0] >= 1 && pool[1] >= 1,
              "fastrec conv (cpp): stride, dilation and pool must be >= 1 and padding >= 0");
  g.Cg = g.C / g.G, g.Og = g.O / g.G, g.K = g.Cg * g.KH * g.KW;
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "fastrec conv (cpp): kernel (", g.KH, ", ", g.KW,
              ") with dilation is larger than the padded input (", g.H + 2 * g.ph, ", ",
              g.W + 2 * g.pw, ")");
  g.pool_h = pool[0], g.pool_w = pool[1];
  g.pooled = g.pool_h != 1 || g.pool_w != 1;
  g.Hp = g.Ho / g.pool_h, g.Wp = g.Wo / g.pool_w;
  g.Hc = g.Hp * g.pool_h, g.Wc = g.Wp * g.pool_w;
  return g;
}

template <typename T>
inline T act_forward(Act act, T z) {
  switch (act) {
    case Act::kRelu:
      return (z > T(0) || z != z) ? z : T(0);  // NaN propagates, as torch.relu
    case Act::kGelu:
      return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case Act::kTanh:
      return std::tanh(z);
    case Act::kSigmoid:
      return T(1) / (T(1) + std::exp(-z));
    case Act::kNone:
      break;
  }
  return z;
}

// d act / d z as torch's backward formulas compute it (relu: threshold_backward, which zeroes
// the gradient where relu(z) <= 0, so a NaN z passes it).
template <typename T>
inline T act_derivative(Act act, T z) {
  switch (act) {
    case Act::kRelu:
      return z <= T(0) ? T(0) : T(1);
    case Act::kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440)));
      const T pdf = std::exp(T(-0.5) * z * z) * T(0.39894228040143267794);
      return cdf + z * pdf;
    }
    case Act::kTanh: {
      const T t = std::tanh(z);
      return T(1) - t * t;
    }
    case Act::kSigmoid: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) - s);
    }
    case Act::kNone:
      break;
  }
  return T(1);
}

// ---------------------------------------------------------------------------------------------
// Implicit-GEMM forward
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMR = 8;  // output channels per microkernel call
constexpr int kNV = 2;      // SIMD vectors of output pixels per microkernel call

template <typename T>
constexpr int64_t kNR = kNV * kN<T>;  // output pixels per microkernel call

// a in every lane as one broadcast (vsplat's `{} + a` costs an add, and GCC's generic
// broadcast of a lane loop splits it into two 256-bit halves).
template <typename T>
inline Vec<T> bcast(T a) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    const __m512 v = _mm512_set1_ps(a);
    return reinterpret_cast<const Vec<T>&>(v);
  } else {
    const __m512d v = _mm512_set1_pd(a);
    return reinterpret_cast<const Vec<T>&>(v);
  }
#else
  Vec<T> v;
  for (int64_t i = 0; i < kN<T>; ++i) v[i] = a;
  return v;
#endif
}

// C[r, 0:kNR] = sum_k A[k, r] * B[k, 0:kNR] for the kMR rows r of one block.
//   A: (K, kMR) packed weights of kMR output channels; B: (K, ldb) packed input, kNR columns
//   used; C: (kMR, ldc) conv outputs of the tile.
template <typename T>
inline void microkernel(int64_t K, const T* __restrict A, const T* __restrict B, int64_t ldb,
                        T* __restrict C, int64_t ldc) {
  Vec<T> acc[kMR][kNV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> b[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) b[v] = vload(B + k * ldb + v * kN<T>);
#pragma GCC unroll 16
    for (int64_t r = 0; r < kMR; ++r) {
      const Vec<T> a = bcast(A[k * kMR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int64_t r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) vstore(C + r * ldc + v * kN<T>, acc[r][v]);
}

// Weights (O, Cg, KH, KW) as (G, ceil(Og / kMR), K, kMR), rows past Og zero.
template <typename T>
std::vector<T> pack_weights(const Geometry& g, const T* w) {
  const int64_t blocks = (g.Og + kMR - 1) / kMR;
  std::vector<T> packed(g.G * blocks * g.K * kMR, T(0));
  for (int64_t grp = 0; grp < g.G; ++grp)
    for (int64_t o = 0; o < g.Og; ++o) {
      const T* src = w + (grp * g.Og + o) * g.K;
      T* dst = packed.data() + ((grp * blocks + o / kMR) * g.K) * kMR + o % kMR;
      for (int64_t k = 0; k < g.K; ++k) dst[k * kMR] = src[k];
    }
  return packed;
}

// The unfolded input of output rows [r0, r0 + rows) x columns [0, Wc) of image n, group grp,
// into the (K, ldb) row-major tile B at column (oh - r0) * Wc + ow.
template <typename T>
void pack_input(const Geometry& g, const T* x, int64_t n, int64_t grp, int64_t r0, int64_t rows,
                int64_t ldb, T* B) {
  if (g.Wc < 16) {  // narrow outputs (full-width kernels): walk each pixel's input row along kw
    for (int64_t c = 0; c < g.Cg; ++c) {
      const T* plane = x + ((n * g.C + grp * g.Cg + c) * g.H) * g.W;
      for (int64_t kh = 0; kh < g.KH; ++kh) {
        T* dst = B + (c * g.KH + kh) * g.KW * ldb;
        for (int64_t lr = 0; lr < rows; ++lr) {
          const int64_t ih = (r0 + lr) * g.sh - g.ph + kh * g.dh;
          const bool inside = ih >= 0 && ih < g.H;
          for (int64_t ow = 0; ow < g.Wc; ++ow) {
            T* out = dst + lr * g.Wc + ow;
            const int64_t iw0 = ow * g.sw - g.pw;
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t iw = iw0 + kw * g.dw;
              out[kw * ldb] = inside && iw >= 0 && iw < g.W ? plane[ih * g.W + iw] : T(0);
            }
          }
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < g.Cg; ++c) {
    const T* plane = x + ((n * g.C + grp * g.Cg + c) * g.H) * g.W;
    for (int64_t kh = 0; kh < g.KH; ++kh)
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        T* dst = B + ((c * g.KH + kh) * g.KW + kw) * ldb;
        const int64_t shift = kw * g.dw - g.pw;  // iw = ow * sw + shift
        // Columns ow in [lo, hi) read inside the row: 0 <= ow * sw + shift < W.
        const int64_t lo = std::min(g.Wc, shift >= 0 ? 0 : (-shift + g.sw - 1) / g.sw);
        const int64_t hi =
            std::max(lo, std::min(g.Wc, g.W - shift <= 0 ? 0 : (g.W - shift - 1) / g.sw + 1));
        for (int64_t lr = 0; lr < rows; ++lr) {
          T* out = dst + lr * g.Wc;
          const int64_t ih = (r0 + lr) * g.sh - g.ph + kh * g.dh;
          if (ih < 0 || ih >= g.H) {
            std::memset(out, 0, g.Wc * sizeof(T));
            continue;
          }
          const T* row = plane + ih * g.W + shift;
          std::memset(out, 0, lo * sizeof(T));
          if (g.sw == 1) {
            std::memcpy(out + lo, row + lo, (hi - lo) * sizeof(T));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] = row[ow * g.sw];
          }
          std::memset(out + hi, 0, (g.Wc - hi) * sizeof(T));
        }
      }
  }
}

template <typename T>
struct IVecOf {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> type __attribute__((vector_size(64)));
};
template <typename T>
using IVec = typename IVecOf<T>::type;  // lane-sized integers: comparison masks and indices

template <typename T, Act act>
inline Vec<T> act_vec(Vec<T> z) {
  if constexpr (act == Act::kNone) {
    return z;
  } else if constexpr (act == Act::kRelu) {
    return ((z > T(0)) | (z != z)) ? z : Vec<T>{};
  } else {
    for (int64_t i = 0; i < kN<T>; ++i) z[i] = act_forward(act, z[i]);
    return z;
  }
}

template <typename T>
struct WindowMax {
  T value, z;
  int32_t index;
};

// torch's max_pool2d over one window of conv outputs (rows of `width` values, `ld` apart):
// value = max of act(z + b), the first maximum in row-major order, or the last NaN if any.
// Each SIMD lane scans its own elements in window order under that rule; the lanes are then
// merged (the last NaN by index, else the largest value at its smallest index).
template <typename T, Act act>
WindowMax<T> window_max(const T* win, int64_t ld, int64_t rows, int64_t width, T b) {
  using I = IVec<T>;
  using S = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  I lane;
  for (int64_t l = 0; l < kN<T>; ++l) lane[l] = static_cast<S>(l);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec<T> best = bcast(neg_inf), best_z = bcast(T(0));
  I best_index = lane * 0 - 1;
  const bool flat = width == ld;  // the window is one contiguous run
  const int64_t runs = flat ? 1 : rows, run = flat ? rows * width : width;
  for (int64_t r = 0; r < runs; ++r) {
    const T* p = win + r * ld;
    for (int64_t k0 = 0; k0 < run; k0 += kN<T>) {
      const int64_t n = std::min(kN<T>, run - k0);
      Vec<T> z = bcast(T(0));
      std::memcpy(&z, p + k0, n * sizeof(T));
      z = z + b;
      const Vec<T> a = act_vec<T, act>(z);
      const I take = ((a > best) | (a != a)) & (lane < static_cast<S>(n));
      best = take ? a : best;
      best_z = take ? z : best_z;
      best_index = take ? lane + static_cast<S>(r * width + k0) : best_index;
    }
  }
  WindowMax<T> out{neg_inf, win[0] + b, -1};
  bool nan = false;
  for (int64_t l = 0; l < kN<T>; ++l) {
    if (best_index[l] < 0) continue;
    const T v = best[l];
    const bool lane_nan = v != v;
    const bool better = nan ? (lane_nan && best_index[l] > out.index)
                            : (lane_nan || v > out.value || (v == out.value && best_index[l] < out.index));
    if (better || out.index < 0) {
      out = {v, best_z[l], static_cast<int32_t>(best_index[l])};
      nan = lane_nan;
    }
  }
  if (out.index < 0) out = {act_forward(act, win[0] + b), win[0] + b, 0};  // all -inf: the first
  return out;
}

// Bias, activation and pool of one tile's conv outputs C ((Og, ldc), column (oh - r0) * Wc + ow)
// into y / saved_z / argmax of image n, group grp.
template <typename T, Act act>
void epilogue(const Geometry& g, const T* C, int64_t ldc, const T* bias, int64_t n,
              int64_t grp, int64_t r0, int64_t rows, T* y, T* saved_z, int32_t* argmax) {
  constexpr bool save = act != Act::kNone;
  for (int64_t m = 0; m < g.Og; ++m) {
    const int64_t o = grp * g.Og + m;
    const T b = bias != nullptr ? bias[o] : T(0);
    const T* crow = C + m * ldc;
    if (!g.pooled) {
      const int64_t base = ((n * g.O + o) * g.Ho + r0) * g.Wo;
      const int64_t count = rows * g.Wo;
      if (save)
        for (int64_t i = 0; i < count; ++i) saved_z[base + i] = crow[i] + b;
      for (int64_t i = 0; i < count; ++i) y[base + i] = act_forward(act, crow[i] + b);
      continue;
    }
    // Window element (0, 0) starts each max; the others replace it where greater or NaN (the
    // order torch's max_pool2d scans in), one pass over a pooled row per window element so
    // that the loop over pooled columns is branch-free and vectorises.
    for (int64_t pr = 0; pr < rows / g.pool_h; ++pr) {
      const int64_t out_base = ((n * g.O + o) * g.Hp + r0 / g.pool_h + pr) * g.Wp;
      T* __restrict yrow = y + out_base;
      T* __restrict zrow = save ? saved_z + out_base : nullptr;
      int32_t* __restrict arow = argmax + out_base;
      const T* top = crow + pr * g.pool_h * g.Wc;
      const int64_t pw = g.pool_w;
      if (g.pool_h * pw >= 32) {  // wide windows (max-over-time): one vectorised scan each
        for (int64_t pc = 0; pc < g.Wp; ++pc) {
          const WindowMax<T> r = window_max<T, act>(top + pc * pw, g.Wc, g.pool_h, pw, b);
          yrow[pc] = r.value;
          if constexpr (save) zrow[pc] = r.z;
          arow[pc] = r.index;
        }
        continue;
      }
      for (int64_t pc = 0; pc < g.Wp; ++pc) {
        const T z = top[pc * pw] + b;
        yrow[pc] = act_forward(act, z);
        if constexpr (save) zrow[pc] = z;
        arow[pc] = 0;
      }
      for (int64_t i = 0; i < g.pool_h; ++i)
        for (int64_t j = i == 0 ? 1 : 0; j < pw; ++j) {
          const T* __restrict src = top + i * g.Wc + j;
          const int32_t index = static_cast<int32_t>(i * pw + j);
          for (int64_t pc = 0; pc < g.Wp; ++pc) {
            const T z = src[pc * pw] + b;
            const T a = act_forward(act, z);
            const T best = yrow[pc];
            const bool take = a > best || a != a;
            yrow[pc] = take ? a : best;
            if constexpr (save) zrow[pc] = take ? z : zrow[pc];
            arow[pc] = take ? index : arow[pc];
          }
        }
    }
  }
}

template <typename T>
void forward_kernel(const Geometry& g, Act act, const T* x, const T* w, const T* bias, T* y,
                    T* saved_z, int32_t* argmax) {
  const std::vector<T> wp = pack_weights(g, w);
  const int64_t blocks = (g.Og + kMR - 1) / kMR;
  // Tile: whole pool windows, about kTargetPixels conv outputs: a band of rows of one image,
  // or several whole images where one image has fewer outputs than that.
  constexpr int64_t kTargetPixels = 128;
  const int64_t per_image = g.Hc * g.Wc;
  int64_t rows = g.Hc, images = 1;
  if (per_image >= kTargetPixels) {
    rows = std::min(g.Hc, g.pool_h * std::max<int64_t>(1, kTargetPixels / (g.pool_h * g.Wc)));
  } else {
    images = std::min(g.N, std::max<int64_t>(1, kTargetPixels / per_image));
  }
  const int64_t tiles = (g.Hc + rows - 1) / rows;
  const int64_t image_blocks = (g.N + images - 1) / images;
  const int64_t ldb = round_up(images * rows * g.Wc, kNR<T>);
  const int64_t work = image_blocks * g.G * tiles;
  const int64_t flops_per_item = 2 * g.Og * g.K * ldb;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, flops_per_item));
  at::parallel_for(0, work, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> B(g.K * ldb);
    std::vector<T> C(blocks * kMR * ldb);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item % tiles;
      const int64_t grp = (item / tiles) % g.G;
      const int64_t n0 = item / (tiles * g.G) * images;
      const int64_t count = std::min(images, g.N - n0);
      const int64_t r0 = tile * rows;
      const int64_t tile_rows = std::min(rows, g.Hc - r0);
      const int64_t span = tile_rows * g.Wc;  // columns of one image
      const int64_t cols = round_up(count * span, kNR<T>);
      for (int64_t i = 0; i < count; ++i)
        pack_input(g, x, n0 + i, grp, r0, tile_rows, ldb, B.data() + i * span);
      for (int64_t k = 0; k < g.K; ++k)
        std::memset(B.data() + k * ldb + count * span, 0, (cols - count * span) * sizeof(T));
      for (int64_t mb = 0; mb < blocks; ++mb) {
        const T* A = wp.data() + (grp * blocks + mb) * g.K * kMR;
        for (int64_t c0 = 0; c0 < cols; c0 += kNR<T>)
          microkernel(g.K, A, B.data() + c0, ldb, C.data() + mb * kMR * ldb + c0, ldb);
      }
      for (int64_t i = 0; i < count; ++i) {
        const T* Ci = C.data() + i * span;
        const int64_t n = n0 + i;
        switch (act) {
          case Act::kNone:
            epilogue<T, Act::kNone>(g, Ci, ldb, bias, n, grp, r0, tile_rows, y, saved_z, argmax);
            break;
          case Act::kRelu:
            epilogue<T, Act::kRelu>(g, Ci, ldb, bias, n, grp, r0, tile_rows, y, saved_z, argmax);
            break;
          case Act::kGelu:
            epilogue<T, Act::kGelu>(g, Ci, ldb, bias, n, grp, r0, tile_rows, y, saved_z, argmax);
            break;
          case Act::kTanh:
            epilogue<T, Act::kTanh>(g, Ci, ldb, bias, n, grp, r0, tile_rows, y, saved_z, argmax);
            break;
          case Act::kSigmoid:
            epilogue<T, Act::kSigmoid>(g, Ci, ldb, bias, n, grp, r0, tile_rows, y, saved_z,
                                       argmax);
            break;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward of the epilogue: dz = scatter of grad_y * act'(z) to the argmax positions
// ---------------------------------------------------------------------------------------------

template <typename T>
void epilogue_backward(const Geometry& g, Act act, const T* grad_y, const T* saved_z,
                       const int32_t* argmax, T* dz) {
  const int64_t planes = g.N * g.O;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* dz_plane = dz + p * g.Ho * g.Wo;
      if (!g.pooled) {
        const int64_t count = g.Ho * g.Wo;
        const T* gy = grad_y + p * count;
        const T* z = saved_z + p * count;
        if (act == Act::kNone) {
          std::memcpy(dz_plane, gy, count * sizeof(T));
        } else {
          for (int64_t i = 0; i < count; ++i) dz_plane[i] = gy[i] * act_derivative(act, z[i]);
        }
        continue;
      }
      std::memset(dz_plane, 0, g.Ho * g.Wo * sizeof(T));
      const int64_t count = g.Hp * g.Wp;
      const T* gy = grad_y + p * count;
      const T* z = act == Act::kNone ? nullptr : saved_z + p * count;
      const int32_t* am = argmax + p * count;
      for (int64_t pr = 0; pr < g.Hp; ++pr)
        for (int64_t pc = 0; pc < g.Wp; ++pc) {
          const int64_t i = pr * g.Wp + pc;
          const int64_t oh = pr * g.pool_h + am[i] / g.pool_w;
          const int64_t ow = pc * g.pool_w + am[i] % g.pool_w;
          const T d = z == nullptr ? gy[i] : gy[i] * act_derivative(act, z[i]);
          dz_plane[oh * g.Wo + ow] = d;
        }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(),
              "fastrec conv (cpp): x and w must be CPU tensors");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && w.scalar_type() == x.scalar_type(),
              "fastrec conv (cpp): x and w must share one floating dtype, got ", x.scalar_type(),
              " and ", w.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_forward_cpp(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::string& act_name, at::IntArrayRef pool) {
  check_inputs(x, w);
  const Geometry g = make_geometry(x, w, stride, padding, dilation, groups, pool);
  const Act act = parse_act(act_name);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.O && bias->scalar_type() == x.scalar_type(),
                "fastrec conv (cpp): bias must be (O,) = (", g.O, ",) of x's dtype, got ",
                bias->sizes(), " ", bias->scalar_type());
  const at::ScalarType ct = compute_type(x);
  const at::Tensor xc = x.to(ct).contiguous();
  const at::Tensor wc = w.to(ct).contiguous();
  const at::Tensor bc = has_bias ? bias->to(ct).contiguous() : at::Tensor();
  const int64_t Hy = g.pooled ? g.Hp : g.Ho, Wy = g.pooled ? g.Wp : g.Wo;
  at::Tensor y = at::empty({g.N, g.O, Hy, Wy}, xc.options());
  at::Tensor saved_z = act == Act::kNone ? at::empty({0}, xc.options()) : at::empty_like(y);
  at::Tensor argmax = g.pooled ? at::empty({g.N, g.O, Hy, Wy}, xc.options().dtype(at::kInt))
                               : at::empty({0}, xc.options().dtype(at::kInt));
  if (y.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "conv_forward_cpp", [&] {
      forward_kernel<scalar_t>(g, act, xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                               has_bias ? bc.data_ptr<scalar_t>() : nullptr,
                               y.data_ptr<scalar_t>(),
                               act == Act::kNone ? nullptr : saved_z.data_ptr<scalar_t>(),
                               g.pooled ? argmax.data_ptr<int32_t>() : nullptr);
    });
  }
  if (x.scalar_type() != ct) {
    y = y.to(x.scalar_type());
    saved_z = saved_z.to(x.scalar_type());
  }
  return {y, saved_z, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cpp(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& saved_z,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, const std::string& act_name, at::IntArrayRef pool,
    std::array<bool, 3> output_mask) {
  check_inputs(x, w);
  const Geometry g = make_geometry(x, w, stride, padding, dilation, groups, pool);
  const Act act = parse_act(act_name);
  const int64_t Hy = g.pooled ? g.Hp : g.Ho, Wy = g.pooled ? g.Wp : g.Wo;
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == g.N && grad_y.size(1) == g.O &&
                  grad_y.size(2) == Hy && grad_y.size(3) == Wy,
              "fastrec conv (cpp): grad_y must be (", g.N, ", ", g.O, ", ", Hy, ", ", Wy,
              "), got ", grad_y.sizes());
  TORCH_CHECK(act == Act::kNone || saved_z.sizes() == grad_y.sizes(),
              "fastrec conv (cpp): saved_z must have grad_y's shape, got ", saved_z.sizes());
  TORCH_CHECK(!g.pooled || (argmax.sizes() == grad_y.sizes() && argmax.scalar_type() == at::kInt),
              "fastrec conv (cpp): argmax must be int32 of grad_y's shape, got ",
              argmax.scalar_type(), " ", argmax.sizes());
  const at::ScalarType ct = compute_type(x);
  const auto opts = x.options().dtype(ct);
  const at::Tensor gy = grad_y.to(ct).contiguous();
  const at::Tensor z = act == Act::kNone ? at::Tensor() : saved_z.to(ct).contiguous();
  const at::Tensor am = g.pooled ? argmax.contiguous() : at::Tensor();
  at::Tensor dz = at::empty({g.N, g.O, g.Ho, g.Wo}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "conv_backward_cpp", [&] {
    epilogue_backward<scalar_t>(g, act, gy.data_ptr<scalar_t>(),
                                z.defined() ? z.data_ptr<scalar_t>() : nullptr,
                                am.defined() ? am.data_ptr<int32_t>() : nullptr,
                                dz.data_ptr<scalar_t>());
  });
  const at::Tensor xc = x.to(ct).contiguous();
  const at::Tensor wc = w.to(ct).contiguous();
  at::Tensor dx, dw, db;
  std::tie(dx, dw, db) = at::convolution_backward(
      dz, xc, wc, std::vector<int64_t>{g.O}, stride, padding, dilation, /*transposed=*/false,
      std::vector<int64_t>{0, 0}, groups, output_mask);
  const auto dt = x.scalar_type();
  dx = output_mask[0] ? dx.to(dt).contiguous() : at::empty({0}, x.options());
  dw = output_mask[1] ? dw.to(dt).contiguous() : at::empty({0}, x.options());
  db = output_mask[2] ? db.to(dt).contiguous() : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def(
      "conv_forward_cpp(Tensor x, Tensor w, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str act, int[2] pool) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_backward_cpp(Tensor grad_y, Tensor x, Tensor w, Tensor saved_z, Tensor argmax, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str act, int[2] pool, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("conv_forward_cpp", &fastrec::conv_forward_cpp);
  m.impl("conv_backward_cpp", &fastrec::conv_backward_cpp);
}

// =============================================================================================
// Caser block: every horizontal filter height at once, and the vertical convolution
// =============================================================================================
//   torch.ops.fastrec.caser_forward_cpp(E, w_h, b_h, w_v, b_v, act_h, act_v)
//       -> (out_h, out_v, z_h, argmax, z_v)
//   torch.ops.fastrec.caser_backward_cpp(grad_h, grad_v, E, w_h, w_v, z_h, argmax, z_v, act_h,
//                                        act_v)
//       -> (grad_E, grad_w_h, grad_b_h, grad_w_v, grad_b_v)
// Contract (shared by every backend): fastrec/ops/conv.py, Caser section. In short, for E
// (B, L, d), heights k = 0..L-1 with w_h[k] (nh, 1, k+1, d):
//   z[b, k, f, t] = b_h[k, f] + sum_{i <= k} E[b, t + i, :] . w_h[k][f, 0, i, :],  t < L - k
//   out_h[b, k * nh + f] = max_t act_h(z[b, k, f, t]) (first maximum wins; NaN wins),
//   z_h / argmax = z and t at that maximum; out_v[b, v * d + j] = act_v(b_v[v] +
//   sum_l w_v[v, 0, l, 0] E[b, l, j]); z_v its pre-activation (empty when act_v is "none").
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
// axpys of (k+1) d values (skipped where g = 0: ReLU's zeros). Batch rows are split into one
// chunk per thread, each with its own weight-gradient buffer, summed at the end (the result
// depends only on the thread count). Batch rows are visited in blocks so that a filter's weights
// stay in L1 across the block.
#if !defined(_OPENMP)
#pragma message("fastrec conv.cpp built without -fopenmp: at::parallel_for will run serially")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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
struct V32Of {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using V32 = typename V32Of<T>::type;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);

template <typename T>
inline V32<T> load32(const T* p) {
  V32<T> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

enum class Act { kNone, kRelu, kGelu, kTanh, kSigmoid };

Act parse_act(c10::string_view name, const char* what) {
  const std::string s(name.data(), name.size());
  if (s == "none") return Act::kNone;
  if (s == "relu") return Act::kRelu;
  if (s == "gelu") return Act::kGelu;
  if (s == "tanh") return Act::kTanh;
  if (s == "sigmoid") return Act::kSigmoid;
  TORCH_CHECK(false, "fastrec caser (cpp): ", what,
              " must be 'none', 'relu', 'gelu', 'tanh' or 'sigmoid', got '", s, "'");
}

// act(z), as torch computes it (relu keeps NaN; gelu is the exact erf form).
template <typename T>
inline T act_forward(T z, Act act) {
  switch (act) {
    case Act::kNone:
      return z;
    case Act::kRelu:
      return z > T(0) || std::isnan(z) ? z : T(0);
    case Act::kGelu:
      return T(0.5) * z * (T(1) + std::erf(z * T(M_SQRT1_2)));
    case Act::kTanh:
      return std::tanh(z);
    case Act::kSigmoid:
      return T(1) / (T(1) + std::exp(-z));
  }
  return z;
}

// d act / dz at z for the smooth activations.
template <typename T>
inline T act_derivative(T z, Act act) {
  switch (act) {
    case Act::kNone:
    case Act::kRelu:
      return T(1);
    case Act::kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);  // 1 / sqrt(2 pi)
      return cdf + z * pdf;
    }
    case Act::kTanh: {
      const T y = std::tanh(z);
      return T(1) - y * y;
    }
    case Act::kSigmoid: {
      const T y = T(1) / (T(1) + std::exp(-z));
      return y * (T(1) - y);
    }
  }
  return T(1);
}

// grad * act'(z) (relu: grad where z > 0, else exactly 0, as torch's threshold_backward).
template <typename T>
inline T act_backward(T grad, T z, Act act) {
  if (act == Act::kNone) return grad;
  if (act == Act::kRelu) return z > T(0) ? grad : T(0);
  return grad * act_derivative(z, act);
}

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
    for (int c = 0; c < C; ++c) wv[c] = load32(w + (c * K + kk) * VL);
    for (int r = 0; r < R; ++r) {
      const T e = rows[r][kk];
      for (int c = 0; c < C; ++c) acc[r][c] += e * wv[c];
    }
  }
}

template <typename T>
inline void store32(T* p, const V32<T>& x) {
  std::memcpy(p, &x, sizeof(x));
}

template <typename T>
inline V32<T> act_forward_vec(V32<T> z, Act act) {
  if (act == Act::kNone) return z;
  if (act == Act::kRelu) return ((z > V32<T>{}) | (z != z)) ? z : V32<T>{};
  for (int64_t u = 0; u < kLanes<T>; ++u) z[u] = act_forward(z[u], act);
  return z;
}

// The running max over t of one full chunk of filters: z = acc + bias, a = act(z); where a beats
// the stored maximum (or t == 0; a NaN beats a number) store a, z and t.
template <typename T>
inline void update_max(V32<T> z, const T* bias, Act act, int64_t t, T* out_h, T* z_h,
                       int32_t* argmax) {
  if (bias) z += load32(bias);
  const V32<T> a = act_forward_vec<T>(z, act);
  if (t == 0) {
    store32(out_h, a);
    store32(z_h, z);
    for (int64_t u = 0; u < kLanes<T>; ++u) argmax[u] = 0;
    return;
  }
  const V32<T> best = load32(out_h);
  const auto take = (a > best) | ((a != a) & (best == best));
  store32(out_h, take ? a : best);
  store32(z_h, take ? z : load32(z_h));
  for (int64_t u = 0; u < kLanes<T>; ++u)
    if (take[u]) argmax[u] = static_cast<int32_t>(t);
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
          const T a = act_forward(z, act);
          if (t == 0 || a > out_h[base + f] || (std::isnan(a) && !std::isnan(out_h[base + f]))) {
            out_h[base + f] = a;
            z_h[base + f] = z;
            argmax[base + f] = static_cast<int32_t>(t);
          }
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
        o[j] = act_forward(o[j], act);
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
  const V32<T> av = V32<T>{} + a;
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    store32(y1 + j, load32(y1 + j) + av * load32(x1 + j));
    store32(y2 + j, load32(y2 + j) + av * load32(x2 + j));
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

// Batch rows [begin, end): grad_E rows (owned) and this chunk's weight-gradient buffers.
template <typename T>
void backward_rows(const Dims& m, int64_t begin, int64_t end, Act act_h, Act act_v,
                   const T* grad_h, const T* grad_v, const T* E, const T* w_h, const T* w_v,
                   const T* z_h, const int32_t* argmax, const T* z_v, T* grad_E, T* gw_h,
                   T* gb_h, T* gw_v, T* gb_v) {
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
          gb += gz;
          if (gz == T(0)) continue;
          const int64_t start = (b * L + argmax[idx]) * d;
          axpy2(grad_E + start, w, gw, E + start, gz, K);
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
  const Act act_h = parse_act(act_h_name, "act_h"), act_v = parse_act(act_v_name, "act_v");
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
                   at::TensorList w_h_in, const at::Tensor& w_v_in, const at::Tensor& z_h_in,
                   const at::Tensor& argmax_in, const at::Tensor& z_v_in,
                   c10::string_view act_h_name, c10::string_view act_v_name) {
  const Act act_h = parse_act(act_h_name, "act_h"), act_v = parse_act(act_v_name, "act_v");
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
    std::unique_ptr<T[]> partial(new T[chunks * width]);
    T* grad_E_p = grad_E.data_ptr<T>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b0 = m.B * c / chunks, b1 = m.B * (c + 1) / chunks;
        T* buf = partial.get() + c * width;
        std::fill(buf, buf + width, T(0));
        std::fill(grad_E_p + b0 * m.L * m.d, grad_E_p + b1 * m.L * m.d, T(0));
        backward_rows<T>(m, b0, b1, act_h, act_v, grad_h.data_ptr<T>(), grad_v.data_ptr<T>(),
                         E.data_ptr<T>(), w_all.data(), w_v.data_ptr<T>(), z_h.data_ptr<T>(),
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
      "caser_backward_cpp(Tensor grad_h, Tensor grad_v, Tensor E, Tensor[] w_h, Tensor w_v, "
      "Tensor z_h, Tensor argmax, Tensor z_v, str act_h, str act_v) "
      "-> (Tensor grad_E, Tensor[] grad_w_h, Tensor grad_b_h, Tensor grad_w_v, Tensor grad_b_v)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("caser_forward_cpp", &fastrec::caser::caser_forward_cpp);
  m.impl("caser_backward_cpp", &fastrec::caser::caser_backward_cpp);
}
