"""Fused recurrences in Triton (Elman tanh / relu, GRU, LSTM): forward and reverse-time backward.

Contract: the docstring of fastrec/ops/rnn.py and csrc/rnn.cpp (shared with the C++ backend: same
inputs, outputs and workspace layout, so one autograd.Function serves both). The caller computes
the input projection ``gx = x W_ih^T + b_ih`` of every step as one GEMM before the forward, and
``dx``, ``dW_ih``, ``dW_hh``, the biases as GEMMs after the backward; these kernels run only the
sequential part. Layout of this file, top-down:

1. ``@triton.jit`` helpers: activations, the per-step row bookkeeping (lengths, reverse, reset),
   the gate arithmetic of one column tile (forward and backward).
2. Kernels, grid ``(cdiv(B, BLOCK_B),)``: each program owns BLOCK_B rows of the batch for the whole
   time loop, so no program ever waits for another (no atomics: deterministic).
   - ``_rnn_forward_kernel``: per step ``gh = h W_hh^T`` by ``tl.dot``, then the gates; writes
     ``out``, the workspace and the final state.
   - ``_rnn_backward_kernel``: reverse steps; per step the gate gradients ``grad_gx`` /
     ``grad_gh`` (they differ only in GRU's n gate: ``dgh_n = dgx_n * r``), ``hprev``, and
     ``dh <- carry + grad_gh W_hh``.
   Two ways to hold W_hh, a constexpr ``RESIDENT``:
   - resident (padded hidden size BLOCK_H <= 64; 32 for fp64): the G gate blocks of W_hh are
     loaded once, before the time loop, and stay on chip (registers, and shared memory where the
     compiler stages the dot operands); the state h (c, dh, dc) stays in registers too.
   - streamed (larger hidden sizes up to 1024, not only powers of two: masked tiles): W_hh is read
     per step in (BLOCK_K, BLOCK_H) tiles, one gate at a time (served from L1 / L2 after the first
     step); the state lives in a (B, H) scratch tensor of the compute dtype. Each step has two
     phases separated by a block barrier (``tl.debug_barrier``, a ``bar.sync``, which also
     orders the global memory accesses of the program's threads): the forward first writes the
     entering state (after reset) to the workspace's hprev slot, then for each output tile reads
     it back over all K tiles; the backward first writes every gate gradient of the step, then
     forms ``dh`` per K tile.
3. Launchers ``rnn_forward`` / ``rnn_backward`` (tensors in, tensors out; no autograd),
   ``block_config`` and ``kernel_variants()`` (every variant the launchers can pick, for
   tests/test_kernels_compile.py).
4. Single-step cells (``rnn_cell_forward`` / ``rnn_cell_backward``, the contract of
   ``rnn_cell_forward_cpp`` / ``rnn_cell_backward_cpp``): one forward kernel per step (both GEMMs
   and the gate arithmetic per tile of rows and hidden units), one elementwise backward kernel for
   the gate gradients, then GEMMs; their variants in ``cell_kernel_variants()``.

Numerics: the state and every accumulation are in the compute dtype (fp32; fp64 for fp64 inputs,
so gradcheck runs through the kernels). fp32 dots use ``input_precision="ieee"`` unless torch's
allow_tf32 flag is on. fp16 / bf16: gx, W_hh and the outputs keep the input dtype, the state h and
the accumulators are fp32; the dot operands (h, or the gate gradients) are rounded to the input
dtype so that the matrix units run (as cuDNN does); in the interpreter (``UPCAST_INPUTS``, where
bf16 arithmetic is broken) bf16 dots run in fp32 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastrec.kernels._common import DTYPE_CLASSES, TRITON_DTYPES, KernelVariant, accumulator_type, tf32_choices, variant
from fastrec.kernels._host import cdiv, launcher, next_power_of_2
from fastrec.kernels._math import sigmoid, tanh

MODES = {"tanh": 0, "relu": 1, "gru": 2, "lstm": 3}
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
SLOTS = {"tanh": 2, "relu": 2, "gru": 5, "lstm": 6}
MAX_HIDDEN = 1024


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _step_rows(
    s,  # processing step (0 .. T-1)
    offs_b,  # (BLOCK_B,) batch rows of this program
    row_ok,  # (BLOCK_B,) offs_b < B
    length,  # (BLOCK_B,) int32 row lengths (T without lengths)
    Reset,  # (T, B) bool contiguous; read iff HAS_RESET
    Offsets,  # (T + 1,) int64: first packed row of each step; read iff PACKED
    B,
    reverse,  # int: 1 = rows run from their last step down to 0
    HAS_RESET: tl.constexpr,
    PACKED: tl.constexpr,
):
    """(active, tb, zero, stored): the row runs this step; its row index into the per-step tensors
    (padded: t * B + b, t = s for a row past its length, whose step writes zeros; packed:
    offsets[t] + b); its state is reset; its entry of the step exists (padded: every row of the
    batch; packed: the running rows only, the others are masked out of every store)."""
    active = row_ok & (s < length)
    t = s + (length - 1 - 2 * s) * (active.to(tl.int32) * reverse)  # reverse: len - 1 - s
    if PACKED:
        tb = tl.load(Offsets + t, mask=active, other=0) + offs_b
        stored = active
    else:
        tb = t.to(tl.int64) * B + offs_b
        stored = row_ok
    zero = offs_b < 0
    if HAS_RESET:
        zero = active & (tl.load(Reset + tb, mask=active, other=0) != 0)
    return active, tb, zero, stored


@triton.jit
def _load_gate_block(
    W,  # (G * H, H) W_hh, contiguous
    gate,  # gate index g: rows g * H .. g * H + H - 1
    offs_r,  # indices into the gate's rows (hidden unit j), broadcastable (BLOCK, 1) or (1, BLOCK)
    offs_c,  # indices into W's columns (hidden unit k), broadcastable against offs_r
    H,
):
    """W_hh[g * H + j, k] at (offs_r, offs_c); zero outside the H x H block."""
    return tl.load(W + (gate * H + offs_r) * H + offs_c, mask=(offs_r < H) & (offs_c < H), other=0.0)


@triton.jit
def _gate_matmul(
    HPrevRows,  # (BLOCK_B, 1) pointers to the workspace's hprev slot of each row (compute dtype)
    W,  # (G * H, H) contiguous: W_hh
    gate,  # gate index g
    offs_j,  # (BLOCK_H,) hidden units of the output tile
    active,  # (BLOCK_B,) row runs this step (others read as zero)
    H,
    LOW_PRECISION_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_B, BLOCK_H) hprev W_g^T for one gate and output tile, over K tiles of BLOCK_K: one
    gate at a time keeps a single W tile (and its pointers) live."""
    cdt: tl.constexpr = HPrevRows.dtype.element_ty
    ddt: tl.constexpr = W.dtype.element_ty if LOW_PRECISION_DOT else cdt
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=cdt)
    offs_kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + offs_kk
        hk = tl.load(HPrevRows + offs_k[None, :], mask=active[:, None] & (offs_k < H)[None, :], other=0.0)
        w = _load_gate_block(W, gate, offs_j[None, :], offs_k[:, None], H)
        acc = tl.dot(hk.to(ddt), w.to(ddt), acc, input_precision=DOT_PRECISION, out_dtype=cdt)
    return acc


