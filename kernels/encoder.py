"""The encoder layer's block after attention, fused in Triton: forward and backward.

Contract: ``encoder_layer`` in fastrec/ops/encoder.py (the attention core and the input
projection run outside, as the attention op's kernels and one GEMM). Per token row r of the
layer's input x (rows in the caller's layout, ``(B, L)`` or ``(L, B)``), with ``a`` the attention
output (``(B, H, L, D)``, any strides, row r's column e at head ``e // D``, dim ``e % D``):

    o  = drop1(a Wout^T + bout)                     (E)
    post-norm:  h1 = x + o,   y = LN1(h1),  out = LN2(y + drop2(FF(y)))
    pre-norm:   h1 = x + o,   y = LN2(h1),  out = h1 + drop2(FF(y))
    FF(y) = drop(act(y W1^T + b1)) W2^T + b2         (act: GELU (erf) or ReLU)

Kernels (BLOCK_M rows at a time, F in BLOCK_F chunks, E padded to BLOCK_E = the next power of two
>= max(E, 16) and masked; E <= MAX_EMBED):

- ``_block_forward_kernel``: one program per row block; writes ``out`` and, post-norm only, the pre-LN2 sum ``y +
  drop2(FF(y))`` in the accumulator dtype (what LN2's backward needs without a second FF pass).
- ``_block_backward_kernel``: recomputes o, h1, y and each F chunk's pre-activation; writes the
  residual part of dx (``dh1``), d(a) in a contiguous ``(B, H, L, D)`` tensor, and partial sums
  of every weight, bias and layer-norm gradient. Persistent grid (``backward_programs``: one
  program per SM): program p takes row blocks p, p + programs, ... in order and adds their
  gradients into its own zeroed row of a ``(programs, total)`` buffer (``partial_layout``; the
  out_proj weight's in registers, stored once), which the launcher sums over programs with one
  reduction: deterministic (fixed block -> program assignment, one ordered sum), no atomics, and
  bounded by programs x (2EF + E^2 + F + 6E) accumulator elements (20 MB fp32 at E = 64, F = 256
  on 132 SMs), whatever the batch.

Dropout: the three masks are fastrec's dropout contract (fastrec/ops/dropout.py) for the tensors
the unfused layer drops: element n = r * E + e of ``(rows, E)`` (dropout1, dropout2) and n = r * F
+ f of ``(rows, F)`` (the feed-forward dropout), kept iff the Philox uniform of counter (n lo, n
hi) under that dropout's seed is >= p. The rescale 1 / (1 - p) arrives as three fp32 parts whose
fp64 sum is exact (fp64 inputs), or their fp32 rounding (other dtypes), as the dropout kernel's.

Numerics: fp64 inputs compute in fp64, every other dtype in fp32 (16-bit loads are upcast, the
stores rounded back). fp16/bf16 dots take operands in the input dtype with fp32 accumulation
(tensor cores; the tiles the layer computes, such as the layer norm and activation outputs, are
rounded to the input dtype for the dot, as torch's 16-bit layer stores them), except where
``upcast_dots`` says (the interpreter; the backward at E = 64); fp32 dots are IEEE unless
ALLOW_TF32 (torch's matmul flag).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from fastrec.kernels._common import TRITON_DTYPES, KernelVariant, variant
from fastrec.kernels._host import cdiv, launcher, next_power_of_2

MAX_EMBED = 64
MAX_EMBED_FP64 = 32  # fp64 tiles take twice the registers: the backward at E = 64 spills


@triton.jit
def _keep(seed_ptr, n, p):
    """Whether element n (int64) of a dropped tensor is kept: fastrec's dropout contract."""
    seed = tl.load(seed_ptr)
    c0 = n.to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, zero, zero)
    return (r0 >> 8).to(tl.float32) * 5.960464477539063e-08 >= p


@triton.jit
def _factor(hi, mid, lo, COMPUTE: tl.constexpr):
    """The dropout rescale 1 / (1 - p) in the compute dtype (exact fp64 sum for fp64). One return
    per helper: the compiler types every return statement, even under a constexpr branch."""
    if COMPUTE == tl.float64:
        factor = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    else:
        factor = tl.cast(hi, tl.float32)
    return factor


