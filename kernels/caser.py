"""Caser's convolution block in Triton: every horizontal filter height and the vertical filters
in one forward and one backward, with the activation and the max over time fused.

Contract: fastrec/ops/caser.py (shared with the C++ and torch backends). Kernels:

- ``_caser_horizontal_forward_kernel``: grid (batch blocks, heights k, filter blocks). For each
  t < L - k the window E[b, t:t+k+1, :] is one contiguous run of (k+1) d values, so z for a
  (BLOCK_B, BLOCK_F) tile is a dot of the windows with the filters (BLOCK_K at a time); the
  activation, running max over t and argmax stay in registers, and so does a flag of a z that is
  not finite (stored as NONFINITE_BIT of argmax). Only valid windows are computed.
- ``_caser_vertical_forward_kernel``: grid (B, filter blocks, d blocks): sum over l of
  w_v[v, l] E[b, l, :], bias, activation.
- ``_caser_grad_epilogue_kernel``: g = grad * act'(z) and its column sums (the bias gradients),
  for the horizontal maxima and the vertical outputs.
- ``_caser_input_grad_kernel``: grid (batch blocks, positions p, d blocks). grad_E[b, p] = sum
  over (k, f) whose maximum window covers p (i = p - t* in [0, k]) of g w_h[k][f, i] (a gathered,
  masked load: weights outside a window are not read) + the vertical part.
- ``_caser_weight_grad_kernel``: grid (heights x rows (k, i), filter blocks, d blocks):
  grad_w_h[k][f, i] = sum_b g[b, k, f] E[b, t*[b, k, f] + i] (a gathered load per (b, f)).
- ``_caser_vertical_weight_grad_kernel``: grid (nv,): grad_w_v[v, l] = sum_b,j gv E[b, l, j].
- ``_caser_nonfinite_grad_kernel``: grid (batch blocks, heights k, filter blocks), after the
  others. Torch's dense backward also adds, at every window that is not the maximum,
  ``0 * act'(z)`` times the window's E and weights: 0, or NaN where act'(z) or an operand is not
  finite, so only where the forward flagged a (b, k, f). A program whose tile has no flag stops
  after reading argmax; otherwise it recomputes those windows' z and writes NaN into grad_E,
  grad_w_h and grad_b_h wherever one of the left-out terms is NaN.

No atomics: every output element is written by one program, in a fixed order (deterministic); the
NaN that the last kernel writes may come from several programs, all writing NaN.
fp64 computes in fp64, everything else in fp32 (fp16/bf16 dots in the input dtype with fp32
accumulation; fp32 dots in ieee fp32 unless ALLOW_TF32). UPCAST_INPUTS (interpreter) casts the
forward's dot inputs to fp32 first: the interpreter's bf16 is broken.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastrec.kernels._common import TRITON_DTYPES, KernelVariant, accumulator_type, tf32_choices, variant
from fastrec.kernels._conv_common import ACTIVATIONS, accumulate_dot, activate, activation_backward, activation_code
from fastrec.kernels._host import cdiv, launcher, next_power_of_2

NONFINITE_BIT = tl.constexpr(1 << 30)  # in argmax: some z of that (b, k, f) is not finite; bits below: t


@launcher
@triton.jit(do_not_specialize=["B", "L"])
def _caser_horizontal_forward_kernel(
    E,  # (B, L, d) contiguous
    W,  # (nh * d * L (L+1) / 2,): w_h[k] (nh, 1, k+1, d) flattened, concatenated over k
    Bias,  # (L, nh) contiguous (row k: bias of height k+1); not read without HAS_BIAS
    OutH,  # (B, L * nh) out: max over t of act(z), E's dtype
    ZH,  # (B, L * nh) out: z at that maximum, E's dtype
    ArgMax,  # (B, L * nh) out, int32: t of that maximum
    B,
    L,
    d,
    nh,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    compute_dtype = tl.float64 if E.dtype.element_ty == tl.float64 else tl.float32
    k = tl.program_id(1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    b_ok = offs_b < B
    f_ok = offs_f < nh
    window = (k + 1) * d
    rows = E + offs_b.to(tl.int64) * (L * d)  # (BLOCK_B,) start of each E[b]
    filters = W + nh * d * (k * (k + 1) // 2) + offs_f * window  # (BLOCK_F,) start of w_h[k][f]
    if HAS_BIAS:
        bias = tl.load(Bias + k * nh + offs_f, mask=f_ok, other=0.0).to(compute_dtype)
    else:
        bias = tl.zeros((BLOCK_F,), dtype=compute_dtype)
    best = tl.full((BLOCK_B, BLOCK_F), float("-inf"), compute_dtype)
    best_z = tl.zeros((BLOCK_B, BLOCK_F), dtype=compute_dtype)
    best_t = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.int32)  # t | NONFINITE_BIT once a z is not finite
    for t in range(0, L - k):
        acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=compute_dtype)
        for k0 in range(0, window, BLOCK_K):
            kk = k0 + offs_k
            kk_ok = kk < window
            e = tl.load(rows[:, None] + t * d + kk[None, :], mask=b_ok[:, None] & kk_ok[None, :], other=0.0)
            w = tl.load(filters[None, :] + kk[:, None], mask=kk_ok[:, None] & f_ok[None, :], other=0.0)
            acc = accumulate_dot(e, w, acc, UPCAST_INPUTS, ALLOW_TF32)
        z = acc + bias[None, :]
        a = activate(z, ACT)
        # max_pool1d's order: the first maximum wins, and a NaN always wins (its last NaN).
        take = (a > best) | (a != a) | (t == 0)
        best = tl.where(take, a, best)
        best_z = tl.where(take, z, best_z)
        best_t = tl.where(take, t | (best_t & NONFINITE_BIT), best_t)
        best_t |= tl.where((z - z) != 0, NONFINITE_BIT, 0)  # inf - inf and NaN - NaN are NaN
    out = offs_b.to(tl.int64)[:, None] * (L * nh) + k * nh + offs_f[None, :]
    mask = b_ok[:, None] & f_ok[None, :]
    tl.store(OutH + out, best.to(OutH.dtype.element_ty), mask=mask)
    tl.store(ZH + out, best_z.to(ZH.dtype.element_ty), mask=mask)
    tl.store(ArgMax + out, best_t, mask=mask)


@launcher
@triton.jit(do_not_specialize=["L"])
def _caser_vertical_forward_kernel(
    E,  # (B, L, d) contiguous
    WV,  # (nv, L): w_v (nv, 1, L, 1) contiguous
    BiasV,  # (nv,); not read without HAS_BIAS
    OutV,  # (B, nv * d) out: act(z_v), E's dtype
    ZV,  # (B, nv * d) out: z_v; not written when ACT == 0
    L,
    d,
    nv,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    compute_dtype = tl.float64 if E.dtype.element_ty == tl.float64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    v_ok = offs_v < nv
    d_ok = offs_d < d
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=compute_dtype)
    for pos in range(0, L):
        w = tl.load(WV + offs_v * L + pos, mask=v_ok, other=0.0).to(compute_dtype)
        e = tl.load(E + b * L * d + pos * d + offs_d, mask=d_ok, other=0.0).to(compute_dtype)
        acc += w[:, None] * e[None, :]
    if HAS_BIAS:
        acc += tl.load(BiasV + offs_v, mask=v_ok, other=0.0).to(compute_dtype)[:, None]
    out = b * nv * d + offs_v[:, None] * d + offs_d[None, :]
    mask = v_ok[:, None] & d_ok[None, :]
    if ACT != 0:
        tl.store(ZV + out, acc.to(ZV.dtype.element_ty), mask=mask)
    tl.store(OutV + out, activate(acc, ACT).to(OutV.dtype.element_ty), mask=mask)


@launcher
@triton.jit(do_not_specialize=["rows"])
def _caser_grad_epilogue_kernel(
    Grad,  # (rows, N) upstream gradient of act(z), contiguous
    Z,  # (rows, N) z; not read when ACT == 0
    G,  # (rows, N) out: grad * act'(z), compute dtype
    ColSum,  # (N,) out: sum over rows of G, compute dtype
    rows,
    N,
    ACT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    compute_dtype = G.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    total = tl.zeros((BLOCK_N,), dtype=compute_dtype)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask = (offs_r < rows)[:, None] & n_ok[None, :]
        index = offs_r.to(tl.int64)[:, None] * N + offs_n[None, :]
        g = tl.load(Grad + index, mask=mask, other=0.0).to(compute_dtype)
        if ACT != 0:
            z = tl.load(Z + index, mask=mask, other=0.0).to(compute_dtype)
            g = activation_backward(g, z, ACT)
        tl.store(G + index, g, mask=mask)
        total += tl.sum(g, 0)
    tl.store(ColSum + offs_n, total, mask=n_ok)


@launcher
@triton.jit(do_not_specialize=["B", "L"])
def _caser_input_grad_kernel(
    G,  # (B, L * nh) g at each maximum, compute dtype
    ArgMax,  # (B, L * nh) int32
    W,  # (nh * d * L (L+1) / 2,): w_h flattened, concatenated over heights
    WV,  # (nv, L)
    GV,  # (B, nv * d) gradient of z_v, compute dtype
    GradE,  # (B, L, d) out, E's dtype
    B,
    L,
    d,
    nh,
    nv,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    compute_dtype = G.dtype.element_ty
    p = tl.program_id(1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    b_ok = offs_b < B
    d_ok = offs_d < d
    row = offs_b.to(tl.int64)[:, None] * (L * nh)  # (BLOCK_B, 1)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=compute_dtype)
    for k in range(0, L):
        w_k = W + nh * d * (k * (k + 1) // 2)
        for f0 in range(0, nh, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            ok = b_ok[:, None] & (offs_f < nh)[None, :]
            index = row + k * nh + offs_f[None, :]
            g = tl.load(G + index, mask=ok, other=0.0)
            t = tl.load(ArgMax + index, mask=ok, other=0) & (NONFINITE_BIT - 1)
            i = p - t  # row of the filter that the maximum's window puts on p
            ok = ok & (i >= 0) & (i <= k) & (g != 0)
            g = tl.where(ok, g, 0.0)  # a NaN g of a window that does not cover p adds nothing here
            w = tl.load(  # (BLOCK_B, BLOCK_F, BLOCK_D) gathered filter rows w_h[k][f, 0, i, :]
                w_k + (offs_f[None, :, None] * (k + 1) + i[:, :, None]) * d + offs_d[None, None, :],
                mask=ok[:, :, None] & d_ok[None, None, :],
                other=0.0,
            ).to(compute_dtype)
            acc += tl.sum(g[:, :, None] * w, 1)
    for v in range(0, nv):
        wv = tl.load(WV + v * L + p).to(compute_dtype)
        gv = tl.load(
            GV + offs_b.to(tl.int64)[:, None] * (nv * d) + v * d + offs_d[None, :],
            mask=b_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += wv * gv
    out = (offs_b.to(tl.int64)[:, None] * L + p) * d + offs_d[None, :]
    tl.store(GradE + out, acc.to(GradE.dtype.element_ty), mask=b_ok[:, None] & d_ok[None, :])


@launcher
@triton.jit(do_not_specialize=["B", "L"])
def _caser_weight_grad_kernel(
    G,  # (B, L * nh) g at each maximum, compute dtype
    ArgMax,  # (B, L * nh) int32
    E,  # (B, L, d) contiguous
    GradW,  # (nh * d * L (L+1) / 2,) out: grad of the concatenated w_h, E's dtype
    B,
    L,
    d,
    nh,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    compute_dtype = G.dtype.element_ty
    k = tl.program_id(0) // L
    i = tl.program_id(0) % L
    # Programs with i > k (no such filter row) read and write nothing. (Masks rather than an early
    # return: the return made ptxas spill on sm_90.)
    rows_b = tl.where(i <= k, B, 0)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    f_ok = offs_f < tl.where(i <= k, nh, 0)
    d_ok = offs_d < d
    acc = tl.zeros((BLOCK_F, BLOCK_D), dtype=compute_dtype)
    for b0 in range(0, rows_b, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ok = (offs_b < B)[:, None] & f_ok[None, :]
        index = offs_b.to(tl.int64)[:, None] * (L * nh) + k * nh + offs_f[None, :]
        g = tl.load(G + index, mask=ok, other=0.0)
        t = tl.load(ArgMax + index, mask=ok, other=0) & (NONFINITE_BIT - 1)
        ok = ok & (g != 0)
        rows = offs_b.to(tl.int64)[:, None] * L + t + i  # (BLOCK_B, BLOCK_F) row of E under w_h[k][f, 0, i]
        e = tl.load(
            E + rows[:, :, None] * d + offs_d[None, None, :], mask=ok[:, :, None] & d_ok[None, None, :], other=0.0
        ).to(compute_dtype)
        acc += tl.sum(g[:, :, None] * e, 0)
    out = nh * d * (k * (k + 1) // 2) + (offs_f[:, None] * (k + 1) + i) * d + offs_d[None, :]
    tl.store(GradW + out, acc.to(GradW.dtype.element_ty), mask=f_ok[:, None] & d_ok[None, :])


@launcher
@triton.jit(do_not_specialize=["B", "L"])
def _caser_vertical_weight_grad_kernel(
    GV,  # (B, nv * d) gradient of z_v, compute dtype
    E,  # (B, L, d) contiguous
    GradWV,  # (nv, L) out, E's dtype
    B,
    L,
    d,
    nv,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    compute_dtype = GV.dtype.element_ty
    v = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    acc = tl.zeros((BLOCK_L,), dtype=compute_dtype)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < d
        part = tl.zeros((BLOCK_L, BLOCK_D), dtype=compute_dtype)
        for b in range(0, B):
            gv = tl.load(GV + b * nv * d + v * d + offs_d, mask=d_ok, other=0.0)
            e = tl.load(
                E + (b * L + offs_l[:, None]).to(tl.int64) * d + offs_d[None, :],
                mask=l_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(compute_dtype)
            part += e * gv[None, :]
        acc += tl.sum(part, 1)
    tl.store(GradWV + v * L + offs_l, acc.to(GradWV.dtype.element_ty), mask=l_ok)


@launcher
@triton.jit(do_not_specialize=["B", "L"])
def _caser_nonfinite_grad_kernel(
    E,  # (B, L, d) contiguous
    W,  # (nh * d * L (L+1) / 2,): w_h flattened, concatenated over heights
    Bias,  # (L, nh) contiguous; not read without HAS_BIAS
    G,  # (B, L * nh) g at each maximum, compute dtype
    ArgMax,  # (B, L * nh) int32: t of each maximum, NONFINITE_BIT where the forward flagged it
    GradE,  # (B, L, d) in / out: NaN added, E's dtype
    GradW,  # (nh * d * L (L+1) / 2,) in / out: NaN added, E's dtype
    GradB,  # (L * nh,) in / out: NaN added, compute dtype
    B,
    L,
    d,
    nh,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    compute_dtype = G.dtype.element_ty
    k = tl.program_id(1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_f = tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)
    b_ok = offs_b < B
    f_ok = offs_f < nh
    index = offs_b.to(tl.int64)[:, None] * (L * nh) + k * nh + offs_f[None, :]
    argmax = tl.load(ArgMax + index, mask=b_ok[:, None] & f_ok[None, :], other=0)
    flagged = (argmax & NONFINITE_BIT) != 0  # (BLOCK_B, BLOCK_F)
    if tl.max(tl.max(flagged.to(tl.int32), 1), 0) != 0:
        t_star = argmax & (NONFINITE_BIT - 1)
        g = tl.load(G + index, mask=flagged, other=0.0)
        window = (k + 1) * d
        rows = offs_b.to(tl.int64) * (L * d)  # (BLOCK_B,) offset of each E[b]
        filters = nh * d * (k * (k + 1) // 2) + offs_f * window  # (BLOCK_F,) offset of w_h[k][f]
        if HAS_BIAS:
            bias = tl.load(Bias + k * nh + offs_f, mask=f_ok, other=0.0).to(compute_dtype)
        else:
            bias = tl.zeros((BLOCK_F,), dtype=compute_dtype)
        offs_k = tl.arange(0, BLOCK_K)
        for t in range(0, L - k):
            # the terms the other kernels left out: every window but the maximum's with g != 0
            left_out = flagged & ((t_star != t) | (g == 0))
            nan_dz = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.int1)
            if ACT >= 2:  # 0 * act'(z) is NaN where act'(z) is (gelu, tanh, sigmoid): recompute z
                z = tl.zeros((BLOCK_B, BLOCK_F), dtype=compute_dtype) + bias[None, :]
                for k0 in range(0, window, BLOCK_K):
                    kk = k0 + offs_k
                    kk_ok = kk < window
                    e = tl.load(E + rows[:, None] + t * d + kk[None, :], mask=b_ok[:, None] & kk_ok[None, :], other=0.0)
                    w = tl.load(W + filters[:, None] + kk[None, :], mask=f_ok[:, None] & kk_ok[None, :], other=0.0)
                    z += tl.sum(e.to(compute_dtype)[:, None, :] * w.to(compute_dtype)[None, :, :], 2)
                dz = activation_backward(tl.zeros((BLOCK_B, BLOCK_F), dtype=compute_dtype), z, ACT)
                nan_dz = left_out & (dz != dz)
                nan_b = tl.max(nan_dz.to(tl.int32), 0) != 0
                tl.store(GradB + k * nh + offs_f, tl.full((BLOCK_F,), float("nan"), compute_dtype), mask=nan_b)
            for k0 in range(0, window, BLOCK_K):
                kk = k0 + offs_k
                kk_ok = kk < window
                e = tl.load(E + rows[:, None] + t * d + kk[None, :], mask=b_ok[:, None] & kk_ok[None, :], other=0.0)
                w = tl.load(W + filters[:, None] + kk[None, :], mask=f_ok[:, None] & kk_ok[None, :], other=0.0)
                e = e.to(compute_dtype)
                w = w.to(compute_dtype)
                bad_e = (e - e) != 0  # (BLOCK_B, BLOCK_K) E not finite
                bad_w = (w - w) != 0  # (BLOCK_F, BLOCK_K) w not finite
                # grad_E[b, t + kk // d]: NaN * w or 0 * a bad w of some filter
                hit = left_out[:, :, None] & (nan_dz[:, :, None] | bad_w[None, :, :])
                hit_e = (tl.max(hit.to(tl.int32), 1) != 0) & kk_ok[None, :]
                nan_e = tl.full((BLOCK_B, BLOCK_K), float("nan"), GradE.dtype.element_ty)
                tl.store(GradE + rows[:, None] + t * d + kk[None, :], nan_e, mask=hit_e)
                # grad_w_h[k][f, kk]: NaN * E or 0 * a bad E of some batch row
                hit = left_out[:, :, None] & (nan_dz[:, :, None] | bad_e[:, None, :])
                hit_w = (tl.max(hit.to(tl.int32), 0) != 0) & kk_ok[None, :]
                nan_w = tl.full((BLOCK_F, BLOCK_K), float("nan"), GradW.dtype.element_ty)
                tl.store(GradW + filters[:, None] + kk[None, :], nan_w, mask=hit_w)


# --------------------------------------------------------------------------------- launchers
_CASER_BLOCK_D_MAX = 64  # d is split over grid axis 2 in chunks of at most this


@dataclass(frozen=True)
class CaserBlocks:
    """Block sizes of the Caser kernels for one problem (interpreter: larger, fewer programs)."""

    forward_b: int
    forward_f: int
    forward_k: int
    vertical_v: int
    block_d: int
    backward_b: int
    backward_f: int
    nonfinite_b: int
    nonfinite_f: int
    nonfinite_k: int
    # Measured with the compile-only check: 4 warps spill in the forward at BLOCK_F = 64 (fp32
    # ieee dots run on FMA units) and in the gathered backward tiles on sm_90; 8 warps do not.
    num_warps: int = 8
    forward_stages: int = 2

    def forward_blocks(self) -> dict[str, int]:
        """The horizontal forward's BLOCK_ constexprs."""
        return dict(BLOCK_B=self.forward_b, BLOCK_F=self.forward_f, BLOCK_K=self.forward_k)

    def vertical_blocks(self) -> dict[str, int]:
        """The vertical forward's BLOCK_ constexprs."""
        return dict(BLOCK_V=self.vertical_v, BLOCK_D=self.block_d)

    def backward_blocks(self) -> dict[str, int]:
        """The BLOCK_ constexprs of the gathered backward kernels (input and weight gradient)."""
        return dict(BLOCK_B=self.backward_b, BLOCK_F=self.backward_f, BLOCK_D=self.block_d)

    def nonfinite_blocks(self) -> dict[str, int]:
        """The BLOCK_ constexprs of the non-finite gradient kernel (its (B, F, K) tiles)."""
        return dict(BLOCK_B=self.nonfinite_b, BLOCK_F=self.nonfinite_f, BLOCK_K=self.nonfinite_k)