@triton.jit
def _forward_gates(
    acc0,  # (BLOCK_B, BLOCK_H) W_hh h of gate 0 (compute dtype); acc1..acc3 gates 1..3 (unused: any)
    acc1,
    acc2,
    acc3,
    hprev,  # (BLOCK_B, BLOCK_H) state entering the step (after reset), compute dtype
    cprev,  # (BLOCK_B, BLOCK_H) LSTM cell entering the step; unused otherwise
    GX,  # (T, B, G * H) contiguous, input dtype
    Bias,  # (G * H,) b_hh; read iff has_bias
    Out,  # (T, B, H) contiguous, input dtype
    WS,  # (T, B, K * H) contiguous, compute dtype
    has_bias,  # int: 0 = no b_hh
    tb,  # (BLOCK_B,) int64 row index t * B + b
    active,  # (BLOCK_B,) row runs this step
    stored,  # (BLOCK_B,) the row's entry of this step exists (stores are masked to it)
    offs_j,  # (BLOCK_H,) hidden units of this tile
    H,
    MODE: tl.constexpr,
):
    """Gate arithmetic of one column tile: stores out and the workspace gate slots (zeros for
    inactive rows) and returns (h_new, c_new) (c_new = cprev except for LSTM)."""
    G: tl.constexpr = 3 if MODE == 2 else (4 if MODE == 3 else 1)
    K: tl.constexpr = 6 if MODE == 3 else (5 if MODE == 2 else 2)
    cdt: tl.constexpr = WS.dtype.element_ty
    j_ok = offs_j < H
    b_ok = offs_j < H * has_bias
    load_mask = active[:, None] & j_ok[None, :]
    store_mask = stored[:, None] & j_ok[None, :]
    act = active[:, None]
    gx = GX + tb[:, None] * (G * H) + offs_j[None, :]
    ws = WS + tb[:, None] * (K * H) + offs_j[None, :]
    pre0 = acc0 + tl.load(gx, mask=load_mask, other=0.0).to(cdt)
    pre0 += tl.load(Bias + offs_j, mask=b_ok, other=0.0).to(cdt)[None, :]
    c_new = cprev
    if MODE <= 1:
        if MODE == 0:
            h_new = tanh(pre0)
        else:
            h_new = tl.where(pre0 < 0.0, 0.0, pre0)  # relu; NaN propagates (as torch)
        tl.store(ws, tl.where(act, h_new, 0.0).to(cdt), mask=store_mask)
    else:
        pre1 = acc1 + tl.load(gx + H, mask=load_mask, other=0.0).to(cdt)
        pre1 += tl.load(Bias + H + offs_j, mask=b_ok, other=0.0).to(cdt)[None, :]
        pre2 = acc2 + tl.load(Bias + 2 * H + offs_j, mask=b_ok, other=0.0).to(cdt)[None, :]
        gx2 = tl.load(gx + 2 * H, mask=load_mask, other=0.0).to(cdt)
        if MODE == 2:  # GRU: r, z, n = tanh(gx_n + r * (W_hn h + b_hn)), h' = (1 - z) n + z h
            r = sigmoid(pre0)
            z = sigmoid(pre1)
            n = tanh(gx2 + r * pre2)
            h_new = n + z * (hprev - n)
            tl.store(ws, tl.where(act, r, 0.0), mask=store_mask)
            tl.store(ws + H, tl.where(act, z, 0.0), mask=store_mask)
            tl.store(ws + 2 * H, tl.where(act, n, 0.0), mask=store_mask)
            tl.store(ws + 3 * H, tl.where(act, pre2, 0.0), mask=store_mask)
        else:  # LSTM: i, f, g, o; c' = f c + i g, h' = o tanh(c')
            pre3 = acc3 + tl.load(gx + 3 * H, mask=load_mask, other=0.0).to(cdt)
            pre3 += tl.load(Bias + 3 * H + offs_j, mask=b_ok, other=0.0).to(cdt)[None, :]
            i = sigmoid(pre0)
            f = sigmoid(pre1)
            g = tanh(gx2 + pre2)
            o = sigmoid(pre3)
            c_new = f * cprev + i * g
            h_new = o * tanh(c_new)
            tl.store(ws, tl.where(act, i, 0.0), mask=store_mask)
            tl.store(ws + H, tl.where(act, f, 0.0), mask=store_mask)
            tl.store(ws + 2 * H, tl.where(act, g, 0.0), mask=store_mask)
            tl.store(ws + 3 * H, tl.where(act, o, 0.0), mask=store_mask)
            tl.store(ws + 4 * H, tl.where(act, cprev, 0.0), mask=store_mask)
    tl.store(
        Out + tb[:, None] * H + offs_j[None, :],
        tl.where(act, h_new, 0.0).to(Out.dtype.element_ty),
        mask=store_mask,
    )
    return h_new, c_new


