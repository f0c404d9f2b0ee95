// Fused softmax attention on the CPU, forward and backward:
//   torch.ops.fastrec.attention_forward_cpp(q, k, v, key_padding_mask, lengths, bias, seed,
//                                           causal, scale, dropout_p, dropout_mask=None,
//                                           return_probs=False) -> (out, lse, probs)
//   torch.ops.fastrec.attention_backward_cpp(grad_out, q, k, v, out, lse, key_padding_mask,
//                                            lengths, bias, seed, causal, scale, dropout_p,
//                                            dropout_mask=None) -> (dq, dk, dv)
// Semantics (masks, dropout stream, fully masked rows) are those of the Triton kernels in
// kernels/attention.py; the readable reference is the torch backend in fastrec/ops/attention.py.
// A bool dropout_mask (B, H, Lq, Lk) replaces the Philox draw (fastrec.use_dropout_stream).
// return_probs=True also writes probs (B, H, Lq, Lk): the attention probabilities after dropout
// (what torch.nn.MultiheadAttention returns with need_weights=True); else probs is empty.
//
// Layout of the work: one (batch, head) pair per task, in parallel over B * H. Per task, K is
// copied once transposed to (D, Lk) (so that query rows times K are FMAs over contiguous keys)
// and zero-padded to multiples of kW; V, Q, dO are read in place when they are fp32/fp64 rows
// of unit stride with D a multiple of kW, else copied padded. Query rows are then processed kR
// at a time: scores for those rows only (never an L x L matrix), a row softmax with a
// polynomial exp on SIMD vectors, and P @ V; each block stops at the last key any of its rows
// may see (causal, padding). The backward recomputes P from the saved log-sum-exp and
// accumulates dK and dV in per-task buffers (no races, bitwise deterministic).
//
// Inner loops use GCC / Clang vector extensions (64-byte vectors: 16 floats, 8 doubles), so the
// code is SIMD whatever the auto-vectoriser decides; -march=native picks the instruction set.
// Parallelism uses at::parallel_for, which only runs in parallel when this file is compiled
// with -fopenmp (ATen's OpenMP backend is header-inline); without it the kernels run on one
// thread.
#if !defined(_OPENMP)
#pragma message("fastrec attention.cpp built without -fopenmp: at::parallel_for will run serially")
#endif
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "attention.h"
#include "philox.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastrec {
namespace {

constexpr int64_t kW = 16;  // chunk width: keys and features are padded to multiples of kW
constexpr int kR = 8;       // query rows processed together (each K / V load feeds kR FMAs)

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// ---------------------------------------------------------------------------------------------
// SIMD vectors (GCC / Clang vector extensions; GCC's loop vectoriser turns the row-blocked
// kernels below into shuffles, explicit vectors give one FMA per vector)
// ---------------------------------------------------------------------------------------------

// x with lanes l and l ^ Half swapped, for every lane l.
template <int Half, typename V, size_t... l>
inline V swap_lanes(const V& x, std::index_sequence<l...>) {
  return __builtin_shufflevector(x, x, (l ^ Half)...);
}

// Horizontal reduction of a Vec in log2(lanes) shuffle + op steps (a 16-long serial chain of
// scalar ops costs as much as the exp of the row).
template <typename T, typename Op>
inline T vreduce(Vec<T> x, Op op) {
  constexpr auto lanes = std::make_index_sequence<kN<T>>{};
  if constexpr (kN<T> >= 16) x = op(x, swap_lanes<8>(x, lanes));
  x = op(x, swap_lanes<4>(x, lanes));
  x = op(x, swap_lanes<2>(x, lanes));
  x = op(x, swap_lanes<1>(x, lanes));
  return x[0];
}
template <typename T>
inline T vsum(const Vec<T>& x) {
  return vreduce<T>(x, [](const Vec<T>& a, const Vec<T>& b) { return a + b; });
}
template <typename T>
inline T vmax(const Vec<T>& x) {
  // NaN-propagating: a NaN score makes the row's max NaN (its output NaN, as in torch)
  return vreduce<T>(x, [](const Vec<T>& a, const Vec<T>& b) { return (a > b) | (a != a) ? a : b; });
}

// 16 x 16 transpose of floats: rows v[i] become columns. Four butterfly stages; stage b
// exchanges bit b of the row index with bit b of the lane index (one two-source shuffle each).
template <int B, size_t... l>
inline Vec<float> interleave_lo(const Vec<float>& a, const Vec<float>& b,
                                std::index_sequence<l...>) {
  return __builtin_shufflevector(a, b, ((l & B) ? 16 + l - B : l)...);
}
template <int B, size_t... l>
inline Vec<float> interleave_hi(const Vec<float>& a, const Vec<float>& b,
                                std::index_sequence<l...>) {
  return __builtin_shufflevector(a, b, ((l & B) ? 16 + l : l + B)...);
}
template <int B>
inline void transpose_stage(Vec<float>* v) {
  constexpr auto lanes = std::make_index_sequence<16>{};
  for (int i = 0; i < 16; ++i) {
    if (i & B) continue;
    const Vec<float> a = v[i], b = v[i + B];
    v[i] = interleave_lo<B>(a, b, lanes);
    v[i + B] = interleave_hi<B>(a, b, lanes);
  }
}
inline void transpose16(Vec<float>* v) {
  transpose_stage<8>(v);
  transpose_stage<4>(v);
  transpose_stage<2>(v);
  transpose_stage<1>(v);
}

// ---------------------------------------------------------------------------------------------
// log (exp is in simd.h)
// ---------------------------------------------------------------------------------------------

// log(x) on 16 floats for x >= FLT_MIN (finite, normal): x = m 2^e with m in [sqrt(1/2),
// sqrt(2)), log(m) by the Cephes logf polynomial in f = m - 1. Max error ~1 ulp.
inline Vec<float> vlog(Vec<float> x) {
  using VI = int32_t __attribute__((vector_size(64)));
  const VI bits = reinterpret_cast<const VI&>(x);
  VI e = (bits >> 23) - 127;
  const VI mbits = (bits & 0x7FFFFF) | 0x3F800000;  // mantissa in [1, 2)
  Vec<float> mant = reinterpret_cast<const Vec<float>&>(mbits);
  const auto big = mant > 1.41421356237f;
  mant = big ? mant * 0.5f : mant;
  e = big ? e + 1 : e;
  const Vec<float> ef = __builtin_convertvector(e, Vec<float>);
  const Vec<float> f = mant - 1.0f;
  const Vec<float> z = f * f;
  Vec<float> y = vsplat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return f + y + ef * 0.693359375f;
}

inline Vec<double> vlog(Vec<double> x) {
  for (int w = 0; w < kN<double>; ++w) x[w] = std::log(x[w]);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10, bit-exact with fastrec/_philox.py (and tl.philox in Triton)
// ---------------------------------------------------------------------------------------------

// z[t] = keep(t) ? inv_keep : 0 for t < n <= 4 * kW, where key t of the chunk draws Philox with
// counter (c0 + t / 4, c1, 0, 0) and key (key0, key1) and takes output word t % 4: u = (word >> 8)
// * 2^-24, keep iff u >= threshold. c0 = i * ceil(Lk / 4) + j0 / 4 (query i, first key j0 of the
// chunk), c1 = b * H + h. The threshold is dropout_p in fp32, as in the reference (a float32
// tensor compared with a Python float).
template <typename acc_t>
inline void dropout_chunk(uint32_t c0, uint32_t c1, uint32_t key0, uint32_t key1, float threshold,
                          acc_t inv_keep, int64_t n, acc_t* __restrict z) {
  static_assert(kW == 16, "one Philox vector of 16 counters per 4 * kW keys");
  PhiloxU32 words[4];
  philox4x16(c0, c1, key0, key1, words);
  acc_t zw[4][16];
  for (int k = 0; k < 4; ++k) {
    const PhiloxF32 u = philox_word_uniform(words[k]);
    for (int w = 0; w < 16; ++w) zw[k][w] = u[w] >= threshold ? inv_keep : acc_t(0);
  }
  for (int64_t t = 0; t < n; ++t) z[t] = zw[t % 4][t / 4];
}

// ---------------------------------------------------------------------------------------------
// Small matrix kernels on padded scratch (kR rows at a time, one SIMD vector of columns)
// ---------------------------------------------------------------------------------------------

// What rows_times_cols does with a product before storing it. Scores: s = scale * (q . k) +
// addk[j] (0 or -inf: key masks), and -inf where j > row0 + r (causal, row0 >= 0). Plain
// products (dP = dO . v): scale 1, no addk, row0 < 0.
template <typename T>
struct ScoreEpilogue {
  T scale = 1;
  const T* addk = nullptr;  // (Lkp) or null
  int64_t row0 = -1;        // query index of row 0 of the block when causal, else -1
};

// Lane indices 0, 1, ..., kN - 1 as a vector of T-sized integers.
template <typename T>
using IntOf = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // same width as T
template <typename T>
struct IVecOf {
  typedef IntOf<T> type __attribute__((vector_size(64)));
};
template <typename T>
using IVec = typename IVecOf<T>::type;
template <typename T>
inline IVec<T> lane_index() {
  IVec<T> x = {};
  for (int w = 0; w < kN<T>; ++w) x[w] = w;
  return x;
}

// out[r][c + j] = epi(sum_{d < D} a[r][d] * bt[d][c + j]), for r < kR and j < NV vectors.
template <int NV, typename T>
inline void rows_times_cols_tile(const T* __restrict a, int64_t lda, const T* __restrict bt,
                                 int64_t ldb, int64_t D, int64_t c, const ScoreEpilogue<T>& epi,
                                 T* __restrict out, int64_t ldo) {
  Vec<T> acc[kR][NV] = {};
  for (int64_t d = 0; d < D; ++d) {
    Vec<T> col[NV];
    for (int u = 0; u < NV; ++u) col[u] = vload(bt + d * ldb + c + u * kN<T>);
    for (int r = 0; r < kR; ++r) {
      const T ar = a[r * lda + d];
      for (int u = 0; u < NV; ++u) acc[r][u] += ar * col[u];
    }
  }
  for (int u = 0; u < NV; ++u) {
    const int64_t cu = c + u * kN<T>;
    const Vec<T> addk = epi.addk ? vload(epi.addk + cu) : Vec<T>{};
    const IVec<T> key = lane_index<T>() + static_cast<IntOf<T>>(cu);  // Lk < 2^31
    for (int r = 0; r < kR; ++r) {
      Vec<T> x = acc[r][u] * epi.scale + addk;
      if (epi.row0 >= 0) x = key > static_cast<IntOf<T>>(epi.row0 + r) ? vsplat(-kInf<T>) : x;
      vstore(out + r * ldo + cu, x);
    }
  }
}

// out[r][j] = epi(sum_{d < D} a[r][d] * bt[d][j]), for r < kR and j in [c0, c1) (multiples of
// kW). a: (kR, lda) query-like rows; bt: (D, ldb) keys stored by column; out: (kR, ldo).
// Two vectors of keys per pass: each broadcast a[r][d] then feeds two FMAs.
template <typename T>
void rows_times_cols(const T* __restrict a, int64_t lda, const T* __restrict bt, int64_t ldb,
                     int64_t D, int64_t c0, int64_t c1, const ScoreEpilogue<T>& epi,
                     T* __restrict out, int64_t ldo) {
  int64_t c = c0;
  for (; c + 2 * kN<T> <= c1; c += 2 * kN<T>)
    rows_times_cols_tile<2>(a, lda, bt, ldb, D, c, epi, out, ldo);
  if (c < c1) rows_times_cols_tile<1>(a, lda, bt, ldb, D, c, epi, out, ldo);
}

// out[r][:Dp] = sum_{j in [j0, j1)} p[r][j] * m[j][:Dp], for r < kR.
// p: (kR, ldp) weights; m: (>= j1, ldm) rows (values or keys); out: (kR, Dp).
template <typename T>
void rows_times_rows(const T* __restrict p, int64_t ldp, int64_t j0, int64_t j1,
                     const T* __restrict m, int64_t ldm, int64_t Dp, T* __restrict out) {
  for (int64_t c = 0; c < Dp; c += kN<T>) {
    Vec<T> acc[kR] = {};
    for (int64_t j = j0; j < j1; ++j) {
      const Vec<T> row = vload(m + j * ldm + c);
      for (int r = 0; r < kR; ++r) acc[r] += p[r * ldp + j] * row;
    }
    for (int r = 0; r < kR; ++r) vstore(out + r * Dp + c, acc[r]);
  }
}

// acc[j][:Dp] += sum_{r < kR} x[r][j] * y[r][:Dp], for j in [j0, j1) (dK and dV updates).
// x: (kR, ldx) weights; y: (kR, ldy) rows; acc: (>= j1, Dp).
template <typename T>
void rank_update(const T* __restrict x, int64_t ldx, const T* __restrict y, int64_t ldy,
                 int64_t Dp, int64_t j0, int64_t j1, T* __restrict acc) {
  for (int64_t c = 0; c < Dp; c += kN<T>) {
    Vec<T> yr[kR];
    for (int r = 0; r < kR; ++r) yr[r] = vload(y + r * ldy + c);
    for (int64_t j = j0; j < j1; ++j) {
      Vec<T> a = vload(acc + j * Dp + c);
      for (int r = 0; r < kR; ++r) a += x[r * ldx + j] * yr[r];
      vstore(acc + j * Dp + c, a);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description
// ---------------------------------------------------------------------------------------------

// Read-only strided view of a (B, H, L, D) tensor (or (B, H, L) with s3 unused).
template <typename T>
struct View4 {
  const T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const T* row(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  View4<T> v;
  v.data = t.data_ptr<T>();
  v.s0 = t.stride(0);
  v.s1 = t.stride(1);
  v.s2 = t.stride(2);
  v.s3 = t.dim() > 3 ? t.stride(3) : 0;
  return v;
}

// Everything but the tensors being computed: sizes, masks, dropout.
template <typename acc_t>
struct Masks {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
  int64_t Lkp = 0, Dp = 0;          // Lk and D rounded up to kW
  acc_t scale = 1;
  const bool* kpm = nullptr;        // (B, Lk), True = key ignored; or null
  const int32_t* lengths = nullptr; // (B,), key j allowed iff j < lengths[b]; or null
  const acc_t* bias = nullptr;      // (B|1, H|1, Lq, Lk) added to scores; or null
  int64_t bs0 = 0, bs1 = 0, bs2 = 0, bs3 = 0;  // bias strides, 0 on broadcast dims
  bool causal = false;
  bool dropout = false;
  float threshold = 0;              // dropout_p in fp32
  acc_t inv_keep = 1;               // 1 / (1 - dropout_p)
  uint32_t key0 = 0, key1 = 0;      // Philox key from the seed
  const bool* keep = nullptr;       // (B, H, Lq, Lk) given dropout draw (replaces Philox); or null
};

// addk[j] = 0 where key j of batch row b may be attended (padding mask and lengths), -inf
// elsewhere, for j < Lkp (the padded tail is -inf). Returns [jlo, jhi): the first and one past
// the last allowed key; jlo >= jhi when there is none. addk: (Lkp).
template <typename acc_t>
void key_mask(const Masks<acc_t>& m, int64_t b, acc_t* addk, int64_t& jlo, int64_t& jhi) {
  int64_t n = m.Lk;
  if (m.lengths) n = std::min<int64_t>(std::max<int64_t>(m.lengths[b], 0), m.Lk);
  const bool* pad = m.kpm ? m.kpm + b * m.Lk : nullptr;
  jlo = n;
  jhi = 0;
  for (int64_t j = 0; j < m.Lkp; ++j) {
    const bool ok = j < n && !(pad && pad[j]);
    addk[j] = ok ? acc_t(0) : -kInf<acc_t>;
    if (ok) {
      jlo = std::min(jlo, j);
      jhi = j + 1;
    }
  }
}

// Adds the bias to the scores of the nrows real rows of a block starting at query i0, key
// chunks [c0, c1). s: (kR, Lkp); bias_bh: the bias at (b, h), rows strided by bs2, keys by bs3.
template <typename acc_t>
void add_bias(const Masks<acc_t>& m, const acc_t* bias_bh, int64_t i0, int nrows, int64_t c0,
              int64_t c1, acc_t* __restrict s) {
  const int64_t jb = std::min(c1, m.Lk);  // bias exists for j < Lk only
  for (int r = 0; r < nrows; ++r) {
    acc_t* __restrict sr = s + r * m.Lkp;
    const acc_t* __restrict br = bias_bh + (i0 + r) * m.bs2;
    if (m.bs3 == 1) {
      for (int64_t j = c0; j < jb; ++j) sr[j] += br[j];
    } else {
      for (int64_t j = c0; j < jb; ++j) sr[j] += br[j * m.bs3];
    }
  }
}

// Masked scores of the kR query rows starting at i0 (nrows real) against key chunks [c0, c1):
// s = scale * (q_i . k_j) + key mask + bias, -inf where causal forbids. qb: (kR, ldq) rows;
// kt: (D, Lkp) keys by column; addk: (Lkp); bias_bh: bias at (b, h) or null; s: (kR, Lkp).
template <typename acc_t>
void block_scores(const Masks<acc_t>& m, const acc_t* qb, int64_t ldq, const acc_t* kt,
                  const acc_t* addk, const acc_t* bias_bh, int64_t i0, int nrows, int64_t c0,
                  int64_t c1, acc_t* s) {
  ScoreEpilogue<acc_t> epi;
  epi.scale = m.scale;
  epi.addk = addk;
  epi.row0 = m.causal ? i0 : -1;
  rows_times_cols(qb, ldq, kt, m.Lkp, m.D, c0, c1, epi, s, m.Lkp);
  if (bias_bh) add_bias(m, bias_bh, i0, nrows, c0, c1, s);
}

// z row for query i over key chunks [c0, c1): keep / (1 - p) per key. z: (Lkp).
template <typename acc_t>
void dropout_row(const Masks<acc_t>& m, int64_t b, int64_t h, int64_t i, int64_t c0, int64_t c1,
                 acc_t* z) {
  if (m.keep) {
    const bool* __restrict kr = m.keep + ((b * m.H + h) * m.Lq + i) * m.Lk;
    const int64_t jb = std::min(c1, m.Lk);
    for (int64_t j = c0; j < jb; ++j) z[j] = kr[j] ? m.inv_keep : acc_t(0);
    for (int64_t j = std::max(c0, jb); j < c1; ++j) z[j] = acc_t(0);
    return;
  }
  const uint32_t c1_ctr = static_cast<uint32_t>(b * m.H + h);
  const int64_t quads = (m.Lk + 3) / 4;  // Philox counters per query row
  for (int64_t c = c0; c < c1; c += 4 * kW)
    dropout_chunk(static_cast<uint32_t>(i * quads + c / 4), c1_ctr, m.key0, m.key1, m.threshold,
                  m.inv_keep, std::min<int64_t>(4 * kW, c1 - c), z + c);
}

// Rows [i0, i0 + n) of the (L, D) slice (b, h) of t as acc_t rows of width Dp (zero past D),
// followed by zero rows up to n_total: the tensor itself where it already has that layout (acc_t,
// unit stride, D == Dp, n == n_total), else a copy in buf (n_total, Dp). Returns the first row;
// ld receives the row stride.
template <typename scalar_t, typename acc_t>
const acc_t* slice_rows(const View4<scalar_t>& t, int64_t b, int64_t h, int64_t i0, int64_t n,
                        int64_t n_total, const Masks<acc_t>& m, acc_t* buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (t.s3 == 1 && m.D == m.Dp && n == n_total) {
      ld = t.s2;
      return t.row(b, h, i0);
    }
  }
  ld = m.Dp;
  for (int64_t r = 0; r < n_total; ++r) {
    acc_t* __restrict dst = buf + r * m.Dp;
    int64_t e = 0;
    if (r < n) {
      const scalar_t* __restrict src = t.row(b, h, i0 + r);
      if (t.s3 == 1) {
        for (; e < m.D; ++e) dst[e] = static_cast<acc_t>(src[e]);
      } else {
        for (; e < m.D; ++e) dst[e] = static_cast<acc_t>(src[e * t.s3]);
      }
    }
    for (; e < m.Dp; ++e) dst[e] = acc_t(0);
  }
  return buf;
}

// The (Lk, D) slice (b, h) of t transposed: cols[e][j] = t[b, h, j, e], zero for keys in
// [Lk, Lkp). cols: (D, Lkp). Copies kW keys at a time so that stores are contiguous.
template <typename scalar_t, typename acc_t>
void load_cols(const View4<scalar_t>& t, int64_t b, int64_t h, const Masks<acc_t>& m,
               acc_t* __restrict cols) {
  const scalar_t* base = t.row(b, h, 0);
  for (int64_t j0 = 0; j0 < m.Lkp; j0 += kW) {
    const int64_t nj = std::min(kW, m.Lk - j0);
    int64_t e0 = 0;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (nj == kW && t.s3 == 1) {  // full 16 x 16 tiles through registers
        for (; e0 + kW <= m.D; e0 += kW) {
          Vec<float> v[kW];
          for (int64_t w = 0; w < kW; ++w) v[w] = vload(base + (j0 + w) * t.s2 + e0);
          transpose16(v);
          for (int64_t e = 0; e < kW; ++e) vstore(cols + (e0 + e) * m.Lkp + j0, v[e]);
        }
      }
    }
    for (int64_t e = e0; e < m.D; ++e) {
      acc_t* __restrict dst = cols + e * m.Lkp + j0;
      const scalar_t* __restrict src = base + j0 * t.s2 + e * t.s3;
      int64_t w = 0;
      for (; w < nj; ++w) dst[w] = static_cast<acc_t>(src[w * t.s2]);
      for (; w < kW; ++w) dst[w] = acc_t(0);
    }
  }
}

// Keys any of the query rows [i0, i0 + nrows) may see: [jlo, jend), and the chunk-aligned
// range [c0, c1) the score kernels cover. Returns false when the block sees no key.
template <typename acc_t>
bool block_keys(const Masks<acc_t>& m, int64_t jlo, int64_t jhi, int64_t i0, int nrows,
                int64_t& jend, int64_t& c0, int64_t& c1) {
  jend = m.causal ? std::min(jhi, i0 + nrows) : jhi;
  if (jend <= jlo) return false;
  c0 = jlo / kW * kW;
  c1 = round_up(jend, kW);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Per-thread scratch of the forward.
template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> kt, vr, addk, qb, s, z, ob;
  explicit ForwardScratch(const Masks<acc_t>& m)
      : kt(m.D * m.Lkp), vr(m.Lk * m.Dp), addk(m.Lkp), qb(kR * m.Dp), s(kR * m.Lkp), z(m.Lkp),
        ob(kR * m.Dp) {}
};

// One (b, h): out[b, h] (Lq, D) contiguous and lse[b, h] (Lq) from q, k, v (strided views);
// probs[b, h] (Lq, Lk) contiguous, the probabilities after dropout, unless probs is null.
template <typename scalar_t, typename acc_t>
void forward_head(const Masks<acc_t>& m, const View4<scalar_t>& q, const View4<scalar_t>& k,
                  const View4<scalar_t>& v, int64_t b, int64_t h, ForwardScratch<acc_t>& ws,
                  scalar_t* out, acc_t* lse, scalar_t* probs) {
  const int64_t D = m.D, Dp = m.Dp, Lkp = m.Lkp;
  int64_t jlo, jhi;
  key_mask(m, b, ws.addk.data(), jlo, jhi);
  if (probs) std::fill(probs, probs + m.Lq * m.Lk, scalar_t(0));  // rows below fill their keys
  if (jlo >= jhi) {  // no key at all: every row is fully masked
    std::fill(out, out + m.Lq * D, scalar_t(0));
    std::fill(lse, lse + m.Lq, kInf<acc_t>);
    return;
  }
  load_cols(k, b, h, m, ws.kt.data());
  int64_t ldv;
  const acc_t* vrows = slice_rows(v, b, h, 0, m.Lk, m.Lk, m, ws.vr.data(), ldv);
  const acc_t* bias_bh = m.bias ? m.bias + b * m.bs0 + h * m.bs1 : nullptr;
  acc_t* s = ws.s.data();  // scores of the block, then P * Z

  for (int64_t i0 = 0; i0 < m.Lq; i0 += kR) {
    const int nrows = static_cast<int>(std::min<int64_t>(kR, m.Lq - i0));
    int64_t jend, c0, c1;
    if (!block_keys(m, jlo, jhi, i0, nrows, jend, c0, c1)) {  // no key for any row
      std::fill(out + i0 * D, out + (i0 + nrows) * D, scalar_t(0));
      std::fill(lse + i0, lse + i0 + nrows, kInf<acc_t>);
      continue;
    }
    int64_t ldq;
    const acc_t* qb = slice_rows(q, b, h, i0, nrows, kR, m, ws.qb.data(), ldq);
    block_scores(m, qb, ldq, ws.kt.data(), ws.addk.data(), bias_bh, i0, nrows, c0, c1, s);

    // Row softmax: P = exp(s - max) / sum; the 1 / sum is applied to the output row.
    acc_t inv_sum[kR] = {};
    Vec<acc_t> row_max = {}, row_sum = vsplat(acc_t(1));  // lanes r < kR used
    for (int r = 0; r < kR; ++r) {
      acc_t* __restrict sr = s + r * Lkp;
      acc_t mx = -kInf<acc_t>;
      if (r < nrows) {
        Vec<acc_t> mv = vsplat(-kInf<acc_t>);
        for (int64_t c = c0; c < c1; c += kN<acc_t>) {
          const Vec<acc_t> x = vload(sr + c);
          mv = (x > mv) | (x != x) ? x : mv;  // NaN propagates: not a fully masked row
        }
        mx = vmax<acc_t>(mv);
      }
      if (mx == -kInf<acc_t>) {  // fully masked row (or padding row of the block)
        std::fill(sr + c0, sr + c1, acc_t(0));
        if (r < nrows) lse[i0 + r] = kInf<acc_t>;
        continue;
      }
      Vec<acc_t> lv = {};
      for (int64_t c = c0; c < c1; c += kN<acc_t>) {
        const Vec<acc_t> p = vexp(vload(sr + c) - mx);
        vstore(sr + c, p);
        lv += p;
      }
      const acc_t l = vsum<acc_t>(lv);
      row_max[r] = mx;
      row_sum[r] = l;
      inv_sum[r] = acc_t(1) / l;
      if (m.dropout) {
        acc_t* __restrict z = ws.z.data();
        dropout_row(m, b, h, i0 + r, c0, c1, z);
        for (int64_t c = c0; c < c1; c += kN<acc_t>) vstore(sr + c, vload(sr + c) * vload(z + c));
      }
    }

    const Vec<acc_t> row_lse = row_max + vlog(row_sum);  // one vector log per block
    for (int r = 0; r < nrows; ++r)
      if (inv_sum[r] != acc_t(0)) lse[i0 + r] = row_lse[r];
    rows_times_rows(s, Lkp, jlo, jend, vrows, ldv, Dp, ws.ob.data());  // (P Z) V
    for (int r = 0; r < nrows; ++r) {
      scalar_t* __restrict o = out + (i0 + r) * D;
      const acc_t* __restrict ob = ws.ob.data() + r * Dp;
      const acc_t inv = inv_sum[r];
      for (int64_t e = 0; e < D; ++e) o[e] = static_cast<scalar_t>(ob[e] * inv);
      if (probs && inv != acc_t(0)) {  // keys outside [c0, c1) keep their zeros
        scalar_t* __restrict pr = probs + (i0 + r) * m.Lk;
        const acc_t* __restrict sr = s + r * Lkp;
        for (int64_t j = c0, je = std::min(c1, m.Lk); j < je; ++j)
          pr[j] = static_cast<scalar_t>(sr[j] * inv);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-thread scratch of the backward.
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> kt, vt, kr, dk, dv, addk, qb, dob, orow, s, dp, z, ob;
  explicit BackwardScratch(const Masks<acc_t>& m)
      : kt(m.D * m.Lkp), vt(m.D * m.Lkp), kr(m.Lk * m.Dp), dk(m.Lk * m.Dp), dv(m.Lk * m.Dp),
        addk(m.Lkp), qb(kR * m.Dp), dob(kR * m.Dp), orow(kR * m.Dp), s(kR * m.Lkp),
        dp(kR * m.Lkp), z(m.Lkp), ob(kR * m.Dp) {}
};

// One (b, h): dq[b, h] (Lq, D), dk[b, h], dv[b, h] (Lk, D), all contiguous, from the strided
// views of grad_out, q, k, v, out (B, H, L, D) and lse (B, H, Lq).
template <typename scalar_t, typename acc_t>
void backward_head(const Masks<acc_t>& m, const View4<scalar_t>& go, const View4<scalar_t>& q,
                   const View4<scalar_t>& k, const View4<scalar_t>& v, const View4<scalar_t>& o,
                   const View4<acc_t>& lse, int64_t b, int64_t h, BackwardScratch<acc_t>& ws,
                   scalar_t* dq, scalar_t* dk, scalar_t* dv) {
  const int64_t D = m.D, Dp = m.Dp, Lkp = m.Lkp;
  int64_t jlo, jhi;
  key_mask(m, b, ws.addk.data(), jlo, jhi);
  if (jlo >= jhi) {  // no key at all: no gradient
    std::fill(dq, dq + m.Lq * D, scalar_t(0));
    std::fill(dk, dk + m.Lk * D, scalar_t(0));
    std::fill(dv, dv + m.Lk * D, scalar_t(0));
    return;
  }
  load_cols(k, b, h, m, ws.kt.data());
  load_cols(v, b, h, m, ws.vt.data());
  int64_t ldk;
  const acc_t* krows = slice_rows(k, b, h, 0, m.Lk, m.Lk, m, ws.kr.data(), ldk);
  std::fill(ws.dk.begin(), ws.dk.end(), acc_t(0));
  std::fill(ws.dv.begin(), ws.dv.end(), acc_t(0));
  const acc_t* bias_bh = m.bias ? m.bias + b * m.bs0 + h * m.bs1 : nullptr;
  const acc_t* lse_bh = lse.row(b, h, 0);
  acc_t* s = ws.s.data();    // scores, then P * Z (the weights of dO in dV)
  acc_t* dp = ws.dp.data();  // dO . v_j, then dS

  for (int64_t i0 = 0; i0 < m.Lq; i0 += kR) {
    const int nrows = static_cast<int>(std::min<int64_t>(kR, m.Lq - i0));
    int64_t jend, c0, c1;
    if (!block_keys(m, jlo, jhi, i0, nrows, jend, c0, c1)) {  // no key: no gradient
      std::fill(dq + i0 * D, dq + (i0 + nrows) * D, scalar_t(0));
      continue;
    }
    int64_t ldq, ldo, ldor;
    const acc_t* qb = slice_rows(q, b, h, i0, nrows, kR, m, ws.qb.data(), ldq);
    const acc_t* dob = slice_rows(go, b, h, i0, nrows, kR, m, ws.dob.data(), ldo);
    const acc_t* orow = slice_rows(o, b, h, i0, nrows, kR, m, ws.orow.data(), ldor);
    block_scores(m, qb, ldq, ws.kt.data(), ws.addk.data(), bias_bh, i0, nrows, c0, c1, s);
    rows_times_cols(dob, ldo, ws.vt.data(), Lkp, D, c0, c1, ScoreEpilogue<acc_t>(), dp, Lkp);

    for (int r = 0; r < kR; ++r) {
      acc_t* __restrict sr = s + r * Lkp;
      acc_t* __restrict dpr = dp + r * Lkp;
      const acc_t row_lse = r < nrows ? lse_bh[(i0 + r) * lse.s2] : kInf<acc_t>;
      if (row_lse == kInf<acc_t>) {  // fully masked row (or padding row of the block)
        std::fill(sr + c0, sr + c1, acc_t(0));
        std::fill(dpr + c0, dpr + c1, acc_t(0));
        continue;
      }
      // Delta_i = dO_i . O_i (O includes dropout); rows are zero-padded past D.
      Vec<acc_t> dv_acc = {};
      for (int64_t c = 0; c < Dp; c += kN<acc_t>)
        dv_acc += vload(dob + r * ldo + c) * vload(orow + r * ldor + c);
      const acc_t delta = vsum<acc_t>(dv_acc);
      for (int64_t c = c0; c < c1; c += kN<acc_t>) {
        const Vec<acc_t> p = vexp(vload(sr + c) - row_lse);
        if (m.dropout) {
          acc_t* __restrict z = ws.z.data();
          if (c == c0) dropout_row(m, b, h, i0 + r, c0, c1, z);
          const Vec<acc_t> zc = vload(z + c);
          vstore(dpr + c, p * (vload(dpr + c) * zc - delta));  // dS = P (dP Z - Delta)
          vstore(sr + c, p * zc);                              // P Z
        } else {
          vstore(dpr + c, p * (vload(dpr + c) - delta));
          vstore(sr + c, p);
        }
      }
    }

    rank_update(s, Lkp, dob, ldo, Dp, jlo, jend, ws.dv.data());  // dV += (P Z)^T dO
    rank_update(dp, Lkp, qb, ldq, Dp, jlo, jend, ws.dk.data());  // dK += dS^T Q
    rows_times_rows(dp, Lkp, jlo, jend, krows, ldk, Dp, ws.ob.data());  // dQ = dS K
    for (int r = 0; r < nrows; ++r) {
      scalar_t* __restrict dqr = dq + (i0 + r) * D;
      const acc_t* __restrict ob = ws.ob.data() + r * Dp;
      for (int64_t e = 0; e < D; ++e) dqr[e] = static_cast<scalar_t>(ob[e] * m.scale);
    }
  }

  for (int64_t j = 0; j < m.Lk; ++j) {
    const acc_t* __restrict dkr = ws.dk.data() + j * Dp;
    const acc_t* __restrict dvr = ws.dv.data() + j * Dp;
    for (int64_t e = 0; e < D; ++e) {
      dk[j * D + e] = static_cast<scalar_t>(dkr[e] * m.scale);
      dv[j * D + e] = static_cast<scalar_t>(dvr[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Input checks and the operators
// ---------------------------------------------------------------------------------------------

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "fastrec attention (cpp): q, k, v must be CPU tensors, got ",
                t->device());
    TORCH_CHECK(t->dim() == 4, "fastrec attention (cpp): q, k, v must be 4-D (B, H, L, D), got ",
                t->dim(), "-D");
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fastrec attention (cpp): q must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt,
              "fastrec attention (cpp): q, k, v must have the same dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(),
              "fastrec attention (cpp): k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "fastrec attention (cpp): q (B, H, Lq, D) and k (B, H, Lk, D) must agree in B, H "
              "and D, got q ",
              q.sizes(), " and k ", k.sizes());
}

// Fills the masks / dropout part of Masks from the optional inputs, checking them.
template <typename acc_t>
Masks<acc_t> make_masks(const at::Tensor& q, const at::Tensor& k,
                        const std::optional<at::Tensor>& key_padding_mask,
                        const std::optional<at::Tensor>& lengths,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& seed, bool causal, double scale,
                        double dropout_p, const std::optional<at::Tensor>& dropout_mask) {
  Masks<acc_t> m;
  m.B = q.size(0);
  m.H = q.size(1);
  m.Lq = q.size(2);
  m.Lk = k.size(2);
  m.D = q.size(3);
  m.Lkp = round_up(m.Lk, kW);
  m.Dp = round_up(m.D, kW);
  m.scale = static_cast<acc_t>(scale);
  m.causal = causal;
  if (key_padding_mask.has_value()) {
    const at::Tensor& t = *key_padding_mask;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBool && t.dim() == 2 &&
                    t.size(0) == m.B && t.size(1) == m.Lk && t.is_contiguous(),
                "fastrec attention (cpp): key_padding_mask must be a contiguous CPU bool tensor "
                "of shape (B, Lk) = (",
                m.B, ", ", m.Lk, "), got ", t.scalar_type(), " ", t.sizes());
    m.kpm = t.data_ptr<bool>();
  }
  if (lengths.has_value()) {
    const at::Tensor& t = *lengths;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 &&
                    t.size(0) == m.B && t.is_contiguous(),
                "fastrec attention (cpp): lengths must be a contiguous CPU int32 tensor of shape "
                "(B,) = (",
                m.B, ",), got ", t.scalar_type(), " ", t.sizes());
    m.lengths = t.data_ptr<int32_t>();
  }
  if (bias.has_value()) {
    const at::Tensor& t = *bias;
    const auto want = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == want,
                "fastrec attention (cpp): bias must be a CPU ", want, " tensor, got ",
                t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.dim() == 4 && (t.size(0) == m.B || t.size(0) == 1) &&
                    (t.size(1) == m.H || t.size(1) == 1) && t.size(2) == m.Lq && t.size(3) == m.Lk,
                "fastrec attention (cpp): bias must have shape (B or 1, H or 1, Lq, Lk) = (", m.B,
                " or 1, ", m.H, " or 1, ", m.Lq, ", ", m.Lk, "), got ", t.sizes());
    m.bias = t.data_ptr<acc_t>();
    m.bs0 = t.size(0) == 1 ? 0 : t.stride(0);
    m.bs1 = t.size(1) == 1 ? 0 : t.stride(1);
    m.bs2 = t.stride(2);
    m.bs3 = t.stride(3);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "fastrec attention (cpp): dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    m.dropout = true;
    m.inv_keep = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
    if (dropout_mask.has_value()) {
      const at::Tensor& t = *dropout_mask;
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBool && t.dim() == 4 &&
                      t.size(0) == m.B && t.size(1) == m.H && t.size(2) == m.Lq &&
                      t.size(3) == m.Lk && t.is_contiguous(),
                  "fastrec attention (cpp): dropout_mask must be a contiguous CPU bool tensor of "
                  "shape (B, H, Lq, Lk) = (",
                  m.B, ", ", m.H, ", ", m.Lq, ", ", m.Lk, "), got ", t.scalar_type(), " ",
                  t.sizes());
      m.keep = t.data_ptr<bool>();
    } else {
      TORCH_CHECK(seed.has_value(), "fastrec attention (cpp): dropout_p > 0 needs a seed tensor");
      const at::Tensor& t = *seed;
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() >= 1,
                  "fastrec attention (cpp): seed must be a CPU int64 tensor of shape (1,), got ",
                  t.scalar_type(), " ", t.sizes(), " on ", t.device());
      m.threshold = static_cast<float>(dropout_p);
      philox_key(t.data_ptr<int64_t>()[0], &m.key0, &m.key1);
    }
  }
  return m;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpp(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& seed, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& dropout_mask,
    bool return_probs) {
  check_qkv(q, k, v);
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype));
  at::Tensor probs = return_probs
                         ? at::empty({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options())
                         : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "attention_forward_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Masks<acc_t> m = make_masks<acc_t>(q, k, key_padding_mask, lengths, bias, seed, causal,
                                             scale, dropout_p, dropout_mask);
    if (m.B * m.H * m.Lq == 0) return;
    const auto qv = view4<scalar_t>(q), kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    scalar_t* out_p = out.data_ptr<scalar_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    scalar_t* probs_p = return_probs ? probs.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, m.B * m.H, 1, [&](int64_t begin, int64_t end) {
      ForwardScratch<acc_t> ws(m);
      for (int64_t bh = begin; bh < end; ++bh)
        forward_head(m, qv, kv, vv, bh / m.H, bh % m.H, ws, out_p + bh * m.Lq * m.D,
                     lse_p + bh * m.Lq, probs_p ? probs_p + bh * m.Lq * m.Lk : nullptr);
    });
  });
  return {out, lse, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpp(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& seed, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_mask) {
  check_qkv(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastrec attention (cpp): grad_out and out must have q's shape ", q.sizes(),
              ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  grad_out.device().is_cpu() && out.device().is_cpu(),
              "fastrec attention (cpp): grad_out and out must be CPU tensors of q's dtype ",
              q.scalar_type(), ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == lse_dtype && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "fastrec attention (cpp): lse must be a CPU ", lse_dtype,
              " tensor of shape (B, H, Lq) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              "), got ", lse.scalar_type(), " ", lse.sizes());
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "attention_backward_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Masks<acc_t> m = make_masks<acc_t>(q, k, key_padding_mask, lengths, bias, seed, causal,
                                             scale, dropout_p, dropout_mask);
    if (m.B * m.H == 0) return;
    const auto gov = view4<scalar_t>(grad_out), qv = view4<scalar_t>(q), kv = view4<scalar_t>(k),
               vv = view4<scalar_t>(v), ov = view4<scalar_t>(out);
    const auto lv = view4<acc_t>(lse);
    scalar_t* dq_p = dq.data_ptr<scalar_t>();
    scalar_t* dk_p = dk.data_ptr<scalar_t>();
    scalar_t* dv_p = dv.data_ptr<scalar_t>();
    at::parallel_for(0, m.B * m.H, 1, [&](int64_t begin, int64_t end) {
      BackwardScratch<acc_t> ws(m);
      for (int64_t bh = begin; bh < end; ++bh)
        backward_head(m, gov, qv, kv, vv, ov, lv, bh / m.H, bh % m.H, ws,
                      dq_p + bh * m.Lq * m.D, dk_p + bh * m.Lk * m.D, dv_p + bh * m.Lk * m.D);
    });
  });
  return {dq, dk, dv};
}

}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def(
      "attention_forward_cpp(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? lengths, Tensor? bias, Tensor? seed, bool causal, float scale, float dropout_p, "
      "Tensor? dropout_mask=None, bool return_probs=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_backward_cpp(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? key_padding_mask, Tensor? lengths, Tensor? bias, Tensor? seed, "
      "bool causal, float scale, float dropout_p, Tensor? dropout_mask=None) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("attention_forward_cpp", &fastrec::attention_forward_cpp);
  m.impl("attention_backward_cpp", &fastrec::attention_backward_cpp);
}
