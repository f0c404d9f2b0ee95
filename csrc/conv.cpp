// Fused 2-D convolution on the CPU: conv + bias + activation + max-pool in one pass, and its
// backward (the contract is in fastrec/ops/conv.py):
//   torch.ops.fastrec.conv_forward_cpp(x, w, bias, stride, padding, dilation, groups, act, pool)
//       -> (y, saved_z, argmax)
//   torch.ops.fastrec.conv_backward_cpp(grad_y, x, w, saved_z, argmax, stride, padding,
//                                       dilation, groups, act, pool, output_mask, bias)
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

#include "conv_common.h"
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
// Geometry
// ---------------------------------------------------------------------------------------------

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
        dispatch_act(act, [&](auto a) {
          epilogue<T, decltype(a)::value>(g, Ci, ldb, bias, n, grp, r0, tile_rows, y, saved_z, argmax);
        });
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward of the epilogue: dz = scatter of grad_y * act'(z) to the argmax positions
// ---------------------------------------------------------------------------------------------

// z = conv + bias at conv output (oh, ow) of image n, channel o, as a dense convolution computes
// it (padding is zeros that still multiply the weights, so an infinite weight gives NaN there).
template <typename T>
T conv_at(const Geometry& g, const T* x, const T* w, const T* bias, int64_t n, int64_t o,
          int64_t oh, int64_t ow) {
  const int64_t grp = o / g.Og;
  T acc = bias != nullptr ? bias[o] : T(0);
  for (int64_t c = 0; c < g.Cg; ++c) {
    const T* plane = x + ((n * g.C + grp * g.Cg + c) * g.H) * g.W;
    const T* wk = w + (o * g.Cg + c) * g.KH * g.KW;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
        const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
        acc += (inside ? plane[ih * g.W + iw] : T(0)) * wk[kh * g.KW + kw];
      }
    }
  }
  return acc;
}

// Torch's dense backward computes 0 * act'(z) at every conv output no pool window takes, which
// is NaN where act'(z) is (gelu at a non-finite z, tanh / sigmoid at a NaN z). The saved winner
// tells when a window holds such a z: a NaN z makes the window's maximum NaN, and gelu's -inf
// (NaN) and +inf win over finite values, so act'(winner's z) is non-finite too. Only those
// windows, and the conv outputs no window covers, recompute z to put the NaN where torch does.
template <typename T>
struct DenseNaN {
  const Geometry& g;
  Act act;
  const T* x;  // (N, C, H, W) compute dtype, contiguous
  const T* w;  // (O, C / G, KH, KW)
  const T* bias;  // (O,) or nullptr
  bool active() const {
    return g.pooled && (act == Act::kGelu || act == Act::kTanh || act == Act::kSigmoid);
  }
  // dz at the outputs of plane p that no window covers.
  void uncovered(int64_t p, T* dz_plane) const {
    const int64_t n = p / g.O, o = p % g.O;
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      for (int64_t ow = oh < g.Hc ? g.Wc : 0; ow < g.Wo; ++ow)
        dz_plane[oh * g.Wo + ow] = T(0) * act_derivative(act, conv_at(g, x, w, bias, n, o, oh, ow));
  }
  // dz at the positions of window (pr, pc) of plane p other than its winner.
  void window(int64_t p, int64_t pr, int64_t pc, int32_t winner, T* dz_plane) const {
    const int64_t n = p / g.O, o = p % g.O;
    for (int64_t i = 0; i < g.pool_h; ++i)
      for (int64_t j = 0; j < g.pool_w; ++j) {
        if (i * g.pool_w + j == winner) continue;
        const int64_t oh = pr * g.pool_h + i, ow = pc * g.pool_w + j;
        dz_plane[oh * g.Wo + ow] = T(0) * act_derivative(act, conv_at(g, x, w, bias, n, o, oh, ow));
      }
  }
};

template <typename T>
void epilogue_backward(const Geometry& g, Act act, const T* grad_y, const T* saved_z,
                       const int32_t* argmax, const DenseNaN<T>& dense, T* dz) {
  const int64_t planes = g.N * g.O;
  const bool has_uncovered = g.Hc != g.Ho || g.Wc != g.Wo;
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
      if (dense.active() && has_uncovered) dense.uncovered(p, dz_plane);
      const int64_t count = g.Hp * g.Wp;
      const T* gy = grad_y + p * count;
      const T* z = act == Act::kNone ? nullptr : saved_z + p * count;
      const int32_t* am = argmax + p * count;
      for (int64_t pr = 0; pr < g.Hp; ++pr)
        for (int64_t pc = 0; pc < g.Wp; ++pc) {
          const int64_t i = pr * g.Wp + pc;
          const int64_t oh = pr * g.pool_h + am[i] / g.pool_w;
          const int64_t ow = pc * g.pool_w + am[i] % g.pool_w;
          const T derivative = z == nullptr ? T(1) : act_derivative(act, z[i]);
          if (dense.active() && !std::isfinite(derivative)) dense.window(p, pr, pc, am[i], dz_plane);
          dz_plane[oh * g.Wo + ow] = z == nullptr ? gy[i] : gy[i] * derivative;
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
  const Act act = parse_act(act_name, "conv", "act");
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
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& bias) {
  check_inputs(x, w);
  const Geometry g = make_geometry(x, w, stride, padding, dilation, groups, pool);
  const Act act = parse_act(act_name, "conv", "act");
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
  const at::Tensor xc = x.to(ct).contiguous();
  const at::Tensor wc = w.to(ct).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.O,
                "fastrec conv (cpp): bias must be (O,) = (", g.O, ",), got ", bias->sizes());
  const at::Tensor bc = has_bias ? bias->to(ct).contiguous() : at::Tensor();
  at::Tensor dz = at::empty({g.N, g.O, g.Ho, g.Wo}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "conv_backward_cpp", [&] {
    const DenseNaN<scalar_t> dense{g, act, xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                   has_bias ? bc.data_ptr<scalar_t>() : nullptr};
    epilogue_backward<scalar_t>(g, act, gy.data_ptr<scalar_t>(),
                                z.defined() ? z.data_ptr<scalar_t>() : nullptr,
                                am.defined() ? am.data_ptr<int32_t>() : nullptr, dense,
                                dz.data_ptr<scalar_t>());
  });
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
      "bool[3] output_mask, Tensor? bias=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("conv_forward_cpp", &fastrec::conv_forward_cpp);
  m.impl("conv_backward_cpp", &fastrec::conv_backward_cpp);
}
