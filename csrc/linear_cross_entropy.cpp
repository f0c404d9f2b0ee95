// Fused linear cross-entropy on the CPU: the log-sum-exp over items of z = h W^T (+ b) and its
// gradients, without the (rows x items) logits.
//   linear_cross_entropy_forward_cpp(Tensor h, Tensor W, Tensor? bias) -> Tensor lse
//   linear_cross_entropy_backward_cpp(Tensor g, Tensor h, Tensor W, Tensor? bias, Tensor target,
//                                     Tensor lse, float label_smoothing) -> (dh, dW, db)
// h (N, d) and W (V, d) float32 / float64 (any strides: only ATen's GEMMs read them), bias (V,)
// or None, target (N,) int64 in [0, V), lse (N,), g (N,) the gradient of each row's loss.
// The backward computes, per logit, P[i, j] = g_i (softmax(z_i)_j - eps / V - (1 - eps) [j == t_i])
// (the gradient of loss_i = lse_i - (1 - eps) z[i, t_i] - eps / V sum_j z[i, j]), then
// dh = P W, dW = P^T h, db = sum_i P[i, :]. The contract and the torch reference are in
// fastrec/ops/linear_cross_entropy.py.
//
// Work: items in tiles of kTile, rows in blocks of kRows, so that one tile of logits (kRows x
// kTile) stays in cache; each tile's logits come from one ATen GEMM (at::mm_out: MKL), exp runs
// vectorised. The tiles are split into contiguous ranges, one per thread (or, with fewer tiles
// than threads, the rows are), each with its own running max and sum (forward) or dh (backward)
// partial; the partials are combined in range order, so the results are the same on every call
// for a given thread count. dW is written tile by tile (a tile's rows are owned by one range).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace fastrec {
namespace lce {
namespace {

constexpr int64_t kTile = 2048;  // items per tile
constexpr int64_t kRows = 128;   // rows per block: a block of logits is 1 MB in fp32

template <typename T>
inline bool is_nan(T x) {
  return x != x;
}

// The largest entry of z[0, n) (NaN if any entry is NaN), after adding bias b (may be null).
template <typename T>
T add_bias_max(T* __restrict z, const T* __restrict b, int64_t n) {
  constexpr int64_t L = kN<T>;
  Vec<T> vmax = vsplat<T>(-std::numeric_limits<T>::infinity());
  Vec<T> vnan = Vec<T>{};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    Vec<T> x = vload(z + j);
    if (b != nullptr) {
      x = x + vload(b + j);
      vstore(z + j, x);
    }
    vmax = x > vmax ? x : vmax;
    vnan = vnan + (x - x);  // NaN in a lane stays NaN
  }
  T m = -std::numeric_limits<T>::infinity(), nan = 0;
  for (int w = 0; w < L; ++w) {
    m = std::max(m, vmax[w]);
    nan += vnan[w];
  }
  for (; j < n; ++j) {
    if (b != nullptr) z[j] += b[j];
    m = std::max(m, z[j]);
    nan += z[j] - z[j];
  }
  return is_nan(nan) ? nan : m;
}

// sum_j exp(z[j] - m) over [0, n).
template <typename T>
T sum_exp(const T* __restrict z, int64_t n, T m) {
  constexpr int64_t L = kN<T>;
  Vec<T> acc = Vec<T>{};
  int64_t j = 0;
  for (; j + L <= n; j += L) acc = acc + vexp(vload(z + j) - m);
  T s = vhsum<T>(acc);
  for (; j < n; ++j) s += std::exp(z[j] - m);
  return s;
}

// z[j] = g * exp(z[j] - lse) - c over [0, n), and colsum[j] += z[j].
template <typename T>
void softmax_grad(T* __restrict z, T* __restrict colsum, int64_t n, T lse, T g, T c) {
  constexpr int64_t L = kN<T>;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Vec<T> p = vexp(vload(z + j) - lse) * g - c;
    vstore(z + j, p);
    vstore(colsum + j, vload(colsum + j) + p);
  }
  for (; j < n; ++j) {
    const T p = std::exp(z[j] - lse) * g - c;
    z[j] = p;
    colsum[j] += p;
  }
}

// How the work splits: ranges of tiles (tile_ranges > 1) or of rows (row_ranges > 1).
struct Split {
  int64_t tiles, tile_ranges, row_ranges;
};

Split split_work(int64_t n, int64_t v) {
  const int64_t tiles = (v + kTile - 1) / kTile;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (tiles >= threads || n < 2 * kRows) return {tiles, std::min(tiles, threads), 1};
  return {tiles, 1, std::min(threads, (n + kRows - 1) / kRows)};
}

// [begin, end) of range r of count items split into `ranges` contiguous ranges.
inline std::pair<int64_t, int64_t> range_of(int64_t r, int64_t ranges, int64_t count) {
  return {r * count / ranges, (r + 1) * count / ranges};
}