@triton.jit
def _drop(v, seed_ptr, n, p, factor, DROP: tl.constexpr):
    if DROP:
        v = tl.where(_keep(seed_ptr, n, p), v * factor, 0.0)
    return v


@triton.jit
def _layer_norm(h, cmask, G, Be, cols, E, eps, COMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(y, xhat, rstd) of the rows of h (padding columns of h are zero; y and xhat are zero there)."""
    mean = tl.sum(h, axis=1) / E
    centred = tl.where(cmask[None, :], h - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / E
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = centred * rstd[:, None]
    g = tl.load(G + cols, mask=cmask, other=0.0).to(COMPUTE)
    y = xhat * g[None, :]
    if HAS_BIAS:
        y += tl.load(Be + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
    return y, xhat, rstd


@triton.jit
def _layer_norm_backward(dy, xhat, rstd, G, cols, cmask, E, COMPUTE: tl.constexpr):
    """d(input) of a layer norm from d(output) dy."""
    g = tl.load(G + cols, mask=cmask, other=0.0).to(COMPUTE)
    dxh = dy * g[None, :]
    m1 = tl.sum(dxh, axis=1) / E
    m2 = tl.sum(dxh * xhat, axis=1) / E
    return tl.where(cmask[None, :], (dxh - m1[:, None] - xhat * m2[:, None]) * rstd[:, None], 0.0)


@triton.jit
def _activation(z, GELU: tl.constexpr):
    if GELU:
        act = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        act = tl.maximum(z, 0.0)
    return act


@triton.jit
def _activation_grad(z, GELU: tl.constexpr):
    """d act / dz in z's dtype."""
    if GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        grad = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        grad = tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    return grad


@triton.jit
def _head_offsets(rows, cols, n_inner, head_dim, s_o, s_i, s_h, s_d):
    """Offsets of the (rows, cols) tile in a (B, H, L, D) tensor of strides s_* for (outer,
    inner, head, dim), row r = outer * n_inner + inner, column e = head * head_dim + dim."""
    outer = rows // n_inner
    inner = rows % n_inner
    offs = outer[:, None] * s_o + inner[:, None] * s_i + (cols // head_dim)[None, :] * s_h
    return offs + (cols % head_dim)[None, :] * s_d


@triton.jit
def _accumulate(ptr, value, mask):
    """*ptr += value where mask (a program's own partial row: no other program writes it)."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _dot(a, b, acc, OPERAND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in acc's dtype, the operands cast to OPERAND (fp16/bf16 inputs: their own
    dtype, on the tensor cores with fp32 accumulation; else the compute dtype)."""
    return tl.dot(a.to(OPERAND), b.to(OPERAND), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _residual(
    x, a, w, Bout, Seed1, rows, cols, cmask, E, p1, f1, COMPUTE: tl.constexpr, OPERAND: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROP1: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """h1 = x + drop1(a w^T + bout), w the (BLOCK_E, BLOCK_E) Wout tile."""
    o = _dot(a, tl.trans(w), tl.zeros(x.shape, dtype=COMPUTE), OPERAND, DOT_PRECISION)
    if HAS_BIAS:
        o += tl.load(Bout + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
    n = rows.to(tl.int64)[:, None] * E + cols[None, :]
    return x + _drop(o, Seed1, n, p1, f1, DROP1)


@launcher
@triton.jit
def _block_forward_kernel(
    X,  # (rows, E) contiguous: the layer's input (the residual)
    A,  # (B, H, L, D) attention output, strides s_a*
    Out,  # (rows, E) contiguous, X's dtype
    Pre,  # (rows, E) contiguous, accumulator dtype: post-norm's pre-LN2 sum (unused pre-norm)
    Wout,  # (E, E) out_proj.weight
    Bout,  # (E,) out_proj.bias
    G1,  # (E,) norm1.weight
    Be1,  # (E,) norm1.bias
    W1,  # (F, E) linear1.weight
    B1,  # (F,) linear1.bias
    W2,  # (E, F) linear2.weight
    B2,  # (E,) linear2.bias
    G2,  # (E,) norm2.weight
    Be2,  # (E,) norm2.bias
    Seed1,  # (1,) int64: dropout1's seed
    SeedF,  # (1,) int64: the feed-forward dropout's seed
    Seed2,  # (1,) int64: dropout2's seed
    M,  # rows
    E,
    F,
    n_inner,
    head_dim,
    s_ao,
    s_ai,
    s_ah,
    s_ad,
    eps1,
    eps2,
    p1,
    pf,
    p2,
    f1_hi,
    f1_mid,
    f1_lo,
    ff_hi,
    ff_mid,
    ff_lo,
    f2_hi,
    f2_mid,
    f2_lo,
    NORM_FIRST: tl.constexpr,
    GELU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROP1: tl.constexpr,
    DROPF: tl.constexpr,
    DROP2: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out for BLOCK_M rows (see the module docstring)."""
    COMPUTE: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    OPERAND: tl.constexpr = COMPUTE if UPCAST_INPUTS else X.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < M
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * E + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
    a_offs = _head_offsets(rows, cols, n_inner, head_dim, s_ao, s_ai, s_ah, s_ad)
    a = tl.load(A + a_offs, mask=mask, other=0.0)
    f1 = _factor(f1_hi, f1_mid, f1_lo, COMPUTE)
    w = tl.load(Wout + cols[:, None] * E + cols[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    h1 = _residual(x, a, w, Bout, Seed1, rows, cols, cmask, E, p1, f1, COMPUTE, OPERAND, HAS_BIAS, DROP1, DOT_PRECISION)
    if NORM_FIRST:
        y, _xhat, _rstd = _layer_norm(h1, cmask, G2, Be2, cols, E, eps2, COMPUTE, HAS_BIAS)
    else:
        y, _xhat, _rstd = _layer_norm(h1, cmask, G1, Be1, cols, E, eps1, COMPUTE, HAS_BIAS)
    ff = _factor(ff_hi, ff_mid, ff_lo, COMPUTE)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=COMPUTE)
    for start in range(0, F, BLOCK_F):
        fc = start + tl.arange(0, BLOCK_F)
        fmask = fc < F
        w1_t = tl.load(W1 + fc[None, :] * E + cols[:, None], mask=cmask[:, None] & fmask[None, :], other=0.0)
        z = _dot(y, w1_t, tl.zeros((BLOCK_M, BLOCK_F), dtype=COMPUTE), OPERAND, DOT_PRECISION)
        if HAS_BIAS:
            z += tl.load(B1 + fc, mask=fmask, other=0.0).to(COMPUTE)[None, :]
        u = _drop(_activation(z, GELU), SeedF, rows.to(tl.int64)[:, None] * F + fc[None, :], pf, ff, DROPF)
        w2_t = tl.load(W2 + cols[None, :] * F + fc[:, None], mask=fmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(u, w2_t, acc, OPERAND, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B2 + cols, mask=cmask, other=0.0).to(COMPUTE)[None, :]
    f2 = _factor(f2_hi, f2_mid, f2_lo, COMPUTE)
    n = rows.to(tl.int64)[:, None] * E + cols[None, :]
    acc = _drop(acc, Seed2, n, p2, f2, DROP2)
    if NORM_FIRST:
        out = h1 + acc
    else:
        h2 = tl.where(cmask[None, :], y + acc, 0.0)
        tl.store(Pre + rows[:, None] * E + cols[None, :], h2, mask=mask)
        out, _xhat2, _rstd2 = _layer_norm(h2, cmask, G2, Be2, cols, E, eps2, COMPUTE, HAS_BIAS)
    tl.store(Out + rows[:, None] * E + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)


@launcher
@triton.jit
def _block_backward_kernel(
    DOut,  # (rows, E) contiguous: d(out)
    X,  # (rows, E) contiguous: the layer's input
    A,  # (B, H, L, D) attention output, strides s_a*
    Pre,  # (rows, E) accumulator dtype: post-norm's pre-LN2 sum from the forward
    DX,  # (rows, E) contiguous, X's dtype: the residual part of dx
    DA,  # (B, H, L, D) contiguous, X's dtype: d(attention output)
    Part,  # (programs, total) accumulator dtype: this program's partial sums (partial_layout)
    Wout,  # (E, E)
    Bout,  # (E,)
    G1,  # (E,)
    Be1,  # (E,)
    W1,  # (F, E)
    B1,  # (F,)
    W2,  # (E, F)
    B2,  # (E,)
    G2,  # (E,)
    Be2,  # (E,)
    Seed1,  # (1,) int64
    SeedF,  # (1,) int64
    Seed2,  # (1,) int64
    M,
    E,
    F,
    n_inner,
    head_dim,
    s_ao,
    s_ai,
    s_ah,
    s_ad,
    s_do,  # DA's strides for (outer, inner, head, dim)
    s_di,
    s_dh,
    s_dd,
    eps1,
    eps2,
    p1,
    pf,
    p2,
    f1_hi,
    f1_mid,
    f1_lo,
    ff_hi,
    ff_mid,
    ff_lo,
    f2_hi,
    f2_mid,
    f2_lo,
    NORM_FIRST: tl.constexpr,
    GELU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROP1: tl.constexpr,
    DROPF: tl.constexpr,
    DROP2: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """dx (residual part), d(a) and the partial weight gradients for BLOCK_M rows."""
    COMPUTE: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    OPERAND: tl.constexpr = COMPUTE if UPCAST_INPUTS else X.dtype.element_ty
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    both = cmask[:, None] & cmask[None, :]
    # partial_layout: Wout (E, E), bout, g1, be1, W1 (F, E), b1 (F), W2 (E, F), b2, g2, be2
    part = Part + pid.to(tl.int64) * (2 * E * F + E * E + F + 6 * E)
    o_bout = E * E
    o_w1 = o_bout + 3 * E
    o_b1 = o_w1 + F * E
    o_w2 = o_b1 + F
    o_b2 = o_w2 + E * F
    f1 = _factor(f1_hi, f1_mid, f1_lo, COMPUTE)
    ff = _factor(ff_hi, ff_mid, ff_lo, COMPUTE)
    f2 = _factor(f2_hi, f2_mid, f2_lo, COMPUTE)
    w = tl.load(Wout + cols[:, None] * E + cols[None, :], mask=both, other=0.0)  # (E, E), every block's
    dwout = tl.zeros((BLOCK_E, BLOCK_E), dtype=COMPUTE)  # this program's out_proj.weight gradient
    # Persistent: row block b belongs to program b % programs, which adds its gradient partials
    # to its own (zeroed) row of Part in the order of its blocks.
    for block in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        tile = rows[:, None] * E + cols[None, :]
        n_e = rows.to(tl.int64)[:, None] * E + cols[None, :]
        x = tl.load(X + tile, mask=mask, other=0.0).to(COMPUTE)
        a = tl.load(A + _head_offsets(rows, cols, n_inner, head_dim, s_ao, s_ai, s_ah, s_ad), mask=mask, other=0.0)
        h1 = _residual(
            x, a, w, Bout, Seed1, rows, cols, cmask, E, p1, f1, COMPUTE, OPERAND, HAS_BIAS, DROP1, DOT_PRECISION
        )
        dout = tl.load(DOut + tile, mask=mask, other=0.0).to(COMPUTE)
        if NORM_FIRST:
            y, xhat_y, rstd_y = _layer_norm(h1, cmask, G2, Be2, cols, E, eps2, COMPUTE, HAS_BIAS)
            dpre = dout  # d(out) reaches the FF output and the residual h1 directly
        else:
            y, xhat_y, rstd_y = _layer_norm(h1, cmask, G1, Be1, cols, E, eps1, COMPUTE, HAS_BIAS)
            h2 = tl.load(Pre + tile, mask=mask, other=0.0)
            _out, xhat2, rstd2 = _layer_norm(h2, cmask, G2, Be2, cols, E, eps2, COMPUTE, HAS_BIAS)
            _accumulate(part + o_b2 + E + cols, tl.sum(dout * xhat2, axis=0), cmask)
            if HAS_BIAS:
                _accumulate(part + o_b2 + 2 * E + cols, tl.sum(dout, axis=0), cmask)
            dpre = _layer_norm_backward(dout, xhat2, rstd2, G2, cols, cmask, E, COMPUTE)
        df = _drop(dpre, Seed2, n_e, p2, f2, DROP2)  # d(FF output before dropout2)
        if HAS_BIAS:
            _accumulate(part + o_b2 + cols, tl.sum(df, axis=0), cmask)
        if NORM_FIRST:
            dy = tl.zeros((BLOCK_M, BLOCK_E), dtype=COMPUTE)
        else:  # h2 = y + ...: d(out) reaches y through the residual as well
            dy = dpre
        for start in range(0, F, BLOCK_F):
            fc = start + tl.arange(0, BLOCK_F)
            fmask = fc < F
            ef = cmask[:, None] & fmask[None, :]
            w1_t = tl.load(W1 + fc[None, :] * E + cols[:, None], mask=ef, other=0.0)  # (E, F chunk)
            z = _dot(y, w1_t, tl.zeros((BLOCK_M, BLOCK_F), dtype=COMPUTE), OPERAND, DOT_PRECISION)
            if HAS_BIAS:
                z += tl.load(B1 + fc, mask=fmask, other=0.0).to(COMPUTE)[None, :]
            n_f = rows.to(tl.int64)[:, None] * F + fc[None, :]
            u = _drop(_activation(z, GELU), SeedF, n_f, pf, ff, DROPF)
            dw2 = _dot(tl.trans(df), u, tl.zeros((BLOCK_E, BLOCK_F), dtype=COMPUTE), OPERAND, DOT_PRECISION)
            _accumulate(part + o_w2 + cols[:, None] * F + fc[None, :], dw2, ef)
            w2 = tl.load(W2 + cols[:, None] * F + fc[None, :], mask=ef, other=0.0)  # (E, F chunk)
            du = _dot(df, w2, tl.zeros((BLOCK_M, BLOCK_F), dtype=COMPUTE), OPERAND, DOT_PRECISION)
            dz = _drop(du, SeedF, n_f, pf, ff, DROPF) * _activation_grad(z, GELU)
            if HAS_BIAS:
                _accumulate(part + o_b1 + fc, tl.sum(dz, axis=0), fmask)
            dw1 = _dot(tl.trans(dz), y, tl.zeros((BLOCK_F, BLOCK_E), dtype=COMPUTE), OPERAND, DOT_PRECISION)
            _accumulate(part + o_w1 + fc[:, None] * E + cols[None, :], dw1, fmask[:, None] & cmask[None, :])
            dy = _dot(dz, tl.trans(w1_t), dy, OPERAND, DOT_PRECISION)
        if NORM_FIRST:  # y = LN2(h1); out = h1 + ...
            _accumulate(part + o_b2 + E + cols, tl.sum(dy * xhat_y, axis=0), cmask)
            if HAS_BIAS:
                _accumulate(part + o_b2 + 2 * E + cols, tl.sum(dy, axis=0), cmask)
            dout = tl.load(DOut + tile, mask=mask, other=0.0).to(COMPUTE)
            dh1 = dout + _layer_norm_backward(dy, xhat_y, rstd_y, G2, cols, cmask, E, COMPUTE)
        else:  # y = LN1(h1)
            _accumulate(part + o_bout + E + cols, tl.sum(dy * xhat_y, axis=0), cmask)
            if HAS_BIAS:
                _accumulate(part + o_bout + 2 * E + cols, tl.sum(dy, axis=0), cmask)
            dh1 = _layer_norm_backward(dy, xhat_y, rstd_y, G1, cols, cmask, E, COMPUTE)
        tl.store(DX + tile, dh1.to(DX.dtype.element_ty), mask=mask)
        do = _drop(dh1, Seed1, n_e, p1, f1, DROP1)
        if HAS_BIAS:
            _accumulate(part + o_bout + cols, tl.sum(do, axis=0), cmask)
        a = tl.load(A + _head_offsets(rows, cols, n_inner, head_dim, s_ao, s_ai, s_ah, s_ad), mask=mask, other=0.0)
        dwout = _dot(tl.trans(do), a, dwout, OPERAND, DOT_PRECISION)
        da = _dot(do, w, tl.zeros((BLOCK_M, BLOCK_E), dtype=COMPUTE), OPERAND, DOT_PRECISION)
        d_offs = _head_offsets(rows, cols, n_inner, head_dim, s_do, s_di, s_dh, s_dd)
        tl.store(DA + d_offs, da.to(DA.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # this block's partial writes reach every thread before the next block's reads
    tl.store(part + cols[:, None] * E + cols[None, :], dwout, mask=both)


# --------------------------------------------------------------------------- launchers
def _factor_parts(p: float) -> tuple[float, float, float]:
    """fp32 values (hi, mid, lo) with hi + mid + lo == 1 / (1 - p) exactly in fp64."""
    scale = 1.0 / (1.0 - p)
    hi = float(np.float32(scale))
    mid = float(np.float32(scale - hi))
    lo = float(np.float32(scale - hi - mid))
    return hi, mid, lo


def partial_layout(embed: int, ff: int) -> list[tuple[str, tuple[int, ...]]]:
    """The gradients in a row of the backward's partial buffer, in order, with their shapes."""
    e, f = embed, ff
    return [
        ("out_proj.weight", (e, e)),
        ("out_proj.bias", (e,)),
        ("norm1.weight", (e,)),
        ("norm1.bias", (e,)),
        ("linear1.weight", (f, e)),
        ("linear1.bias", (f,)),
        ("linear2.weight", (e, f)),
        ("linear2.bias", (e,)),
        ("norm2.weight", (e,)),
        ("norm2.bias", (e,)),
    ]


def block_config(
    dtype: torch.dtype, embed: int, rows: int, interpreter: bool, backward: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_E, BLOCK_F, num_warps). The interpreter's cost grows with programs, so it
    takes big row blocks. On the GPU each config compiles without register spills for every flag
    combination on sm_80 and sm_90 (the compile-only check pins it): fp32 / fp64 dots run on the
    FMA units, whose operands hold the whole reduction dimension in registers, and the backward
    keeps about ten row tiles live, so the row and F blocks shrink as E grows."""
    block_e = max(16, next_power_of_2(embed))
    if interpreter:
        return max(16, min(64, next_power_of_2(rows))), block_e, 32, 4
    if backward:
        if dtype == torch.float64 or block_e >= 64:
            return 8, block_e, (8 if block_e >= 64 else 16), 8
        return 16, block_e, 32, 8
    if block_e <= 32:
        return (16 if dtype == torch.float64 else 32), block_e, 16, 4
    if dtype == torch.float64:
        return 8, block_e, 32, 8
    return (16 if dtype == torch.float32 else 32), block_e, 32, 8


def upcast_dots(embed: int, interpreter: bool, backward: bool) -> bool:
    """Whether 16-bit inputs reach the dots as fp32 (the UPCAST_INPUTS constexpr) rather than in
    their own dtype (tensor cores, fp32 accumulation): in the interpreter, whose bf16 arithmetic
    is wrong, and in the backward at E = 64, whose tensor-core operands need BLOCK_M >= 16, which
    does not fit the registers there (the fp32 path at BLOCK_M = 8 does)."""
    return interpreter or (backward and embed > 32)


def backward_programs(blocks: int, device: torch.device) -> int:
    """The persistent backward's grid: one program per SM on CUDA (its block configs use about the
    whole register file, so one program per SM is resident), two in the interpreter (which runs
    programs one after the other; two keep the row-block loop and the sum over programs
    exercised); never more than the row blocks."""
    if device.type == "cuda":
        return max(1, min(blocks, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(blocks, 2))


def _common_args(x, a, batch_major, weights, seeds, ps, eps, norm_first, gelu, allow_tf32, backward):
    """The kernels' shared trailing arguments and constexprs."""
    w_out, b_out, g1, be1, w1, b1, w2, b2, g2, be2 = weights
    rows, embed = x.shape
    ff = w1.shape[0]
    batch, heads, length, head_dim = a.shape
    n_inner = length if batch_major else batch
    sb, sh, sl, sd = a.stride()
    s_ao, s_ai = (sb, sl) if batch_major else (sl, sb)
    has_bias = b_out is not None
    dummy = x  # stands in for absent biases / seeds: never read
    tensors = [w_out, b_out if has_bias else dummy, g1, be1 if has_bias else dummy, w1]
    tensors += [b1 if has_bias else dummy, w2, b2 if has_bias else dummy, g2, be2 if has_bias else dummy]
    tensors += [s if s is not None else dummy for s in seeds]
    parts = []
    for p in ps:
        parts += _factor_parts(p)
    scalars = [rows, embed, ff, n_inner, head_dim, s_ao, s_ai, sh, sd]
    flags = dict(
        NORM_FIRST=bool(norm_first),
        GELU=bool(gelu),
        HAS_BIAS=has_bias,
        DROP1=ps[0] > 0.0,
        DROPF=ps[1] > 0.0,
        DROP2=ps[2] > 0.0,
        ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
    )
    flags["UPCAST_INPUTS"] = upcast_dots(embed, x.device.type == "cpu", backward)
    return tensors, scalars, [*eps, *ps, *parts], flags


def block_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    batch_major: bool,
    weights: list[torch.Tensor | None],
    seeds: list[torch.Tensor | None],
    ps: tuple[float, float, float],
    eps: tuple[float, float],
    norm_first: bool,
    gelu: bool,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (rows, E), pre (rows, E) accumulator dtype; empty pre-norm). ``x``: contiguous (rows, E)
    token rows; ``a``: the attention output (B, H, L, D); ``batch_major``: rows are (b, l) (else
    (l, b)); ``weights``: out_proj w/b, norm1 w/b, linear1 w/b, linear2 w/b, norm2 w/b (biases all
    present or all None); ``seeds``/``ps``: dropout1, feed-forward dropout, dropout2."""
    rows, embed = x.shape
    limit = MAX_EMBED_FP64 if x.dtype == torch.float64 else MAX_EMBED
    if embed > limit:
        raise ValueError(f"embed_dim must be at most {limit} for the fused block in {x.dtype}, got {embed}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty_like(x)
    pre = torch.empty((0 if norm_first else rows, embed), dtype=acc, device=x.device)
    block_m, block_e, block_f, warps = block_config(x.dtype, embed, rows, x.device.type == "cpu")
    tensors, scalars, floats, flags = _common_args(
        x, a, batch_major, weights, seeds, ps, eps, norm_first, gelu, allow_tf32, False
    )
    grid = (cdiv(rows, block_m),)
    _block_forward_kernel[grid](
        x, a, out, pre if not norm_first else out, *tensors, *scalars, *floats,
        **flags, BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_F=block_f, num_warps=warps,
    )  # fmt: skip
    return out, pre


def block_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    pre: torch.Tensor,
    batch_major: bool,
    weights: list[torch.Tensor | None],
    seeds: list[torch.Tensor | None],
    ps: tuple[float, float, float],
    eps: tuple[float, float],
    norm_first: bool,
    gelu: bool,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(dx residual part (rows, E), d(a) (B, H, L, D) contiguous, the 10 weight gradients in
    ``block_forward``'s order, in the weights' dtype: norm1's None pre-norm, biases None when
    absent)."""
    rows, embed = x.shape
    ff = weights[4].shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_m, block_e, block_f, warps = block_config(x.dtype, embed, rows, x.device.type == "cpu", True)
    programs = backward_programs(cdiv(rows, block_m), x.device)
    layout = partial_layout(embed, ff)
    total = sum(int(np.prod(shape)) for _, shape in layout)
    part = torch.zeros((programs, total), dtype=acc, device=x.device)
    dx = torch.empty_like(x)
    da = torch.empty(a.shape, dtype=x.dtype, device=x.device)
    sb, sh, sl, sd = da.stride()
    s_do, s_di = (sb, sl) if batch_major else (sl, sb)
    tensors, scalars, floats, flags = _common_args(
        x, a, batch_major, weights, seeds, ps, eps, norm_first, gelu, allow_tf32, True
    )
    _block_backward_kernel[(programs,)](
        grad_out.contiguous(), x, a, pre if not norm_first else x, dx, da, part, *tensors, *scalars,
        s_do, s_di, sh, sd, *floats,
        **flags, BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_F=block_f, num_warps=warps,
    )  # fmt: skip
    sums = part.sum(0)
    grads, offset = [], 0
    for (name, shape), weight in zip(layout, weights, strict=True):
        size = int(np.prod(shape))
        grad = sums[offset : offset + size].view(shape)
        offset += size
        unused = weight is None or (norm_first and name.startswith("norm1"))
        grads.append(None if unused else grad.to(weight.dtype))
    return dx, da, grads


# ------------------------------------------------------------------------------------------------
# every variant the launchers can pick (for the compile-only test)
# ------------------------------------------------------------------------------------------------
EMBED_BUCKETS = (16, 32, 64)


def kernel_variants() -> list[KernelVariant]:
    """Every kernel x dtype x BLOCK_E bucket x flag combination (NORM_FIRST, GELU, HAS_BIAS,
    DROPOUT for all three dropouts at once; ALLOW_TF32 for fp32), with the GPU block configs."""
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        acc = "fp64" if dt == "fp64" else "fp32"
        pointers = {"Pre": acc, "Part": acc, "Seed1": "i64", "SeedF": "i64", "Seed2": "i64"}
        for name, fn in (("forward", _block_forward_kernel), ("backward", _block_backward_kernel)):
            for embed in EMBED_BUCKETS if dt != "fp64" else [e for e in EMBED_BUCKETS if e <= MAX_EMBED_FP64]:
                backward = name == "backward"
                block_m, block_e, block_f, warps = block_config(torch_dtype, embed, 1 << 20, False, backward)
                for norm_first in (False, True):
                    for gelu in (False, True):
                        for dropout in (False, True):
                            for tf32 in (False, True) if dt == "fp32" else (False,):
                                flags = dict(NORM_FIRST=norm_first, GELU=gelu, HAS_BIAS=True, DROP1=dropout)
                                flags.update(DROPF=dropout, DROP2=dropout, ALLOW_TF32=tf32)
                                constexprs = dict(flags, UPCAST_INPUTS=upcast_dots(embed, False, backward))
                                constexprs.update(BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_F=block_f)
                                scalar_floats = {"eps1", "eps2", "p1", "pf", "p2"}

                                def arg_type(arg: str, pointers=pointers, dt=dt, floats=scalar_floats) -> str:
                                    if arg[0].isupper() and arg not in ("M", "E", "F"):
                                        return "*" + pointers.get(arg, dt)
                                    return "fp32" if arg in floats or arg[:2] in ("f1", "ff", "f2") else "i32"

                                on = tuple(k for k in ("NORM_FIRST", "GELU", "DROP1", "ALLOW_TF32") if flags[k])
                                options = dict(num_warps=warps, num_stages=1)
                                bucket = f"BLOCK_E={block_e}"
                                variants.append(
                                    variant("encoder", name, fn, dt, bucket, constexprs, options, on, arg_type)
                                )
    return variants


COVERAGE_ALTERNATE_FLAGS = ("ALLOW_TF32",)

__all__ = [
    "MAX_EMBED",
    "MAX_EMBED_FP64",
    "backward_programs",
    "block_backward",
    "block_config",
    "block_forward",
    "kernel_variants",
    "partial_layout",
    "upcast_dots",
]
