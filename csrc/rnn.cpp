// Fused recurrences on the CPU (Elman tanh / relu, GRU, LSTM), forward and backward, for one
// layer and one direction:
//   torch.ops.fastrec.rnn_forward_cpp(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse,
//                                     batch_first=False, batch_sizes=None,
//                                     need_workspace=True)
//       -> (out, h_n, c_n, workspace)
//   torch.ops.fastrec.rnn_backward_cpp(grad_out, grad_h_n, grad_c_n, workspace, w_hh, b_hh, h0,
//                                      c0, lengths, reset, mode, reverse, batch_first=False,
//                                      batch_sizes=None)
//       -> (grad_gx, grad_gh, grad_h0, grad_c0, hprev)
// haste-style split of the work: the caller computes the input projection of every step as one
// GEMM (gx = x W_ih^T + b_ih) before the forward, and the weight gradients as GEMMs after the
// backward (dW_ih = grad_gx^T x, dW_hh = grad_gh^T hprev, the biases as sums, dx = grad_gx
// W_ih); these kernels run only the sequential part. (Single-step cells, at the end of the
// file, are one op each way instead.)
//
// Layouts of the per-step tensors (gx, out, workspace, grad_out, grad_gx, grad_gh, hprev), all
// the same: time-major (T, B, ..); batch-major (B, T, ..) when batch_first, so that a
// batch_first module needs no transposed copies; or packed (N, ..) in PackedSequence order
// when batch_sizes (int64 (T,), non-increasing, batch_sizes[0] = B) is given: the rows of step
// t are the batch_sizes[t] first rows of the batch, so only real rows are stored and computed
// and a step touches only the rows still running (lengths / reset are not taken then).
//
// Equations are PyTorch's (gate order GRU r, z, n; LSTM i, f, g, o; GRU b_hn inside the reset
// product). lengths (int32 (B,), values in [1, T]): row b runs steps 0..len_b-1 (reverse: from
// len_b-1 down to 0); past its length out = 0 and the state is frozen, so h_n is each row's own
// last state. reset (bool (T, B), (B, T) when batch_first): the state of row b is zeroed before
// step t where set.
//
// workspace: (.., K * H) in the compute dtype (fp32, or fp64 for fp64 inputs), entry (t, b)
// holding K slots of H values for the step t of row b:
//   tanh / relu: K = 2: [h_t, hprev]
//   gru:         K = 5: [r, z, n, gh_n = W_hn h + b_hn, hprev]
//   lstm:        K = 6: [i, f, g, o, cprev, hprev]
// where hprev / cprev are the states that entered the step (after reset). Entries of steps a row
// did not run are zero. need_workspace=False (inference) returns a (.., 0) workspace and writes
// none of it.
//
// Layout of the work: blocks of rows of the batch are dealt to threads (at::parallel_for, snake
// order so that length-sorted packed batches balance); each thread owns its rows for the whole
// time loop (no per-step synchronisation). W_hh is packed
// once per call: forward by chunks of one SIMD vector of hidden units, (Hp / kN, H, G, kN) with
// Hp = H rounded up to the vector width, so that h (R rows) x W_hh^T for one chunk is an outer
// product of broadcast h values with the chunk's G contiguous gate vectors, accumulated in
// registers for R rows at once and consumed by the gate arithmetic of that chunk before anything
// is stored (gh is never written to memory); backward as (G * Hp, Hp) rows for grad_gh (R rows)
// x W_hh. Inner loops use GCC / Clang vector extensions (64-byte vectors), polynomial exp and a
// rational tanh; the GRU / LSTM workspace is written with streaming stores (it is read only by
// the backward, and is the largest output).
#if !defined(_OPENMP)
#pragma message("fastrec rnn.cpp built without -fopenmp: at::parallel_for will run serially")
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "buffers.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastrec {
namespace {

// ---------------------------------------------------------------------------------------------
// SIMD vectors
// ---------------------------------------------------------------------------------------------

// First n lanes (n <= kN), the others zero: unpadded (.., H) rows of the tensors.
template <typename T>
inline Vec<T> vload_n(const T* p, int64_t n) {
  if (n == kN<T>) return vload(p);
  Vec<T> x = {};
  std::memcpy(&x, p, n * sizeof(T));
  return x;
}
template <typename T>
inline void vstore_n(T* p, const Vec<T>& x, int64_t n) {
  if (n == kN<T>) return vstore(p, x);
  std::memcpy(p, &x, n * sizeof(T));
}

// Stores of the workspace, which is read again only by the backward: streaming (non-temporal)
// stores where the vector is full and 64-byte aligned, so that its cache lines are neither
// read for ownership nor kept in the caches the recurrence works in. stream_fence() orders
// them before the workspace is handed back.
template <typename T>
inline void vstream_n(T* p, const Vec<T>& x, int64_t n) {
#if defined(__AVX512F__)
  if (n == kN<T> && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    if constexpr (sizeof(T) == 4) {
      _mm512_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<const __m512&>(x));
    } else {
      _mm512_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<const __m512d&>(x));
    }
    return;
  }
#endif
  vstore_n(p, x, n);
}
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// 1 / d for d >= 1 (finite): the 14-bit hardware estimate and one Newton step (~1 ulp), which
// is 3 pipelined ops instead of a division with a throughput of several cycles per vector.
inline Vec<float> vrecip(Vec<float> d) {
#if defined(__AVX512F__)
  const Vec<float> r = reinterpret_cast<Vec<float>>(_mm512_rcp14_ps(reinterpret_cast<__m512>(d)));
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// vexp overflows to +inf for x <~ -88.4, where vrecip's Newton step would give NaN: sigmoid is 0
// there (NaN still propagates: NaN == inf is false).
inline Vec<float> vsigmoid(Vec<float> x) {
  const Vec<float> d = 1.0f + vexp(-x);
  return d == vsplat(std::numeric_limits<float>::infinity()) ? Vec<float>{} : vrecip(d);
}

// tanh on 16 floats: odd rational approximation p(x) / q(x^2) of degrees 13 / 6 on x clamped to
// +-7.9 (where tanh rounds to +-1), Eigen's ptanh_float coefficients; a few ulp, no cancellation
// near 0, one reciprocal and no exp.
inline Vec<float> vtanh(Vec<float> x) {
  const Vec<float> c = Vec<float>{} + 7.90531110763549805f;
  x = x > c ? c : x;
  x = x < -c ? -c : x;
  const Vec<float> x2 = x * x;
  Vec<float> p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  Vec<float> q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p * vrecip(q);
}

// fp64 is the gradcheck path: accuracy over speed.
inline Vec<double> vsigmoid(Vec<double> x) {
  for (int w = 0; w < kN<double>; ++w) x[w] = 1.0 / (1.0 + std::exp(-x[w]));
  return x;
}
inline Vec<double> vtanh(Vec<double> x) {
  for (int w = 0; w < kN<double>; ++w) x[w] = std::tanh(x[w]);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Problem description
// ---------------------------------------------------------------------------------------------

enum class Mode { kTanh, kRelu, kGru, kLstm };

constexpr int gates_of(Mode m) { return m == Mode::kGru ? 3 : m == Mode::kLstm ? 4 : 1; }
constexpr int slots_of(Mode m) { return m == Mode::kGru ? 5 : m == Mode::kLstm ? 6 : 2; }

Mode parse_mode(c10::string_view mode) {
  const std::string s(mode.data(), mode.size());
  if (s == "tanh") return Mode::kTanh;
  if (s == "relu") return Mode::kRelu;
  if (s == "gru") return Mode::kGru;
  if (s == "lstm") return Mode::kLstm;
  TORCH_CHECK(false, "fastrec rnn (cpp): mode must be 'tanh', 'relu', 'gru' or 'lstm', got '", s,
              "'");
}

template <typename T>
struct Problem {
  int64_t steps = 0, B = 0, H = 0, G = 1, K = 2;
  int64_t Hp = 0;  // H rounded up to kN<T>
  bool reverse = false;
  const int32_t* lengths = nullptr;  // (B) or null
  const bool* reset = nullptr;       // (steps, B) or null
  // forward packing, by chunks of kN hidden units (Hp / kN, H, G, kN), so that one chunk's
  // gate columns are one contiguous stream over k: wt[j / kN][k][g][j % kN] = w_hh[g * H + j][k]
  std::vector<T> wt;
  std::vector<T> wp;    // backward packing (G * Hp, Hp): wp[g * Hp + k][j] = w_hh[g * H + k][j]
  std::vector<T> bias;  // (G * Hp) b_hh padded, zeros when there is none

  // Layout of the (t, b) rows of gx / out / workspace and the gradients: dense with strides
  // (time-major: st = B, sb = 1; batch-major: st = 1, sb = steps), or packed (PackedSequence
  // order: the batch_sizes[t] rows of step t, a prefix of the batch, start at offsets[t]).
  int64_t st = 0, sb = 1;
  bool packed = false;
  std::vector<int64_t> offsets;       // (steps) packed only
  std::vector<int32_t> packed_lens;   // (B) packed only: rows of step t are b < batch_sizes[t]

  int64_t length(int64_t b) const { return lengths ? lengths[b] : steps; }
  // Time index of processing step s of a row of length len (s < len).
  int64_t time(int64_t s, int64_t len) const { return reverse ? len - 1 - s : s; }
  // Row of entry (t, b) in gx / out / workspace; packed: only for t < length(b).
  int64_t index(int64_t t, int64_t b) const { return packed ? offsets[t] + b : t * st + b * sb; }
  bool is_reset(int64_t t, int64_t b) const { return reset && reset[t * st + b * sb]; }
};

// ---------------------------------------------------------------------------------------------
// The recurrent matrix product: R rows times NV vectors of packed columns
// ---------------------------------------------------------------------------------------------

// acc[r][u] = sum over segments g < nseg, k < K of a[r * lda + g * sa + k] * w[(g * sa + k) * ldw
// + off + u * ostride]. Each broadcast a value feeds NV FMAs, each w vector R FMAs.
template <int R, int NV, typename T>
__attribute__((always_inline)) inline void rows_times_packed(
    const T* __restrict a, int64_t lda, int64_t nseg, int64_t sa, int64_t K,
    const T* __restrict w, int64_t ldw, int64_t off, int64_t ostride, Vec<T> (&acc)[R][NV]) {
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = Vec<T>{};
  for (int64_t g = 0; g < nseg; ++g) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = g * sa + k;
      const T* __restrict wr = w + j * ldw + off;
      Vec<T> col[NV];
      for (int u = 0; u < NV; ++u) col[u] = vload(wr + u * ostride);
      for (int r = 0; r < R; ++r) {
        const T ar = a[r * lda + j];
        for (int u = 0; u < NV; ++u) acc[r][u] += ar * col[u];
      }
    }
  }
}