void check_inputs(const char* what, const at::Tensor& h, const at::Tensor& W, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(h.device().is_cpu() && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble),
              "fastrec linear_cross_entropy ", what, " (cpp): h must be a float32 or float64 CPU tensor, got ",
              h.scalar_type(), " on ", h.device());
  TORCH_CHECK(h.dim() == 2 && W.dim() == 2 && W.size(1) == h.size(1),
              "fastrec linear_cross_entropy ", what, " (cpp): h (N, d) and W (V, d) expected, got ", h.sizes(),
              " and ", W.sizes());
  TORCH_CHECK(W.scalar_type() == h.scalar_type() && W.device().is_cpu(),
              "fastrec linear_cross_entropy ", what, " (cpp): W must be a CPU tensor of h's dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == W.size(0) && bias->scalar_type() == h.scalar_type(),
                "fastrec linear_cross_entropy ", what, " (cpp): bias must be (V,) of h's dtype, got ",
                bias->sizes());
  }
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& h, const at::Tensor& W, const c10::optional<at::Tensor>& bias) {
  const int64_t n = h.size(0), v = W.size(0);
  at::Tensor lse = at::empty({n}, h.options());
  if (n == 0) return lse;
  const Split sp = split_work(n, v);
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const T* bp = bias.has_value() ? bc.data_ptr<T>() : nullptr;
  const T inf = std::numeric_limits<T>::infinity();
  // Running (max, sum) per tile range and row.
  std::vector<T> run_max(sp.tile_ranges * n, -inf), run_sum(sp.tile_ranges * n, T(0));
  at::parallel_for(0, sp.tile_ranges * sp.row_ranges, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({kRows * kTile}, h.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tr = task / sp.row_ranges, rr = task % sp.row_ranges;
      const auto [t0, t1] = range_of(tr, sp.tile_ranges, sp.tiles);
      const auto [r0, r1] = range_of(rr, sp.row_ranges, n);
      T* mx = run_max.data() + tr * n;
      T* sm = run_sum.data() + tr * n;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t v0 = t * kTile, nv = std::min(kTile, v - v0);
        const at::Tensor Wt = W.narrow(0, v0, nv).t();
        for (int64_t i0 = r0; i0 < r1; i0 += kRows) {
          const int64_t nr = std::min(kRows, r1 - i0);
          at::Tensor z = buf.narrow(0, 0, nr * nv).view({nr, nv});
          at::mm_out(z, h.narrow(0, i0, nr), Wt);
          T* zp = z.data_ptr<T>();
          for (int64_t i = 0; i < nr; ++i) {
            T* row = zp + i * nv;
            const T tile_max = add_bias_max(row, bp == nullptr ? nullptr : bp + v0, nv);
            T& m = mx[i0 + i];
            T& s = sm[i0 + i];
            const T m_new = (is_nan(tile_max) || tile_max > m) ? tile_max : m;
            if (m_new == -inf) continue;  // every logit so far is -inf
            s = (m == -inf ? T(0) : s * std::exp(m - m_new)) + sum_exp(row, nv, m_new);
            m = m_new;
          }
        }
      }
    }
  });
  T* out = lse.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    T m = -inf, s = 0;
    for (int64_t tr = 0; tr < sp.tile_ranges; ++tr) {
      const T mt = run_max[tr * n + i], st = run_sum[tr * n + i];
      if (is_nan(mt) || is_nan(m)) {
        m = is_nan(m) ? m : mt;
        continue;
      }
      if (mt == -inf) continue;
      const T m_new = std::max(m, mt);
      s = (m == -inf ? T(0) : s * std::exp(m - m_new)) + st * std::exp(mt - m_new);
      m = m_new;
    }
    out[i] = is_nan(m) ? m : m + std::log(s);
  }
  return lse;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& g, const at::Tensor& h,
                                                             const at::Tensor& W,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& target, const at::Tensor& lse,
                                                             double label_smoothing) {
  const int64_t n = h.size(0), v = W.size(0), d = h.size(1);
  const Split sp = split_work(n, v);
  // dh partials per tile range, dW partials per row range (only one of them is ever > 1).
  at::Tensor dh_parts = at::zeros({sp.tile_ranges, n, d}, h.options());
  at::Tensor dw_parts = at::empty({sp.row_ranges, v, d}, h.options());
  at::Tensor db_parts = at::zeros({sp.row_ranges, v}, h.options());
  if (n == 0 || v == 0) {
    dw_parts.zero_();
  } else {
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    const T* bp = bias.has_value() ? bc.data_ptr<T>() : nullptr;
    const at::Tensor gc = g.contiguous(), tc = target.contiguous(), lc = lse.contiguous();
    const T* gp = gc.data_ptr<T>();
    const int64_t* tp = tc.data_ptr<int64_t>();
    const T* lp = lc.data_ptr<T>();
    const T eps = static_cast<T>(label_smoothing), uniform = eps / static_cast<T>(v), hit = T(1) - eps;
    at::parallel_for(0, sp.tile_ranges * sp.row_ranges, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buf = at::empty({kRows * kTile}, h.options());
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tr = task / sp.row_ranges, rr = task % sp.row_ranges;
        const auto [t0, t1] = range_of(tr, sp.tile_ranges, sp.tiles);
        const auto [r0, r1] = range_of(rr, sp.row_ranges, n);
        at::Tensor dh = dh_parts[tr];
        at::Tensor dw = dw_parts[rr];
        T* db = db_parts[rr].data_ptr<T>();
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t v0 = t * kTile, nv = std::min(kTile, v - v0);
          const at::Tensor Wt = W.narrow(0, v0, nv);
          at::Tensor dWt = dw.narrow(0, v0, nv);
          for (int64_t i0 = r0; i0 < r1; i0 += kRows) {
            const int64_t nr = std::min(kRows, r1 - i0);
            at::Tensor z = buf.narrow(0, 0, nr * nv).view({nr, nv});
            const at::Tensor hb = h.narrow(0, i0, nr);
            at::mm_out(z, hb, Wt.t());
            T* zp = z.data_ptr<T>();
            for (int64_t i = 0; i < nr; ++i) {
              T* row = zp + i * nv;
              if (bp != nullptr) {
                for (int64_t j = 0; j < nv; ++j) row[j] += bp[v0 + j];
              }
              const T gi = gp[i0 + i];
              softmax_grad(row, db + v0, nv, lp[i0 + i], gi, gi * uniform);
              const int64_t tj = tp[i0 + i] - v0;
              if (tj >= 0 && tj < nv) {
                row[tj] -= gi * hit;
                db[v0 + tj] -= gi * hit;
              }
            }
            at::Tensor dhb = dh.narrow(0, i0, nr);
            dhb.addmm_(z, Wt);
            if (i0 == r0) {
              at::mm_out(dWt, z.t(), hb);
            } else {
              dWt.addmm_(z.t(), hb);
            }
          }
        }
      }
    });
  }
  at::Tensor dh = sp.tile_ranges == 1 ? dh_parts[0] : dh_parts.sum(0);
  at::Tensor dW = sp.row_ranges == 1 ? dw_parts[0] : dw_parts.sum(0);
  at::Tensor db = sp.row_ranges == 1 ? db_parts[0] : db_parts.sum(0);
  return {dh, dW, db};
}

