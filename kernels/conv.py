"""Fused 2-D convolution in Triton: implicit-GEMM forward with a bias + activation + max-pool
epilogue, input- and weight-gradient kernels, and the epilogue backward.

Contract: the conv family's op contract (fastrec/ops/conv.py, shared with the C++ and torch
backends). conv1d (N, C, L) is conv2d on (N, C, 1, L) with a (1, k) kernel; callers reshape.
Offsets are int32 (they fit the registers the gathers need): every tensor's largest element
offset must be below 2**31, which the launchers check (ValueError; the caller routes larger
problems elsewhere).
Layout of this file, top-down:

1. ``@triton.jit`` helper: the first-maximum pool reduction (the activations and their
   derivatives are in ``_conv_common.py``, shared with the Caser kernels).
2. Kernels
   - ``_conv_forward_kernel``: grid (cdiv(N*Hp*Wp, BLOCK_P), groups * cdiv(O/groups, BLOCK_O)).
     The GEMM rows of a program are BLOCK_P pooled outputs x WIN_BLOCK window positions, so the
     pool reduces in registers; windows longer than WIN_BLOCK (max over time) are walked in
     chunks with a running (max, argmax). The K loop walks (c, kh, kw) and gathers the input with
     masks for padding: no im2col tensor. Writes y, and z at the winner (act != none) and the
     int32 winner index i * pool_w + j (pooled).
   - ``_epilogue_backward_kernel``: dz = grad_y * act'(z) scattered to the argmax positions.
   - ``_conv_backward_input_kernel``: dx as an implicit GEMM over (o, kh, kw) of dz and w.
   - ``_conv_backward_weight_kernel``: dw as an implicit GEMM reducing over N*Ho*Wo, split into
     SPLIT fixed ranges whose partial sums are added in a fixed order (deterministic; no atomics).
3. Launchers (tensors in, tensors out; no autograd) and ``kernel_variants()``, every kernel
   variant the launchers can pick, for tests/test_kernels_compile.py.
4. The epilogue-only forward (``_epilogue_forward_kernel``, ``epilogue_forward``): bias +
   activation + pool of a convolution computed elsewhere (cuDNN), for the "cudnn" conv path.

Math (canonical form), per group g with C/groups input and O/groups output channels:
    z[n,o,oh,ow] = sum_{c,kh,kw} x[n, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw] w[o,c,kh,kw] + b[o]
    a = act(z);  y[n,o,hp,wp] = max_{i<pool_h, j<pool_w} a[n, o, hp*pool_h + i, wp*pool_w + j]
Pool ties and NaN as torch's max_pool2d: the first maximum in row-major window order wins; a NaN
wins over any number (the last NaN of the window, as torch's kernels scan).

Numerics: fp64 computes in fp64 (gradcheck); fp32 in fp32 with ``input_precision="ieee"`` dots
unless ``allow_tf32``; fp16/bf16 dots run in the input dtype with fp32 accumulation. The
interpreter holds bf16 as raw integers, so there (UPCAST_INPUTS) loaded tiles are cast to fp32
at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from fastrec.kernels._common import DTYPE_CLASSES, TRITON_DTYPES, KernelVariant, accumulator_type, tf32_choices, variant
from fastrec.kernels._conv_common import accumulate_dot, activate, activation_backward, activation_code
from fastrec.kernels._host import cdiv, launcher, next_power_of_2

WIN_BLOCKS = (4, 16, 64)  # pool-window rows per GEMM tile (1 when not pooled)


# ------------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _pool_chunk(
    a,  # (BLOCK_P, WIN_BLOCK, BLOCK_O) activated values of one window chunk
    z,  # (BLOCK_P, WIN_BLOCK, BLOCK_O) pre-activation values
    e,  # (1, WIN_BLOCK, 1) int32 window index of each row (row-major i * pool_w + j)
    valid,  # (1, WIN_BLOCK, 1) bool: e < pool_h * pool_w
):
    """Per (p, o): (winner value, z at the winner, winner index, whether it is NaN) of the chunk."""
    is_nan = (a != a) & valid
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    last_nan = tl.max(tl.where(is_nan, e, -1), axis=1)
    key = tl.where(valid & (a == a), a, float("-inf"))
    best = tl.max(key, axis=1)
    first = tl.min(tl.where(valid & (key == best[:, None, :]), e, 2147483647), axis=1)
    index = tl.where(has_nan, last_nan, first)
    z_at = tl.sum(tl.where(e == index[:, None, :], z, 0.0), axis=1)
    value = tl.where(has_nan, float("nan"), best).to(a.dtype)
    return value, z_at, index, has_nan


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@launcher
@triton.jit(do_not_specialize=["batch", "height", "width", "pooled_h", "pooled_w"])
def _conv_forward_kernel(
    X,  # (N, C, H, W) strided
    Wt,  # (O, C/groups, KH, KW) contiguous
    Bias,  # (O,) contiguous; read iff HAS_BIAS
    Y,  # (N, O, Hp, Wp) contiguous, dtype of x
    SavedZ,  # (N, O, Hp, Wp) contiguous, dtype of x; written iff ACT != 0
    Argmax,  # (N, O, Hp, Wp) int32 contiguous; written iff POOLED
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    batch,
    height,
    width,
    channels_per_group,
    out_channels,
    out_per_group,
    kernel_h,
    kernel_w,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    pool_h,
    pool_w,
    pooled_h,
    pooled_w,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    POOLED: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WIN_BLOCK: tl.constexpr,
):
    """y = maxpool(act(conv(x, w) + b)) for BLOCK_M // WIN_BLOCK pooled outputs x BLOCK_O channels
    of one group; WIN_BLOCK = 1 when not pooled (then y = act(z) and the loop runs once)."""
    tl.static_assert(BLOCK_M % WIN_BLOCK == 0)
    BLOCK_P: tl.constexpr = BLOCK_M // WIN_BLOCK
    compute_dtype: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    o_blocks = tl.cdiv(out_per_group, BLOCK_O)
    group = tl.program_id(1) // o_blocks
    offs_o = (tl.program_id(1) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < out_per_group
    o_global = group * out_per_group + offs_o
    pooled_hw = pooled_h * pooled_w
    total_p = batch * pooled_hw
    k_total = channels_per_group * kernel_h * kernel_w
    window = pool_h * pool_w

    # GEMM rows: pooled output p = start + r // WIN_BLOCK, window position chunk + r % WIN_BLOCK.
    rows = tl.arange(0, BLOCK_M)
    p_row = tl.program_id(0) * BLOCK_P + rows // WIN_BLOCK
    e_row = rows % WIN_BLOCK
    n_row = p_row // pooled_hw
    rem_row = p_row % pooled_hw
    hp_row = rem_row // pooled_w
    wp_row = rem_row % pooled_w
    p_row_ok = p_row < total_p
    x_row = n_row * stride_xn + group * channels_per_group * stride_xc  # (BLOCK_M,) int32 offsets

    w_col = o_global * k_total  # (BLOCK_O,) start of each filter
    bias = tl.zeros([BLOCK_O], dtype=compute_dtype)
    if HAS_BIAS:
        bias = tl.load(Bias + o_global, mask=o_ok, other=0.0).to(compute_dtype)

    run_value = tl.full([BLOCK_P, BLOCK_O], float("-inf"), dtype=compute_dtype)
    run_z = tl.zeros([BLOCK_P, BLOCK_O], dtype=compute_dtype)
    run_index = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.int32)
    run_nan = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.int1)
    offs_k = tl.arange(0, BLOCK_K)
    for chunk in range(0, window, WIN_BLOCK):
        e = chunk + e_row
        row_ok = p_row_ok & (e < window)
        oh = hp_row * pool_h + e // pool_w
        ow = wp_row * pool_w + e % pool_w
        ih0 = oh * conv_stride_h - pad_h
        iw0 = ow * conv_stride_w - pad_w
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=compute_dtype)
        for k0 in range(0, k_total, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_total
            c = k // (kernel_h * kernel_w)
            khw = k % (kernel_h * kernel_w)
            ih = ih0[:, None] + (khw // kernel_w)[None, :] * dil_h
            iw = iw0[:, None] + (khw % kernel_w)[None, :] * dil_w
            in_bounds = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            a_tile = tl.load(  # (BLOCK_M, BLOCK_K) gathered input
                X + (x_row[:, None] + c[None, :] * stride_xc + ih * stride_xh + iw * stride_xw),
                mask=row_ok[:, None] & k_ok[None, :] & in_bounds,
                other=0.0,
            )
            w_tile = tl.load(  # (BLOCK_K, BLOCK_O)
                Wt + (w_col[None, :] + k[:, None]), mask=k_ok[:, None] & o_ok[None, :], other=0.0
            )
            acc = accumulate_dot(a_tile, w_tile, acc, UPCAST_INPUTS, ALLOW_TF32)
        z = acc + bias[None, :]
        act = activate(z, ACT)
        if POOLED:
            e3 = tl.reshape(e, (BLOCK_P, WIN_BLOCK, 1))
            value, z_at, index, has_nan = _pool_chunk(
                tl.reshape(act, (BLOCK_P, WIN_BLOCK, BLOCK_O)),
                tl.reshape(z, (BLOCK_P, WIN_BLOCK, BLOCK_O)),
                e3,
                e3 < window,
            )
            # A later chunk wins with a NaN (the last NaN wins) or a strictly larger value.
            take = has_nan | ((run_nan == 0) & (value > run_value))
            run_value = tl.where(take, value, run_value)
            run_z = tl.where(take, z_at, run_z)
            run_index = tl.where(take, index, run_index)
            run_nan = run_nan | has_nan
        else:
            run_value = tl.reshape(act, (BLOCK_P, BLOCK_O))
            run_z = tl.reshape(z, (BLOCK_P, BLOCK_O))

    # Store: y[n, o, hp, wp] at n * O * Hp * Wp + o * Hp * Wp + hp * Wp + wp.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = p // pooled_hw
    out_off = (n * out_channels * pooled_hw + p % pooled_hw)[:, None] + (o_global * pooled_hw)[None, :]
    out_mask = (p < total_p)[:, None] & o_ok[None, :]
    tl.store(Y + out_off, run_value.to(Y.dtype.element_ty), mask=out_mask)
    if ACT != 0:
        tl.store(SavedZ + out_off, run_z.to(SavedZ.dtype.element_ty), mask=out_mask)
    if POOLED:
        tl.store(Argmax + out_off, run_index, mask=out_mask)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@launcher
@triton.jit(do_not_specialize=["total", "pooled_h", "pooled_w", "out_h", "out_w"])
def _epilogue_backward_kernel(
    GradY,  # (N, O, Hp, Wp) contiguous
    SavedZ,  # (N, O, Hp, Wp) contiguous; read iff ACT != 0
    Argmax,  # (N, O, Hp, Wp) int32 contiguous; read iff POOLED
    GradZ,  # (N, O, Ho, Wo) contiguous, dtype of grad_y; zero outside windows (launcher)
    total,  # N * O * Hp * Wp
    pooled_h,
    pooled_w,
    out_h,
    out_w,
    pool_h,
    pool_w,
    ACT: tl.constexpr,
    POOLED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    compute_dtype: tl.constexpr = tl.float64 if GradY.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    g = tl.load(GradY + offs, mask=ok, other=0.0).to(compute_dtype)
    # The other window positions get 0, or NaN where act'(the winner's z) is not finite (gelu at
    # a non-finite z, tanh / sigmoid at NaN): such a window holds a z whose 0 * act'(z) is NaN in
    # torch's dense backward; which of its positions is not known here, so all of them are NaN.
    rest = tl.zeros([BLOCK], dtype=compute_dtype)
    if ACT != 0:
        z = tl.load(SavedZ + offs, mask=ok, other=0.0).to(compute_dtype)
        if ACT >= 2:
            rest = activation_backward(rest, z, ACT)
        g = activation_backward(g, z, ACT)
    g = g.to(GradZ.dtype.element_ty)
    rest = rest.to(GradZ.dtype.element_ty)
    if POOLED:
        pooled_hw = pooled_h * pooled_w
        plane = offs // pooled_hw  # n * O + o
        hp = (offs % pooled_hw) // pooled_w
        wp = offs % pooled_w
        winner = tl.load(Argmax + offs, mask=ok, other=0)
        base = plane * out_h * out_w + (hp * pool_h) * out_w + wp * pool_w
        for e in range(0, pool_h * pool_w):
            tl.store(GradZ + base + (e // pool_w) * out_w + e % pool_w, tl.where(winner == e, g, rest), mask=ok)
    else:
        tl.store(GradZ + offs, g, mask=ok)


@launcher
@triton.jit(do_not_specialize=["batch", "height", "width", "out_h", "out_w"])
def _conv_backward_input_kernel(
    GradZ,  # (N, O, Ho, Wo) strided
    Wt,  # (O, C/groups, KH, KW) contiguous
    GradX,  # (N, C, H, W) contiguous, dtype of dz
    stride_gn,
    stride_go,
    stride_gh,
    stride_gw,
    batch,
    height,
    width,
    channels,
    channels_per_group,
    out_per_group,
    out_h,
    out_w,
    kernel_h,
    kernel_w,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    UNIT_STRIDE: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx[n, c, ih, iw] = sum over (o, kh, kw) with ih = oh*sh - ph + kh*dh (same for w) of dz * w."""
    compute_dtype: tl.constexpr = tl.float64 if GradZ.dtype.element_ty == tl.float64 else tl.float32
    c_blocks = tl.cdiv(channels_per_group, BLOCK_C)
    group = tl.program_id(1) // c_blocks
    offs_c = (tl.program_id(1) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < channels_per_group
    khw_total = kernel_h * kernel_w
    k_total = out_per_group * khw_total
    hw = height * width

    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < batch * hw
    n = m // hw
    ih = (m % hw) // width
    iw = m % width
    g_row = n * stride_gn + group * out_per_group * stride_go  # (BLOCK_M,) int32 offsets
    w_group = Wt + group * out_per_group * channels_per_group * khw_total

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=compute_dtype)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, k_total, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_total
        o = k // khw_total
        khw = k % khw_total
        kh = khw // kernel_w
        kw = khw % kernel_w
        oh_num = (ih + pad_h)[:, None] - (kh * dil_h)[None, :]
        ow_num = (iw + pad_w)[:, None] - (kw * dil_w)[None, :]
        if UNIT_STRIDE:
            oh = oh_num
            ow = ow_num
            hit = (oh_num >= 0) & (ow_num >= 0)
        else:
            oh = oh_num // conv_stride_h
            ow = ow_num // conv_stride_w
            hit = (oh_num >= 0) & (ow_num >= 0) & (oh_num % conv_stride_h == 0) & (ow_num % conv_stride_w == 0)
        hit = hit & (oh < out_h) & (ow < out_w) & m_ok[:, None] & k_ok[None, :]
        dz_tile = tl.load(  # (BLOCK_M, BLOCK_K) gathered upstream gradient
            GradZ + (g_row[:, None] + o[None, :] * stride_go + oh * stride_gh + ow * stride_gw), mask=hit, other=0.0
        )
        w_tile = tl.load(  # (BLOCK_K, BLOCK_C): w[g*Og + o, c, kh, kw]
            w_group + (o * channels_per_group * khw_total + khw)[:, None] + (offs_c * khw_total)[None, :],
            mask=k_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = accumulate_dot(dz_tile, w_tile, acc, UPCAST_INPUTS, ALLOW_TF32)

    out_off = (n * channels * hw + m % hw)[:, None] + ((group * channels_per_group + offs_c) * hw)[None, :]
    tl.store(GradX + out_off, acc.to(GradX.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@launcher
@triton.jit(do_not_specialize=["batch", "height", "width", "out_h", "out_w", "rows_per_split"])
def _conv_backward_weight_kernel(
    GradZ,  # (N, O, Ho, Wo) strided
    X,  # (N, C, H, W) strided
    Partial,  # (SPLIT, O, C/groups * KH * KW) contiguous, fp32 (fp64 for fp64)
    stride_gn,
    stride_go,
    stride_gh,
    stride_gw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    batch,
    height,
    width,
    out_channels,
    channels_per_group,
    out_per_group,
    out_h,
    out_w,
    kernel_h,
    kernel_w,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    rows_per_split,  # a multiple of BLOCK_R: split s reduces rows [s * rows_per_split, (s + 1) * ...)
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dw[o, (c, kh, kw)] = sum over rows (n, oh, ow) of dz[n, o, oh, ow] x[n, c, ih, iw]."""
    compute_dtype: tl.constexpr = tl.float64 if GradZ.dtype.element_ty == tl.float64 else tl.float32
    khw_total = kernel_h * kernel_w
    k_total = channels_per_group * khw_total
    o_blocks = tl.cdiv(out_per_group, BLOCK_O)
    offs_o = (tl.program_id(0) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = (tl.program_id(0) // o_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    group = tl.program_id(1)
    split = tl.program_id(2)
    o_ok = offs_o < out_per_group
    k_ok = offs_k < k_total
    c = offs_k // khw_total
    khw = offs_k % khw_total
    kh_off = (khw // kernel_w) * dil_h
    kw_off = (khw % kernel_w) * dil_w
    g_col = (group * out_per_group + offs_o) * stride_go  # (BLOCK_O,) int32 offsets
    x_col = (group * channels_per_group + c) * stride_xc  # (BLOCK_K,) int32 offsets
    out_hw = out_h * out_w
    total_r = batch * out_hw
    r_start = split * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, total_r)

    acc = tl.zeros([BLOCK_O, BLOCK_K], dtype=compute_dtype)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < r_end
        n = r // out_hw
        oh = (r % out_hw) // out_w
        ow = r % out_w
        dz_tile = tl.load(  # (BLOCK_O, BLOCK_R)
            GradZ + (g_col[:, None] + (n * stride_gn + oh * stride_gh + ow * stride_gw)[None, :]),
            mask=o_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        ih = (oh * conv_stride_h - pad_h)[:, None] + kh_off[None, :]
        iw = (ow * conv_stride_w - pad_w)[:, None] + kw_off[None, :]
        in_bounds = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        x_tile = tl.load(  # (BLOCK_R, BLOCK_K) gathered input
            X + (x_col[None, :] + (n * stride_xn)[:, None] + ih * stride_xh + iw * stride_xw),
            mask=r_ok[:, None] & k_ok[None, :] & in_bounds,
            other=0.0,
        )
        acc = accumulate_dot(dz_tile, x_tile, acc, UPCAST_INPUTS, ALLOW_TF32)

    out_off = (split * out_channels + group * out_per_group + offs_o)[:, None] * k_total + offs_k[None, :]
    tl.store(Partial + out_off, acc, mask=o_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------
# block configs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockConfig:
    """GEMM tile of one program: ``rows`` x ``cols`` output, ``depth`` of reduction per step.

    forward: rows = BLOCK_M (pooled outputs x window), cols = BLOCK_O, depth = BLOCK_K (c, kh, kw);
    input gradient: rows = BLOCK_M (n, ih, iw), cols = BLOCK_C, depth = BLOCK_K (o, kh, kw);
    weight gradient: rows = BLOCK_O, cols = BLOCK_K (c, kh, kw), depth = BLOCK_R (n, oh, ow).
    """

    rows: int
    cols: int
    depth: int
    num_warps: int
    num_stages: int

    def blocks(self, kernel: str) -> dict[str, int]:
        """The tile as ``kernel``'s BLOCK_ constexprs (``BLOCK_NAMES``)."""
        return dict(zip(BLOCK_NAMES[kernel], (self.rows, self.cols, self.depth), strict=True))

    @property
    def options(self) -> dict[str, int]:
        """The launch options (num_warps, num_stages)."""
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


# Each kernel's BLOCK_ constexprs for (rows, cols, depth).
BLOCK_NAMES = {
    "forward": ("BLOCK_M", "BLOCK_O", "BLOCK_K"),
    "input": ("BLOCK_M", "BLOCK_C", "BLOCK_K"),
    "weight": ("BLOCK_O", "BLOCK_K", "BLOCK_R"),
}

# GPU tiles per (kernel, dtype class, column bucket). Recommender convolutions have 8-64 channels
# per group: 16 columns for <= 16 channels, 64 above. fp64 runs only for gradcheck: one small tile.
# Chosen so that every variant compiles without spills for sm_80 and sm_90 (the compile check):
# gathered tiles carry a pointer and a mask per element, and fp32 "ieee" dots run on FMA units
# with operand tiles replicated across threads, hence the 16-deep fp32 steps and 8-warp 64 x 64
# tiles.
COLUMN_BUCKETS = (16, 64)
_GPU_CONFIGS = {
    "forward": {
        ("16", 16): BlockConfig(64, 16, 16, 4, 2),
        ("16", 64): BlockConfig(64, 64, 16, 8, 2),
        ("32", 16): BlockConfig(64, 16, 16, 4, 2),
        ("32", 64): BlockConfig(64, 64, 16, 8, 2),
        ("64", 16): BlockConfig(16, 16, 16, 4, 1),
    },
    "input": {
        ("16", 16): BlockConfig(64, 16, 32, 4, 2),
        ("16", 64): BlockConfig(64, 64, 32, 4, 2),
        ("32", 16): BlockConfig(64, 16, 16, 4, 2),
        ("32", 64): BlockConfig(32, 64, 16, 8, 2),
        ("64", 16): BlockConfig(32, 16, 16, 4, 1),
    },
    "weight": {
        ("16", 16): BlockConfig(16, 64, 32, 4, 2),
        ("16", 64): BlockConfig(64, 64, 32, 4, 3),
        ("32", 16): BlockConfig(16, 64, 32, 4, 2),
        ("32", 64): BlockConfig(64, 64, 16, 8, 2),
        ("64", 16): BlockConfig(16, 32, 16, 4, 1),
    },
}
_EPILOGUE_BLOCK = {"16": 1024, "32": 1024, "64": 512}  # elementwise epilogue kernels, per dtype class
# The interpreter's cost grows with programs x operations, not tile size: big tiles there.
_INTERPRETER_ROWS = 64
WEIGHT_SPLIT_MIN_STEPS = 4  # a split of the weight-gradient reduction walks at least this many BLOCK_R


def column_bucket(dtype: torch.dtype, columns: int) -> int:
    """GPU column tile for ``columns`` output channels (or input channels) per group."""
    if dtype == torch.float64:
        return 16
    return 16 if columns <= 16 else 64


def block_config(kernel: str, dtype: torch.dtype, columns: int, depth: int, interpreter: bool) -> BlockConfig:
    """Tiles for ``kernel`` in {"forward", "input", "weight"}; ``columns`` channels per group on the
    tile's column side (weight: output channels, the tile's rows), ``depth`` the (c, kh, kw) size."""
    if interpreter:

        def fit(v):
            return max(16, min(64, next_power_of_2(v)))

        if kernel == "weight":
            return BlockConfig(fit(columns), fit(depth), 32, 4, 1)
        return BlockConfig(_INTERPRETER_ROWS, fit(columns), fit(depth), 4, 1)
    return _GPU_CONFIGS[kernel][(DTYPE_CLASSES[dtype], column_bucket(dtype, columns))]


def window_block(window: int, rows: int) -> int:
    """Rows of a window chunk: 1 when not pooled, else the WIN_BLOCKS entry (<= rows) that pads the
    window least (ties: the larger, fewer chunks)."""
    if window == 1:
        return 1
    choices = [w for w in WIN_BLOCKS if w <= rows]
    return min(choices, key=lambda w: (cdiv(window, w) * w, -w))


def weight_split(tiles: int, total_rows: int, block_r: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of the weight-gradient reduction: enough programs to fill the GPU
    (4 per SM), each walking >= WEIGHT_SPLIT_MIN_STEPS blocks; depends on shapes only (deterministic).
    On the interpreter, two programs' worth so that the split path runs in tests."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    steps = cdiv(total_rows, block_r)
    splits = max(1, min(cdiv(target, tiles), steps // WEIGHT_SPLIT_MIN_STEPS))
    rows_per_split = cdiv(steps, splits) * block_r
    return cdiv(total_rows, rows_per_split), rows_per_split


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------


def _pair(v, name: str) -> tuple[int, int]:
    if len(v) != 2:
        raise ValueError(f"{name} must be an (int, int) pair, got {v!r}")
    return int(v[0]), int(v[1])


def _check_int32_offsets(**tensors: torch.Tensor) -> None:
    """ValueError naming the first tensor whose largest element offset does not fit int32."""
    for name, t in tensors.items():
        span = sum((size - 1) * abs(step) for size, step in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
        if span >= 2**31:
            raise ValueError(f"{name} must have element offsets below 2**31 for the Triton conv kernels, got {span}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (torch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _geometry(w_shape, stride, padding, dilation) -> tuple[int, ...]:
    """``(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)``: the geometry
    arguments every convolution kernel takes, in their order."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    return int(w_shape[2]), int(w_shape[3]), sh, sw, ph, pw, dh, dw


def conv_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    act: str,
    pool: tuple[int, int],
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (N, O, Hp, Wp), saved_z (shape of y, or (0,) when act == "none"), argmax (int32, shape
    of y, or (0,) when not pooled)); x (N, C, H, W) any strides; w (O, C/groups, KH, KW), bias
    (O,) or None, same dtype as x. ``allow_tf32``: fp32 dots may use tf32 (the caller passes
    torch's flag)."""
    geometry = _geometry(w.shape, stride, padding, dilation)
    kernel_h, kernel_w, sh, sw, ph, pw, dh, dw = geometry
    pool_h, pool_w = _pair(pool, "pool")
    act_code = activation_code(act)
    batch, channels, height, width = x.shape
    out_channels, channels_per_group = w.shape[:2]
    out_h = conv_output_size(height, kernel_h, sh, ph, dh)
    out_w = conv_output_size(width, kernel_w, sw, pw, dw)
    pooled_h, pooled_w = out_h // pool_h, out_w // pool_w
    pooled = (pool_h, pool_w) != (1, 1)
    shape = (batch, out_channels, pooled_h, pooled_w)
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    saved_z = torch.empty(shape if act_code else (0,), dtype=x.dtype, device=x.device)
    argmax = torch.empty(shape if pooled else (0,), dtype=torch.int32, device=x.device)
    if y.numel() == 0:
        return y, saved_z, argmax
    w = w.contiguous()
    _check_int32_offsets(x=x, w=w, y=y)
    bias_arg = bias.contiguous() if bias is not None else w
    out_per_group = out_channels // groups
    interpreter = x.device.type == "cpu"
    cfg = block_config("forward", x.dtype, out_per_group, channels_per_group * kernel_h * kernel_w, interpreter)
    win = window_block(pool_h * pool_w, cfg.rows)
    grid = (
        cdiv(batch * pooled_h * pooled_w, cfg.rows // win),
        groups * cdiv(out_per_group, cfg.cols),
    )
    _conv_forward_kernel[grid](
        x,
        w,
        bias_arg,
        y,
        saved_z if act_code else y,
        argmax if pooled else y,
        *x.stride(),
        batch,
        height,
        width,
        channels_per_group,
        out_channels,
        out_per_group,
        *geometry,
        pool_h,
        pool_w,
        pooled_h,
        pooled_w,
        ACT=act_code,
        HAS_BIAS=bias is not None,
        POOLED=pooled,
        UPCAST_INPUTS=interpreter,
        ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
        **cfg.blocks("forward"),
        WIN_BLOCK=win,
        **cfg.options,
    )
    return y, saved_z, argmax


def epilogue_backward(
    grad_y: torch.Tensor,
    saved_z: torch.Tensor,
    argmax: torch.Tensor,
    act: str,
    pool: tuple[int, int],
    conv_out_shape: tuple[int, int, int, int],
) -> torch.Tensor:
    """dz (N, O, Ho, Wo) contiguous, dtype of grad_y: grad_y * act'(saved_z) at the argmax position
    of each window, zero elsewhere (NaN in a window whose winner has a non-finite act'), and zero
    at the conv outputs no window covers (the caller fills those). With act "none" and no pool it
    is a copy of grad_y (the caller may skip it)."""
    act_code = activation_code(act)
    pool_h, pool_w = _pair(pool, "pool")
    pooled = (pool_h, pool_w) != (1, 1)
    batch, channels, out_h, out_w = (int(s) for s in conv_out_shape)
    _, _, pooled_h, pooled_w = grad_y.shape
    covered = pooled_h * pool_h == out_h and pooled_w * pool_w == out_w
    alloc = torch.empty if covered else torch.zeros
    grad_z = alloc((batch, channels, out_h, out_w), dtype=grad_y.dtype, device=grad_y.device)
    total = grad_y.numel()
    if total == 0:
        return grad_z
    grad_y = grad_y.contiguous()
    _check_int32_offsets(grad_z=grad_z)
    block = _EPILOGUE_BLOCK[DTYPE_CLASSES[grad_y.dtype]]
    _epilogue_backward_kernel[(cdiv(total, block),)](
        grad_y,
        saved_z.contiguous() if act_code else grad_y,
        argmax.contiguous() if pooled else grad_y,
        grad_z,
        total,
        pooled_h,
        pooled_w,
        out_h,
        out_w,
        pool_h,
        pool_w,
        ACT=act_code,
        POOLED=pooled,
        BLOCK=block,
    )
    return grad_z


def conv_backward_input(
    dz: torch.Tensor,
    w: torch.Tensor,
    x_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """dx (N, C, H, W) contiguous, dtype of dz: the convolution's input gradient for dz (N, O, Ho, Wo)."""
    geometry = _geometry(w.shape, stride, padding, dilation)
    kernel_h, kernel_w, sh, sw = geometry[:4]
    batch, channels, height, width = (int(s) for s in x_shape)
    out_channels, channels_per_group = w.shape[:2]
    _, _, out_h, out_w = dz.shape
    grad_x = torch.empty((batch, channels, height, width), dtype=dz.dtype, device=dz.device)
    if grad_x.numel() == 0:
        return grad_x
    if dz.numel() == 0:
        return grad_x.zero_()
    w = w.contiguous()
    _check_int32_offsets(dz=dz, w=w, dx=grad_x)
    out_per_group = out_channels // groups
    interpreter = dz.device.type == "cpu"
    cfg = block_config("input", dz.dtype, channels_per_group, out_per_group * kernel_h * kernel_w, interpreter)
    grid = (cdiv(batch * height * width, cfg.rows), groups * cdiv(channels_per_group, cfg.cols))
    _conv_backward_input_kernel[grid](
        dz,
        w,
        grad_x,
        *dz.stride(),
        batch,
        height,
        width,
        channels,
        channels_per_group,
        out_per_group,
        out_h,
        out_w,
        *geometry,
        UNIT_STRIDE=(sh, sw) == (1, 1),
        UPCAST_INPUTS=interpreter,
        ALLOW_TF32=bool(allow_tf32) and dz.dtype == torch.float32,
        **cfg.blocks("input"),
        **cfg.options,
    )
    return grad_x


def conv_backward_weight(
    dz: torch.Tensor,
    x: torch.Tensor,
    w_shape: tuple[int, int, int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """dw (O, C/groups, KH, KW) contiguous, dtype of x: the weight gradient for dz (N, O, Ho, Wo).

    Deterministic: the reduction over N*Ho*Wo is split into fixed row ranges (``weight_split``),
    whose fp32 (fp64) partial sums are added in split order."""
    geometry = _geometry(w_shape, stride, padding, dilation)
    out_channels, channels_per_group, kernel_h, kernel_w = (int(s) for s in w_shape)
    batch, _, height, width = x.shape
    _, _, out_h, out_w = dz.shape
    k_total = channels_per_group * kernel_h * kernel_w
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    total_rows = batch * out_h * out_w
    if total_rows == 0 or out_channels * k_total == 0:
        return torch.zeros((out_channels, channels_per_group, kernel_h, kernel_w), dtype=x.dtype, device=x.device)
    _check_int32_offsets(dz=dz, x=x)
    out_per_group = out_channels // groups
    interpreter = x.device.type == "cpu"
    cfg = block_config("weight", x.dtype, out_per_group, k_total, interpreter)
    tiles = cdiv(out_per_group, cfg.rows) * cdiv(k_total, cfg.cols)
    splits, rows_per_split = weight_split(tiles * groups, total_rows, cfg.depth, x.device)
    partial = torch.empty((splits, out_channels, k_total), dtype=acc_dtype, device=x.device)
    _conv_backward_weight_kernel[(tiles, groups, splits)](
        dz,
        x,
        partial,
        *dz.stride(),
        *x.stride(),
        batch,
        height,
        width,
        out_channels,
        channels_per_group,
        out_per_group,
        out_h,
        out_w,
        *geometry,
        rows_per_split,
        UPCAST_INPUTS=interpreter,
        ALLOW_TF32=bool(allow_tf32) and x.dtype == torch.float32,
        **cfg.blocks("weight"),
        **cfg.options,
    )
    grad_w = partial[0] if splits == 1 else partial.sum(0)
    return grad_w.to(x.dtype).view(out_channels, channels_per_group, kernel_h, kernel_w)


# ------------------------------------------------------------------------------------------------
# every variant the launchers can pick (for the compile-only test)
# ------------------------------------------------------------------------------------------------

ACT_FLAGS = ("", "RELU", "GELU", "TANH", "SIGMOID")  # the flag naming each act (none: no flag)
# ALLOW_TF32 only switches fp32 dots to tf32 and HAS_BIAS adds one (BLOCK_O,) load: the sampled
# compile check turns them on in every other combination instead of multiplying the combinations.
COVERAGE_ALTERNATE_FLAGS = ("ALLOW_TF32", "HAS_BIAS")


_UNIT_STRIDES = ("stride_xw", "stride_gw")  # contiguous inputs: the JIT specialises a stride of 1


def _arg_type(arg: str, dt: str) -> str | int:
    """Triton type of a kernel argument: pointers (capitalised names) 16-byte aligned, the unit
    stride along the width of a contiguous input the constant 1, other integers i32."""
    if arg in _UNIT_STRIDES:
        return 1
    if arg[0].isupper():
        return {"Argmax": "*i32", "Partial": "*" + accumulator_type(dt)}.get(arg, "*" + dt)
    return "i32"


def _variant(fn, kernel, dt, constexprs, options, flags, bucket) -> KernelVariant:
    """Signature as the JIT builds it for contiguous inputs (``_arg_type``)."""
    return variant("conv", kernel, fn, dt, bucket, constexprs, options, tuple(flags), lambda arg: _arg_type(arg, dt))


def _flags(act_code: int = 0, **switches: bool) -> tuple[str, ...]:
    """A variant's flags: the activation's (none: no flag), then the names of the switches that are on."""
    return tuple(f for f in (ACT_FLAGS[act_code], *(name for name, on in switches.items() if on)) if f)


def _conv_variants() -> list[KernelVariant]:
    """Every GPU variant the fused-convolution launchers can pick.

    forward: dtype x act (5) x window block (1 = not pooled, else WIN_BLOCKS) x HAS_BIAS x column
    bucket (x ALLOW_TF32 for fp32); epilogue backward: dtype x act x POOLED; input gradient:
    dtype x UNIT_STRIDE x column bucket (x ALLOW_TF32); weight gradient: dtype x column bucket
    (x ALLOW_TF32).
    """
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        dclass, tf32s = DTYPE_CLASSES[torch_dtype], tf32_choices(torch_dtype)
        buckets = sorted({column_bucket(torch_dtype, c) for c in COLUMN_BUCKETS})
        block = _EPILOGUE_BLOCK[dclass]
        for act_code, pooled in itertools.product(range(len(ACT_FLAGS)), (False, True)):
            constexprs = dict(ACT=act_code, POOLED=pooled, BLOCK=block)
            options = dict(num_warps=4, num_stages=1)
            flags = _flags(act_code, POOLED=pooled)
            variants.append(
                _variant(
                    _epilogue_backward_kernel, "epilogue_backward", dt, constexprs, options, flags, f"BLOCK={block}"
                )
            )
            for cols in buckets:
                cfg = _GPU_CONFIGS["forward"][(dclass, cols)]
                wins = [w for w in WIN_BLOCKS if w <= cfg.rows] if pooled else [1]
                for win, has_bias, tf32 in itertools.product(wins, (False, True), tf32s):
                    switches = dict(HAS_BIAS=has_bias, POOLED=pooled, UPCAST_INPUTS=False, ALLOW_TF32=tf32)
                    constexprs = dict(ACT=act_code, **switches, **cfg.blocks("forward"), WIN_BLOCK=win)
                    flags = _flags(act_code, POOLED=pooled, HAS_BIAS=has_bias, ALLOW_TF32=tf32)
                    bucket = f"O={cols},WIN={win}"
                    variants.append(
                        _variant(_conv_forward_kernel, "forward", dt, constexprs, cfg.options, flags, bucket)
                    )
        for cols, tf32 in itertools.product(buckets, tf32s):
            cfg = _GPU_CONFIGS["input"][(dclass, cols)]
            for unit_stride in (False, True):
                constexprs = dict(UNIT_STRIDE=unit_stride, UPCAST_INPUTS=False, ALLOW_TF32=tf32, **cfg.blocks("input"))
                flags = _flags(UNIT_STRIDE=unit_stride, ALLOW_TF32=tf32)
                variants.append(
                    _variant(_conv_backward_input_kernel, "input", dt, constexprs, cfg.options, flags, f"C={cols}")
                )
            cfg = _GPU_CONFIGS["weight"][(dclass, cols)]
            constexprs = dict(UPCAST_INPUTS=False, ALLOW_TF32=tf32, **cfg.blocks("weight"))
            flags = _flags(ALLOW_TF32=tf32)
            variants.append(
                _variant(_conv_backward_weight_kernel, "weight", dt, constexprs, cfg.options, flags, f"O={cols}")
            )
    return variants


# =============================================================================================
# Epilogue-only forward (the "cudnn" path: cuDNN's convolution, then this kernel)
# =============================================================================================
# ``_epilogue_forward_kernel``: grid (cdiv(N * O * Hp * Wp, BLOCK),). Each program takes BLOCK
# pooled outputs of z = cuDNN's conv output (N, O, Ho, Wo), walks their windows in row-major
# order adding the bias and applying the activation, and keeps a running (max, z at the max,
# index, NaN seen) with the rules of ``_pool_chunk``: the first maximum wins ties, a NaN wins
# (the last NaN of the window). Writes y, saved_z (act != none) and argmax (pooled) exactly as
# ``conv_forward`` does, so the backward is ``epilogue_backward`` + torch's conv backward.


@launcher
@triton.jit(do_not_specialize=["total", "pooled_h", "pooled_w", "out_h", "out_w", "out_channels", "pool_h", "pool_w"])
def _epilogue_forward_kernel(
    Z,  # (N, O, Ho, Wo) contiguous: the convolution without bias
    Bias,  # (O,) contiguous; read iff HAS_BIAS
    Y,  # (N, O, Hp, Wp) contiguous, dtype of z
    SavedZ,  # (N, O, Hp, Wp) contiguous, dtype of z; written iff ACT != 0
    Argmax,  # (N, O, Hp, Wp) int32 contiguous; written iff POOLED
    total,  # N * O * Hp * Wp
    out_channels,
    pooled_h,
    pooled_w,
    out_h,
    out_w,
    pool_h,
    pool_w,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    POOLED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = maxpool(act(z + b)) for BLOCK pooled outputs; not pooled: y = act(z + b) elementwise."""
    compute_dtype: tl.constexpr = tl.float64 if Z.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    pooled_hw = pooled_h * pooled_w
    plane = offs // pooled_hw  # n * O + o
    bias = tl.zeros([BLOCK], dtype=compute_dtype)
    if HAS_BIAS:
        bias = tl.load(Bias + plane % out_channels, mask=ok, other=0.0).to(compute_dtype)
    if POOLED:
        hp = (offs % pooled_hw) // pooled_w
        wp = offs % pooled_w
        base = plane * out_h * out_w + (hp * pool_h) * out_w + wp * pool_w
        run_value = tl.full([BLOCK], float("-inf"), dtype=compute_dtype)
        run_z = tl.zeros([BLOCK], dtype=compute_dtype)
        run_index = tl.zeros([BLOCK], dtype=tl.int32)
        run_nan = tl.zeros([BLOCK], dtype=tl.int1)
        for e in range(0, pool_h * pool_w):
            z = tl.load(Z + base + (e // pool_w) * out_w + e % pool_w, mask=ok, other=0.0).to(compute_dtype) + bias
            a = activate(z, ACT)
            is_nan = a != a
            # e == 0 seeds the window (an all -inf window's winner is its first place).
            take = (e == 0) | is_nan | ((run_nan == 0) & (a > run_value))
            run_value = tl.where(take, a, run_value)
            run_z = tl.where(take, z, run_z)
            run_index = tl.where(take, e, run_index)
            run_nan = run_nan | is_nan
        tl.store(Argmax + offs, run_index, mask=ok)
    else:
        run_z = tl.load(Z + offs, mask=ok, other=0.0).to(compute_dtype) + bias
        run_value = activate(run_z, ACT)
    tl.store(Y + offs, run_value.to(Y.dtype.element_ty), mask=ok)
    if ACT != 0:
        tl.store(SavedZ + offs, run_z.to(SavedZ.dtype.element_ty), mask=ok)


def epilogue_forward(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
    pool: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, saved_z, argmax) as ``conv_forward`` returns them, from the convolution output z
    (N, O, Ho, Wo) computed without bias (cuDNN's) and ``bias`` (O,) or None of z's dtype."""
    act_code = activation_code(act)
    pool_h, pool_w = _pair(pool, "pool")
    if z.dim() != 4:
        raise ValueError(f"z must be (N, O, Ho, Wo), got shape {tuple(z.shape)}")
    if bias is not None and tuple(bias.shape) != (z.shape[1],):
        raise ValueError(f"bias must have shape ({z.shape[1]},), got {tuple(bias.shape)}")
    batch, channels, out_h, out_w = z.shape
    pooled = (pool_h, pool_w) != (1, 1)
    shape = (batch, channels, out_h // pool_h, out_w // pool_w)
    y = torch.empty(shape, dtype=z.dtype, device=z.device)
    saved_z = torch.empty(shape if act_code else (0,), dtype=z.dtype, device=z.device)
    argmax = torch.empty(shape if pooled else (0,), dtype=torch.int32, device=z.device)
    total = y.numel()
    if total == 0:
        return y, saved_z, argmax
    z = z.contiguous()
    _check_int32_offsets(z=z)
    block = _EPILOGUE_BLOCK[DTYPE_CLASSES[z.dtype]]
    _epilogue_forward_kernel[(cdiv(total, block),)](
        z,
        bias.contiguous() if bias is not None else z,
        y,
        saved_z if act_code else y,
        argmax if pooled else y,
        total,
        channels,
        shape[2],
        shape[3],
        out_h,
        out_w,
        pool_h,
        pool_w,
        ACT=act_code,
        HAS_BIAS=bias is not None,
        POOLED=pooled,
        BLOCK=block,
    )
    return y, saved_z, argmax


def _epilogue_forward_variants() -> list[KernelVariant]:
    """dtype x act (5) x POOLED x HAS_BIAS: every variant ``epilogue_forward`` can pick."""
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        block = _EPILOGUE_BLOCK[DTYPE_CLASSES[torch_dtype]]
        for act_code, pooled, has_bias in itertools.product(range(len(ACT_FLAGS)), (False, True), (False, True)):
            constexprs = dict(ACT=act_code, HAS_BIAS=has_bias, POOLED=pooled, BLOCK=block)
            options = dict(num_warps=4, num_stages=1)
            flags = _flags(act_code, POOLED=pooled, HAS_BIAS=has_bias)
            variants.append(
                _variant(_epilogue_forward_kernel, "epilogue_forward", dt, constexprs, options, flags, f"BLOCK={block}")
            )
    return variants


def kernel_variants() -> list[KernelVariant]:
    """Every GPU variant of this family's kernels (each section of the file adds its own list)."""
    return _conv_variants() + _epilogue_forward_variants()


__all__ = [
    "BlockConfig",
    "block_config",
    "conv_backward_input",
    "conv_backward_weight",
    "conv_forward",
    "conv_output_size",
    "epilogue_backward",
    "epilogue_forward",
    "kernel_variants",
    "weight_split",
    "window_block",
]