// Row state of one block of a processing step.
template <int R>
struct BlockRows {
  int nr = 0;          // real rows in the block (<= R)
  bool any = false;    // some row runs this step
  bool active[R] = {};
  int64_t b[R] = {};   // batch index
  int64_t t[R] = {};   // time index of the step (s when inactive)
};

template <int R, typename T>
BlockRows<R> block_rows(const Problem<T>& p, int64_t s, const int64_t* rows, int nr) {
  BlockRows<R> br;
  br.nr = nr;
  for (int r = 0; r < nr; ++r) {
    const int64_t b = rows[r], len = p.length(b);
    br.b[r] = b;
    br.active[r] = s < len;
    br.t[r] = s < len ? p.time(s, len) : s;
    br.any = br.any || br.active[r];
  }
  return br;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

// Gate arithmetic of the forward for row r of a block at column chunk c (nc real lanes).
// acc holds W_hh h for the chunk: per gate (GRU / LSTM), or per chunk u (Elman, c = c0 + u kN).
template <Mode M, int R, int NV, typename T>
__attribute__((always_inline)) inline void forward_epilogue(
    const Problem<T>& p, const Vec<T> (&acc)[R][NV], int r, int u, int64_t c, int64_t nc,
    const T* __restrict gxr, const T* __restrict hprev, T* __restrict hnext, T* __restrict crow,
    T* __restrict outr, T* __restrict wsr) {
  const int64_t H = p.H, Hp = p.Hp;
  const T* bias = p.bias.data();
  if constexpr (M == Mode::kTanh || M == Mode::kRelu) {
    Vec<T> y = vload_n(gxr + c, nc) + acc[r][u] + vload(bias + c);
    if constexpr (M == Mode::kTanh) {
      y = vtanh(y);
    } else {
      y = y < T(0) ? Vec<T>{} : y;  // relu; NaN propagates
    }
    vstore(hnext + c, y);
    vstore_n(outr + c, y, nc);
    if (wsr) vstore_n(wsr + c, y, nc);  // small workspace: streaming does not pay
  } else if constexpr (M == Mode::kGru) {
    const Vec<T> rg = vsigmoid(vload_n(gxr + c, nc) + acc[r][0] + vload(bias + c));
    const Vec<T> z = vsigmoid(vload_n(gxr + H + c, nc) + acc[r][1] + vload(bias + Hp + c));
    const Vec<T> ghn = acc[r][2] + vload(bias + 2 * Hp + c);
    const Vec<T> n = vtanh(vload_n(gxr + 2 * H + c, nc) + rg * ghn);
    const Vec<T> h = n + z * (vload(hprev + c) - n);  // (1 - z) n + z h
    vstore(hnext + c, h);
    vstore_n(outr + c, h, nc);
    if (wsr) {
      vstream_n(wsr + c, rg, nc);
      vstream_n(wsr + H + c, z, nc);
      vstream_n(wsr + 2 * H + c, n, nc);
      vstream_n(wsr + 3 * H + c, ghn, nc);
    }
  } else {
    const Vec<T> i = vsigmoid(vload_n(gxr + c, nc) + acc[r][0] + vload(bias + c));
    const Vec<T> f = vsigmoid(vload_n(gxr + H + c, nc) + acc[r][1] + vload(bias + Hp + c));
    const Vec<T> g = vtanh(vload_n(gxr + 2 * H + c, nc) + acc[r][2] + vload(bias + 2 * Hp + c));
    const Vec<T> o = vsigmoid(vload_n(gxr + 3 * H + c, nc) + acc[r][3] + vload(bias + 3 * Hp + c));
    const Vec<T> cp = vload(crow + c);
    const Vec<T> cn = f * cp + i * g;
    const Vec<T> h = o * vtanh(cn);
    vstore(crow + c, cn);
    vstore(hnext + c, h);
    vstore_n(outr + c, h, nc);
    if (wsr) {
      vstream_n(wsr + c, i, nc);
      vstream_n(wsr + H + c, f, nc);
      vstream_n(wsr + 2 * H + c, g, nc);
      vstream_n(wsr + 3 * H + c, o, nc);
      vstream_n(wsr + 4 * H + c, cp, nc);
    }
  }
}

// One block of R rows (state rows hcur / hnext / cst, stride Hp) at one processing step: the
// columns [c0, c0 + NV kN) (Elman) or the gate chunk at c0 (GRU, LSTM: NV = G).
template <Mode M, int R, int NV, typename T>
void forward_block_cols(const Problem<T>& p, const BlockRows<R>& br, int64_t c0, const T* gx,
                        const T* hcur, T* hnext, T* cst, T* out, T* ws) {
  const int64_t H = p.H, Hp = p.Hp, G = p.G, K = p.K;
  constexpr bool kElman = M == Mode::kTanh || M == Mode::kRelu;
  Vec<T> acc[R][NV];
  // Chunk c0 / kN of wt starts at c0 * H * G; within it row k holds the G gate vectors (GRU,
  // LSTM: NV = G, vectors kN apart); Elman (G = 1) takes NV consecutive chunks (H * kN apart).
  rows_times_packed<R, NV, T>(hcur, Hp, 1, 0, H, p.wt.data() + c0 * H * G, G * kN<T>, 0,
                              kElman ? H * kN<T> : kN<T>, acc);
  for (int r = 0; r < br.nr; ++r) {
    if (!br.active[r]) continue;
    const int64_t tb = p.index(br.t[r], br.b[r]);
    const T* gxr = gx + tb * G * H;
    T* outr = out + tb * H;
    T* wsr = ws ? ws + tb * K * H : nullptr;
    T* crow = cst ? cst + r * Hp : nullptr;
    if constexpr (kElman) {
      for (int u = 0; u < NV; ++u) {
        const int64_t c = c0 + u * kN<T>;
        forward_epilogue<M, R, NV, T>(p, acc, r, u, c, std::min<int64_t>(kN<T>, H - c), gxr,
                                      hcur + r * Hp, hnext + r * Hp, crow, outr, wsr);
      }
    } else {
      forward_epilogue<M, R, NV, T>(p, acc, r, 0, c0, std::min<int64_t>(kN<T>, H - c0), gxr,
                                    hcur + r * Hp, hnext + r * Hp, crow, outr, wsr);
    }
  }
}

// The n rows rows[0..n) of the batch for the whole time loop (packed: in increasing b, so the
// rows still running at a step are a prefix of them and the loop stops at the first block
// with none). A row's final state goes to h_n / c_n at its last step.
template <Mode M, int R, typename T>
void forward_rows(const Problem<T>& p, const int64_t* rows, int64_t n, const T* gx, const T* h0,
                  const T* c0, T* out, T* h_n, T* c_n, T* ws) {
  const int64_t H = p.H, Hp = p.Hp, K = p.K;
  const int64_t nb = round_up(n, R);
  constexpr bool kLstm = M == Mode::kLstm;
  std::vector<T> hbuf(2 * nb * Hp, T(0)), cbuf(kLstm ? nb * Hp : 0, T(0));
  T* hcur = hbuf.data();
  T* hnext = hcur + nb * Hp;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = rows[i];
    std::copy(h0 + b * H, h0 + (b + 1) * H, hcur + i * Hp);
    if constexpr (kLstm) std::copy(c0 + b * H, c0 + (b + 1) * H, &cbuf[i * Hp]);
    if (p.length(b) == 0) {  // no steps at all: the state passes through
      std::copy(h0 + b * H, h0 + (b + 1) * H, h_n + b * H);
      if constexpr (kLstm) std::copy(c0 + b * H, c0 + (b + 1) * H, c_n + b * H);
    }
  }
  // Per step: row bookkeeping for every block, then the matrix product with the column chunks
  // outermost, so that one chunk's slice of W_hh (H x G vectors) stays in L1 while every block
  // of rows passes through it (W_hh as a whole is re-read from L2 once per step, not once per
  // block), then the final states.
  std::vector<BlockRows<R>> brs(nb / R);
  for (int64_t s = 0; s < p.steps; ++s) {
    int64_t live = 0;  // blocks of this step (packed: the blocks before the first idle one)
    for (int64_t rb = 0; rb < n; rb += R, ++live) {
      const BlockRows<R> br =
          block_rows<R>(p, s, rows + rb, static_cast<int>(std::min<int64_t>(R, n - rb)));
      if (p.packed && !br.any) break;
      brs[rb / R] = br;
      T* hc = hcur + rb * Hp;
      T* cs = kLstm ? &cbuf[rb * Hp] : nullptr;
      for (int r = 0; r < br.nr; ++r) {
        if (!br.active[r]) {  // past the row's length: zero output (dense layouts only)
          if (!p.packed) {
            const int64_t tb = p.index(br.t[r], br.b[r]);
            std::fill(out + tb * H, out + (tb + 1) * H, T(0));
            if (ws) std::fill(ws + tb * K * H, ws + (tb + 1) * K * H, T(0));
          }
          continue;
        }
        const int64_t tb = p.index(br.t[r], br.b[r]);
        if (p.is_reset(br.t[r], br.b[r])) {
          std::fill(hc + r * Hp, hc + (r + 1) * Hp, T(0));
          if constexpr (kLstm) std::fill(cs + r * Hp, cs + (r + 1) * Hp, T(0));
        }
        if (!ws) continue;
        T* hprev = ws + tb * K * H + (K - 1) * H;
        for (int64_t c = 0; c < H; c += kN<T>) {
          const Vec<T> x = vload(hc + r * Hp + c);
          const int64_t nc = std::min<int64_t>(kN<T>, H - c);
          if constexpr (M == Mode::kGru || M == Mode::kLstm) {
            vstream_n(hprev + c, x, nc);
          } else {
            vstore_n(hprev + c, x, nc);
          }
        }
      }
    }
    auto blocks = [&](auto nv, int64_t c) {
      constexpr int NV = decltype(nv)::value;
      for (int64_t i = 0; i < live; ++i) {
        if (!brs[i].any) continue;
        const int64_t rb = i * R;
        forward_block_cols<M, R, NV, T>(p, brs[i], c, gx, hcur + rb * Hp, hnext + rb * Hp,
                                        kLstm ? &cbuf[rb * Hp] : nullptr, out, ws);
      }
    };
    using std::integral_constant;
    if constexpr (M == Mode::kGru) {
      for (int64_t c = 0; c < Hp; c += kN<T>) blocks(integral_constant<int, 3>(), c);
    } else if constexpr (M == Mode::kLstm) {
      for (int64_t c = 0; c < Hp; c += kN<T>) blocks(integral_constant<int, 4>(), c);
    } else {
      int64_t c = 0;
      for (; c + 4 * kN<T> <= Hp; c += 4 * kN<T>) blocks(integral_constant<int, 4>(), c);
      switch ((Hp - c) / kN<T>) {
        case 3: blocks(integral_constant<int, 3>(), c); break;
        case 2: blocks(integral_constant<int, 2>(), c); break;
        case 1: blocks(integral_constant<int, 1>(), c); break;
        default: break;
      }
    }
    for (int64_t i = 0; i < live; ++i) {  // rows at their last step: final state
      const BlockRows<R>& br = brs[i];
      const int64_t rb = i * R;
      for (int r = 0; r < br.nr; ++r) {
        if (!br.active[r] || s != p.length(br.b[r]) - 1) continue;
        const int64_t b = br.b[r];
        std::copy(hnext + (rb + r) * Hp, hnext + (rb + r) * Hp + H, h_n + b * H);
        if constexpr (kLstm) std::copy(&cbuf[(rb + r) * Hp], &cbuf[(rb + r) * Hp] + H, c_n + b * H);
      }
    }
    std::swap(hcur, hnext);
  }
  stream_fence();
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// dh (R rows, stride Hp) = carry + dgh_block (R, G * Hp) x W_hh, for the columns [c0, c0 + NV kN).
template <int R, int NV, typename T>
void backward_block_cols(const Problem<T>& p, int nr, int64_t c0, const T* dghs, const T* carry,
                         T* dh) {
  const int64_t Hp = p.Hp;
  Vec<T> acc[R][NV];
  rows_times_packed<R, NV, T>(dghs, p.G * Hp, p.G, Hp, p.H, p.wp.data(), Hp, c0, kN<T>, acc);
  for (int r = 0; r < nr; ++r)
    for (int u = 0; u < NV; ++u) {
      const int64_t c = c0 + u * kN<T>;
      vstore(dh + r * Hp + c, vload(carry + r * Hp + c) + acc[r][u]);
    }
}

// Gate gradients of row r at chunk c (nc real lanes): writes grad_gx / grad_gh rows (unpadded),
// the padded grad_gh row dghr (G * Hp) for the matrix product, carry (what flows to hprev
// directly) and, for LSTM, the cell gradient dcr in place.
template <Mode M, typename T>
__attribute__((always_inline)) inline void backward_gates(
    const Problem<T>& p, int64_t c, int64_t nc, const T* __restrict dhr, const T* __restrict gor,
    const T* __restrict wsr, T* __restrict dcr, T* __restrict dgxr, T* __restrict dghr_out,
    T* __restrict dghr, T* __restrict carryr) {
  const int64_t H = p.H, Hp = p.Hp;
  const Vec<T> dh = vload(dhr + c) + vload_n(gor + c, nc);
  const Vec<T> one = Vec<T>{} + T(1);
  if constexpr (M == Mode::kTanh || M == Mode::kRelu) {
    const Vec<T> y = vload_n(wsr + c, nc);
    Vec<T> d;
    if constexpr (M == Mode::kTanh) {
      d = dh * (one - y * y);
    } else {
      d = y <= T(0) ? Vec<T>{} : dh;  // torch's relu backward: NaN passes dh
    }
    vstore_n(dgxr + c, d, nc);
    vstore_n(dghr_out + c, d, nc);
    vstore(dghr + c, d);
    vstore(carryr + c, Vec<T>{});
  } else if constexpr (M == Mode::kGru) {
    const Vec<T> rg = vload_n(wsr + c, nc), z = vload_n(wsr + H + c, nc),
                 n = vload_n(wsr + 2 * H + c, nc), ghn = vload_n(wsr + 3 * H + c, nc),
                 hp = vload_n(wsr + 4 * H + c, nc);
    const Vec<T> dn = dh * (one - z) * (one - n * n);
    const Vec<T> dz = dh * (hp - n) * z * (one - z);
    const Vec<T> dr = dn * ghn * rg * (one - rg);
    const Vec<T> dnh = dn * rg;
    vstore_n(dgxr + c, dr, nc);
    vstore_n(dgxr + H + c, dz, nc);
    vstore_n(dgxr + 2 * H + c, dn, nc);
    vstore_n(dghr_out + c, dr, nc);
    vstore_n(dghr_out + H + c, dz, nc);
    vstore_n(dghr_out + 2 * H + c, dnh, nc);
    vstore(dghr + c, dr);
    vstore(dghr + Hp + c, dz);
    vstore(dghr + 2 * Hp + c, dnh);
    vstore(carryr + c, dh * z);
  } else {
    const Vec<T> i = vload_n(wsr + c, nc), f = vload_n(wsr + H + c, nc),
                 g = vload_n(wsr + 2 * H + c, nc), o = vload_n(wsr + 3 * H + c, nc),
                 cp = vload_n(wsr + 4 * H + c, nc);
    const Vec<T> tc = vtanh(f * cp + i * g);
    const Vec<T> dc = vload(dcr + c) + dh * o * (one - tc * tc);
    const Vec<T> di = dc * g * i * (one - i);
    const Vec<T> df = dc * cp * f * (one - f);
    const Vec<T> dg = dc * i * (one - g * g);
    const Vec<T> d_o = dh * tc * o * (one - o);
    vstore(dcr + c, dc * f);
    const Vec<T> d[4] = {di, df, dg, d_o};
    for (int q = 0; q < 4; ++q) {
      vstore_n(dgxr + q * H + c, d[q], nc);
      vstore_n(dghr_out + q * H + c, d[q], nc);
      vstore(dghr + q * Hp + c, d[q]);
    }
    vstore(carryr + c, Vec<T>{});
  }
}

template <Mode M, int R, typename T>
void backward_rows(const Problem<T>& p, const int64_t* rows, int64_t n, const T* grad_out,
                   const T* grad_h_n, const T* grad_c_n, const T* ws, T* dgx, T* dgh, T* dh0,
                   T* dc0, T* hprev) {
  const int64_t H = p.H, Hp = p.Hp, G = p.G, K = p.K, GH = G * H;
  const int64_t nb = round_up(n, R);
  constexpr bool kLstm = M == Mode::kLstm;
  std::vector<T> dhbuf(nb * Hp, T(0)), dcbuf(kLstm ? nb * Hp : 0, T(0));
  std::vector<T> carry(R * Hp, T(0)), dghs(R * G * Hp, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = rows[i];
    std::copy(grad_h_n + b * H, grad_h_n + (b + 1) * H, &dhbuf[i * Hp]);
    if constexpr (kLstm) std::copy(grad_c_n + b * H, grad_c_n + (b + 1) * H, &dcbuf[i * Hp]);
  }
  for (int64_t s = p.steps - 1; s >= 0; --s) {
    for (int64_t rb = 0; rb < n; rb += R) {
      const BlockRows<R> br =
          block_rows<R>(p, s, rows + rb, static_cast<int>(std::min<int64_t>(R, n - rb)));
      if (p.packed && !br.any) break;
      T* dh = &dhbuf[rb * Hp];
      T* dc = kLstm ? &dcbuf[rb * Hp] : nullptr;
      for (int r = 0; r < br.nr; ++r) {
        T* dghr = &dghs[r * G * Hp];
        if (!br.active[r]) {  // the state passes through unchanged; no gradient for the step
          std::copy(dh + r * Hp, dh + (r + 1) * Hp, &carry[r * Hp]);
          std::fill(dghr, dghr + G * Hp, T(0));
          if (!p.packed) {
            const int64_t tb = p.index(br.t[r], br.b[r]);
            std::fill(dgx + tb * GH, dgx + (tb + 1) * GH, T(0));
            std::fill(dgh + tb * GH, dgh + (tb + 1) * GH, T(0));
            std::fill(hprev + tb * H, hprev + (tb + 1) * H, T(0));
          }
          continue;
        }
        const int64_t tb = p.index(br.t[r], br.b[r]);
        const T* wsr = ws + tb * K * H;
        std::copy(wsr + (K - 1) * H, wsr + K * H, hprev + tb * H);
        for (int64_t c = 0; c < Hp; c += kN<T>)
          backward_gates<M, T>(p, c, std::min<int64_t>(kN<T>, H - c), dh + r * Hp,
                               grad_out + tb * H, wsr, kLstm ? dc + r * Hp : nullptr,
                               dgx + tb * GH, dgh + tb * GH, dghr, &carry[r * Hp]);
      }
      if (!br.any) continue;
      int64_t c = 0;
      for (; c + 4 * kN<T> <= Hp; c += 4 * kN<T>)
        backward_block_cols<R, 4, T>(p, br.nr, c, dghs.data(), carry.data(), dh);
      switch ((Hp - c) / kN<T>) {
        case 3: backward_block_cols<R, 3, T>(p, br.nr, c, dghs.data(), carry.data(), dh); break;
        case 2: backward_block_cols<R, 2, T>(p, br.nr, c, dghs.data(), carry.data(), dh); break;
        case 1: backward_block_cols<R, 1, T>(p, br.nr, c, dghs.data(), carry.data(), dh); break;
        default: break;
      }
      for (int r = 0; r < br.nr; ++r) {  // the state was zeroed before the step: no gradient
        if (br.active[r] && p.is_reset(br.t[r], br.b[r])) {
          std::fill(dh + r * Hp, dh + (r + 1) * Hp, T(0));
          if constexpr (kLstm) std::fill(dc + r * Hp, dc + (r + 1) * Hp, T(0));
        }
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = rows[i];
    std::copy(&dhbuf[i * Hp], &dhbuf[i * Hp] + H, dh0 + b * H);
    if constexpr (kLstm) std::copy(&dcbuf[i * Hp], &dcbuf[i * Hp] + H, dc0 + b * H);
  }
}

// ---------------------------------------------------------------------------------------------
// Input checks, packing and the operators
// ---------------------------------------------------------------------------------------------

bool is_low_precision(at::ScalarType dt) { return dt == at::kHalf || dt == at::kBFloat16; }

// The layout of the per-step tensors (gx, out, workspace and their gradients), from the
// leading dims of gx (forward) or grad_out (backward) and the optional batch_sizes:
//   time-major (T, B, ..), batch-major (B, T, ..) when batch_first, or packed (N, ..) in
//   PackedSequence order when batch_sizes (int64 (T,), non-increasing, batch_sizes[0] = B,
//   summing to N) is given.
struct Layout {
  int64_t steps = 0;
  std::vector<int64_t> lead;  // leading dims of every per-step tensor
};

Layout layout_of(const at::Tensor& t, const char* name, int64_t B, bool batch_first,
                 const std::optional<at::Tensor>& batch_sizes) {
  Layout l;
  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1 &&
                    bs.is_contiguous(),
                "fastrec rnn (cpp): batch_sizes must be a contiguous CPU int64 tensor of shape "
                "(T,), got ", bs.scalar_type(), " ", bs.sizes());
    TORCH_CHECK(t.dim() == 2, "fastrec rnn (cpp): ", name,
                " must be 2-D (N, features) with batch_sizes, got ", t.dim(), "-D");
    l.steps = bs.size(0);
    l.lead = {t.size(0)};
  } else {
    TORCH_CHECK(t.dim() == 3, "fastrec rnn (cpp): ", name, " must be 3-D ",
                batch_first ? "(B, T, features)" : "(T, B, features)", ", got ", t.dim(), "-D");
    l.steps = t.size(batch_first ? 1 : 0);
    l.lead = batch_first ? std::vector<int64_t>{B, l.steps} : std::vector<int64_t>{l.steps, B};
  }
  return l;
}

std::vector<int64_t> with_last(std::vector<int64_t> lead, int64_t last) {
  lead.push_back(last);
  return lead;
}

// Fills the problem description (everything but the packed weights) and checks the optional
// inputs. B, H from h0, steps from the layout.
template <typename T>
void describe(Problem<T>& p, Mode mode, const Layout& l, int64_t B, int64_t H,
              const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& reset,
              bool reverse, bool batch_first, const std::optional<at::Tensor>& batch_sizes) {
  const int64_t steps = l.steps;
  p.steps = steps;
  p.B = B;
  p.H = H;
  p.G = gates_of(mode);
  p.K = slots_of(mode);
  p.Hp = round_up(std::max<int64_t>(H, 1), kN<T>);
  p.reverse = reverse;
  p.st = batch_first ? 1 : B;
  p.sb = batch_first ? steps : 1;
  if (batch_sizes.has_value()) {
    TORCH_CHECK(!lengths.has_value() && !reset.has_value(),
                "fastrec rnn (cpp): lengths and reset cannot be combined with batch_sizes");
    const int64_t* bs = batch_sizes->data_ptr<int64_t>();
    p.packed = true;
    p.offsets.resize(steps);
    p.packed_lens.assign(B, 0);
    int64_t total = 0;
    for (int64_t t = 0; t < steps; ++t) {
      TORCH_CHECK(bs[t] >= 1 && bs[t] <= (t == 0 ? B : bs[t - 1]) && (t > 0 || bs[0] == B),
                  "fastrec rnn (cpp): batch_sizes must be non-increasing with batch_sizes[0] = B "
                  "= ", B, " and every entry >= 1, got ", bs[t], " at step ", t);
      p.offsets[t] = total;
      total += bs[t];
      for (int64_t b = 0; b < bs[t]; ++b) p.packed_lens[b] += 1;
    }
    TORCH_CHECK(total == l.lead[0], "fastrec rnn (cpp): batch_sizes must sum to the ",
                l.lead[0], " packed rows, got ", total);
    p.lengths = B > 0 ? p.packed_lens.data() : nullptr;
  }
  if (lengths.has_value()) {
    const at::Tensor& t = *lengths;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 &&
                    t.size(0) == B && t.is_contiguous(),
                "fastrec rnn (cpp): lengths must be a contiguous CPU int32 tensor of shape (B,) = (",
                B, ",), got ", t.scalar_type(), " ", t.sizes());
    p.lengths = t.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(p.lengths[b] >= 1 && p.lengths[b] <= steps,
                  "fastrec rnn (cpp): lengths must be in [1, T] = [1, ", steps, "], got ",
                  p.lengths[b], " at row ", b);
  }
  if (reset.has_value()) {
    const at::Tensor& t = *reset;
    const int64_t d0 = batch_first ? B : steps, d1 = batch_first ? steps : B;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBool && t.dim() == 2 &&
                    t.size(0) == d0 && t.size(1) == d1 && t.is_contiguous(),
                "fastrec rnn (cpp): reset must be a contiguous CPU bool tensor of shape ",
                batch_first ? "(B, T)" : "(T, B)", " = (", d0, ", ", d1, "), got ",
                t.scalar_type(), " ", t.sizes());
    p.reset = t.data_ptr<bool>();
  }
}