at::Tensor linear_cross_entropy_forward_cpp(const at::Tensor& h, const at::Tensor& W,
                                            const c10::optional<at::Tensor>& bias) {
  check_inputs("forward", h, W, bias);
  // Detached aliases: the ATen GEMMs inside must not see tensors that require grad.
  const at::Tensor hd = h.detach(), Wd = W.detach();
  const c10::optional<at::Tensor> bd = bias.has_value() ? c10::optional<at::Tensor>(bias->detach()) : c10::nullopt;
  if (h.scalar_type() == at::kFloat) return forward_impl<float>(hd, Wd, bd);
  return forward_impl<double>(hd, Wd, bd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpp(
    const at::Tensor& g, const at::Tensor& h, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& lse, double label_smoothing) {
  check_inputs("backward", h, W, bias);
  const int64_t n = h.size(0);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == n,
              "fastrec linear_cross_entropy backward (cpp): target must be int64 (N,), got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(g.scalar_type() == h.scalar_type() && g.dim() == 1 && g.size(0) == n,
              "fastrec linear_cross_entropy backward (cpp): g must be (N,) of h's dtype");
  TORCH_CHECK(lse.scalar_type() == h.scalar_type() && lse.dim() == 1 && lse.size(0) == n,
              "fastrec linear_cross_entropy backward (cpp): lse must be (N,) of h's dtype");
  const at::Tensor hd = h.detach(), Wd = W.detach();
  const c10::optional<at::Tensor> bd = bias.has_value() ? c10::optional<at::Tensor>(bias->detach()) : c10::nullopt;
  if (h.scalar_type() == at::kFloat) return backward_impl<float>(g.detach(), hd, Wd, bd, target, lse.detach(), label_smoothing);
  return backward_impl<double>(g.detach(), hd, Wd, bd, target, lse.detach(), label_smoothing);
}

}  // namespace
}  // namespace lce
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def("linear_cross_entropy_forward_cpp(Tensor h, Tensor W, Tensor? bias) -> Tensor");
  m.def(
      "linear_cross_entropy_backward_cpp(Tensor g, Tensor h, Tensor W, Tensor? bias, Tensor target, Tensor lse, "
      "float label_smoothing) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("linear_cross_entropy_forward_cpp", &fastrec::lce::linear_cross_entropy_forward_cpp);
  m.impl("linear_cross_entropy_backward_cpp", &fastrec::lce::linear_cross_entropy_backward_cpp);
}