def caser_blocks(batch: int, dim: int, filters: int, vertical: int, interpreter: bool) -> CaserBlocks:
    """Block sizes: tl.dot needs every side >= 16; the gathered backward tiles are
    (BLOCK_B, BLOCK_F, BLOCK_D), kept to 2048 elements (8 per thread with 8 warps) on the GPU, and
    so are the non-finite kernel's (BLOCK_B, BLOCK_F, BLOCK_K) (it runs only on flagged tiles)."""
    block_d = min(_CASER_BLOCK_D_MAX, max(16, next_power_of_2(dim)))
    block_f = min(64, max(16, next_power_of_2(filters)))
    if interpreter:
        big_b = min(64, max(16, next_power_of_2(batch)))
        return CaserBlocks(
            big_b, block_f, 64, next_power_of_2(vertical), block_d, big_b, block_f, big_b, block_f, block_d
        )
    backward_f = min(16, block_f)
    backward_b = max(1, 2048 // (backward_f * block_d))
    return CaserBlocks(
        32, block_f, 32, min(16, next_power_of_2(vertical)), block_d, backward_b, backward_f, 16, backward_f, 8
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _concat_weights(w_h: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.reshape(-1) for w in w_h])


def caser_forward(
    E: torch.Tensor,
    w_h: list[torch.Tensor],
    b_h: torch.Tensor | None,
    w_v: torch.Tensor,
    b_v: torch.Tensor | None,
    act_h: str,
    act_v: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Caser forward: ``(out_h, out_v, z_h, argmax, z_v)`` (contract in fastrec/ops/caser.py)."""
    E = E.contiguous()
    batch, length, dim = E.shape
    filters, vertical = w_h[0].shape[0], w_v.shape[0]
    sizes = (batch, length, dim, filters)  # the kernels' B, L, d, nh
    interpreter = E.device.type == "cpu"
    cfg = caser_blocks(batch, dim, filters, vertical, interpreter)
    W = _concat_weights(w_h)
    w_v = w_v.contiguous()
    out_h = E.new_empty(batch, length * filters)
    z_h = E.new_empty(batch, length * filters)
    argmax = E.new_empty(batch, length * filters, dtype=torch.int32)
    out_v = E.new_empty(batch, vertical * dim)
    z_v = E.new_empty(0) if act_v == "none" else E.new_empty(batch, vertical * dim)
    if batch == 0:
        return out_h, out_v, z_h, argmax, z_v
    grid = (cdiv(batch, cfg.forward_b), length, cdiv(filters, cfg.forward_f))
    _caser_horizontal_forward_kernel[grid](
        E,
        W,
        W if b_h is None else b_h.contiguous(),
        out_h,
        z_h,
        argmax,
        *sizes,
        ACT=activation_code(act_h),
        HAS_BIAS=b_h is not None,
        ALLOW_TF32=bool(allow_tf32) and E.dtype == torch.float32,
        UPCAST_INPUTS=interpreter,
        **cfg.forward_blocks(),
        num_warps=cfg.num_warps,
        num_stages=cfg.forward_stages,
    )
    grid = (batch, cdiv(vertical, cfg.vertical_v), cdiv(dim, cfg.block_d))
    _caser_vertical_forward_kernel[grid](
        E,
        w_v,
        w_v if b_v is None else b_v.contiguous(),
        out_v,
        out_v if act_v == "none" else z_v,
        length,
        dim,
        vertical,
        ACT=activation_code(act_v),
        HAS_BIAS=b_v is not None,
        **cfg.vertical_blocks(),
        num_warps=cfg.num_warps,
    )
    return out_h, out_v, z_h, argmax, z_v


# Tiles of the gradient epilogue. 8 warps: with 4, ptxas spills (8-392 B) in the fp64 and fp32 gelu
# and the fp16 / bf16 sigmoid variants, whose erf / division slow paths are calls.
_GRAD_EPILOGUE_BLOCKS = {"BLOCK_R": 32, "BLOCK_N": 64}
_GRAD_EPILOGUE_WARPS = 8


def _grad_epilogue(grad: torch.Tensor, z: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad * act'(z), its column sums)`` in the compute dtype, for a (rows, N) gradient."""
    rows, n = grad.shape
    g = torch.empty(rows, n, device=grad.device, dtype=_compute_dtype(grad.dtype))
    col_sum = torch.empty(n, device=grad.device, dtype=g.dtype)
    _caser_grad_epilogue_kernel[(cdiv(n, _GRAD_EPILOGUE_BLOCKS["BLOCK_N"]),)](
        grad,
        grad if act == "none" else z,
        g,
        col_sum,
        rows,
        n,
        ACT=activation_code(act),
        **_GRAD_EPILOGUE_BLOCKS,
        num_warps=_GRAD_EPILOGUE_WARPS,
    )
    return g, col_sum


def caser_backward(
    grad_h: torch.Tensor,
    grad_v: torch.Tensor,
    E: torch.Tensor,
    w_h: list[torch.Tensor],
    b_h: torch.Tensor | None,
    w_v: torch.Tensor,
    z_h: torch.Tensor,
    argmax: torch.Tensor,
    z_v: torch.Tensor,
    act_h: str,
    act_v: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Caser backward: ``(grad_E, grad_w_h, grad_b_h (L, nh), grad_w_v, grad_b_v)``; ``b_h``
    (L, nh) or None recomputes the flagged windows' z.

    ``allow_tf32`` is accepted for the op's signature; the backward kernels use no dots."""
    E = E.contiguous()
    batch, length, dim = E.shape
    filters, vertical = w_h[0].shape[0], w_v.shape[0]
    sizes = (batch, length, dim, filters)  # the kernels' B, L, d, nh
    cfg = caser_blocks(batch, dim, filters, vertical, E.device.type == "cpu")
    g_h, grad_b_h = _grad_epilogue(grad_h.contiguous(), z_h.contiguous(), act_h)
    g_v, col_v = _grad_epilogue(grad_v.contiguous(), z_v.contiguous(), act_v)
    W = _concat_weights(w_h)
    w_v = w_v.contiguous()
    grad_E = torch.empty_like(E)
    grad_W = torch.empty_like(W)
    grad_w_v = torch.empty_like(w_v)
    d_blocks = cdiv(dim, cfg.block_d)
    if batch > 0:
        _caser_input_grad_kernel[(cdiv(batch, cfg.backward_b), length, d_blocks)](
            g_h,
            argmax,
            W,
            w_v,
            g_v,
            grad_E,
            *sizes,
            vertical,
            **cfg.backward_blocks(),
            num_warps=cfg.num_warps,
        )
    _caser_weight_grad_kernel[(length * length, cdiv(filters, cfg.backward_f), d_blocks)](
        g_h,
        argmax,
        E,
        grad_W,
        *sizes,
        **cfg.backward_blocks(),
        num_warps=cfg.num_warps,
    )
    block_l = min(64, next_power_of_2(length))
    _caser_vertical_weight_grad_kernel[(vertical, cdiv(length, block_l))](
        g_v, E, grad_w_v, batch, length, dim, vertical, BLOCK_L=block_l, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps
    )
    if batch > 0:
        _caser_nonfinite_grad_kernel[(cdiv(batch, cfg.nonfinite_b), length, cdiv(filters, cfg.nonfinite_f))](
            E,
            W,
            W if b_h is None else b_h.contiguous(),
            g_h,
            argmax,
            grad_E,
            grad_W,
            grad_b_h,
            *sizes,
            ACT=activation_code(act_h),
            HAS_BIAS=b_h is not None,
            **cfg.nonfinite_blocks(),
            num_warps=cfg.num_warps,
        )
    # Separate tensors, not views of one buffer: a custom op's outputs must not alias each other.
    sizes = [w.numel() for w in w_h]
    grad_w_h = [part.view(w.shape).clone() for part, w in zip(torch.split(grad_W, sizes), w_h, strict=True)]
    dtype = E.dtype
    return (
        grad_E,
        grad_w_h,
        grad_b_h.view(length, filters).to(dtype),
        grad_w_v,
        col_v.view(vertical, dim).sum(1).to(dtype),
    )


# ------------------------------------------------------------- variants for the compile test
_CASER_INT_ARGS = ("B", "L", "d", "nh", "nv", "rows", "N")
_COMPUTE_DTYPE_ARGS = ("G", "ColSum", "GV", "GradB")  # gradient buffers the launchers allocate in fp32 / fp64
# ALLOW_TF32 only switches fp32 dots to tf32 and HAS_BIAS adds one bias load: the sampled compile
# check turns them on in every other combination instead of multiplying the combinations.
COVERAGE_ALTERNATE_FLAGS = ("ALLOW_TF32", "HAS_BIAS")


def _arg_type(arg: str, dt: str) -> str:
    """Triton type of a Caser kernel argument: sizes i32, ArgMax int32, the gradient buffers in the
    compute dtype (``_COMPUTE_DTYPE_ARGS``), the other pointers in the input dtype."""
    if arg in _CASER_INT_ARGS:
        return "i32"
    if arg == "ArgMax":
        return "*i32"
    return "*" + (accumulator_type(dt) if arg in _COMPUTE_DTYPE_ARGS else dt)


def _caser_variant(fn, kernel: str, dt: str, constexprs: dict, flags=(), options=None) -> KernelVariant:
    """Signature for the common case: 16-byte aligned pointers, integer sizes as i32; the bucket
    names the BLOCK_ constexprs."""
    bucket = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))
    options = dict(options or {"num_warps": 8})
    return variant("caser", kernel, fn, dt, bucket, constexprs, options, tuple(flags), lambda arg: _arg_type(arg, dt))


def _flags(act: str, **switches: bool) -> tuple[str, ...]:
    """A variant's flags: ``ACT=<act>`` (none: no flag), then the names of the switches that are on."""
    return tuple(f for f, on in ((f"ACT={act}", act != "none"), *switches.items()) if on)


def _caser_variants() -> list[KernelVariant]:
    """Every Caser kernel variant the launchers pick on the GPU: dtype x activation x bias (x tf32
    for fp32 dots) x the block configs of nh in {8, 16, 32, 64+} and d in {16, 32, 64+}."""
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        for filters, dim in itertools.product((8, 32, 64), (16, 32, 64)):
            cfg = caser_blocks(512, dim, filters, 4, interpreter=False)
            for code, act in enumerate(ACTIVATIONS):
                for bias in (False, True):
                    for tf32 in tf32_choices(torch_dtype) if dim == 64 else ():
                        switches = dict(HAS_BIAS=bias, ALLOW_TF32=tf32)
                        constexprs = dict(ACT=code, **switches, UPCAST_INPUTS=False, **cfg.forward_blocks())
                        flags = _flags(act, **switches)
                        variants.append(
                            _caser_variant(
                                _caser_horizontal_forward_kernel, "horizontal_forward", dt, constexprs, flags
                            )
                        )
                    if filters == 8:
                        constexprs = dict(ACT=code, HAS_BIAS=bias, **cfg.vertical_blocks())
                        flags = _flags(act, HAS_BIAS=bias)
                        variants.append(
                            _caser_variant(_caser_vertical_forward_kernel, "vertical_forward", dt, constexprs, flags)
                        )
                if filters == 8 and dim == 64:
                    constexprs = dict(ACT=code, **_GRAD_EPILOGUE_BLOCKS)
                    options = dict(num_warps=_GRAD_EPILOGUE_WARPS)
                    variants.append(
                        _caser_variant(
                            _caser_grad_epilogue_kernel, "grad_epilogue", dt, constexprs, _flags(act), options
                        )
                    )
            blocks = cfg.backward_blocks()
            variants.append(_caser_variant(_caser_input_grad_kernel, "input_grad", dt, blocks))
            variants.append(_caser_variant(_caser_weight_grad_kernel, "weight_grad", dt, blocks))
            if dim == 64:  # the non-finite kernel's blocks do not depend on d
                for code, act in enumerate(ACTIVATIONS):
                    for bias in (False, True):
                        constexprs = dict(ACT=code, HAS_BIAS=bias, **cfg.nonfinite_blocks())
                        flags = _flags(act, HAS_BIAS=bias)
                        variants.append(
                            _caser_variant(_caser_nonfinite_grad_kernel, "nonfinite_grad", dt, constexprs, flags)
                        )
            if filters == 8 and dim == 64:
                constexprs = dict(BLOCK_L=64, BLOCK_D=64)
                variants.append(
                    _caser_variant(_caser_vertical_weight_grad_kernel, "vertical_weight_grad", dt, constexprs)
                )
    return list({v.name: v for v in variants}.values())  # configs shared by several shapes once


def kernel_variants() -> list[KernelVariant]:
    """Every GPU variant of the Caser kernels."""
    return _caser_variants()


__all__ = ["CaserBlocks", "caser_backward", "caser_blocks", "caser_forward", "kernel_variants"]