// Packs w_hh (G * H, H) and b_hh (G * H) into p.wt / p.wp / p.bias (forward or backward).
template <typename T>
void pack_weights(Problem<T>& p, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_hh,
                  bool for_backward) {
  const int64_t H = p.H, Hp = p.Hp, G = p.G;
  const T* w = w_hh.data_ptr<T>();
  if (for_backward) {
    p.wp.assign(G * Hp * Hp, T(0));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < H; ++k)
        std::copy(w + (g * H + k) * H, w + (g * H + k + 1) * H, &p.wp[(g * Hp + k) * Hp]);
  } else {
    p.wt.assign(H * G * Hp, T(0));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < H; ++j) {
        T* dst = &p.wt[((j / kN<T>) * H * G + g) * kN<T> + j % kN<T>];
        const T* src = w + (g * H + j) * H;
        for (int64_t k = 0; k < H; ++k) dst[k * G * kN<T>] = src[k];
      }
    p.bias.assign(G * Hp, T(0));
    if (b_hh.has_value()) {
      const T* bias = b_hh->data_ptr<T>();
      for (int64_t g = 0; g < G; ++g) std::copy(bias + g * H, bias + (g + 1) * H, &p.bias[g * Hp]);
    }
  }
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "fastrec rnn (cpp): ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fastrec rnn (cpp): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes().equals(shape), "fastrec rnn (cpp): ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

