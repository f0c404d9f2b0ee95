"""Fused scaled-dot-product attention in Triton (FlashAttention-2 style), forward and backward.

Contract: the docstring of fastrec/ops/attention.py (shared with the C++ and torch backends).
Layout of this file, top-down:

1. ``@triton.jit`` helpers: the allowed-key mask, the score tile, the dropout keep mask.
2. Kernels
   - ``_attention_forward_kernel``: grid (B*H, cdiv(Lq, BLOCK_M)). Online softmax over key
     blocks; writes ``out`` and the natural-log ``lse`` (+inf, with out = 0, for a query row that
     has no allowed key).
   - ``_attention_backward_preprocess_kernel``: Delta_i = rowsum(dO_i * O_i).
   - ``_attention_backward_dkdv_kernel``: grid over key blocks; loops over query blocks and
     recomputes P from lse.
   - ``_attention_backward_dq_kernel``: grid over query blocks; loops over key blocks.
   No atomics: every output element is written by exactly one program (deterministic).
   B*H is grid axis 0 (limit 2**31 - 1), the sequence blocks axis 1 (limit 65535): recommender
   batches times heads exceed 65535.
3. Launchers ``attention_forward`` / ``attention_backward`` (tensors in, tensors out; no
   autograd) and ``kernel_variants()``, the list of every kernel variant the launchers can pick
   (dtype x constexpr flags x block config), used by tests/test_kernels_compile.py.

Math, per (b, h), with s_ij = scale * q_i.k_j + bias_ij over allowed keys j:
    P = softmax_j(s), lse_i = logsumexp_j(s_ij), Z_ij = keep_ij / (1 - dropout_p)
    out_i = sum_j P_ij Z_ij v_j
    dV_j = sum_i P_ij Z_ij dO_i,  dP_ij = Z_ij dO_i.v_j,  dS_ij = P_ij (dP_ij - Delta_i)
    dQ_i = scale sum_j dS_ij k_j,  dK_j = scale sum_i dS_ij q_i
Scores are kept in base 2 (scale * log2(e) folded into one multiply; exp2 instead of exp); lse is
stored in natural log.

Variants are constexpr flags, not copies: CAUSAL, HAS_KEY_PADDING_MASK, HAS_LENGTHS, HAS_BIAS,
DROPOUT, ALLOW_TF32 (fp32 dots), UPCAST_INPUTS (interpreter: bf16 is broken there, so loaded tiles
are cast to fp32 at once), BLOCK_M / BLOCK_N / BLOCK_D (BLOCK_D = next power of two >= max(D, 16);
loads along the head dim are masked). Sequence lengths are not specialised (``do_not_specialize``),
so a new L does not recompile. fp64 inputs are computed in fp64 (accumulators included), fp32 in
fp32 (``input_precision="ieee"`` unless allow_tf32), fp16/bf16 dots run in the input dtype with
fp32 accumulation (tensor cores) on the GPU.

Python float arguments reach a kernel as fp32; the launchers therefore pass ``scale`` and the
dropout rescale 1 / (1 - p) as a (high, low) pair of fp32 values that the kernel adds in its
compute dtype, which keeps fp64 results accurate to ~1e-14.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastrec.kernels._common import DTYPE_CLASSES, TRITON_DTYPES, KernelVariant, accumulator_type, tf32_choices, variant
from fastrec.kernels._host import cdiv, launcher, next_power_of_2

from fastrec import backends
from fastrec._tables import package_table, parse_card_table

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln(2)


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _allowed_keys(
    KeyPaddingMask,  # (B, Lk) bool (int32 for fp64), contiguous; already offset to this batch row
    offs_k,  # (BLOCK,) int32 key indices of this tile
    hi,  # keys at or beyond hi are not allowed (hi <= min(Lk, lengths[b]))
    HAS_KEY_PADDING_MASK: tl.constexpr,
):
    """Bool (BLOCK,): key j is in range, below the length and not padding."""
    key_ok = offs_k < hi
    if HAS_KEY_PADDING_MASK:
        padded = tl.load(KeyPaddingMask + offs_k, mask=key_ok, other=1)
        key_ok = key_ok & (padded == 0)
    return key_ok


@triton.jit
def _score_tile(
    qk,  # q.k tile, any orientation: (BLOCK_M, BLOCK_N) or its transpose, compute dtype
    offs_q,  # query indices, broadcastable against qk ((BLOCK_M, 1) or (1, BLOCK_M))
    offs_k,  # key indices, broadcastable against qk ((1, BLOCK_N) or (BLOCK_N, 1))
    key_ok,  # bool, same broadcast shape as offs_k: allowed by length / padding / range
    qk_scale,  # scale * log2(e), compute dtype
    Bias,  # (B|1, H|1, Lq, Lk) float, strided; already offset to this (b, h)
    stride_bias_m,
    stride_bias_n,
    Lq,
    HAS_BIAS: tl.constexpr,
    MASK_CAUSAL: tl.constexpr,
):
    """Base-2 scores s * log2(e) of a tile, -inf where the key is not allowed."""
    s = qk * qk_scale
    allowed = key_ok
    if HAS_BIAS:
        bias = tl.load(
            Bias + offs_q * stride_bias_m + offs_k * stride_bias_n,
            mask=key_ok & (offs_q < Lq),
            other=0.0,
        )
        s += bias.to(s.dtype) * 1.4426950408889634  # log2(e); -inf bias stays -inf
    if MASK_CAUSAL:
        allowed = allowed & (offs_k <= offs_q)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _dropout_keep(
    seed,  # int64 scalar (loaded from the seed tensor)
    offs_q,  # (BLOCK_Q,) int32 query indices of the tile
    start_k,  # first key index of the tile, a multiple of 4
    Lk,
    batch_head,  # b * H + h
    dropout_p,
    BLOCK_K: tl.constexpr,
    KEYS_FIRST: tl.constexpr,  # return the (BLOCK_K, BLOCK_Q) transpose
):
    """Bool (BLOCK_Q, BLOCK_K) tile: Philox4x32-10, counter (i * ceil(Lk / 4) + j // 4, b * H + h,
    0, 0), output word j % 4; keep iff u >= p.

    One Philox call per four adjacent keys: a (BLOCK_Q, BLOCK_K / 4) draw whose four words are
    interleaved along the keys.
    """
    tl.static_assert(BLOCK_K % 4 == 0)
    BLOCK_Q: tl.constexpr = offs_q.shape[0]
    quads = start_k // 4 + tl.arange(0, BLOCK_K // 4)
    c0 = offs_q[:, None] * ((Lk + 3) // 4) + quads[None, :]  # (BLOCK_Q, BLOCK_K / 4)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + batch_head, zero, zero)
    # join(join(r0, r2), join(r1, r3))[..., y, x] is word 2y + x: row-major reshape interleaves.
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_Q, BLOCK_K))
    if KEYS_FIRST:
        r = tl.trans(r)
    u = (r >> 8).to(tl.float32) * 5.960464477539063e-08  # 2**-24
    return u >= dropout_p


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _forward_inner(
    acc,  # (BLOCK_M, BLOCK_D) unnormalised output, compute dtype
    l_i,  # (BLOCK_M,) running sum of exp2(s - m)
    m_i,  # (BLOCK_M,) running max of base-2 scores
    q,  # (BLOCK_M, BLOCK_D) query tile
    K,  # (B, H, Lk, D) strided; already offset to this (b, h)
    V,  # (B, H, Lk, D) strided; already offset to this (b, h)
    KeyPaddingMask,  # (B, Lk) bool (int32 for fp64); already offset to this b
    Bias,  # (B|1, H|1, Lq, Lk) strided; already offset to this (b, h)
    seed,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_bias_m,
    stride_bias_n,
    batch_head,
    offs_m,
    offs_d,
    lo,
    hi,
    Lq,
    Lk,
    head_dim,
    qk_scale,
    dropout_p,
    MASK_CAUSAL: tl.constexpr,
    HAS_KEY_PADDING_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi) (one function, two call sites when causal)."""
    compute_dtype = acc.dtype
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        key_ok = _allowed_keys(KeyPaddingMask, offs_k, hi, HAS_KEY_PADDING_MASK)
        kv_mask = offs_k < hi
        k_t = tl.load(  # (BLOCK_D, BLOCK_N)
            K + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=kv_mask[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(  # (BLOCK_N, BLOCK_D)
            V + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=kv_mask[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST_INPUTS:
            k_t = k_t.to(compute_dtype)
            v = v.to(compute_dtype)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        s = _score_tile(
            qk,
            offs_m[:, None],
            offs_k[None, :],
            key_ok[None, :],
            qk_scale,
            Bias,
            stride_bias_m,
            stride_bias_n,
            Lq,
            HAS_BIAS,
            MASK_CAUSAL,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far has m = -inf: shift by 0 so that exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, start_n, Lk, batch_head, dropout_p, BLOCK_N, False)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        m_i = m_new
    return acc, l_i, m_i


@launcher
@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attention_forward_kernel(
    Q,  # (B, H, Lq, D) strided
    K,  # (B, H, Lk, D) strided
    V,  # (B, H, Lk, D) strided
    Out,  # (B, H, Lq, D) contiguous, dtype of q
    LSE,  # (B, H, Lq) contiguous, fp32 (fp64 for fp64 q)
    KeyPaddingMask,  # (B, Lk) bool contiguous (int32 for fp64), True = ignore; read iff HAS_KEY_PADDING_MASK
    Lengths,  # (B,) int32; read iff HAS_LENGTHS
    Bias,  # (B|1, H|1, Lq, Lk) fp32/fp64 strided (0 on broadcast dims); read iff HAS_BIAS
    Seed,  # (1,) int64; read iff DROPOUT
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bias_b,
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    H,
    Lq,
    Lk,
    head_dim,
    scale_hi,  # scale * log2(e) = scale_hi + scale_lo
    scale_lo,
    dropout_p,
    dropout_scale_hi,  # 1 / (1 - dropout_p) = hi + lo
    dropout_scale_lo,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING_MASK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    compute_dtype: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    start_m = tl.program_id(1) * BLOCK_M
    batch_head = tl.program_id(0)
    b = batch_head // H
    h = batch_head % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    d_ok = offs_d < head_dim
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST_INPUTS:
        q = q.to(compute_dtype)
    K += b64 * stride_kb + h64 * stride_kh
    V += b64 * stride_vb + h64 * stride_vh
    KeyPaddingMask += b64 * Lk
    Bias += b64 * stride_bias_b + h64 * stride_bias_h
    qk_scale = tl.cast(scale_hi, compute_dtype) + tl.cast(scale_lo, compute_dtype)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    kv_len = Lk
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(Lengths + b), Lk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=compute_dtype)
    l_i = tl.zeros([BLOCK_M], dtype=compute_dtype)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=compute_dtype)
    lo, hi = 0, kv_len
    if CAUSAL:
        # Keys below start_m are allowed for every row of the block (no causal mask needed);
        # keys in [start_m, start_m + BLOCK_M) straddle the diagonal (the masked call below);
        # later keys are skipped.
        acc, l_i, m_i = _forward_inner(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            KeyPaddingMask,
            Bias,
            seed,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            stride_bias_m,
            stride_bias_n,
            batch_head,
            offs_m,
            offs_d,
            0,
            tl.minimum(start_m, kv_len),
            Lq,
            Lk,
            head_dim,
            qk_scale,
            dropout_p,
            False,
            HAS_KEY_PADDING_MASK,
            HAS_BIAS,
            DROPOUT,
            UPCAST_INPUTS,
            DOT_PRECISION,
            BLOCK_N,
        )
        lo, hi = start_m, tl.minimum(start_m + BLOCK_M, kv_len)
    acc, l_i, m_i = _forward_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        KeyPaddingMask,
        Bias,
        seed,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_bias_m,
        stride_bias_n,
        batch_head,
        offs_m,
        offs_d,
        lo,
        hi,
        Lq,
        Lk,
        head_dim,
        qk_scale,
        dropout_p,
        CAUSAL,
        HAS_KEY_PADDING_MASK,
        HAS_BIAS,
        DROPOUT,
        UPCAST_INPUTS,
        DOT_PRECISION,
        BLOCK_N,
    )

    empty = l_i == 0.0  # no allowed key: out = 0, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (tl.cast(dropout_scale_hi, compute_dtype) + tl.cast(dropout_scale_lo, compute_dtype))
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row = batch_head.to(tl.int64) * Lq + offs_m
    tl.store(LSE + row, lse, mask=row_ok)
    tl.store(
        Out + row[:, None] * head_dim + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@launcher
@triton.jit(do_not_specialize=["Lq"])
def _attention_backward_preprocess_kernel(
    Out,  # (B, H, Lq, D) strided
    GradOut,  # (B, H, Lq, D) strided
    Delta,  # (B, H, Lq) contiguous, fp32 (fp64 for fp64 inputs)
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    H,
    Lq,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    compute_dtype: tl.constexpr = tl.float64 if Out.dtype.element_ty == tl.float64 else tl.float32
    batch_head = tl.program_id(0)
    b64 = (batch_head // H).to(tl.int64)
    h64 = (batch_head % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(
        Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    ).to(compute_dtype)
    do = tl.load(
        GradOut + b64 * stride_gb + h64 * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=mask,
        other=0.0,
    ).to(compute_dtype)
    tl.store(Delta + batch_head.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(
    dk,  # (BLOCK_N, BLOCK_D) accumulator, compute dtype
    dv,  # (BLOCK_N, BLOCK_D) accumulator, compute dtype
    k,  # (BLOCK_N, BLOCK_D) key tile
    v,  # (BLOCK_N, BLOCK_D) value tile
    Q,  # (B, H, Lq, D) strided; already offset to this (b, h)
    GradOut,  # (B, H, Lq, D) strided; already offset to this (b, h)
    LSE,  # (B, H, Lq) contiguous; already offset to this (b, h)
    Delta,  # (B, H, Lq) contiguous; already offset to this (b, h)
    Bias,  # (B|1, H|1, Lq, Lk) strided; already offset to this (b, h)
    seed,
    stride_qm,
    stride_qd,
    stride_gm,
    stride_gd,
    stride_bias_m,
    stride_bias_n,
    batch_head,
    offs_k,  # (BLOCK_N,) key indices of this program
    start_k,  # offs_k[0]
    key_ok,  # (BLOCK_N,) bool allowed keys
    offs_d,
    lo,
    hi,
    Lq,
    Lk,
    head_dim,
    qk_scale,
    dropout_p,
    dropout_scale,
    MASK_CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [lo, hi); tiles are (keys, queries)."""
    compute_dtype = dk.dtype
    offs_mb = tl.arange(0, BLOCK_M)
    d_ok = offs_d < head_dim
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_mb
        row_ok = offs_m < Lq
        q_t = tl.load(  # (BLOCK_D, BLOCK_M)
            Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
            mask=row_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        do = tl.load(  # (BLOCK_M, BLOCK_D)
            GradOut + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST_INPUTS:
            q_t = q_t.to(compute_dtype)
            do = do.to(compute_dtype)
        # Rows beyond Lq and fully masked rows have lse = +inf, hence P = 0.
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf")).to(compute_dtype)
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0).to(compute_dtype)
        qk_t = tl.dot(k, q_t, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        s_t = _score_tile(
            qk_t,
            offs_m[None, :],
            offs_k[:, None],
            key_ok[:, None],
            qk_scale,
            Bias,
            stride_bias_m,
            stride_bias_n,
            Lq,
            HAS_BIAS,
            MASK_CAUSAL,
        )
        p_t = tl.math.exp2(s_t - lse[None, :] * 1.4426950408889634)  # (BLOCK_N, BLOCK_M)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, start_k, Lk, batch_head, dropout_p, BLOCK_N, True)
            z_t = tl.where(keep, dropout_scale, 0.0)
            dv = tl.dot((p_t * z_t).to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
            dp_t = dp_t * z_t
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
    return dk, dv


@launcher
@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attention_backward_dkdv_kernel(
    Q,  # (B, H, Lq, D) strided
    K,  # (B, H, Lk, D) strided
    V,  # (B, H, Lk, D) strided
    GradOut,  # (B, H, Lq, D) strided
    LSE,  # (B, H, Lq) contiguous, fp32 (fp64 for fp64 q)
    Delta,  # (B, H, Lq) contiguous, fp32 (fp64 for fp64 q)
    GradK,  # (B, H, Lk, D) contiguous, dtype of k
    GradV,  # (B, H, Lk, D) contiguous, dtype of v
    KeyPaddingMask,  # (B, Lk) bool contiguous (int32 for fp64); read iff HAS_KEY_PADDING_MASK
    Lengths,  # (B,) int32; read iff HAS_LENGTHS
    Bias,  # (B|1, H|1, Lq, Lk) strided; read iff HAS_BIAS
    Seed,  # (1,) int64; read iff DROPOUT
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_bias_b,
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    H,
    Lq,
    Lk,
    head_dim,
    scale_hi,  # scale = scale_hi + scale_lo (natural, for dK)
    scale_lo,
    qk_scale_hi,  # scale * log2(e) = qk_scale_hi + qk_scale_lo
    qk_scale_lo,
    dropout_p,
    dropout_scale_hi,  # 1 / (1 - dropout_p) = hi + lo
    dropout_scale_lo,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING_MASK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    compute_dtype: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    start_n = tl.program_id(1) * BLOCK_N
    batch_head = tl.program_id(0)
    b = batch_head // H
    b64 = b.to(tl.int64)
    h64 = (batch_head % H).to(tl.int64)

    offs_k = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_len = Lk
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(Lengths + b), Lk)
    key_ok = _allowed_keys(KeyPaddingMask + b64 * Lk, offs_k, kv_len, HAS_KEY_PADDING_MASK)
    kv_mask = (offs_k < Lk)[:, None] & d_ok[None, :]
    k = tl.load(
        K + b64 * stride_kb + h64 * stride_kh + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b64 * stride_vb + h64 * stride_vh + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST_INPUTS:
        k = k.to(compute_dtype)
        v = v.to(compute_dtype)
    Q += b64 * stride_qb + h64 * stride_qh
    GradOut += b64 * stride_gb + h64 * stride_gh
    LSE += batch_head.to(tl.int64) * Lq
    Delta += batch_head.to(tl.int64) * Lq
    Bias += b64 * stride_bias_b + h64 * stride_bias_h
    qk_scale = tl.cast(qk_scale_hi, compute_dtype) + tl.cast(qk_scale_lo, compute_dtype)
    dropout_scale = tl.cast(dropout_scale_hi, compute_dtype) + tl.cast(dropout_scale_lo, compute_dtype)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    # A key block entirely beyond the length gets no gradient: skip its query loop.
    q_hi = tl.where(start_n < kv_len, Lq, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=compute_dtype)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=compute_dtype)
    lo = 0
    if CAUSAL:
        # Queries before start_n see none of these keys (skipped); queries in
        # [start_n, start_n + BLOCK_N) straddle the diagonal (masked, first); later queries see all
        # of them (the unmasked call below).
        dk, dv = _dkdv_inner(
            dk,
            dv,
            k,
            v,
            Q,
            GradOut,
            LSE,
            Delta,
            Bias,
            seed,
            stride_qm,
            stride_qd,
            stride_gm,
            stride_gd,
            stride_bias_m,
            stride_bias_n,
            batch_head,
            offs_k,
            start_n,
            key_ok,
            offs_d,
            start_n,
            tl.minimum(start_n + BLOCK_N, q_hi),
            Lq,
            Lk,
            head_dim,
            qk_scale,
            dropout_p,
            dropout_scale,
            True,
            HAS_BIAS,
            DROPOUT,
            UPCAST_INPUTS,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
        )
        lo = start_n + BLOCK_N
    dk, dv = _dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q,
        GradOut,
        LSE,
        Delta,
        Bias,
        seed,
        stride_qm,
        stride_qd,
        stride_gm,
        stride_gd,
        stride_bias_m,
        stride_bias_n,
        batch_head,
        offs_k,
        start_n,
        key_ok,
        offs_d,
        lo,
        q_hi,
        Lq,
        Lk,
        head_dim,
        qk_scale,
        dropout_p,
        dropout_scale,
        False,
        HAS_BIAS,
        DROPOUT,
        UPCAST_INPUTS,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
    )

    dk = dk * (tl.cast(scale_hi, compute_dtype) + tl.cast(scale_lo, compute_dtype))
    row = batch_head.to(tl.int64) * Lk + offs_k
    out_ptrs = row[:, None] * head_dim + offs_d[None, :]
    tl.store(GradK + out_ptrs, dk.to(GradK.dtype.element_ty), mask=kv_mask)
    tl.store(GradV + out_ptrs, dv.to(GradV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) accumulator, compute dtype
    q,  # (BLOCK_M, BLOCK_D) query tile
    do,  # (BLOCK_M, BLOCK_D) output-gradient tile
    lse,  # (BLOCK_M,) natural-log lse, compute dtype
    delta,  # (BLOCK_M,) Delta, compute dtype
    K,  # (B, H, Lk, D) strided; already offset to this (b, h)
    V,  # (B, H, Lk, D) strided; already offset to this (b, h)
    KeyPaddingMask,  # (B, Lk) bool (int32 for fp64); already offset to this b
    Bias,  # (B|1, H|1, Lq, Lk) strided; already offset to this (b, h)
    seed,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_bias_m,
    stride_bias_n,
    batch_head,
    offs_m,
    offs_d,
    lo,
    hi,
    Lq,
    Lk,
    head_dim,
    qk_scale,
    dropout_p,
    dropout_scale,
    MASK_CAUSAL: tl.constexpr,
    HAS_KEY_PADDING_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    compute_dtype = dq.dtype
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        offs_k = start_n + offs_n
        key_ok = _allowed_keys(KeyPaddingMask, offs_k, hi, HAS_KEY_PADDING_MASK)
        kv_mask = (offs_k < hi)[None, :] & d_ok[:, None]
        k_t = tl.load(  # (BLOCK_D, BLOCK_N)
            K + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=kv_mask, other=0.0
        )
        v_t = tl.load(  # (BLOCK_D, BLOCK_N)
            V + offs_k[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=kv_mask, other=0.0
        )
        if UPCAST_INPUTS:
            k_t = k_t.to(compute_dtype)
            v_t = v_t.to(compute_dtype)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        s = _score_tile(
            qk,
            offs_m[:, None],
            offs_k[None, :],
            key_ok[None, :],
            qk_scale,
            Bias,
            stride_bias_m,
            stride_bias_n,
            Lq,
            HAS_BIAS,
            MASK_CAUSAL,
        )
        p = tl.math.exp2(s - lse[:, None] * 1.4426950408889634)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m, start_n, Lk, batch_head, dropout_p, BLOCK_N, False)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION, out_dtype=compute_dtype)
    return dq


@launcher
@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attention_backward_dq_kernel(
    Q,  # (B, H, Lq, D) strided
    K,  # (B, H, Lk, D) strided
    V,  # (B, H, Lk, D) strided
    GradOut,  # (B, H, Lq, D) strided
    LSE,  # (B, H, Lq) contiguous, fp32 (fp64 for fp64 q)
    Delta,  # (B, H, Lq) contiguous, fp32 (fp64 for fp64 q)
    GradQ,  # (B, H, Lq, D) contiguous, dtype of q
    KeyPaddingMask,  # (B, Lk) bool contiguous (int32 for fp64); read iff HAS_KEY_PADDING_MASK
    Lengths,  # (B,) int32; read iff HAS_LENGTHS
    Bias,  # (B|1, H|1, Lq, Lk) strided; read iff HAS_BIAS
    Seed,  # (1,) int64; read iff DROPOUT
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_bias_b,
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    H,
    Lq,
    Lk,
    head_dim,
    scale_hi,  # scale = scale_hi + scale_lo (natural, for dQ)
    scale_lo,
    qk_scale_hi,  # scale * log2(e) = qk_scale_hi + qk_scale_lo
    qk_scale_lo,
    dropout_p,
    dropout_scale_hi,  # 1 / (1 - dropout_p) = hi + lo
    dropout_scale_lo,
    CAUSAL: tl.constexpr,
    HAS_KEY_PADDING_MASK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    compute_dtype: tl.constexpr = tl.float64 if Q.dtype.element_ty == tl.float64 else tl.float32
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    start_m = tl.program_id(1) * BLOCK_M
    batch_head = tl.program_id(0)
    b = batch_head // H
    b64 = b.to(tl.int64)
    h64 = (batch_head % H).to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    tile_mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=tile_mask,
        other=0.0,
    )
    do = tl.load(
        GradOut + b64 * stride_gb + h64 * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        mask=tile_mask,
        other=0.0,
    )
    if UPCAST_INPUTS:
        q = q.to(compute_dtype)
        do = do.to(compute_dtype)
    row = batch_head.to(tl.int64) * Lq + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=float("inf")).to(compute_dtype)
    delta = tl.load(Delta + row, mask=row_ok, other=0.0).to(compute_dtype)
    K += b64 * stride_kb + h64 * stride_kh
    V += b64 * stride_vb + h64 * stride_vh
    KeyPaddingMask += b64 * Lk
    Bias += b64 * stride_bias_b + h64 * stride_bias_h
    qk_scale = tl.cast(qk_scale_hi, compute_dtype) + tl.cast(qk_scale_lo, compute_dtype)
    dropout_scale = tl.cast(dropout_scale_hi, compute_dtype) + tl.cast(dropout_scale_lo, compute_dtype)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    kv_len = Lk
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(Lengths + b), Lk)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=compute_dtype)
    lo, hi = 0, kv_len
    if CAUSAL:
        # As in the forward: unmasked key blocks below start_m, then the diagonal block masked.
        dq = _dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            KeyPaddingMask,
            Bias,
            seed,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            stride_bias_m,
            stride_bias_n,
            batch_head,
            offs_m,
            offs_d,
            0,
            tl.minimum(start_m, kv_len),
            Lq,
            Lk,
            head_dim,
            qk_scale,
            dropout_p,
            dropout_scale,
            False,
            HAS_KEY_PADDING_MASK,
            HAS_BIAS,
            DROPOUT,
            UPCAST_INPUTS,
            DOT_PRECISION,
            BLOCK_N,
        )
        lo, hi = start_m, tl.minimum(start_m + BLOCK_M, kv_len)
    dq = _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        K,
        V,
        KeyPaddingMask,
        Bias,
        seed,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        stride_bias_m,
        stride_bias_n,
        batch_head,
        offs_m,
        offs_d,
        lo,
        hi,
        Lq,
        Lk,
        head_dim,
        qk_scale,
        dropout_p,
        dropout_scale,
        CAUSAL,
        HAS_KEY_PADDING_MASK,
        HAS_BIAS,
        DROPOUT,
        UPCAST_INPUTS,
        DOT_PRECISION,
        BLOCK_N,
    )
    dq = dq * (tl.cast(scale_hi, compute_dtype) + tl.cast(scale_lo, compute_dtype))
    tl.store(
        GradQ + row[:, None] * head_dim + offs_d[None, :],
        dq.to(GradQ.dtype.element_ty),
        mask=tile_mask,
    )


# ------------------------------------------------------------------------------------------------
# block configs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


# Per kernel, (dtype class, BLOCK_D) -> config: the largest tiles for which the worst-case
# variant (every flag on; Philox dropout is what fills the registers) compiles for sm_80 and sm_90
# without register spills and within shared memory (tests/test_kernels_compile.py; found by
# trying candidates largest-first with triton 3.9's compiler). dtype class: "16" = fp16/bf16,
# "32" = fp32, "64" = fp64 (gradcheck on CUDA only: smallest tiles). Variants without dropout
# would fit larger tiles; a DROPOUT-dependent config is a possible speed-up not taken yet.
_GPU_CONFIGS = {
    "forward": {
        ("16", 16): BlockConfig(64, 32, 4, 3),
        ("16", 32): BlockConfig(64, 32, 4, 3),
        ("16", 64): BlockConfig(64, 32, 4, 3),
        ("16", 128): BlockConfig(32, 32, 4, 3),
        ("16", 256): BlockConfig(32, 32, 8, 2),
        ("32", 16): BlockConfig(64, 32, 8, 3),
        ("32", 32): BlockConfig(64, 32, 8, 3),
        ("32", 64): BlockConfig(64, 32, 8, 3),
        ("32", 128): BlockConfig(32, 16, 8, 2),
        ("32", 256): BlockConfig(32, 16, 8, 2),
        ("64", 16): BlockConfig(32, 16, 4, 2),
        ("64", 32): BlockConfig(32, 16, 4, 2),
        ("64", 64): BlockConfig(16, 16, 4, 2),
        ("64", 128): BlockConfig(16, 16, 4, 1),
        ("64", 256): BlockConfig(16, 16, 8, 1),
    },
    "dkdv": {
        ("16", 16): BlockConfig(32, 64, 4, 3),
        ("16", 32): BlockConfig(32, 64, 4, 3),
        ("16", 64): BlockConfig(32, 64, 8, 3),
        ("16", 128): BlockConfig(32, 32, 8, 2),  # 4 warps spill with dropout (the 4-word mask's interleave)
        ("16", 256): BlockConfig(16, 32, 8, 2),
        ("32", 16): BlockConfig(32, 64, 8, 3),
        ("32", 32): BlockConfig(32, 32, 4, 3),
        ("32", 64): BlockConfig(32, 32, 8, 2),
        ("32", 128): BlockConfig(16, 32, 8, 2),
        ("32", 256): BlockConfig(16, 16, 16, 1),
        ("64", 16): BlockConfig(16, 32, 4, 2),
        ("64", 32): BlockConfig(16, 16, 4, 2),
        ("64", 64): BlockConfig(16, 16, 4, 2),
        ("64", 128): BlockConfig(16, 16, 8, 1),
        ("64", 256): BlockConfig(16, 16, 8, 1),
    },
    "dq": {
        ("16", 16): BlockConfig(64, 32, 4, 3),
        ("16", 32): BlockConfig(64, 32, 8, 3),
        ("16", 64): BlockConfig(64, 32, 4, 3),
        ("16", 128): BlockConfig(32, 32, 4, 3),
        ("16", 256): BlockConfig(32, 16, 8, 2),
        ("32", 16): BlockConfig(64, 32, 8, 3),
        ("32", 32): BlockConfig(32, 16, 8, 2),
        ("32", 64): BlockConfig(32, 32, 8, 2),
        ("32", 128): BlockConfig(32, 16, 8, 2),
        ("32", 256): BlockConfig(16, 16, 8, 1),
        ("64", 16): BlockConfig(16, 16, 2, 1),
        ("64", 32): BlockConfig(16, 16, 4, 2),
        ("64", 64): BlockConfig(16, 16, 2, 1),
        ("64", 128): BlockConfig(16, 16, 8, 1),
        ("64", 256): BlockConfig(16, 16, 8, 1),
    },
}
# Register use is not monotonic in the flags (ptxas): the compile check's flag coverage, not only
# the all-flags variant, decided several of these entries.
# Variants known to spill (reported, not failed, by the compile check): fp64 backward at
# BLOCK_D=256 keeps several (16, 256) fp64 tiles live (k, v, dK, dV / q, dO, dQ) and spills at
# the smallest tiles. Only gradcheck runs fp64 on a GPU: this costs speed, not correctness.
SPILLS_ACCEPTED = {
    ("dkdv", "fp64", 256): "fp64 backward at head_dim > 128: (16, 256) fp64 tiles",
    ("dq", "fp64", 256): "fp64 backward at head_dim > 128: (16, 256) fp64 tiles",
    # ptxas caps this 2-warp kernel at 96 registers on sm_90 and spills 8 B in some flag sets.
    ("dq", "fp64", 16): "fp64 dQ at head_dim <= 16 on sm_90: 8 B in some flag combinations",
}
# The interpreter's cost grows with programs x operations, not tile size: use big tiles there.
_INTERPRETER_CONFIG = BlockConfig(64, 64, 4, 1)
BLOCK_D_BUCKETS = (16, 32, 64, 128, 256)


def block_d_for(head_dim: int) -> int:
    """Padded head dim: next power of two >= max(head_dim, 16) (tl.dot needs K >= 16)."""
    return max(16, next_power_of_2(head_dim))


def preprocess_block_m(dtype: torch.dtype, head_dim: int) -> int:
    """Rows per program of the Delta kernel: two (rows, BLOCK_D) tiles of ~32 values per thread."""
    elements = 2048 if dtype == torch.float64 else 4096
    return max(8, min(128, elements // block_d_for(head_dim)))


# Measured configs per card (fastrec/attention_configs.json, written on the card by ``fastrec
# bench --family attention --write-configs PATH``) replace the ones above for variants without
# dropout and without a bias tile, which have registers to spare for larger tiles. Dropout (Philox)
# and bias (a (BLOCK_M, BLOCK_N) fp32 tile) variants keep the configs above everywhere. The
# compile check covers the table's configs too.
CONFIGS_VERSION = 1
TUNED_KERNELS = ("forward", "dkdv", "dq")


def _valid_config(kernel: str, cfg: BlockConfig) -> bool:
    """What the kernels' static asserts and tl.dot need: tiles >= 16, the loop tile dividing the
    program's tile (forward, dq: BLOCK_N | BLOCK_M; dkdv: BLOCK_M | BLOCK_N)."""
    outer, inner = (cfg.block_n, cfg.block_m) if kernel == "dkdv" else (cfg.block_m, cfg.block_n)
    return kernel in TUNED_KERNELS and inner >= 16 and outer % inner == 0 and cfg.num_warps in (1, 2, 4, 8, 16)


def tuned_key(kernel: str, dtype: torch.dtype, block_d: int) -> str:
    """The table's key of one block-config slot, e.g. ``"dkdv/16/32"``."""
    return f"{kernel}/{DTYPE_CLASSES[dtype]}/{block_d}"


def parse_configs(table: dict, source: str = "attention config table") -> dict[str, dict[str, BlockConfig]]:
    """``{card: {tuned_key: BlockConfig}}`` from the JSON table; ValueError naming what is wrong.

    Format: ``{"version": 1, "cards": {card: {"measured": date, "torch": version, "triton":
    version, "configs": {key: {"block_m", "block_n", "num_warps", "num_stages", "ms",
    "default_ms"}}}}}``.
    """
    return parse_card_table(table, source, {"version": CONFIGS_VERSION}, "configs", _parse_config)


def _parse_config(where: str, key: str, row: object) -> BlockConfig:
    """One slot's BlockConfig; ValueError naming ``where`` when a field is missing or the tiles are
    not valid for the slot's kernel (``_valid_config``)."""
    try:
        cfg = BlockConfig(*(int(row[f]) for f in ("block_m", "block_n", "num_warps", "num_stages")))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where} needs integer block_m, block_n, num_warps, num_stages") from None
    if not _valid_config(key.split("/")[0], cfg):
        raise ValueError(f"{where} is not a valid config: {cfg}")
    return cfg


_TABLE: dict[str, dict[str, BlockConfig]] | None = None  # a parsed table standing in for the package's (tests)


def tuned_configs() -> dict[str, dict[str, BlockConfig]]:
    """The package's table (fastrec/attention_configs.json), parsed once."""
    return _TABLE if _TABLE is not None else package_table("attention_configs.json", parse_configs)


def card_name(device: torch.device) -> str:
    """The table's card key for ``device`` (a CUDA device)."""
    return backends.card_name(device.index if device.index is not None else torch.cuda.current_device())


def block_config(
    kernel: str,
    dtype: torch.dtype,
    head_dim: int,
    interpreter: bool,
    dropout_or_bias: bool = True,
    card: str | None = None,
) -> BlockConfig:
    """Tile sizes and launch options for ``kernel`` in {"forward", "dkdv", "dq"}: the interpreter's,
    else ``card``'s measured config when there is one and neither dropout nor a bias, else the
    spill-free default."""
    if interpreter:
        return _INTERPRETER_CONFIG
    block_d = block_d_for(head_dim)
    if not dropout_or_bias and card is not None:
        tuned = tuned_configs().get(card, {}).get(tuned_key(kernel, dtype, block_d))
        if tuned is not None:
            return tuned
    return _GPU_CONFIGS[kernel][(DTYPE_CLASSES[dtype], block_d)]


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _to_fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=256)  # a model passes the same few scales on every call
def _split_fp32(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo fp32 (kernels receive Python floats as fp32)."""
    hi = _to_fp32(x)
    return hi, _to_fp32(x - hi)


def _on_interpreter(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _flags(key_padding_mask, lengths, bias, causal, dropout_p, allow_tf32, dtype, interpreter):
    return dict(
        CAUSAL=bool(causal),
        HAS_KEY_PADDING_MASK=key_padding_mask is not None,
        HAS_LENGTHS=lengths is not None,
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0.0,
        UPCAST_INPUTS=interpreter,
        ALLOW_TF32=bool(allow_tf32) and dtype == torch.float32,
    )


def _optional_args(q, key_padding_mask, lengths, bias, seed, dropout_p):
    """Pointers for optional inputs (q stands in for an absent one: it is never read) and bias strides."""
    if key_padding_mask is not None:
        # fp64: an 8-bit load feeding the dot operands makes triton 3.6 pick an operand width that
        # its fp64 MMA lowering rejects ("fp64 don't support largeK MMA"); an int32 mask does not.
        wide = q.dtype == torch.float64
        key_padding_mask = key_padding_mask.to(torch.int32) if wide else key_padding_mask.contiguous()
    if lengths is not None:
        lengths = lengths.contiguous()
    if bias is not None:
        bias_strides = tuple(0 if bias.size(i) == 1 else bias.stride(i) for i in range(4))  # a size-1 dim broadcasts
    else:
        bias_strides = (0, 0, 0, 0)
    seed_arg = seed if (seed is not None and dropout_p > 0.0) else None
    return (
        key_padding_mask if key_padding_mask is not None else q,
        lengths if lengths is not None else q,
        bias if bias is not None else q,
        seed_arg if seed_arg is not None else q,
        bias_strides,
    )


def _config(kernel: str, q: torch.Tensor, bias, dropout_p: float, interpreter: bool, override) -> BlockConfig:
    """``override`` (the tuner's candidate) or block_config for this call's card."""
    if override is not None:
        return override
    heavy = bias is not None or dropout_p > 0.0
    card = None if interpreter or heavy else card_name(q.device)
    return block_config(kernel, q.dtype, q.shape[-1], interpreter, heavy, card)


def attention_forward(
    q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p, allow_tf32=False, config=None
):
    """(out (B, H, Lq, D), lse (B, H, Lq)); see fastrec/ops/attention.py. Inputs may be strided views.
    ``config``: a BlockConfig instead of the table's (the tuner's candidates)."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed must be an int64 tensor of shape (1,) when dropout_p > 0, got None")
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, len_q), dtype=acc_dtype, device=q.device)
    interpreter = _on_interpreter(q)
    cfg = _config("forward", q, bias, dropout_p, interpreter, config)
    kpm, lens, bias_arg, seed_arg, bias_strides = _optional_args(q, key_padding_mask, lengths, bias, seed, dropout_p)
    scale_hi, scale_lo = _split_fp32(scale * LOG2E)
    drop_hi, drop_lo = _split_fp32(1.0 / (1.0 - dropout_p))
    grid = (batch * heads, cdiv(len_q, cfg.block_m))
    _attention_forward_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        kpm,
        lens,
        bias_arg,
        seed_arg,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        heads,
        len_q,
        len_k,
        head_dim,
        scale_hi,
        scale_lo,
        dropout_p,
        drop_hi,
        drop_lo,
        **_flags(key_padding_mask, lengths, bias, causal, dropout_p, allow_tf32, q.dtype, interpreter),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d_for(head_dim),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


def attention_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    key_padding_mask,
    lengths,
    bias,
    seed,
    causal,
    scale,
    dropout_p,
    allow_tf32=False,
    dkdv_config=None,
    dq_config=None,
):
    """(dq, dk, dv), contiguous, dtypes of q, k, v; see fastrec/ops/attention.py. ``dkdv_config``,
    ``dq_config``: BlockConfigs instead of the table's (the tuner's candidates)."""
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    dropout_p = float(dropout_p)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed must be an int64 tensor of shape (1,) when dropout_p > 0, got None")
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = lse.contiguous()
    interpreter = _on_interpreter(q)
    block_d = block_d_for(head_dim)

    delta = torch.empty((batch, heads, len_q), dtype=acc_dtype, device=q.device)
    pre_block_m = preprocess_block_m(q.dtype, head_dim)
    _attention_backward_preprocess_kernel[(batch * heads, cdiv(len_q, pre_block_m))](
        out,
        grad_out,
        delta,
        *out.stride(),
        *grad_out.stride(),
        heads,
        len_q,
        head_dim,
        BLOCK_M=pre_block_m,
        BLOCK_D=block_d,
    )

    dq = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, heads, len_k, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((batch, heads, len_k, head_dim), dtype=v.dtype, device=q.device)
    kpm, lens, bias_arg, seed_arg, bias_strides = _optional_args(q, key_padding_mask, lengths, bias, seed, dropout_p)
    scale_hi, scale_lo = _split_fp32(scale)
    qk_scale_hi, qk_scale_lo = _split_fp32(scale * LOG2E)
    drop_hi, drop_lo = _split_fp32(1.0 / (1.0 - dropout_p))
    flags = _flags(key_padding_mask, lengths, bias, causal, dropout_p, allow_tf32, q.dtype, interpreter)
    common = (
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *grad_out.stride(),
        *bias_strides,
        heads,
        len_q,
        len_k,
        head_dim,
        scale_hi,
        scale_lo,
        qk_scale_hi,
        qk_scale_lo,
        dropout_p,
        drop_hi,
        drop_lo,
    )

    cfg = _config("dkdv", q, bias, dropout_p, interpreter, dkdv_config)
    _attention_backward_dkdv_kernel[(batch * heads, cdiv(len_k, cfg.block_n))](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        kpm,
        lens,
        bias_arg,
        seed_arg,
        *common,
        **flags,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    cfg = _config("dq", q, bias, dropout_p, interpreter, dq_config)
    _attention_backward_dq_kernel[(batch * heads, cdiv(len_q, cfg.block_m))](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        kpm,
        lens,
        bias_arg,
        seed_arg,
        *common,
        **flags,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# every variant the launchers can pick (for the compile-only test)
# ------------------------------------------------------------------------------------------------

FLAG_NAMES = ("CAUSAL", "HAS_KEY_PADDING_MASK", "HAS_LENGTHS", "HAS_BIAS", "DROPOUT")
# ALLOW_TF32 only switches fp32 dots to tf32: the sampled compile check turns it on in every other
# flag combination instead of doubling them (FASTREC_COMPILE_ALL=1 compiles all of them).
COVERAGE_ALTERNATE_FLAGS = ("ALLOW_TF32",)


def _arg_type(arg: str, dt: str) -> str | int:
    """Triton type of a kernel argument (1: the unit stride along the head dim)."""
    if arg.startswith("stride_"):
        return 1 if arg.endswith("d") else "i32"
    if arg in ("Q", "K", "V", "Out", "GradOut", "GradQ", "GradK", "GradV"):
        return "*" + dt
    if arg in ("LSE", "Delta", "Bias"):
        return "*" + accumulator_type(dt)
    mask = "*i32" if dt == "fp64" else "*i1"  # see _optional_args
    pointer = {"KeyPaddingMask": mask, "Lengths": "*i32", "Seed": "*i64"}.get(arg)
    if pointer is not None:
        return pointer
    return "i32" if arg in ("H", "Lq", "Lk", "head_dim") else "fp32"  # else scale / dropout floats


def _aligned(arg: str, kind: str) -> bool:
    """Pointers and strides are multiples of 16 in the common case (not the broadcast bias's)."""
    return kind.startswith("*") or (arg.startswith("stride_") and not arg.startswith("stride_bias"))


def _variant(fn, kernel, dt, constexprs, options, flags=(), tuned=""):
    """Signature as the JIT would build it for the common case: 16-byte aligned pointers,
    unit stride along the head dim (specialised to the constant 1), other strides % 16 == 0.
    ``tuned``: the card whose measured config this is (its own bucket)."""
    bucket = f"BLOCK_D={constexprs['BLOCK_D']}"
    if tuned:
        tiles = f"{constexprs['BLOCK_M']}x{constexprs['BLOCK_N']}w{options['num_warps']}s{options['num_stages']}"
        bucket += f" {tuned} {tiles}"
    spills = SPILLS_ACCEPTED.get((kernel, dt, constexprs["BLOCK_D"]), "")
    arg_type = lambda arg: _arg_type(arg, dt)
    return variant("attention", kernel, fn, dt, bucket, constexprs, options, flags, arg_type, _aligned, spills)


def kernel_variants() -> list[KernelVariant]:
    """Every GPU variant the launchers can pick: dtype x flags x BLOCK_D bucket x kernel.

    4 dtypes x 32 flag combinations (x2 for fp32's ALLOW_TF32) x 5 BLOCK_D buckets x 3 kernels,
    plus the preprocess kernel per dtype x BLOCK_D, plus each card's measured configs (flag
    combinations without DROPOUT or HAS_BIAS; their own bucket, named after the card and the
    tiles).
    """
    kernels = (
        ("forward", _attention_forward_kernel),
        ("dkdv", _attention_backward_dkdv_kernel),
        ("dq", _attention_backward_dq_kernel),
    )
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        for block_d in BLOCK_D_BUCKETS:
            variants.append(
                _variant(
                    _attention_backward_preprocess_kernel,
                    "backward_preprocess",
                    dt,
                    dict(BLOCK_M=preprocess_block_m(torch_dtype, block_d), BLOCK_D=block_d),
                    dict(num_warps=4, num_stages=1),
                )
            )
            for bits in range(2 ** len(FLAG_NAMES)):
                on = tuple(n for i, n in enumerate(FLAG_NAMES) if bits >> i & 1)
                for tf32 in tf32_choices(torch_dtype):
                    flags = on + (("ALLOW_TF32",) if tf32 else ())
                    for kernel, fn in kernels:
                        default = block_config(kernel, torch_dtype, block_d, interpreter=False)
                        configs = {"": default}
                        heavy = "DROPOUT" in on or "HAS_BIAS" in on
                        for card in [] if heavy else sorted(tuned_configs()):
                            cfg = block_config(kernel, torch_dtype, block_d, False, dropout_or_bias=False, card=card)
                            if cfg != default and cfg not in configs.values():
                                configs[card] = cfg
                        for card, cfg in configs.items():
                            constexprs = {n: (n in on) for n in FLAG_NAMES}
                            constexprs.update(
                                UPCAST_INPUTS=False,
                                ALLOW_TF32=tf32,
                                BLOCK_M=cfg.block_m,
                                BLOCK_N=cfg.block_n,
                                BLOCK_D=block_d,
                            )
                            options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                            variants.append(_variant(fn, kernel, dt, constexprs, options, flags, card))
    return variants


__all__ = [
    "attention_forward",
    "attention_backward",
    "kernel_variants",
    "block_config",
    "block_d_for",
    "BlockConfig",
    "KernelVariant",
]