@triton.jit
def _backward_gates(
    dh_state,  # (BLOCK_B, BLOCK_H) gradient reaching h_t from later steps (and grad_h_n), compute dtype
    dc_state,  # (BLOCK_B, BLOCK_H) LSTM: gradient reaching c_t; unused otherwise
    GradOut,  # (T, B, H) contiguous, compute dtype
    WS,  # (T, B, K * H) contiguous, compute dtype (the forward's workspace)
    GradGX,  # (T, B, G * H) contiguous, compute dtype
    GradGH,  # (T, B, G * H) contiguous, compute dtype
    HPrev,  # (T, B, H) contiguous, compute dtype
    tb,  # (BLOCK_B,) int64 row index t * B + b
    active,  # (BLOCK_B,) row runs this step
    stored,  # (BLOCK_B,) the row's entry of this step exists (stores are masked to it)
    offs_j,  # (BLOCK_H,) hidden units of this tile
    H,
    MODE: tl.constexpr,
):
    """Gate gradients of one column tile: stores grad_gx, grad_gh, hprev (zeros for inactive rows)
    and returns (dgh_0, .., dgh_3, carry, dc_new): the grad_gh of each gate (as many as the mode
    has; the rest repeat), the part of dh_{t-1} that bypasses W_hh, and the LSTM cell gradient
    for the previous step (dc_state unchanged otherwise and for inactive rows)."""
    G: tl.constexpr = 3 if MODE == 2 else (4 if MODE == 3 else 1)
    K: tl.constexpr = 6 if MODE == 3 else (5 if MODE == 2 else 2)
    cdt: tl.constexpr = WS.dtype.element_ty
    j_ok = offs_j < H
    load_mask = active[:, None] & j_ok[None, :]
    store_mask = stored[:, None] & j_ok[None, :]
    act = active[:, None]
    dh = dh_state + tl.load(GradOut + tb[:, None] * H + offs_j[None, :], mask=load_mask, other=0.0).to(cdt)
    ws = WS + tb[:, None] * (K * H) + offs_j[None, :]
    hp = tl.load(ws + (K - 1) * H, mask=load_mask, other=0.0)
    tl.store(HPrev + tb[:, None] * H + offs_j[None, :], hp, mask=store_mask)
    gx = GradGX + tb[:, None] * (G * H) + offs_j[None, :]
    gh = GradGH + tb[:, None] * (G * H) + offs_j[None, :]
    carry = dh_state
    dc_new = dc_state
    if MODE <= 1:
        y = tl.load(ws, mask=load_mask, other=0.0)
        if MODE == 0:
            d = dh * (1.0 - y * y)
        else:
            d = tl.where(y <= 0.0, 0.0, dh)  # torch's relu backward: NaN passes dh
        d = tl.where(act, d, 0.0)
        tl.store(gx, d, mask=store_mask)
        tl.store(gh, d, mask=store_mask)
        carry = tl.where(act, 0.0, dh_state)
        d1 = d
        d2 = d
        d3 = d
    elif MODE == 2:
        r = tl.load(ws, mask=load_mask, other=0.0)
        z = tl.load(ws + H, mask=load_mask, other=0.0)
        n = tl.load(ws + 2 * H, mask=load_mask, other=0.0)
        ghn = tl.load(ws + 3 * H, mask=load_mask, other=0.0)
        dn = tl.where(act, dh * (1.0 - z) * (1.0 - n * n), 0.0)
        d1 = tl.where(act, dh * (hp - n) * z * (1.0 - z), 0.0)
        d = dn * ghn * r * (1.0 - r)
        d2 = dn * r
        d3 = d
        tl.store(gx, d, mask=store_mask)
        tl.store(gx + H, d1, mask=store_mask)
        tl.store(gx + 2 * H, dn, mask=store_mask)
        tl.store(gh, d, mask=store_mask)
        tl.store(gh + H, d1, mask=store_mask)
        tl.store(gh + 2 * H, d2, mask=store_mask)
        carry = tl.where(act, dh * z, dh_state)
    else:
        i = tl.load(ws, mask=load_mask, other=0.0)
        f = tl.load(ws + H, mask=load_mask, other=0.0)
        g = tl.load(ws + 2 * H, mask=load_mask, other=0.0)
        o = tl.load(ws + 3 * H, mask=load_mask, other=0.0)
        cp = tl.load(ws + 4 * H, mask=load_mask, other=0.0)
        tc = tanh(f * cp + i * g)
        dc = dc_state + dh * o * (1.0 - tc * tc)
        d = tl.where(act, dc * g * i * (1.0 - i), 0.0)
        d1 = tl.where(act, dc * cp * f * (1.0 - f), 0.0)
        d2 = tl.where(act, dc * i * (1.0 - g * g), 0.0)
        d3 = tl.where(act, dh * tc * o * (1.0 - o), 0.0)
        tl.store(gx, d, mask=store_mask)
        tl.store(gx + H, d1, mask=store_mask)
        tl.store(gx + 2 * H, d2, mask=store_mask)
        tl.store(gx + 3 * H, d3, mask=store_mask)
        tl.store(gh, d, mask=store_mask)
        tl.store(gh + H, d1, mask=store_mask)
        tl.store(gh + 2 * H, d2, mask=store_mask)
        tl.store(gh + 3 * H, d3, mask=store_mask)
        carry = tl.where(act, 0.0, dh_state)
        dc_new = tl.where(act, dc * f, dc_state)
    return d, d1, d2, d3, carry, dc_new


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@launcher
@triton.jit(do_not_specialize=["T", "B"])
def _rnn_forward_kernel(
    GX,  # (T, B, G * H) contiguous, input dtype: x W_ih^T + b_ih
    W,  # (G * H, H) contiguous, input dtype: W_hh
    Bias,  # (G * H,) input dtype: b_hh; read iff has_bias
    Lengths,  # (B,) int32 in [1, T]; read iff HAS_LENGTHS
    Reset,  # (T, B) bool contiguous; read iff HAS_RESET
    Offsets,  # (T + 1,) int64: first packed row of each step (offsets[T] = N); read iff PACKED
    Out,  # (T, B, H) contiguous, input dtype ((N, H) packed, as every per-step tensor)
    WS,  # (T, B, K * H) contiguous, compute dtype: the workspace (see fastrec/ops/rnn.py)
    HState,  # (B, H) contiguous, compute dtype: h0 in, h_n out (and the state, streamed)
    CState,  # (B, H) contiguous, compute dtype: c0 in, c_n out (LSTM only)
    T,
    B,
    H,
    reverse,  # int: 1 = each row runs from its last step down to 0
    has_bias,  # int: 0 = no b_hh
    MODE: tl.constexpr,  # 0 tanh, 1 relu, 2 gru, 3 lstm
    HAS_LENGTHS: tl.constexpr,  # packed: Lengths holds the rows' lengths (from batch_sizes)
    HAS_RESET: tl.constexpr,
    PACKED: tl.constexpr,  # per-step tensors in PackedSequence order (rows of step t: b < batch_sizes[t])
    RESIDENT: tl.constexpr,  # W_hh and the state in registers (BLOCK_H >= H), else streamed tiles
    LOW_PRECISION_DOT: tl.constexpr,  # dot operands in W's (16-bit) dtype, else the compute dtype
    ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,  # hidden units per output tile (resident: all of them)
    BLOCK_K: tl.constexpr,  # hidden units per reduction tile (streamed)
):
    G: tl.constexpr = 3 if MODE == 2 else (4 if MODE == 3 else 1)
    K: tl.constexpr = 6 if MODE == 3 else (5 if MODE == 2 else 2)
    LSTM: tl.constexpr = MODE == 3
    cdt: tl.constexpr = WS.dtype.element_ty
    ddt: tl.constexpr = W.dtype.element_ty if LOW_PRECISION_DOT else cdt
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(Lengths + offs_b, mask=row_ok, other=0), T)  # in bounds whatever the input
    else:
        length = tl.zeros([BLOCK_B], dtype=tl.int32) + T
    # Packed: the program's rows end after their longest (no storage past it); padded: every step
    # (the steps past a row's length write its zeros).
    steps = T
    if PACKED:
        steps = tl.max(length, axis=0)
    state = offs_b.to(tl.int64)[:, None] * H  # (BLOCK_B, 1) rows of HState / CState
    offs_h = tl.arange(0, BLOCK_H)
    hprev_slot = WS + (K - 1) * H
    if RESIDENT:
        h_ok = offs_h < H
        smask = row_ok[:, None] & h_ok[None, :]
        h = tl.load(HState + state + offs_h[None, :], mask=smask, other=0.0)
        c = h
        if LSTM:
            c = tl.load(CState + state + offs_h[None, :], mask=smask, other=0.0)
        # W_g^T (k, j) = W_hh[g * H + j, k], one (BLOCK_H, BLOCK_H) block per gate, kept for the loop.
        w0 = _load_gate_block(W, 0, offs_h[None, :], offs_h[:, None], H).to(ddt)
        w1 = w0
        w2 = w0
        w3 = w0
        if G >= 3:
            w1 = _load_gate_block(W, 1, offs_h[None, :], offs_h[:, None], H).to(ddt)
            w2 = _load_gate_block(W, 2, offs_h[None, :], offs_h[:, None], H).to(ddt)
        if G == 4:
            w3 = _load_gate_block(W, 3, offs_h[None, :], offs_h[:, None], H).to(ddt)
        for s in range(steps):
            active, tb, zero, stored = _step_rows(
                s, offs_b, row_ok, length, Reset, Offsets, B, reverse, HAS_RESET, PACKED
            )
            h = tl.where(zero[:, None], 0.0, h)
            if LSTM:
                c = tl.where(zero[:, None], 0.0, c)
            tl.store(
                hprev_slot + tb[:, None] * (K * H) + offs_h[None, :],
                tl.where(active[:, None], h, 0.0),
                mask=stored[:, None] & h_ok[None, :],
            )
            hd = h.to(ddt)
            acc0 = tl.dot(hd, w0, input_precision=DOT_PRECISION, out_dtype=cdt)
            acc1 = acc0
            acc2 = acc0
            acc3 = acc0
            if G >= 3:
                acc1 = tl.dot(hd, w1, input_precision=DOT_PRECISION, out_dtype=cdt)
                acc2 = tl.dot(hd, w2, input_precision=DOT_PRECISION, out_dtype=cdt)
            if G == 4:
                acc3 = tl.dot(hd, w3, input_precision=DOT_PRECISION, out_dtype=cdt)
            h_new, c_new = _forward_gates(
                acc0, acc1, acc2, acc3, h, c, GX, Bias, Out, WS, has_bias, tb, active, stored, offs_h, H, MODE
            )
            h = tl.where(active[:, None], h_new, h)
            if LSTM:
                c = tl.where(active[:, None], c_new, c)
        tl.store(HState + state + offs_h[None, :], h, mask=smask)
        if LSTM:
            tl.store(CState + state + offs_h[None, :], c, mask=smask)
    else:
        for s in range(steps):
            active, tb, zero, stored = _step_rows(
                s, offs_b, row_ok, length, Reset, Offsets, B, reverse, HAS_RESET, PACKED
            )
            hprev_rows = hprev_slot + tb[:, None] * (K * H)
            # Phase 1: the state entering the step (after reset) to the workspace's hprev slot.
            for k0 in range(0, H, BLOCK_H):
                offs_k = k0 + offs_h
                kmask = row_ok[:, None] & (offs_k < H)[None, :]
                hk = tl.load(HState + state + offs_k[None, :], mask=kmask, other=0.0)
                hk = tl.where(zero[:, None] | ~active[:, None], 0.0, hk)
                tl.store(hprev_rows + offs_k[None, :], hk, mask=stored[:, None] & (offs_k < H)[None, :])
            tl.debug_barrier()
            # Phase 2: per output tile, gh = hprev W_hh^T over K tiles, then the gates.
            for j0 in range(0, H, BLOCK_H):
                offs_j = j0 + offs_h
                acc0 = _gate_matmul(
                    hprev_rows, W, 0, offs_j, active, H, LOW_PRECISION_DOT, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K
                )
                acc1 = acc0
                acc2 = acc0
                acc3 = acc0
                if G >= 3:
                    acc1 = _gate_matmul(
                        hprev_rows, W, 1, offs_j, active, H, LOW_PRECISION_DOT, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K
                    )
                    acc2 = _gate_matmul(
                        hprev_rows, W, 2, offs_j, active, H, LOW_PRECISION_DOT, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K
                    )
                if G == 4:
                    acc3 = _gate_matmul(
                        hprev_rows, W, 3, offs_j, active, H, LOW_PRECISION_DOT, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K
                    )
                jmask = row_ok[:, None] & (offs_j < H)[None, :]
                h_old = tl.load(HState + state + offs_j[None, :], mask=jmask, other=0.0)
                h_in = tl.where(zero[:, None], 0.0, h_old)
                c_old = h_old
                c_in = h_in
                if LSTM:
                    c_old = tl.load(CState + state + offs_j[None, :], mask=jmask, other=0.0)
                    c_in = tl.where(zero[:, None], 0.0, c_old)
                h_new, c_new = _forward_gates(
                    acc0, acc1, acc2, acc3, h_in, c_in, GX, Bias, Out, WS, has_bias, tb, active, stored, offs_j, H, MODE
                )
                tl.store(HState + state + offs_j[None, :], tl.where(active[:, None], h_new, h_old), mask=jmask)
                if LSTM:
                    tl.store(CState + state + offs_j[None, :], tl.where(active[:, None], c_new, c_old), mask=jmask)
            tl.debug_barrier()