// Rows per block of the matrix product (accumulators = R x vectors per block <= 24 registers).
template <Mode M>
constexpr int forward_rows_per_block() { return M == Mode::kGru ? 8 : 6; }
constexpr int kBackwardRows = 6;
// Below this batch the forward runs blocks of one row (a block of R rows costs R rows' FMAs
// however many are real: at batch 1, 8x the work of the recurrence).
constexpr int64_t kSingleRowBatch = 4;

template <typename Fn>
void dispatch_mode(Mode mode, Fn&& fn) {
  switch (mode) {
    case Mode::kTanh: fn(std::integral_constant<Mode, Mode::kTanh>()); break;
    case Mode::kRelu: fn(std::integral_constant<Mode, Mode::kRelu>()); break;
    case Mode::kGru: fn(std::integral_constant<Mode, Mode::kGru>()); break;
    case Mode::kLstm: fn(std::integral_constant<Mode, Mode::kLstm>()); break;
  }
}

// The batch rows of each task (one task per thread at most): blocks of R consecutive rows dealt
// to the tasks in snake order (0, 1, .., n-1, n-1, .., 0, ..), so that packed batches, sorted by
// decreasing length, give every task a similar share of the steps; each task's rows stay in
// increasing order.
std::vector<std::vector<int64_t>> task_rows(int64_t B, int R) {
  const int64_t blocks = (B + R - 1) / R;
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(blocks, at::get_num_threads()));
  std::vector<std::vector<int64_t>> rows(tasks);
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t round = i / tasks, pos = i % tasks;
    auto& dst = rows[round % 2 == 0 ? pos : tasks - 1 - pos];
    for (int64_t b = i * R; b < std::min<int64_t>(B, (i + 1) * R); ++b) dst.push_back(b);
  }
  return rows;
}

template <typename Fn>
void parallel_over_rows(int64_t B, int R, Fn&& fn) {
  const auto rows = task_rows(B, R);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      fn(rows[i].data(), static_cast<int64_t>(rows[i].size()));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_forward_cpp(
    const at::Tensor& gx_in, const at::Tensor& h0_in, const std::optional<at::Tensor>& c0_in,
    const at::Tensor& w_hh_in, const std::optional<at::Tensor>& b_hh_in,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& reset,
    c10::string_view mode_name, bool reverse, bool batch_first,
    const std::optional<at::Tensor>& batch_sizes, bool need_workspace) {
  const Mode mode = parse_mode(mode_name);
  const int64_t G = gates_of(mode), K = need_workspace ? slots_of(mode) : 0;
  TORCH_CHECK(h0_in.dim() == 2, "fastrec rnn (cpp): h0 must be 2-D (B, H), got ", h0_in.dim(),
              "-D");
  const auto dt = gx_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || is_low_precision(dt),
              "fastrec rnn (cpp): gx must be float16, bfloat16, float32 or float64, got ", dt);
  const int64_t B = h0_in.size(0), H = h0_in.size(1);
  const Layout l = layout_of(gx_in, "gx", B, batch_first, batch_sizes);
  const int64_t steps = l.steps;
  check_tensor(gx_in, "gx", dt, with_last(l.lead, G * H));
  check_tensor(h0_in, "h0", dt, {B, H});
  check_tensor(w_hh_in, "w_hh", dt, {G * H, H});
  if (b_hh_in.has_value()) check_tensor(*b_hh_in, "b_hh", dt, {G * H});
  TORCH_CHECK(c0_in.has_value() == (mode == Mode::kLstm),
              "fastrec rnn (cpp): c0 must be given for mode 'lstm' and only then");
  if (c0_in.has_value()) check_tensor(*c0_in, "c0", dt, {B, H});

  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;  // compute dtype
  auto prep = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  const at::Tensor gx = prep(gx_in), h0 = prep(h0_in), w_hh = prep(w_hh_in);
  const std::optional<at::Tensor> b_hh =
      b_hh_in.has_value() ? std::optional<at::Tensor>(prep(*b_hh_in)) : std::nullopt;
  const std::optional<at::Tensor> c0 =
      c0_in.has_value() ? std::optional<at::Tensor>(prep(*c0_in)) : std::nullopt;

  const auto opts = gx.options();
  at::Tensor out = empty_large(with_last(l.lead, H), opts);
  at::Tensor h_n = at::empty({B, H}, opts);
  at::Tensor c_n = at::empty({mode == Mode::kLstm ? B : 0, mode == Mode::kLstm ? H : 0}, opts);
  at::Tensor ws = empty_large(with_last(l.lead, K * H), opts);
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "rnn_forward_cpp", [&] {
      Problem<scalar_t> p;
      describe(p, mode, l, B, H, lengths, reset, reverse, batch_first, batch_sizes);
      pack_weights(p, w_hh, b_hh, false);
      const scalar_t* gx_p = gx.data_ptr<scalar_t>();
      const scalar_t* h0_p = h0.data_ptr<scalar_t>();
      const scalar_t* c0_p = c0 ? c0->data_ptr<scalar_t>() : nullptr;
      scalar_t* out_p = out.data_ptr<scalar_t>();
      scalar_t* hn_p = h_n.data_ptr<scalar_t>();
      scalar_t* cn_p = c_n.data_ptr<scalar_t>();
      scalar_t* ws_p = need_workspace ? ws.data_ptr<scalar_t>() : nullptr;
      dispatch_mode(mode, [&](auto m) {
        constexpr Mode M = decltype(m)::value;
        constexpr int R = forward_rows_per_block<M>();
        if (B < kSingleRowBatch) {  // serving: blocks of one row, no FMAs on padding rows
          parallel_over_rows(B, 1, [&](const int64_t* rows, int64_t n) {
            forward_rows<M, 1, scalar_t>(p, rows, n, gx_p, h0_p, c0_p, out_p, hn_p, cn_p, ws_p);
          });
        } else {
          parallel_over_rows(B, R, [&](const int64_t* rows, int64_t n) {
            forward_rows<M, R, scalar_t>(p, rows, n, gx_p, h0_p, c0_p, out_p, hn_p, cn_p, ws_p);
          });
        }
      });
    });
  }
  if (is_low_precision(dt)) {
    out = out.to(dt);
    h_n = h_n.to(dt);
    c_n = c_n.to(dt);
  }
  return {out, h_n, c_n, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_backward_cpp(
    const at::Tensor& grad_out_in, const at::Tensor& grad_h_n_in,
    const std::optional<at::Tensor>& grad_c_n_in, const at::Tensor& ws_in,
    const at::Tensor& w_hh_in, const std::optional<at::Tensor>& b_hh, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& reset, c10::string_view mode_name, bool reverse,
    bool batch_first, const std::optional<at::Tensor>& batch_sizes) {
  const Mode mode = parse_mode(mode_name);
  const int64_t G = gates_of(mode), K = slots_of(mode);
  const bool lstm = mode == Mode::kLstm;
  TORCH_CHECK(h0.dim() == 2, "fastrec rnn (cpp): h0 must be 2-D (B, H), got ", h0.sizes());
  const auto dt = h0.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || is_low_precision(dt),
              "fastrec rnn (cpp): h0 must be float16, bfloat16, float32 or float64, got ", dt);
  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = h0.size(0), H = h0.size(1);
  const Layout l = layout_of(grad_out_in, "grad_out", B, batch_first, batch_sizes);
  check_tensor(grad_out_in, "grad_out", dt, with_last(l.lead, H));
  check_tensor(grad_h_n_in, "grad_h_n", dt, {B, H});
  check_tensor(ws_in, "workspace", ct, with_last(l.lead, K * H));
  check_tensor(w_hh_in, "w_hh", dt, {G * H, H});
  if (b_hh.has_value()) check_tensor(*b_hh, "b_hh", dt, {G * H});
  TORCH_CHECK(!lstm || (grad_c_n_in.has_value() && c0.has_value()),
              "fastrec rnn (cpp): mode 'lstm' needs grad_c_n and c0");
  if (lstm) {
    check_tensor(*grad_c_n_in, "grad_c_n", dt, {B, H});
    check_tensor(*c0, "c0", dt, {B, H});
  }

  auto prep = [&](const at::Tensor& t) { return t.to(ct).contiguous(); };
  const at::Tensor grad_out = prep(grad_out_in), grad_h_n = prep(grad_h_n_in),
                   ws = ws_in.contiguous(), w_hh = prep(w_hh_in);
  const at::Tensor grad_c_n = lstm ? prep(*grad_c_n_in) : at::Tensor();

  const auto opts = grad_out.options();
  at::Tensor dgx = empty_large(with_last(l.lead, G * H), opts);
  at::Tensor dgh = empty_large(with_last(l.lead, G * H), opts);
  at::Tensor dh0 = at::empty({B, H}, opts);
  at::Tensor dc0 = at::empty({lstm ? B : 0, lstm ? H : 0}, opts);
  at::Tensor hprev = empty_large(with_last(l.lead, H), opts);
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "rnn_backward_cpp", [&] {
      Problem<scalar_t> p;
      describe(p, mode, l, B, H, lengths, reset, reverse, batch_first, batch_sizes);
      pack_weights(p, w_hh, std::nullopt, true);
      const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
      const scalar_t* ghn_p = grad_h_n.data_ptr<scalar_t>();
      const scalar_t* gcn_p = lstm ? grad_c_n.data_ptr<scalar_t>() : nullptr;
      const scalar_t* ws_p = ws.data_ptr<scalar_t>();
      scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
      scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
      scalar_t* dh0_p = dh0.data_ptr<scalar_t>();
      scalar_t* dc0_p = lstm ? dc0.data_ptr<scalar_t>() : nullptr;
      scalar_t* hprev_p = hprev.data_ptr<scalar_t>();
      dispatch_mode(mode, [&](auto m) {
        constexpr Mode M = decltype(m)::value;
        parallel_over_rows(B, kBackwardRows, [&](const int64_t* rows, int64_t n) {
          backward_rows<M, kBackwardRows, scalar_t>(p, rows, n, go_p, ghn_p, gcn_p, ws_p, dgx_p,
                                                    dgh_p, dh0_p, dc0_p, hprev_p);
        });
      });
    });
  } else {
    dh0.zero_();
  }
  if (is_low_precision(dt)) {
    dgx = dgx.to(dt);
    dgh = dgh.to(dt);
    dh0 = dh0.to(dt);
    dc0 = dc0.to(dt);
    hprev = hprev.to(dt);
  }
  return {dgx, dgh, dh0, dc0, hprev};
}

// ---------------------------------------------------------------------------------------------
// Single-step cells
// ---------------------------------------------------------------------------------------------
// torch.ops.fastrec.rnn_cell_forward_cpp(x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
//     -> (h_new, c_new, workspace)
// torch.ops.fastrec.rnn_cell_backward_cpp(grad_h_new, grad_c_new, workspace, x, h, c, w_ih, w_hh,
//                                         mode) -> (grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh,
//                                                   grad_b_ih, grad_b_hh)
// One step of one cell (x (B, I), h / c (B, H), fp32 or fp64) in one op each way: the two
// products with the weights (for Elman / LSTM the second accumulates into the first) and the
// gate arithmetic in one pass. Up to kCellSmallBatch rows the products are dot products on
// torch's weight layout, serial; above, register-tiled outer products on weights packed per call,
// parallel over chunks of hidden units (cell_forward_chunked; ATen's GEMM at these shapes,
// ~64 x 100 x 300, ran at half the rate). The backward computes the gate
// gradients in one pass and every input, state, weight and bias gradient as GEMMs / sums in the
// same op (small batches: the same serial loops). workspace (B,
// K * H): tanh / relu K = 1 [h_new]; gru K = 4 [r, z, n, gh_n]; lstm K = 5 [i, f, g, o,
// tanh(c_new)]. c_new and grad_c are (0, 0) for modes other than lstm, as are the bias gradients
// when the forward had no biases.

// First n lanes (n <= kN) of a cell row, the others zero, and their store: AVX-512 masked
// loads / stores where available (a per-row tail through memcpy costs a library call and a
// store-forwarding stall, which dominates a step at a few rows).
template <typename T>
inline Vec<T> cload(const T* p, int64_t n) {
#if defined(__AVX512F__)
  if (n < kN<T>) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if constexpr (sizeof(T) == 4) {
      return reinterpret_cast<Vec<T>>(_mm512_maskz_loadu_ps(m, p));
    } else {
      return reinterpret_cast<Vec<T>>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p));
    }
  }
#endif
  return vload_n(p, n);
}
template <typename T>
inline void cstore(T* p, const Vec<T>& x, int64_t n) {
#if defined(__AVX512F__)
  if (n < kN<T>) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    if constexpr (sizeof(T) == 4) {
      _mm512_mask_storeu_ps(p, m, reinterpret_cast<const __m512&>(x));
    } else {
      _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), reinterpret_cast<const __m512d&>(x));
    }
    return;
  }
#endif
  vstore_n(p, x, n);
}

constexpr int cell_slots_of(Mode m) { return m == Mode::kGru ? 4 : m == Mode::kLstm ? 5 : 1; }

// Gate arithmetic of one row. pre: (G * H) pre-activations, W_ih x + b_ih (+ W_hh h for Elman /
// LSTM); gh: (G * H) W_hh h + b_hh (GRU); b_hh (G * H) or null (Elman / LSTM: added here).
template <Mode M, typename T>
void cell_forward_row(int64_t H, const T* pre, const T* gh, const T* b_hh, const T* h,
                      const T* c, T* hn, T* cn, T* ws) {
  auto ld = [&](const T* q, int64_t off, int64_t nc) {
    return q ? cload(q + off, nc) : Vec<T>{};
  };
  for (int64_t j = 0; j < H; j += kN<T>) {
    const int64_t nc = std::min<int64_t>(kN<T>, H - j);
    if constexpr (M == Mode::kTanh || M == Mode::kRelu) {
      Vec<T> y = cload(pre + j, nc) + ld(b_hh, j, nc);
      if constexpr (M == Mode::kTanh) {
        y = vtanh(y);
      } else {
        y = y < T(0) ? Vec<T>{} : y;  // relu; NaN propagates
      }
      cstore(hn + j, y, nc);
      cstore(ws + j, y, nc);
    } else if constexpr (M == Mode::kGru) {
      const Vec<T> r = vsigmoid(cload(pre + j, nc) + cload(gh + j, nc));
      const Vec<T> z = vsigmoid(cload(pre + H + j, nc) + cload(gh + H + j, nc));
      const Vec<T> ghn = cload(gh + 2 * H + j, nc);
      const Vec<T> n = vtanh(cload(pre + 2 * H + j, nc) + r * ghn);
      cstore(hn + j, n + z * (cload(h + j, nc) - n), nc);
      cstore(ws + j, r, nc);
      cstore(ws + H + j, z, nc);
      cstore(ws + 2 * H + j, n, nc);
      cstore(ws + 3 * H + j, ghn, nc);
    } else {
      const Vec<T> i = vsigmoid(cload(pre + j, nc) + ld(b_hh, j, nc));
      const Vec<T> f = vsigmoid(cload(pre + H + j, nc) + ld(b_hh, H + j, nc));
      const Vec<T> g = vtanh(cload(pre + 2 * H + j, nc) + ld(b_hh, 2 * H + j, nc));
      const Vec<T> o = vsigmoid(cload(pre + 3 * H + j, nc) + ld(b_hh, 3 * H + j, nc));
      const Vec<T> cnew = f * cload(c + j, nc) + i * g;
      const Vec<T> tc = vtanh(cnew);
      cstore(cn + j, cnew, nc);
      cstore(hn + j, o * tc, nc);
      const Vec<T> slots[5] = {i, f, g, o, tc};
      for (int q = 0; q < 5; ++q) cstore(ws + q * H + j, slots[q], nc);
    }
  }
}