@launcher
@triton.jit(do_not_specialize=["T", "B"])
def _rnn_backward_kernel(
    GradOut,  # (T, B, H) contiguous, compute dtype
    WS,  # (T, B, K * H) contiguous, compute dtype: the forward's workspace
    W,  # (G * H, H) contiguous, input dtype: W_hh
    Lengths,  # (B,) int32 in [1, T]; read iff HAS_LENGTHS
    Reset,  # (T, B) bool contiguous; read iff HAS_RESET
    Offsets,  # (T + 1,) int64: first packed row of each step; read iff PACKED
    GradGX,  # (T, B, G * H) contiguous, compute dtype
    GradGH,  # (T, B, G * H) contiguous, compute dtype
    HPrev,  # (T, B, H) contiguous, compute dtype
    DHState,  # (B, H) contiguous, compute dtype: grad_h_n in, grad_h0 out (and the state, streamed)
    DCState,  # (B, H) contiguous, compute dtype: grad_c_n in, grad_c0 out (LSTM only)
    T,
    B,
    H,
    reverse,
    MODE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_RESET: tl.constexpr,
    PACKED: tl.constexpr,
    RESIDENT: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,  # hidden units per output tile (resident: all of them)
    BLOCK_K: tl.constexpr,  # hidden units per reduction tile (streamed)
):
    G: tl.constexpr = 3 if MODE == 2 else (4 if MODE == 3 else 1)
    LSTM: tl.constexpr = MODE == 3
    cdt: tl.constexpr = WS.dtype.element_ty
    ddt: tl.constexpr = W.dtype.element_ty if LOW_PRECISION_DOT else cdt
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = offs_b < B
    if HAS_LENGTHS:
        length = tl.minimum(tl.load(Lengths + offs_b, mask=row_ok, other=0), T)  # in bounds whatever the input
    else:
        length = tl.zeros([BLOCK_B], dtype=tl.int32) + T
    # Packed: the program's rows end after their longest (no storage past it); padded: every step
    # (the steps past a row's length write its zeros).
    steps = T
    if PACKED:
        steps = tl.max(length, axis=0)
    state = offs_b.to(tl.int64)[:, None] * H
    offs_h = tl.arange(0, BLOCK_H)
    if RESIDENT:
        h_ok = offs_h < H
        smask = row_ok[:, None] & h_ok[None, :]
        dh = tl.load(DHState + state + offs_h[None, :], mask=smask, other=0.0)
        dc = dh
        if LSTM:
            dc = tl.load(DCState + state + offs_h[None, :], mask=smask, other=0.0)
        # W_g (j, k) = W_hh[g * H + j, k], one (BLOCK_H, BLOCK_H) block per gate, kept for the loop.
        w0 = _load_gate_block(W, 0, offs_h[:, None], offs_h[None, :], H).to(ddt)
        w1 = w0
        w2 = w0
        w3 = w0
        if G >= 3:
            w1 = _load_gate_block(W, 1, offs_h[:, None], offs_h[None, :], H).to(ddt)
            w2 = _load_gate_block(W, 2, offs_h[:, None], offs_h[None, :], H).to(ddt)
        if G == 4:
            w3 = _load_gate_block(W, 3, offs_h[:, None], offs_h[None, :], H).to(ddt)
        for i in range(steps):
            active, tb, zero, stored = _step_rows(
                steps - 1 - i, offs_b, row_ok, length, Reset, Offsets, B, reverse, HAS_RESET, PACKED
            )
            d0, d1, d2, d3, carry, dc = _backward_gates(
                dh, dc, GradOut, WS, GradGX, GradGH, HPrev, tb, active, stored, offs_h, H, MODE
            )
            dh = tl.dot(d0.to(ddt), w0, carry, input_precision=DOT_PRECISION, out_dtype=cdt)
            if G >= 3:
                dh = tl.dot(d1.to(ddt), w1, dh, input_precision=DOT_PRECISION, out_dtype=cdt)
                dh = tl.dot(d2.to(ddt), w2, dh, input_precision=DOT_PRECISION, out_dtype=cdt)
            if G == 4:
                dh = tl.dot(d3.to(ddt), w3, dh, input_precision=DOT_PRECISION, out_dtype=cdt)
            dh = tl.where(zero[:, None], 0.0, dh)  # the state was zeroed before the step
            if LSTM:
                dc = tl.where(zero[:, None], 0.0, dc)
        tl.store(DHState + state + offs_h[None, :], dh, mask=smask)
        if LSTM:
            tl.store(DCState + state + offs_h[None, :], dc, mask=smask)
    else:
        for i in range(steps):
            active, tb, zero, stored = _step_rows(
                steps - 1 - i, offs_b, row_ok, length, Reset, Offsets, B, reverse, HAS_RESET, PACKED
            )
            # Phase 1: gate gradients of every column tile; DHState <- the carry (bypassing W_hh).
            for j0 in range(0, H, BLOCK_H):
                offs_j = j0 + offs_h
                jmask = row_ok[:, None] & (offs_j < H)[None, :]
                dh_j = tl.load(DHState + state + offs_j[None, :], mask=jmask, other=0.0)
                dc_j = dh_j
                if LSTM:
                    dc_j = tl.load(DCState + state + offs_j[None, :], mask=jmask, other=0.0)
                _d0, _d1, _d2, _d3, carry, dc_j = _backward_gates(
                    dh_j, dc_j, GradOut, WS, GradGX, GradGH, HPrev, tb, active, stored, offs_j, H, MODE
                )
                tl.store(DHState + state + offs_j[None, :], carry, mask=jmask)
                if LSTM:
                    tl.store(DCState + state + offs_j[None, :], tl.where(zero[:, None], 0.0, dc_j), mask=jmask)
            tl.debug_barrier()
            # Phase 2: dh_{t-1} = carry + grad_gh W_hh per output tile of BLOCK_H hidden units k,
            # reducing over the gates (a loop, one W tile live) and BLOCK_K-wide tiles of units j.
            gh_rows = GradGH + tb[:, None] * (G * H)
            offs_jj = tl.arange(0, BLOCK_K)
            for k0 in range(0, H, BLOCK_H):
                offs_k = k0 + offs_h
                kmask = row_ok[:, None] & (offs_k < H)[None, :]
                acc = tl.load(DHState + state + offs_k[None, :], mask=kmask, other=0.0)
                for g in range(G):
                    for j0 in range(0, H, BLOCK_K):
                        offs_j = j0 + offs_jj
                        dmask = active[:, None] & (offs_j < H)[None, :]
                        d = tl.load(gh_rows + g * H + offs_j[None, :], mask=dmask, other=0.0).to(ddt)
                        w = _load_gate_block(W, g, offs_j[:, None], offs_k[None, :], H).to(ddt)
                        acc = tl.dot(d, w, acc, input_precision=DOT_PRECISION, out_dtype=cdt)
                acc = tl.where(zero[:, None], 0.0, acc)
                tl.store(DHState + state + offs_k[None, :], acc, mask=kmask)
            tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
# block configs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    block_b: int  # batch rows per program (>= 16: tl.dot's minimum M)
    block_h: int  # hidden units per output tile (resident: the padded hidden size)
    block_k: int  # hidden units per reduction tile (streamed; resident: block_h)
    resident: bool  # W_hh in registers for the whole loop (one tile), else streamed tiles
    num_warps: int


# GPU: resident while the G padded (BLOCK_H, BLOCK_H) blocks of W_hh fit the registers beside the
# state; above, streamed tiles (the same compiled kernel for every larger hidden size). Chosen
# with the compile check (tests/test_kernels_compile.py): the largest tiles whose worst case
# (LSTM, every flag) neither spills on sm_80 / sm_90 nor exceeds shared memory.
# fp64 (gradcheck only) always streams: in the resident loop the state feeding the dot passes
# through the 8-bit reset mask, which makes triton 3.6 pick a dot operand width that its fp64 MMA
# lowering rejects ("fp64 don't support largeK MMA"); the streamed loop reads the state back.
RESIDENT_MAX = {"16": 64, "32": 64, "64": 0}
# Warps per resident (dtype class, BLOCK_H); BLOCK_H = 32 also serves hidden sizes below 32.
RESIDENT_WARPS = {("16", 32): 4, ("16", 64): 8, ("32", 32): 8, ("32", 64): 8}
STREAMED = {"16": (64, 32, 8), "32": (32, 16, 4), "64": (16, 16, 4)}  # (BLOCK_H, BLOCK_K, num_warps)
# The interpreter's cost grows with operations, not tile size; it runs both paths in the tests:
# resident up to 16 hidden units (H = 1, 7), streamed 32 x 16 tiles above (H = 50: 2 x 4 tiles).
INTERPRETER_RESIDENT_MAX = 16
INTERPRETER_STREAMED = (32, 16, 4)
# No software pipelining: the loops are latency-bound chains (a step needs the previous one), and
# the compile check then covers exactly what is launched. Prefetching the next step's gx / W tiles
# (num_stages = 2) is a tuning left for a GPU session.
NUM_STAGES = 1


def padded_hidden(hidden: int) -> int:
    """Next power of two >= max(hidden, 16) (tl.dot needs K, N >= 16)."""
    return max(16, next_power_of_2(hidden))


def block_config(dtype: torch.dtype, hidden: int, interpreter: bool) -> BlockConfig:
    """Tile sizes and launch options for both kernels at this dtype and hidden size."""
    padded = padded_hidden(hidden) if interpreter else max(32, padded_hidden(hidden))
    resident_max = INTERPRETER_RESIDENT_MAX if interpreter else RESIDENT_MAX[DTYPE_CLASSES[dtype]]
    if padded <= resident_max:
        return BlockConfig(16, padded, padded, True, 4 if interpreter else RESIDENT_WARPS[DTYPE_CLASSES[dtype], padded])
    block_h, block_k, num_warps = INTERPRETER_STREAMED if interpreter else STREAMED[DTYPE_CLASSES[dtype]]
    return BlockConfig(16, block_h, block_k, False, num_warps)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _low_precision_dot(dtype: torch.dtype, interpreter: bool) -> bool:
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreter)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_masks(lengths, reset, steps: int, batch: int) -> None:
    if lengths is not None:
        _check("lengths", lengths, torch.int32, (batch,))
    if reset is not None:
        _check("reset", reset, torch.bool, (steps, batch))


# One entry: the forward and backward of every layer and direction of one packed call share it.
_PACKED_CACHE: list[tuple[torch.Tensor, torch.device, torch.Tensor, torch.Tensor]] = []