// Gate gradients of one row: dgx (G * H) the pre-activation gradient of the input projection,
// dgh (G * H, GRU only: the other modes share dgx) that of W_hh h, carry (H) the gradient that
// reaches h directly (GRU) and dc_prev (H, LSTM) that of c.
template <Mode M, typename T>
void cell_backward_row(int64_t H, const T* dhn, const T* dcn, const T* ws, const T* h,
                       const T* c, T* dgx, T* dgh, T* carry, T* dc_prev) {
  const Vec<T> one = Vec<T>{} + T(1);
  for (int64_t j = 0; j < H; j += kN<T>) {
    const int64_t nc = std::min<int64_t>(kN<T>, H - j);
    const Vec<T> dh = cload(dhn + j, nc);
    if constexpr (M == Mode::kTanh || M == Mode::kRelu) {
      const Vec<T> y = cload(ws + j, nc);
      if constexpr (M == Mode::kTanh) {
        cstore(dgx + j, dh * (one - y * y), nc);
      } else {
        cstore(dgx + j, y <= T(0) ? Vec<T>{} : dh, nc);  // NaN passes dh, as torch
      }
    } else if constexpr (M == Mode::kGru) {
      const Vec<T> r = cload(ws + j, nc), z = cload(ws + H + j, nc),
                   n = cload(ws + 2 * H + j, nc), ghn = cload(ws + 3 * H + j, nc);
      const Vec<T> dn = dh * (one - z) * (one - n * n);
      const Vec<T> dz = dh * (cload(h + j, nc) - n) * z * (one - z);
      const Vec<T> dr = dn * ghn * r * (one - r);
      cstore(dgx + j, dr, nc);
      cstore(dgx + H + j, dz, nc);
      cstore(dgx + 2 * H + j, dn, nc);
      cstore(dgh + j, dr, nc);
      cstore(dgh + H + j, dz, nc);
      cstore(dgh + 2 * H + j, dn * r, nc);
      cstore(carry + j, dh * z, nc);
    } else {
      const Vec<T> i = cload(ws + j, nc), f = cload(ws + H + j, nc),
                   g = cload(ws + 2 * H + j, nc), o = cload(ws + 3 * H + j, nc),
                   tc = cload(ws + 4 * H + j, nc);
      const Vec<T> dc = (dcn ? cload(dcn + j, nc) : Vec<T>{}) + dh * o * (one - tc * tc);
      cstore(dgx + j, dc * g * i * (one - i), nc);
      cstore(dgx + H + j, dc * cload(c + j, nc) * f * (one - f), nc);
      cstore(dgx + 2 * H + j, dc * i * (one - g * g), nc);
      cstore(dgx + 3 * H + j, dh * tc * o * (one - o), nc);
      cstore(dc_prev + j, dc * f, nc);
    }
  }
}

// out[b, n] (+)= bias[n] + sum_k w[n, k] a[b, k] for b < B <= kCellSmallBatch: w (N, K) and a
// (B, K) row-major, out (B, ldo). Dot products along k straight from torch's weight layout: at
// a handful of rows there is nothing to amortise a packing or a GEMM call over. RB rows and
// NW weight rows at a time, their RB * NW accumulators in registers (independent FMA chains).
constexpr int64_t kCellSmallBatch = 4;
template <typename T, int RB, int NW>
inline void cell_dot_block(const T* w, const T* a, const T* bias, int64_t n, int64_t K, T* out,
                           int64_t ldo, bool accumulate) {
  Vec<T> acc[RB][NW];
  for (int b = 0; b < RB; ++b)
    for (int q = 0; q < NW; ++q) acc[b][q] = Vec<T>{};
  for (int64_t k = 0; k < K; k += kN<T>) {
    const int64_t nc = std::min<int64_t>(kN<T>, K - k);
    Vec<T> wv[NW];
    for (int q = 0; q < NW; ++q) wv[q] = cload(w + (n + q) * K + k, nc);
    for (int b = 0; b < RB; ++b) {
      const Vec<T> av = cload(a + b * K + k, nc);
      for (int q = 0; q < NW; ++q) acc[b][q] += wv[q] * av;
    }
  }
  for (int b = 0; b < RB; ++b)
    for (int q = 0; q < NW; ++q) {
      T& o = out[b * ldo + n + q];
      o = (accumulate ? o : T(0)) + (bias ? bias[n + q] : T(0)) + vhsum<T>(acc[b][q]);
    }
}
template <typename T, int RB>
void cell_small_gemv_rows(const T* w, const T* a, const T* bias, int64_t N, int64_t K, T* out,
                          int64_t ldo, bool accumulate) {
  constexpr int NW = RB <= 2 ? 4 : 2;
  int64_t n = 0;
  for (; n + NW <= N; n += NW) cell_dot_block<T, RB, NW>(w, a, bias, n, K, out, ldo, accumulate);
  for (; n < N; ++n) cell_dot_block<T, RB, 1>(w, a, bias, n, K, out, ldo, accumulate);
}
template <typename T>
void cell_small_gemv(const T* w, const T* a, const T* bias, int64_t B, int64_t N, int64_t K, T* out,
                     int64_t ldo, bool accumulate) {
  switch (B) {
    case 1: return cell_small_gemv_rows<T, 1>(w, a, bias, N, K, out, ldo, accumulate);
    case 2: return cell_small_gemv_rows<T, 2>(w, a, bias, N, K, out, ldo, accumulate);
    case 3: return cell_small_gemv_rows<T, 3>(w, a, bias, N, K, out, ldo, accumulate);
    default: return cell_small_gemv_rows<T, 4>(w, a, bias, N, K, out, ldo, accumulate);
  }
}

// The backward's products at b < B <= kCellSmallBatch rows, along the contiguous k of w:
// out (B, K) (+)= g (B, N) w (N, K), and wgrad (N, K) = g^T a for a (B, K).
template <typename T>
void cell_small_input_grad(const T* g, const T* w, int64_t B, int64_t N, int64_t K, T* out,
                           bool accumulate) {
  if (!accumulate) std::fill(out, out + B * K, T(0));
  for (int64_t n = 0; n < N; ++n) {
    const T* wn = w + n * K;
    for (int64_t k = 0; k < K; k += kN<T>) {
      const int64_t nc = std::min<int64_t>(kN<T>, K - k);
      const Vec<T> wv = cload(wn + k, nc);
      for (int64_t b = 0; b < B; ++b) {
        T* o = out + b * K + k;
        cstore(o, cload(o, nc) + g[b * N + n] * wv, nc);
      }
    }
  }
}
template <typename T>
void cell_small_weight_grad(const T* g, const T* a, int64_t B, int64_t N, int64_t K, T* wgrad) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; k += kN<T>) {
      const int64_t nc = std::min<int64_t>(kN<T>, K - k);
      Vec<T> acc = {};
      for (int64_t b = 0; b < B; ++b) acc += g[b * N + n] * cload(a + b * K + k, nc);
      cstore(wgrad + n * K + k, acc, nc);
    }
  }
}

// Larger batches: parallel over chunks of kN hidden units, each task packing its chunk's slice of
// W_ih and W_hh as (K, G, kN) (for each k the chunk's G gate vectors contiguous), so that a block
// of R rows accumulates x W_ih^T and h W_hh^T for the chunk in registers, as outer products of
// broadcast x / h values with the gate vectors, and the gate arithmetic consumes them before
// anything is stored: no pre-activation buffers, and the packing (at B = 64 as costly as the
// products) is split over the tasks instead of done once serially. GRU keeps the h part of the
// n gate apart (b_hn sits inside the reset product): G + 1 accumulators per row.

// dst[(k * G + g) * kN + u] = w[(g * H + j0 + u) * K + k] for u < nc, zero for nc <= u < kN.
// Written in order (one vector per (k, g)), read from kN rows of w at once.
template <typename T>
void cell_pack_chunk(const T* w, int64_t G, int64_t H, int64_t K, int64_t j0, int64_t nc, T* dst) {
  for (int64_t g = 0; g < G; ++g) {
    const T* src = w + (g * H + j0) * K;
    for (int64_t k = 0; k < K; ++k) {
      T* d = dst + (k * G + g) * kN<T>;
      for (int64_t u = 0; u < kN<T>; ++u) d[u] = u < nc ? src[u * K + k] : T(0);
    }
  }
}

// Biases of one chunk: bx[g] added with the x part (b_ih, plus b_hh except for the GRU n gate),
// bhn the GRU's b_hn (zero vectors without biases).
template <typename T>
struct CellBias {
  Vec<T> bx[4] = {};
  Vec<T> bhn = {};
};

// Rows [0, R) of a block (x (R, I), h (R, H), c (R, H) for LSTM) at chunk j0 (nc real lanes):
// h_new / c_new (row stride H) and the workspace rows (stride K * H).
template <Mode M, int R, typename T>
inline void cell_chunk_rows(const T* __restrict x, int64_t I, const T* __restrict h, int64_t H,
                            const T* __restrict c, const T* __restrict pih,
                            const T* __restrict phh, const CellBias<T>& bias, int64_t j0,
                            int64_t nc, T* __restrict hn, T* __restrict cn, T* __restrict ws) {
  constexpr int G = gates_of(M);
  constexpr int A = M == Mode::kGru ? G + 1 : G;
  constexpr int K = cell_slots_of(M);
  Vec<T> acc[R][A];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = Vec<T>{};
  for (int64_t k = 0; k < I; ++k) {
    Vec<T> wv[G];
    for (int g = 0; g < G; ++g) wv[g] = vload(pih + (k * G + g) * kN<T>);
    for (int r = 0; r < R; ++r) {
      const T xr = x[r * I + k];
      for (int g = 0; g < G; ++g) acc[r][g] += xr * wv[g];
    }
  }
  for (int64_t k = 0; k < H; ++k) {
    Vec<T> wv[G];
    for (int g = 0; g < G; ++g) wv[g] = vload(phh + (k * G + g) * kN<T>);
    for (int r = 0; r < R; ++r) {
      const T hr = h[r * H + k];
      for (int g = 0; g < G; ++g) acc[r][M == Mode::kGru && g == 2 ? 3 : g] += hr * wv[g];
    }
  }
  for (int r = 0; r < R; ++r) {
    T* wsr = ws + r * K * H + j0;
    if constexpr (M == Mode::kTanh || M == Mode::kRelu) {
      Vec<T> y = acc[r][0] + bias.bx[0];
      if constexpr (M == Mode::kTanh) {
        y = vtanh(y);
      } else {
        y = y < T(0) ? Vec<T>{} : y;  // relu; NaN propagates
      }
      cstore(hn + r * H + j0, y, nc);
      cstore(wsr, y, nc);
    } else if constexpr (M == Mode::kGru) {
      const Vec<T> rg = vsigmoid(acc[r][0] + bias.bx[0]);
      const Vec<T> z = vsigmoid(acc[r][1] + bias.bx[1]);
      const Vec<T> ghn = acc[r][3] + bias.bhn;
      const Vec<T> n = vtanh(acc[r][2] + bias.bx[2] + rg * ghn);
      cstore(hn + r * H + j0, n + z * (cload(h + r * H + j0, nc) - n), nc);
      cstore(wsr, rg, nc);
      cstore(wsr + H, z, nc);
      cstore(wsr + 2 * H, n, nc);
      cstore(wsr + 3 * H, ghn, nc);
    } else {
      const Vec<T> i = vsigmoid(acc[r][0] + bias.bx[0]);
      const Vec<T> f = vsigmoid(acc[r][1] + bias.bx[1]);
      const Vec<T> g = vtanh(acc[r][2] + bias.bx[2]);
      const Vec<T> o = vsigmoid(acc[r][3] + bias.bx[3]);
      const Vec<T> cnew = f * cload(c + r * H + j0, nc) + i * g;
      const Vec<T> tc = vtanh(cnew);
      cstore(cn + r * H + j0, cnew, nc);
      cstore(hn + r * H + j0, o * tc, nc);
      const Vec<T> slots[5] = {i, f, g, o, tc};
      for (int q = 0; q < 5; ++q) cstore(wsr + q * H, slots[q], nc);
    }
  }
}

// Rows per block (accumulators R x (G or G + 1) <= 24 registers).
template <Mode M>
constexpr int cell_rows_per_block() { return M == Mode::kTanh || M == Mode::kRelu ? 8 : 6; }

// The whole step for B > kCellSmallBatch: tasks over (chunk, part of the rows) pairs. The rows
// are split when there are fewer chunks than threads, and at large batches also when the
// chunks do not divide evenly among the threads (each part repacks its chunk, which pays only
// when the products dominate).
template <Mode M, typename T>
void cell_forward_chunked(const T* x, const T* h, const T* c, const T* w_ih, const T* w_hh,
                          const T* b_ih, const T* b_hh, int64_t B, int64_t I, int64_t H, T* hn,
                          T* cn, T* ws) {
  constexpr int G = gates_of(M), K = cell_slots_of(M), R = cell_rows_per_block<M>();
  const int64_t chunks = round_up(H, kN<T>) / kN<T>;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool uneven = chunks % threads != 0 && B >= 16 * R;
  const int64_t parts =
      std::min<int64_t>(std::max((threads + chunks - 1) / chunks, uneven ? threads : 1), (B + R - 1) / R);
  const int64_t rows_per_part = round_up((B + parts - 1) / parts, R);
  at::parallel_for(0, chunks * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pih(I * G * kN<T>), phh(H * G * kN<T>);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / parts, part = task % parts;
      const int64_t j0 = chunk * kN<T>, nc = std::min<int64_t>(kN<T>, H - j0);
      if (chunk != packed) {
        cell_pack_chunk(w_ih, G, H, I, j0, nc, pih.data());
        cell_pack_chunk(w_hh, G, H, H, j0, nc, phh.data());
        packed = chunk;
      }
      CellBias<T> bias;
      if (b_ih != nullptr) {
        for (int g = 0; g < G; ++g) {
          bias.bx[g] = cload(b_ih + g * H + j0, nc);
          if (M == Mode::kGru && g == 2) {
            bias.bhn = cload(b_hh + g * H + j0, nc);
          } else {
            bias.bx[g] += cload(b_hh + g * H + j0, nc);
          }
        }
      }
      const int64_t b0 = part * rows_per_part, b1 = std::min<int64_t>(B, b0 + rows_per_part);
      auto rows = [&](auto rows_c, int64_t b) {
        constexpr int RR = decltype(rows_c)::value;
        cell_chunk_rows<M, RR, T>(x + b * I, I, h + b * H, H, c ? c + b * H : nullptr, pih.data(),
                                  phh.data(), bias, j0, nc, hn + b * H, cn ? cn + b * H : nullptr,
                                  ws + b * K * H);
      };
      int64_t b = b0;
      for (; b + R <= b1; b += R) rows(std::integral_constant<int, R>(), b);
      for (; b < b1; ++b) rows(std::integral_constant<int, 1>(), b);
    }
  });
}

void check_cell_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastrec rnn cell (cpp): ", name, " must be float32 or float64, got ",
              t.scalar_type());
}

// The cell backward runs one parallel region over chunks of rows, each chunk doing its rows'
// GEMMs (single-threaded inside the region) and gate arithmetic: one fork / join per step
// instead of one per GEMM. Chunks of at least 8 rows, at most one per thread.
int64_t cell_grain(int64_t B) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(8, (B + threads - 1) / threads);
}