def _packed_meta(batch_sizes, batch: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets int64 (T + 1,), lengths int32 (B,)) on ``device`` for a PackedSequence's
    ``batch_sizes`` (CPU int64 (T,), non-increasing, batch_sizes[0] = B, summing to the N packed
    rows): step t's rows start at offsets[t]; row b runs lengths[b] = #{t: batch_sizes[t] > b}
    steps. Computed on the host, where batch_sizes lives, and copied over without a sync."""
    if not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1:
        raise TypeError(f"batch_sizes must be a 1-D int64 tensor, got {getattr(batch_sizes, 'dtype', batch_sizes)}")
    if batch_sizes.device.type != "cpu":
        raise ValueError(f"batch_sizes must be a CPU tensor (as PackedSequence holds it), got {batch_sizes.device}")
    for bs, dev, offsets, lengths in _PACKED_CACHE:
        if dev == device and bs.shape == batch_sizes.shape and torch.equal(bs, batch_sizes):
            return offsets, lengths
    steps = batch_sizes.shape[0]
    if steps == 0 or int(batch_sizes[0]) != batch or bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
        raise ValueError(f"batch_sizes must be non-increasing with batch_sizes[0] = B = {batch}")
    if int(batch_sizes[-1]) < 1 or int(batch_sizes.sum()) != rows:
        raise ValueError(f"batch_sizes must be positive and sum to the {rows} packed rows")
    offsets = torch.zeros(steps + 1, dtype=torch.int64)
    torch.cumsum(batch_sizes, 0, out=offsets[1:])
    # lengths[b] = #{t: batch_sizes[t] > b}: count the steps that end each length, then sum from the right
    ends = torch.bincount(batch_sizes - 1, minlength=batch)  # steps whose last row is b
    lengths = ends.flip(0).cumsum(0).flip(0).to(torch.int32)
    meta = (offsets.to(device, non_blocking=True), lengths.to(device, non_blocking=True))
    _PACKED_CACHE[:] = [(batch_sizes.clone(), device, *meta)]
    return meta


def _mode_of(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    return MODES[mode]


def _layout(name, t, batch: int, lengths, reset, batch_sizes):
    """(lead dims of the per-step tensors, steps, lengths, offsets) of ``t``: time-major
    ``(T, B, ..)``, or packed ``(N, ..)`` when ``batch_sizes`` is given (the rows' lengths and the
    step offsets then come from batch_sizes; lengths and reset are not taken)."""
    if batch_sizes is None:
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (T, B, features), got {tuple(t.shape)}")
        steps = t.shape[0]
        _check_masks(lengths, reset, steps, batch)
        return tuple(t.shape[:2]), steps, lengths, None
    if lengths is not None or reset is not None:
        raise ValueError("lengths and reset cannot be combined with batch_sizes")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, features) with batch_sizes, got {tuple(t.shape)}")
    offsets, lengths = _packed_meta(batch_sizes, batch, t.shape[0], t.device)
    return (t.shape[0],), batch_sizes.shape[0], lengths, offsets


def rnn_forward(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, allow_tf32=False, batch_sizes=None):
    """(out (T, B, H), h_n (B, H), c_n (B, H) or (0, 0), workspace (T, B, K*H)); with
    ``batch_sizes`` the per-step tensors are packed ``(N, ..)``; see fastrec/ops/rnn.py."""
    mode_id = _mode_of(mode)
    if h0.dim() != 2:
        raise ValueError(f"h0 must be 2-D (B, H), got {tuple(h0.shape)}")
    batch, hidden = h0.shape
    lead, steps, lengths, offsets = _layout("gx", gx, batch, lengths, reset, batch_sizes)
    dtype, gates, lstm = gx.dtype, GATES[mode], mode == "lstm"
    if dtype not in DTYPE_CLASSES:
        raise TypeError(f"gx must be float16, bfloat16, float32 or float64, got {dtype}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size must be <= {MAX_HIDDEN}, got {hidden}")
    _check("gx", gx, dtype, (*lead, gates * hidden))
    _check("h0", h0, dtype, (batch, hidden))
    _check("w_hh", w_hh, dtype, (gates * hidden, hidden))
    if b_hh is not None:
        _check("b_hh", b_hh, dtype, (gates * hidden,))
    if (c0 is not None) != lstm:
        raise ValueError(f"c0 must be given for mode 'lstm' and only then (mode {mode!r})")
    if lstm:
        _check("c0", c0, dtype, (batch, hidden))

    cdt = _compute_dtype(dtype)
    gx, w_hh = gx.contiguous(), w_hh.contiguous()
    out = torch.empty((*lead, hidden), dtype=dtype, device=gx.device)
    workspace = torch.empty((*lead, SLOTS[mode] * hidden), dtype=cdt, device=gx.device)
    h_state = h0.to(cdt, copy=True).contiguous()
    c_state = c0.to(cdt, copy=True).contiguous() if lstm else h_state
    interpreter = gx.device.type == "cpu"
    cfg = block_config(dtype, hidden, interpreter)
    if batch * hidden > 0:
        _rnn_forward_kernel[(cdiv(batch, cfg.block_b),)](
            gx,
            w_hh,
            b_hh.contiguous() if b_hh is not None else w_hh,
            lengths.contiguous() if lengths is not None else h_state,
            reset.contiguous() if reset is not None else h_state,
            offsets if offsets is not None else h_state,
            out,
            workspace,
            h_state,
            c_state,
            steps,
            batch,
            hidden,
            int(bool(reverse)),
            int(b_hh is not None),
            MODE=mode_id,
            HAS_LENGTHS=lengths is not None,
            HAS_RESET=reset is not None,
            PACKED=offsets is not None,
            RESIDENT=cfg.resident,
            LOW_PRECISION_DOT=_low_precision_dot(dtype, interpreter),
            ALLOW_TF32=bool(allow_tf32) and dtype == torch.float32,
            BLOCK_B=cfg.block_b,
            BLOCK_H=cfg.block_h,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=NUM_STAGES,
        )
    h_n = h_state.to(dtype)
    c_n = c_state.to(dtype) if lstm else h0.new_empty(0, 0)
    return out, h_n, c_n, workspace


def rnn_backward(
    grad_out,
    grad_h_n,
    grad_c_n,
    workspace,
    w_hh,
    b_hh,
    h0,
    c0,
    lengths,
    reset,
    mode,
    reverse,
    allow_tf32=False,
    batch_sizes=None,
):
    """(grad_gx, grad_gh (T, B, G*H), grad_h0 (B, H), grad_c0 (B, H) or (0, 0), hprev (T, B, H)),
    in h0's dtype; packed ``(N, ..)`` with ``batch_sizes``; see fastrec/ops/rnn.py. ``b_hh`` is
    not read (its gradient is grad_gh's sum)."""
    mode_id = _mode_of(mode)
    if h0.dim() != 2:
        raise ValueError(f"h0 must be 2-D (B, H), got {tuple(h0.shape)}")
    batch, hidden = h0.shape
    lead, steps, lengths, offsets = _layout("grad_out", grad_out, batch, lengths, reset, batch_sizes)
    dtype, gates, lstm = h0.dtype, GATES[mode], mode == "lstm"
    if dtype not in DTYPE_CLASSES:
        raise TypeError(f"h0 must be float16, bfloat16, float32 or float64, got {dtype}")
    cdt = _compute_dtype(dtype)
    _check("grad_out", grad_out, dtype, (*lead, hidden))
    _check("grad_h_n", grad_h_n, dtype, (batch, hidden))
    _check("workspace", workspace, cdt, (*lead, SLOTS[mode] * hidden))
    _check("w_hh", w_hh, dtype, (gates * hidden, hidden))
    if lstm:
        if grad_c_n is None or c0 is None:
            raise ValueError("mode 'lstm' needs grad_c_n and c0, got None")
        _check("grad_c_n", grad_c_n, dtype, (batch, hidden))

    grad_out = grad_out.to(cdt).contiguous()
    workspace, w_hh = workspace.contiguous(), w_hh.contiguous()
    device = grad_out.device
    grad_gx = torch.empty((*lead, gates * hidden), dtype=cdt, device=device)
    grad_gh = torch.empty((*lead, gates * hidden), dtype=cdt, device=device)
    hprev = torch.empty((*lead, hidden), dtype=cdt, device=device)
    dh_state = grad_h_n.to(cdt, copy=True).contiguous()
    dc_state = grad_c_n.to(cdt, copy=True).contiguous() if lstm else dh_state
    interpreter = device.type == "cpu"
    cfg = block_config(dtype, hidden, interpreter)
    if batch * hidden > 0:
        _rnn_backward_kernel[(cdiv(batch, cfg.block_b),)](
            grad_out,
            workspace,
            w_hh,
            lengths.contiguous() if lengths is not None else dh_state,
            reset.contiguous() if reset is not None else dh_state,
            offsets if offsets is not None else dh_state,
            grad_gx,
            grad_gh,
            hprev,
            dh_state,
            dc_state,
            steps,
            batch,
            hidden,
            int(bool(reverse)),
            MODE=mode_id,
            HAS_LENGTHS=lengths is not None,
            HAS_RESET=reset is not None,
            PACKED=offsets is not None,
            RESIDENT=cfg.resident,
            LOW_PRECISION_DOT=_low_precision_dot(dtype, interpreter),
            ALLOW_TF32=bool(allow_tf32) and dtype == torch.float32,
            BLOCK_B=cfg.block_b,
            BLOCK_H=cfg.block_h,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=NUM_STAGES,
        )
    grad_c0 = dc_state.to(dtype) if lstm else h0.new_empty(0, 0)
    return grad_gx.to(dtype), grad_gh.to(dtype), dh_state.to(dtype), grad_c0, hprev.to(dtype)


# ------------------------------------------------------------------------------------------------
# every variant the launchers can pick (for the compile-only test)
# ------------------------------------------------------------------------------------------------

# reverse and has_bias are runtime ints (an index select and a masked load), not constexprs, so
# that they do not multiply the variants.
FLAG_NAMES = ("HAS_LENGTHS", "HAS_RESET")
# The combinations the launchers pass: any of the padded flags, or the packed layout (which takes
# its lengths from batch_sizes, HAS_LENGTHS on, and no reset).
FLAG_SETS = tuple(
    tuple(n for i, n in enumerate(FLAG_NAMES) if bits >> i & 1) for bits in range(2 ** len(FLAG_NAMES))
) + (("HAS_LENGTHS", "PACKED"),)
# ALLOW_TF32 only switches fp32 dots to tf32: the sampled compile check turns it on in every other
# flag combination instead of doubling them (FASTREC_COMPILE_ALL=1 compiles all of them).
COVERAGE_ALTERNATE_FLAGS = ("ALLOW_TF32",)
# The per-bucket worst case of the compile check: LSTM holds the most (four gate blocks of W_hh,
# the cell state); Elman and GRU run the same code with fewer gates and meet the flag coverage.
# The same holds for the single-step cell kernels.
WORST_CASE_KERNELS = ("forward_lstm", "backward_lstm", "cell_forward_lstm", "cell_backward_lstm")
# Variants known to spill (reported, not failed, by the compile check).
SPILLS_ACCEPTED: dict[tuple[str, str, str], str] = {
    ("forward_gru", "fp32", "BLOCK_H=64 resident"): "64-104 B at 255 registers on sm_80 / sm_90 with lengths and "
    "reset (the three fp32 W_hh blocks and the state; LSTM's four do not spill): to time on a card against "
    "the streamed config before changing RESIDENT_MAX",
}


# Kernel arguments that are integers, and pointers in the input dtype (the other pointers are in
# the compute dtype, or int32 / bool masks).
_INT_ARGS = ("T", "B", "IN", "H", "reverse", "has_bias")
_INPUT_DTYPE_ARGS = (
    "GX",
    "W",
    "Bias",
    "Out",
    "X",
    "Hs",
    "C",
    "WIh",
    "WHh",
    "BIh",
    "BHh",
    "HNew",
    "CNew",
    "DHNew",
    "DCNew",
)


def _arg_type(arg: str, dt: str) -> str:
    if arg in _INT_ARGS:
        return "i32"
    if arg in _INPUT_DTYPE_ARGS:
        return "*" + dt
    return {"Lengths": "*i32", "Reset": "*i1", "Offsets": "*i64"}.get(arg, "*" + accumulator_type(dt))


def _variant(fn, kernel: str, dt: str, bucket: str, constexprs: dict, options: dict, flags: tuple) -> KernelVariant:
    """Signature as the JIT builds it for contiguous inputs: 16-byte aligned pointers, i32 sizes."""
    spills = SPILLS_ACCEPTED.get((kernel, dt, bucket), "")
    arg_type = lambda arg: _arg_type(arg, dt)
    return variant("rnn", kernel, fn, dt, bucket, constexprs, options, flags, arg_type, None, spills)


def _configs(dtype: torch.dtype) -> list[BlockConfig]:
    """The distinct configs block_config can return for this dtype on a GPU (hidden 1..1024)."""
    configs = []
    for hidden in (1, 32, 64, 128, 256, 512, MAX_HIDDEN):
        cfg = block_config(dtype, hidden, interpreter=False)
        if cfg not in configs:
            configs.append(cfg)
    return configs


def kernel_variants() -> list[KernelVariant]:
    """Every GPU variant the launchers can pick: kernel (forward / backward x 4 modes) x dtype x
    flags (x ALLOW_TF32 for fp32) x block config (resident padded hidden sizes, streamed); then
    the single-step cell kernels (``cell_kernel_variants``)."""
    kernels = (("forward", _rnn_forward_kernel), ("backward", _rnn_backward_kernel))
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        for cfg in _configs(torch_dtype):
            bucket = f"BLOCK_H={cfg.block_h} {'resident' if cfg.resident else 'streamed'}"
            for direction, fn in kernels:
                for mode, mode_id in MODES.items():
                    for on in FLAG_SETS:
                        for tf32 in tf32_choices(torch_dtype):
                            constexprs = {n: (n in on) for n in (*FLAG_NAMES, "PACKED")}
                            constexprs.update(
                                MODE=mode_id,
                                RESIDENT=cfg.resident,
                                LOW_PRECISION_DOT=_low_precision_dot(torch_dtype, interpreter=False),
                                ALLOW_TF32=tf32,
                                BLOCK_B=cfg.block_b,
                                BLOCK_H=cfg.block_h,
                                BLOCK_K=cfg.block_k,
                            )
                            variants.append(
                                _variant(
                                    fn,
                                    f"{direction}_{mode}",
                                    dt,
                                    bucket,
                                    constexprs,
                                    dict(num_warps=cfg.num_warps, num_stages=NUM_STAGES),
                                    on + (("ALLOW_TF32",) if tf32 else ()),
                                )
                            )
    return variants + cell_kernel_variants()


# ------------------------------------------------------------------------------------------------
# single-step cells
# ------------------------------------------------------------------------------------------------
# Contract: rnn_cell_forward_cpp / rnn_cell_backward_cpp (csrc/rnn.cpp), the same inputs, outputs
# and workspace layout: (B, K * H), K = 1 [h_new] (tanh / relu), 4 [r, z, n, gh_n] (GRU),
# 5 [i, f, g, o, tanh(c_new)] (LSTM); here in the compute dtype (fp32, fp64 for fp64 inputs).
# Grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)): each program owns a tile of rows and hidden units and
# computes all G gates of it (x W_ih^T and h W_hh^T by tl.dot over K tiles, then the gate
# arithmetic), so no pre-activation goes through memory. The backward kernel gives the gate
# pre-activation gradients; dx, dh, dW and db are GEMMs / sums over them in the launcher.

CELL_SLOTS = {"tanh": 1, "relu": 1, "gru": 4, "lstm": 5}
# (BLOCK_B, BLOCK_H, BLOCK_K, num_warps) per dtype class on a GPU: a single step is latency-bound,
# so small row tiles give more programs; tl.dot needs every dimension >= 16.
CELL_CONFIG = {"16": (16, 64, 32, 4), "32": (16, 32, 32, 4), "64": (16, 32, 16, 4)}
INTERPRETER_CELL_CONFIG = (16, 32, 32, 4)


@triton.jit
def _cell_matmul(
    acc,  # (BLOCK_B, BLOCK_H) accumulator in the compute dtype
    A,  # (B, N) contiguous: x (N = I) or h (N = H)
    W,  # (G * H, N) contiguous: W_ih or W_hh
    gate,  # gate index g: rows g * H + offs_j of W
    offs_b,  # (BLOCK_B,) rows of A
    offs_j,  # (BLOCK_H,) hidden units of the output tile
    B,
    N,
    H,
    LOW_PRECISION_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + A[offs_b] W[g * H + offs_j]^T over N in tiles of BLOCK_K (masked: any B, N, H)."""
    ddt: tl.constexpr = W.dtype.element_ty if LOW_PRECISION_DOT else acc.dtype
    offs_kk = tl.arange(0, BLOCK_K)
    row_ok = offs_b < B
    col_ok = offs_j < H
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + offs_kk
        k_ok = offs_k < N
        a = tl.load(A + offs_b[:, None] * N + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            W + (gate * H + offs_j[None, :]) * N + offs_k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0
        )
        acc = tl.dot(a.to(ddt), w.to(ddt), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _cell_preact(
    X,  # (B, I) contiguous
    Hs,  # (B, H) contiguous
    WIh,  # (G * H, I) contiguous
    WHh,  # (G * H, H) contiguous
    BIh,  # (G * H,) read iff HAS_BIAS and WITH_X
    BHh,  # (G * H,) read iff HAS_BIAS and WITH_H
    gate,
    offs_b,  # (BLOCK_B,)
    offs_j,  # (BLOCK_H,)
    B,
    IN,
    H,
    CDT: tl.constexpr,
    WITH_X: tl.constexpr,
    WITH_H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BLOCK_B, BLOCK_H) pre-activation of gate g: x W_ih_g^T + b_ih_g (WITH_X) plus
    h W_hh_g^T + b_hh_g (WITH_H), accumulated in CDT."""
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=CDT)
    col_ok = offs_j < H
    if WITH_X:
        acc = _cell_matmul(acc, X, WIh, gate, offs_b, offs_j, B, IN, H, LOW_PRECISION_DOT, DOT_PRECISION, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(BIh + gate * H + offs_j, mask=col_ok, other=0.0).to(CDT)[None, :]
    if WITH_H:
        acc = _cell_matmul(acc, Hs, WHh, gate, offs_b, offs_j, B, H, H, LOW_PRECISION_DOT, DOT_PRECISION, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(BHh + gate * H + offs_j, mask=col_ok, other=0.0).to(CDT)[None, :]
    return acc


@launcher
@triton.jit
def _rnn_cell_forward_kernel(
    X,  # (B, I) input dtype, contiguous
    Hs,  # (B, H) input dtype: the entering hidden state
    C,  # (B, H) input dtype: the entering cell state; read iff MODE == 3 (LSTM)
    WIh,  # (G * H, I) input dtype
    WHh,  # (G * H, H) input dtype
    BIh,  # (G * H,) input dtype; read iff HAS_BIAS
    BHh,  # (G * H,) input dtype; read iff HAS_BIAS
    HNew,  # (B, H) input dtype: h_new
    CNew,  # (B, H) input dtype: c_new; written iff MODE == 3
    Ws,  # (B, K * H) compute dtype: the workspace (layout above)
    B,
    IN,
    H,
    MODE: tl.constexpr,  # 0 tanh, 1 relu, 2 GRU, 3 LSTM
    HAS_BIAS: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One step of one cell for a (BLOCK_B, BLOCK_H) tile: both GEMMs and the gate arithmetic."""
    CDT: tl.constexpr = Ws.dtype.element_ty
    DOT_PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    K: tl.constexpr = 4 if MODE == 2 else (5 if MODE == 3 else 1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b < B)[:, None] & (offs_j < H)[None, :]
    state = offs_b[:, None] * H + offs_j[None, :]
    ws = Ws + offs_b[:, None] * (K * H) + offs_j[None, :]
    # Gate 0 (Elman's only gate, GRU's r, LSTM's i) and gate 1 (z, f) take x W_ih^T + b_ih + h W_hh^T + b_hh.
    p0 = _cell_preact(
        X,
        Hs,
        WIh,
        WHh,
        BIh,
        BHh,
        0,
        offs_b,
        offs_j,
        B,
        IN,
        H,
        CDT,
        True,
        True,
        HAS_BIAS,
        LOW_PRECISION_DOT,
        DOT_PRECISION,
        BLOCK_B,
        BLOCK_H,
        BLOCK_K,
    )
    if MODE <= 1:
        if MODE == 0:
            y = tanh(p0)
        else:
            y = tl.where(p0 < 0.0, 0.0, p0)  # relu; NaN propagates (as torch)
        tl.store(HNew + state, y.to(HNew.dtype.element_ty), mask=mask)
        tl.store(ws, y, mask=mask)
    else:
        p1 = _cell_preact(
            X,
            Hs,
            WIh,
            WHh,
            BIh,
            BHh,
            1,
            offs_b,
            offs_j,
            B,
            IN,
            H,
            CDT,
            True,
            True,
            HAS_BIAS,
            LOW_PRECISION_DOT,
            DOT_PRECISION,
            BLOCK_B,
            BLOCK_H,
            BLOCK_K,
        )
        # Gate 2: LSTM's g adds both products; GRU's n keeps h W_hn^T + b_hn apart (r scales it).
        p2 = _cell_preact(
            X,
            Hs,
            WIh,
            WHh,
            BIh,
            BHh,
            2,
            offs_b,
            offs_j,
            B,
            IN,
            H,
            CDT,
            True,
            MODE == 3,
            HAS_BIAS,
            LOW_PRECISION_DOT,
            DOT_PRECISION,
            BLOCK_B,
            BLOCK_H,
            BLOCK_K,
        )
        if MODE == 2:
            ghn = _cell_preact(
                X,
                Hs,
                WIh,
                WHh,
                BIh,
                BHh,
                2,
                offs_b,
                offs_j,
                B,
                IN,
                H,
                CDT,
                False,
                True,
                HAS_BIAS,
                LOW_PRECISION_DOT,
                DOT_PRECISION,
                BLOCK_B,
                BLOCK_H,
                BLOCK_K,
            )
            r = sigmoid(p0)
            z = sigmoid(p1)
            n = tanh(p2 + r * ghn)
            h = tl.load(Hs + state, mask=mask, other=0.0).to(CDT)
            tl.store(HNew + state, (n + z * (h - n)).to(HNew.dtype.element_ty), mask=mask)
            tl.store(ws, r, mask=mask)
            tl.store(ws + H, z, mask=mask)
            tl.store(ws + 2 * H, n, mask=mask)
            tl.store(ws + 3 * H, ghn, mask=mask)
        else:
            p3 = _cell_preact(
                X,
                Hs,
                WIh,
                WHh,
                BIh,
                BHh,
                3,
                offs_b,
                offs_j,
                B,
                IN,
                H,
                CDT,
                True,
                True,
                HAS_BIAS,
                LOW_PRECISION_DOT,
                DOT_PRECISION,
                BLOCK_B,
                BLOCK_H,
                BLOCK_K,
            )
            i = sigmoid(p0)
            f = sigmoid(p1)
            g = tanh(p2)
            o = sigmoid(p3)
            c = tl.load(C + state, mask=mask, other=0.0).to(CDT)
            c_new = f * c + i * g
            tc = tanh(c_new)
            tl.store(CNew + state, c_new.to(CNew.dtype.element_ty), mask=mask)
            tl.store(HNew + state, (o * tc).to(HNew.dtype.element_ty), mask=mask)
            tl.store(ws, i, mask=mask)
            tl.store(ws + H, f, mask=mask)
            tl.store(ws + 2 * H, g, mask=mask)
            tl.store(ws + 3 * H, o, mask=mask)
            tl.store(ws + 4 * H, tc, mask=mask)


@launcher
@triton.jit
def _rnn_cell_backward_kernel(
    DHNew,  # (B, H) input dtype: gradient of h_new
    DCNew,  # (B, H) input dtype: gradient of c_new; read iff HAS_GRAD_C (LSTM)
    Ws,  # (B, K * H) compute dtype: the forward's workspace
    Hs,  # (B, H) input dtype: the entering hidden state; read iff MODE == 2 (GRU)
    C,  # (B, H) input dtype: the entering cell state; read iff MODE == 3 (LSTM)
    DGX,  # (B, G * H) compute dtype: gradient of the pre-activations of x W_ih^T + b_ih
    DGH,  # (B, G * H) compute dtype: that of h W_hh^T + b_hh; written iff MODE == 2 (else = DGX)
    Carry,  # (B, H) compute dtype: GRU dh_new * z (reaches h directly), LSTM dc * f (grad of c)
    B,
    H,
    MODE: tl.constexpr,
    HAS_GRAD_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The gate pre-activation gradients of one (BLOCK_B, BLOCK_H) tile (elementwise)."""
    CDT: tl.constexpr = Ws.dtype.element_ty
    K: tl.constexpr = 4 if MODE == 2 else (5 if MODE == 3 else 1)
    G: tl.constexpr = 3 if MODE == 2 else (4 if MODE == 3 else 1)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (offs_b < B)[:, None] & (offs_j < H)[None, :]
    state = offs_b[:, None] * H + offs_j[None, :]
    ws = Ws + offs_b[:, None] * (K * H) + offs_j[None, :]
    dgx = DGX + offs_b[:, None] * (G * H) + offs_j[None, :]
    dh = tl.load(DHNew + state, mask=mask, other=0.0).to(CDT)
    if MODE <= 1:
        y = tl.load(ws, mask=mask, other=0.0)
        if MODE == 0:
            tl.store(dgx, dh * (1.0 - y * y), mask=mask)
        else:
            tl.store(dgx, tl.where(y <= 0.0, 0.0, dh), mask=mask)  # NaN passes dh, as torch
    elif MODE == 2:
        r = tl.load(ws, mask=mask, other=0.0)
        z = tl.load(ws + H, mask=mask, other=0.0)
        n = tl.load(ws + 2 * H, mask=mask, other=0.0)
        ghn = tl.load(ws + 3 * H, mask=mask, other=0.0)
        h = tl.load(Hs + state, mask=mask, other=0.0).to(CDT)
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dz = dh * (h - n) * z * (1.0 - z)
        dr = dn * ghn * r * (1.0 - r)
        dgh = DGH + offs_b[:, None] * (G * H) + offs_j[None, :]
        tl.store(dgx, dr, mask=mask)
        tl.store(dgx + H, dz, mask=mask)
        tl.store(dgx + 2 * H, dn, mask=mask)
        tl.store(dgh, dr, mask=mask)
        tl.store(dgh + H, dz, mask=mask)
        tl.store(dgh + 2 * H, dn * r, mask=mask)
        tl.store(Carry + state, dh * z, mask=mask)
    else:
        i = tl.load(ws, mask=mask, other=0.0)
        f = tl.load(ws + H, mask=mask, other=0.0)
        g = tl.load(ws + 2 * H, mask=mask, other=0.0)
        o = tl.load(ws + 3 * H, mask=mask, other=0.0)
        tc = tl.load(ws + 4 * H, mask=mask, other=0.0)
        dc = dh * o * (1.0 - tc * tc)
        if HAS_GRAD_C:
            dc += tl.load(DCNew + state, mask=mask, other=0.0).to(CDT)
        c = tl.load(C + state, mask=mask, other=0.0).to(CDT)
        tl.store(dgx, dc * g * i * (1.0 - i), mask=mask)
        tl.store(dgx + H, dc * c * f * (1.0 - f), mask=mask)
        tl.store(dgx + 2 * H, dc * i * (1.0 - g * g), mask=mask)
        tl.store(dgx + 3 * H, dh * tc * o * (1.0 - o), mask=mask)
        tl.store(Carry + state, dc * f, mask=mask)


def cell_config(dtype: torch.dtype, interpreter: bool) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) of the cell kernels at this dtype."""
    return INTERPRETER_CELL_CONFIG if interpreter else CELL_CONFIG[DTYPE_CLASSES[dtype]]


def _check_cell(x, h, c, w_ih, w_hh, mode: str) -> tuple[int, int, int, int]:
    """Checks the shapes / dtypes shared by both cell launchers: (mode id, B, I, H)."""
    mode_id = _mode_of(mode)
    if x.dim() != 2 or h.dim() != 2:
        raise ValueError(f"x and h must be 2-D (B, I) and (B, H), got {tuple(x.shape)} and {tuple(h.shape)}")
    dtype = x.dtype
    if dtype not in DTYPE_CLASSES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {dtype}")
    (batch, size), hidden, gates = x.shape, h.shape[1], GATES[mode]
    _check("h", h, dtype, (batch, hidden))
    _check("w_ih", w_ih, dtype, (gates * hidden, size))
    _check("w_hh", w_hh, dtype, (gates * hidden, hidden))
    if (c is not None) != (mode == "lstm"):
        raise ValueError(f"c must be given for mode 'lstm' and only then (mode {mode!r})")
    if c is not None:
        _check("c", c, dtype, (batch, hidden))
    return mode_id, batch, size, hidden


def rnn_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh, mode, allow_tf32=False):
    """(h_new (B, H), c_new (B, H) or (0, 0), workspace (B, K*H) compute dtype); the contract of
    rnn_cell_forward_cpp on the Triton kernel (any dtype of DTYPE_CLASSES)."""
    mode_id, batch, size, hidden = _check_cell(x, h, c, w_ih, w_hh, mode)
    dtype, gates, lstm = x.dtype, GATES[mode], mode == "lstm"
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must be given together")
    if b_ih is not None:
        _check("b_ih", b_ih, dtype, (gates * hidden,))
        _check("b_hh", b_hh, dtype, (gates * hidden,))
    x, h, w_ih, w_hh = x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    c = c.contiguous() if lstm else h
    h_new = torch.empty((batch, hidden), dtype=dtype, device=x.device)
    c_new = torch.empty((batch, hidden), dtype=dtype, device=x.device) if lstm else x.new_empty(0, 0)
    workspace = torch.empty((batch, CELL_SLOTS[mode] * hidden), dtype=_compute_dtype(dtype), device=x.device)
    interpreter = x.device.type == "cpu"
    block_b, block_h, block_k, num_warps = cell_config(dtype, interpreter)
    if batch * hidden > 0:
        _rnn_cell_forward_kernel[(cdiv(batch, block_b), cdiv(hidden, block_h))](
            x,
            h,
            c,
            w_ih,
            w_hh,
            b_ih.contiguous() if b_ih is not None else w_ih,
            b_hh.contiguous() if b_hh is not None else w_hh,
            h_new,
            c_new if lstm else h_new,
            workspace,
            batch,
            size,
            hidden,
            MODE=mode_id,
            HAS_BIAS=b_ih is not None,
            LOW_PRECISION_DOT=_low_precision_dot(dtype, interpreter),
            ALLOW_TF32=bool(allow_tf32) and dtype == torch.float32,
            BLOCK_B=block_b,
            BLOCK_H=block_h,
            BLOCK_K=block_k,
            num_warps=num_warps,
            num_stages=NUM_STAGES,
        )
    return h_new, c_new, workspace


def rnn_cell_backward(grad_h_new, grad_c_new, workspace, x, h, c, w_ih, w_hh, has_bias, mode):
    """(grad_x, grad_h, grad_c ((0, 0) unless LSTM), grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh
    ((0,) without biases)) in x's dtype: the gate gradients by the kernel, the rest as GEMMs."""
    mode_id, batch, size, hidden = _check_cell(x, h, c, w_ih, w_hh, mode)
    dtype, gates, lstm, gru = x.dtype, GATES[mode], mode == "lstm", mode == "gru"
    cdt = _compute_dtype(dtype)
    _check("grad_h_new", grad_h_new, dtype, (batch, hidden))
    _check("workspace", workspace, cdt, (batch, CELL_SLOTS[mode] * hidden))
    if grad_c_new is not None:
        _check("grad_c_new", grad_c_new, dtype, (batch, hidden))
    device = x.device
    x, h, w_ih, w_hh = x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    grad_gx = torch.empty((batch, gates * hidden), dtype=cdt, device=device)
    grad_gh = torch.empty((batch, gates * hidden), dtype=cdt, device=device) if gru else grad_gx
    carry = torch.empty((batch, hidden), dtype=cdt, device=device)
    block_b, block_h, _, num_warps = cell_config(dtype, device.type == "cpu")
    has_grad_c = lstm and grad_c_new is not None
    if batch * hidden > 0:
        _rnn_cell_backward_kernel[(cdiv(batch, block_b), cdiv(hidden, block_h))](
            grad_h_new.contiguous(),
            grad_c_new.contiguous() if has_grad_c else grad_h_new,
            workspace.contiguous(),
            h,
            c.contiguous() if lstm else h,
            grad_gx,
            grad_gh,
            carry,
            batch,
            hidden,
            MODE=mode_id,
            HAS_GRAD_C=has_grad_c,
            BLOCK_B=block_b,
            BLOCK_H=block_h,
            num_warps=num_warps,
            num_stages=NUM_STAGES,
        )
    dgx, dgh = grad_gx.to(dtype), grad_gh.to(dtype)
    grad_x = torch.mm(dgx, w_ih)
    grad_h = torch.addmm(carry.to(dtype), dgh, w_hh) if gru else torch.mm(dgh, w_hh)
    grad_c = carry.to(dtype) if lstm else x.new_empty(0, 0)
    grad_w_ih = torch.mm(dgx.t(), x)
    grad_w_hh = torch.mm(dgh.t(), h)
    if has_bias:
        grad_b_ih = grad_gx.sum(0).to(dtype)
        grad_b_hh = grad_gh.sum(0).to(dtype) if gru else grad_b_ih.clone()
    else:
        grad_b_ih, grad_b_hh = x.new_empty(0), x.new_empty(0)
    return grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def cell_kernel_variants() -> list[KernelVariant]:
    """Every GPU variant of the cell kernels: forward (x HAS_BIAS, x ALLOW_TF32 for fp32) and
    backward (x HAS_GRAD_C for LSTM) x 4 modes x dtype, one block config per dtype."""
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        block_b, block_h, block_k, num_warps = cell_config(torch_dtype, interpreter=False)
        options = dict(num_warps=num_warps, num_stages=NUM_STAGES)
        bucket = f"BLOCK_H={block_h} cell"
        for mode, mode_id in MODES.items():
            for bias in (False, True):
                for tf32 in tf32_choices(torch_dtype):
                    constexprs = dict(
                        MODE=mode_id,
                        HAS_BIAS=bias,
                        LOW_PRECISION_DOT=_low_precision_dot(torch_dtype, interpreter=False),
                        ALLOW_TF32=tf32,
                        BLOCK_B=block_b,
                        BLOCK_H=block_h,
                        BLOCK_K=block_k,
                    )
                    flags = (("HAS_BIAS",) if bias else ()) + (("ALLOW_TF32",) if tf32 else ())
                    variants.append(
                        _variant(
                            _rnn_cell_forward_kernel, f"cell_forward_{mode}", dt, bucket, constexprs, options, flags
                        )
                    )
            for grad_c in (False, True) if mode == "lstm" else (False,):
                constexprs = dict(MODE=mode_id, HAS_GRAD_C=grad_c, BLOCK_B=block_b, BLOCK_H=block_h)
                flags = ("HAS_GRAD_C",) if grad_c else ()
                variants.append(
                    _variant(_rnn_cell_backward_kernel, f"cell_backward_{mode}", dt, bucket, constexprs, options, flags)
                )
    return variants


__all__ = [
    "rnn_forward",
    "rnn_backward",
    "kernel_variants",
    "rnn_cell_forward",
    "rnn_cell_backward",
    "cell_config",
    "block_config",
    "padded_hidden",
    "BlockConfig",
    "KernelVariant",
]