// The checks both cell ops share: x (B, I) and h (B, H) of one cell dtype, the weights' shapes,
// and c (B, H) given for LSTM and only then.
void check_cell_inputs(const at::Tensor& x, const at::Tensor& h, const std::optional<at::Tensor>& c,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, Mode mode) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2,
              "fastrec rnn cell (cpp): x and h must be 2-D (B, I) and (B, H), got ", x.sizes(),
              " and ", h.sizes());
  check_cell_dtype(x, "x");
  const auto dt = x.scalar_type();
  const int64_t G = gates_of(mode), B = x.size(0), I = x.size(1), H = h.size(1);
  check_tensor(h, "h", dt, {B, H});
  check_tensor(w_ih, "w_ih", dt, {G * H, I});
  check_tensor(w_hh, "w_hh", dt, {G * H, H});
  const bool lstm = mode == Mode::kLstm;
  TORCH_CHECK(c.has_value() == lstm,
              "fastrec rnn cell (cpp): c must be given for mode 'lstm' and only then");
  if (lstm) check_tensor(*c, "c", dt, {B, H});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_cell_forward_cpp(
    const at::Tensor& x_in, const at::Tensor& h_in, const std::optional<at::Tensor>& c_in,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, c10::string_view mode_name) {
  const Mode mode = parse_mode(mode_name);
  const int64_t G = gates_of(mode), K = cell_slots_of(mode);
  const bool lstm = mode == Mode::kLstm, gru = mode == Mode::kGru;
  check_cell_inputs(x_in, h_in, c_in, w_ih, w_hh, mode);
  const auto dt = x_in.scalar_type();
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "fastrec rnn cell (cpp): b_ih and b_hh must be given together");
  if (b_ih.has_value()) {
    check_tensor(*b_ih, "b_ih", dt, {G * H});
    check_tensor(*b_hh, "b_hh", dt, {G * H});
  }
  const at::Tensor x = x_in.detach().contiguous(), h = h_in.detach().contiguous();
  const at::Tensor c = lstm ? c_in->contiguous() : at::Tensor();

  const auto opts = x.options();
  at::Tensor hn = at::empty({B, H}, opts);
  at::Tensor cn = at::empty({lstm ? B : 0, lstm ? H : 0}, opts);
  at::Tensor ws = at::empty({B, K * H}, opts);
  if (B == 0) return {hn, cn, ws};  // an empty batch: nothing to compute
  const at::Tensor w_ih_c = w_ih.detach().contiguous(), w_hh_c = w_hh.detach().contiguous();
  const at::Tensor b_ih_c = b_ih.has_value() ? b_ih->detach().contiguous() : at::Tensor();
  const at::Tensor b_hh_c = b_hh.has_value() ? b_hh->detach().contiguous() : at::Tensor();
  if (B <= kCellSmallBatch) {  // a few rows: one serial pass, no GEMM calls, no parallel region
    at::Tensor pre = at::empty({B, G * H}, opts);
    at::Tensor gh = gru ? at::empty({B, G * H}, opts) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(dt, "rnn_cell_forward_cpp", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      scalar_t* pre_p = pre.data_ptr<scalar_t>();
      scalar_t* gh_p = gru ? gh.data_ptr<scalar_t>() : nullptr;
      cell_small_gemv<scalar_t>(w_ih_c.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr(b_ih_c), B,
                                G * H, I, pre_p, G * H, false);
      if (gru) {
        cell_small_gemv<scalar_t>(w_hh_c.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), ptr(b_hh_c), B,
                                  G * H, H, gh_p, G * H, false);
      } else {
        cell_small_gemv<scalar_t>(w_hh_c.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), nullptr, B,
                                  G * H, H, pre_p, G * H, true);
      }
      const scalar_t* b_p = gru ? nullptr : ptr(b_hh_c);
      dispatch_mode(mode, [&](auto m) {
        constexpr Mode M = decltype(m)::value;
        for (int64_t b = 0; b < B; ++b)
          cell_forward_row<M, scalar_t>(H, pre_p + b * G * H, gh_p ? gh_p + b * G * H : nullptr, b_p,
                                        h.data_ptr<scalar_t>() + b * H,
                                        lstm ? c.data_ptr<scalar_t>() + b * H : nullptr,
                                        hn.data_ptr<scalar_t>() + b * H,
                                        lstm ? cn.data_ptr<scalar_t>() + b * H : nullptr,
                                        ws.data_ptr<scalar_t>() + b * K * H);
      });
    });
    return {hn, cn, ws};
  }
  AT_DISPATCH_FLOATING_TYPES(dt, "rnn_cell_forward_cpp", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    dispatch_mode(mode, [&](auto m) {
      cell_forward_chunked<decltype(m)::value, scalar_t>(
          x.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), ptr(c), w_ih_c.data_ptr<scalar_t>(),
          w_hh_c.data_ptr<scalar_t>(), ptr(b_ih_c), ptr(b_hh_c), B, I, H, hn.data_ptr<scalar_t>(),
          ptr(cn), ws.data_ptr<scalar_t>());
    });
  });
  return {hn, cn, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rnn_cell_backward_cpp(const at::Tensor& grad_hn_in, const std::optional<at::Tensor>& grad_cn_in,
                      const at::Tensor& ws, const at::Tensor& x_in, const at::Tensor& h_in,
                      const std::optional<at::Tensor>& c_in, const at::Tensor& w_ih,
                      const at::Tensor& w_hh, bool has_bias, c10::string_view mode_name) {
  const Mode mode = parse_mode(mode_name);
  const int64_t G = gates_of(mode), K = cell_slots_of(mode);
  const bool lstm = mode == Mode::kLstm, gru = mode == Mode::kGru;
  check_cell_inputs(x_in, h_in, c_in, w_ih, w_hh, mode);
  const auto dt = x_in.scalar_type();
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  check_tensor(grad_hn_in, "grad_h_new", dt, {B, H});
  check_tensor(ws, "workspace", dt, {B, K * H});
  if (grad_cn_in.has_value()) check_tensor(*grad_cn_in, "grad_c_new", dt, {B, H});
  const at::Tensor x = x_in.detach().contiguous(), h = h_in.detach().contiguous(),
                   dhn = grad_hn_in.contiguous();
  const at::Tensor w_ih_d = w_ih.detach(), w_hh_d = w_hh.detach();
  const at::Tensor c = lstm ? c_in->contiguous() : at::Tensor();
  const at::Tensor dcn =
      (lstm && grad_cn_in.has_value()) ? grad_cn_in->contiguous() : at::Tensor();

  const auto opts = x.options();
  at::Tensor dgx = at::empty({B, G * H}, opts);
  at::Tensor dgh = gru ? at::empty({B, G * H}, opts) : dgx;
  at::Tensor carry = gru ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor dc = at::empty({lstm ? B : 0, lstm ? H : 0}, opts);
  at::Tensor dx = at::empty({B, I}, opts);
  at::Tensor dh = at::empty({B, H}, opts);
  if (B == 0) {  // an empty batch: zero weight and bias gradients
    const int64_t nb = has_bias ? G * H : 0;
    return {dx, dh, dc, at::zeros({G * H, I}, opts), at::zeros({G * H, H}, opts),
            at::zeros({nb}, opts), at::zeros({nb}, opts)};
  }
  if (B <= kCellSmallBatch) {  // a few rows: one serial pass, no GEMM calls, no parallel region
    const at::Tensor w_ih_c = w_ih_d.contiguous(), w_hh_c = w_hh_d.contiguous();
    at::Tensor dw_ih = at::empty({G * H, I}, opts), dw_hh = at::empty({G * H, H}, opts);
    AT_DISPATCH_FLOATING_TYPES(dt, "rnn_cell_backward_cpp", [&] {
      scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
      scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
      scalar_t* dh_p = dh.data_ptr<scalar_t>();
      dispatch_mode(mode, [&](auto m) {
        constexpr Mode M = decltype(m)::value;
        for (int64_t b = 0; b < B; ++b)
          cell_backward_row<M, scalar_t>(
              H, dhn.data_ptr<scalar_t>() + b * H,
              dcn.defined() ? dcn.data_ptr<scalar_t>() + b * H : nullptr,
              ws.data_ptr<scalar_t>() + b * K * H, h.data_ptr<scalar_t>() + b * H,
              lstm ? c.data_ptr<scalar_t>() + b * H : nullptr, dgx_p + b * G * H,
              gru ? dgh_p + b * G * H : nullptr, gru ? dh_p + b * H : nullptr,
              lstm ? dc.data_ptr<scalar_t>() + b * H : nullptr);
      });
      // GRU: dh starts as the carry (dh_new * z) written by the gate pass
      cell_small_input_grad<scalar_t>(dgx_p, w_ih_c.data_ptr<scalar_t>(), B, G * H, I,
                                      dx.data_ptr<scalar_t>(), false);
      cell_small_input_grad<scalar_t>(dgh_p, w_hh_c.data_ptr<scalar_t>(), B, G * H, H, dh_p, gru);
      cell_small_weight_grad<scalar_t>(dgx_p, x.data_ptr<scalar_t>(), B, G * H, I,
                                       dw_ih.data_ptr<scalar_t>());
      cell_small_weight_grad<scalar_t>(dgh_p, h.data_ptr<scalar_t>(), B, G * H, H,
                                       dw_hh.data_ptr<scalar_t>());
    });
    at::Tensor db_ih = has_bias ? dgx.sum(0) : at::empty({0}, opts);
    at::Tensor db_hh = has_bias ? (gru ? dgh.sum(0) : db_ih.clone()) : at::empty({0}, opts);
    return {dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh};
  }
  const at::ThreadLocalState state;
  AT_DISPATCH_FLOATING_TYPES(dt, "rnn_cell_backward_cpp", [&] {
    const scalar_t* dhn_p = dhn.data_ptr<scalar_t>();
    const scalar_t* dcn_p = dcn.defined() ? dcn.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ws_p = ws.data_ptr<scalar_t>();
    const scalar_t* h_p = h.data_ptr<scalar_t>();
    const scalar_t* c_p = lstm ? c.data_ptr<scalar_t>() : nullptr;
    scalar_t* dgx_p = dgx.data_ptr<scalar_t>();
    scalar_t* dgh_p = gru ? dgh.data_ptr<scalar_t>() : nullptr;
    scalar_t* carry_p = gru ? carry.data_ptr<scalar_t>() : nullptr;
    scalar_t* dc_p = lstm ? dc.data_ptr<scalar_t>() : nullptr;
    dispatch_mode(mode, [&](auto m) {
      constexpr Mode M = decltype(m)::value;
      at::parallel_for(0, B, cell_grain(B), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          cell_backward_row<M, scalar_t>(
              H, dhn_p + b * H, dcn_p ? dcn_p + b * H : nullptr, ws_p + b * K * H, h_p + b * H,
              c_p ? c_p + b * H : nullptr, dgx_p + b * G * H, dgh_p ? dgh_p + b * G * H : nullptr,
              carry_p ? carry_p + b * H : nullptr, dc_p ? dc_p + b * H : nullptr);
        // the input and state gradients of the chunk's rows, in the same region
        at::ThreadLocalStateGuard guard(state);
        const int64_t n = end - begin;
        at::Tensor dxs = dx.narrow(0, begin, n), dhs = dh.narrow(0, begin, n);
        at::mm_out(dxs, dgx.narrow(0, begin, n), w_ih_d);
        if (gru) {
          at::addmm_out(dhs, carry.narrow(0, begin, n), dgh.narrow(0, begin, n), w_hh_d);
        } else {
          at::mm_out(dhs, dgh.narrow(0, begin, n), w_hh_d);
        }
      });
    });
  });
  at::Tensor dw_ih = at::mm(dgx.t(), x);
  at::Tensor dw_hh = at::mm(dgh.t(), h);
  at::Tensor db_ih = has_bias ? dgx.sum(0) : at::empty({0}, opts);
  at::Tensor db_hh = has_bias ? (gru ? dgh.sum(0) : db_ih.clone()) : at::empty({0}, opts);
  return {dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh};
}

// The input projection of every step, x (N, I) W_ih^T + b_ih -> (N, G * H), into a buffer from
// empty_large: at training shapes it is as large as the workspace.
at::Tensor rnn_project_cpp(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "fastrec rnn (cpp): rnn_project_cpp takes x (N, I) and w (G*H, I), got ", x.sizes(),
              " and ", w.sizes());
  at::Tensor out = empty_large({x.size(0), w.size(0)}, x.options());
  if (b.has_value()) {
    at::addmm_out(out, *b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
  return out;
}

}  // namespace
}  // namespace fastrec

TORCH_LIBRARY_FRAGMENT(fastrec, m) {
  m.def("rnn_project_cpp(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def(
      "rnn_forward_cpp(Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, "
      "Tensor? lengths, Tensor? reset, str mode, bool reverse, bool batch_first=False, "
      "Tensor? batch_sizes=None, bool need_workspace=True) "
      "-> (Tensor out, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "rnn_backward_cpp(Tensor grad_out, Tensor grad_h_n, Tensor? grad_c_n, Tensor workspace, "
      "Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? c0, Tensor? lengths, Tensor? reset, "
      "str mode, bool reverse, bool batch_first=False, Tensor? batch_sizes=None) "
      "-> (Tensor grad_gx, Tensor grad_gh, Tensor grad_h0, Tensor grad_c0, Tensor hprev)");
  m.def(
      "rnn_cell_forward_cpp(Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, str mode) -> (Tensor h_new, Tensor c_new, Tensor workspace)");
  m.def(
      "rnn_cell_backward_cpp(Tensor grad_h_new, Tensor? grad_c_new, Tensor workspace, Tensor x, "
      "Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, bool has_bias, str mode) "
      "-> (Tensor grad_x, Tensor grad_h, Tensor grad_c, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh)");
}

TORCH_LIBRARY_IMPL(fastrec, CPU, m) {
  m.impl("rnn_project_cpp", &fastrec::rnn_project_cpp);
  m.impl("rnn_forward_cpp", &fastrec::rnn_forward_cpp);
  m.impl("rnn_backward_cpp", &fastrec::rnn_backward_cpp);
  m.impl("rnn_cell_forward_cpp", &fastrec::rnn_cell_forward_cpp);
  m.impl("rnn_cell_backward_cpp", &fastrec::rnn_cell_backward_cpp);
}
