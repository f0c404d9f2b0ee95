"""Fused linear cross-entropy in Triton, Cut-Cross-Entropy style: the logits ``z = h W^T + b`` live
one ``(BLOCK_M, BLOCK_V)`` tile at a time, on chip.

Contract: the docstring of fastrec/ops/linear_cross_entropy.py (shared with the C++ and torch
backends). Three kernels, all deterministic (no atomics; partials summed in a fixed order):

- ``_lse_kernel``, grid (row blocks, SPLITS): program (r, s) runs an online log-sum-exp over the
  item tiles of split s for its rows and writes ``lse_part[s, rows]``; the launcher combines the
  splits with ``torch.logsumexp`` (SPLITS > 1 keeps the GPU busy when rows are few).
- ``_dw_kernel``, grid (item tiles,): program t recomputes its tile's logits for every row block
  and accumulates ``dW[t] = P^T h`` and ``db[t] = P.sum(0)``, with
  ``P = g (exp(z - lse) - eps / V - (1 - eps) onehot(target))``.
- ``_dh_kernel``, grid (row blocks, SPLITS): ``dh_part[s, rows] = P W`` over split s's item tiles;
  the launcher sums the splits.

fp16/bf16 inputs: dots on the 16-bit operands with fp32 accumulation (P cast to the input dtype
for the backward dots, as CCE does); UPCAST_INPUTS (the interpreter, whose bf16 is broken) casts
loaded tiles to fp32 first. fp32 dots run in ieee fp32 unless ALLOW_TF32; fp64 computes in fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrec.kernels._common import TRITON_DTYPES, KernelVariant, variant_signature
from fastrec.kernels._host import cdiv, launcher, next_power_of_2

NUM_STAGES = 3
MAX_SPLITS = 64  # item splits of the row-block kernels: enough programs for a GPU at few rows


@triton.jit
def _dot(a, b, acc, UPCAST_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in acc's dtype (see the module docstring for the precisions)."""
    if UPCAST_INPUTS:
        a = a.to(acc.dtype)
        b = b.to(acc.dtype)
    PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _load_rows(H, rows, cols_d, N, D, stride_hn):
    """The (BLOCK_M, BLOCK_D) tile of h at ``rows``, zero outside (N, D)."""
    mask = (rows < N)[:, None] & (cols_d < D)[None, :]
    return tl.load(H + rows.to(tl.int64)[:, None] * stride_hn + cols_d[None, :], mask=mask, other=0.0)


@triton.jit
def _logits(
    h,
    W,
    B,
    cols,
    cols_d,
    V,
    D,
    stride_wv,
    stride_wd,
    ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
):
    """(w, z): the W tile (BLOCK_V, BLOCK_D) of items ``cols`` and the logits h w^T (+ b) of the
    (BLOCK_M, BLOCK_D) h tile, in ACC."""
    w = tl.load(
        W + cols.to(tl.int64)[:, None] * stride_wv + cols_d[None, :] * stride_wd,
        mask=(cols < V)[:, None] & (cols_d < D)[None, :],
        other=0.0,
    )
    z = _dot(h, tl.trans(w), tl.zeros([BLOCK_M, BLOCK_V], ACC), UPCAST_INPUTS, ALLOW_TF32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=cols < V, other=0.0).to(ACC)[None, :]
    return w, z


@launcher
@triton.jit
def _lse_kernel(
    H,  # (N, D) h, fp16 / bf16 / fp32 / fp64
    W,  # (V, D) weight, H's dtype (strided)
    B,  # (V,) bias, H's dtype (unused without HAS_BIAS)
    LsePart,  # (SPLITS, N) per-split log-sum-exp, fp32 (fp64 for fp64)
    N,
    V,
    D,
    stride_hn,
    stride_wv,
    stride_wd,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
):
    """lse_part[s, rows] = log sum_j exp(z[rows, j]) over the items j of split s."""
    ACC: tl.constexpr = LsePart.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    h = _load_rows(H, rows, cols_d, N, D, stride_hn)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], ACC)
    for t in range(tiles_per_split):
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        _w, z = _logits(
            h,
            W,
            B,
            cols,
            cols_d,
            V,
            D,
            stride_wv,
            stride_wd,
            ACC,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            UPCAST_INPUTS,
            ALLOW_TF32,
        )
        z = tl.where((cols < V)[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
    tl.store(LsePart + split * N + rows, m + tl.log(s), mask=rows < N)


@triton.jit
def _grad_tile(z, cols, rows, G, T, Lse, Eps, N, V, ACC: tl.constexpr):
    """P = g (exp(z - lse) - eps / V - (1 - eps) onehot(target)) of one tile, zero outside it."""
    e = tl.load(Eps).to(ACC)
    uniform = e / V
    hit = 1.0 - e
    g = tl.load(G + rows, mask=rows < N, other=0.0).to(ACC)
    lse = tl.load(Lse + rows, mask=rows < N, other=0.0).to(ACC)
    t = tl.load(T + rows, mask=rows < N, other=-1)
    p = tl.exp(z - lse[:, None]) - uniform - tl.where(cols[None, :] == t[:, None], hit, 0.0)
    p = p * g[:, None]
    return tl.where((rows < N)[:, None] & (cols < V)[None, :], p, 0.0)


@launcher
@triton.jit
def _dw_kernel(
    H,  # (N, D) h
    W,  # (V, D) weight (strided)
    B,  # (V,) bias (unused without HAS_BIAS)
    G,  # (N,) gradient of each row's loss, Lse's dtype
    T,  # (N,) int64 targets
    Lse,  # (N,) log-sum-exp, fp32 (fp64 for fp64)
    Eps,  # (1,) label smoothing, Lse's dtype (a tensor: a float argument would be fp32)
    DW,  # (V, D) weight gradient, H's dtype, contiguous
    DB,  # (V,) bias gradient, H's dtype
    N,
    V,
    D,
    stride_hn,
    stride_wv,
    stride_wd,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
):
    """dW[tile] = P^T h and db[tile] = P.sum(0) over every row block, for this program's items."""
    ACC: tl.constexpr = Lse.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols_d = tl.arange(0, BLOCK_D)
    dw = tl.zeros([BLOCK_V, BLOCK_D], ACC)
    db = tl.zeros([BLOCK_V], ACC)
    for r0 in range(0, N, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        h = _load_rows(H, rows, cols_d, N, D, stride_hn)
        _w, z = _logits(
            h,
            W,
            B,
            cols,
            cols_d,
            V,
            D,
            stride_wv,
            stride_wd,
            ACC,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            UPCAST_INPUTS,
            ALLOW_TF32,
        )
        p = _grad_tile(z, cols, rows, G, T, Lse, Eps, N, V, ACC)
        db += tl.sum(p, 0)
        if not UPCAST_INPUTS:
            p = p.to(h.dtype)
        dw = _dot(tl.trans(p), h, dw, UPCAST_INPUTS, ALLOW_TF32)
    mask = (cols < V)[:, None] & (cols_d < D)[None, :]
    tl.store(DW + cols.to(tl.int64)[:, None] * D + cols_d[None, :], dw.to(DW.dtype.element_ty), mask=mask)
    tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=cols < V)


@launcher
@triton.jit
def _dh_kernel(
    H,  # (N, D) h
    W,  # (V, D) weight (strided)
    B,  # (V,) bias (unused without HAS_BIAS)
    G,  # (N,) gradient of each row's loss, Lse's dtype
    T,  # (N,) int64 targets
    Lse,  # (N,) log-sum-exp, fp32 (fp64 for fp64)
    Eps,  # (1,) label smoothing, Lse's dtype
    DhPart,  # (SPLITS, N, D) per-split h gradient, Lse's dtype, contiguous
    N,
    V,
    D,
    stride_hn,
    stride_wv,
    stride_wd,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_INPUTS: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
):
    """dh_part[s, rows] = P W over the item tiles of split s."""
    ACC: tl.constexpr = Lse.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    h = _load_rows(H, rows, cols_d, N, D, stride_hn)
    dh = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for t in range(tiles_per_split):
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        w, z = _logits(
            h,
            W,
            B,
            cols,
            cols_d,
            V,
            D,
            stride_wv,
            stride_wd,
            ACC,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            UPCAST_INPUTS,
            ALLOW_TF32,
        )
        p = _grad_tile(z, cols, rows, G, T, Lse, Eps, N, V, ACC)
        if not UPCAST_INPUTS:
            p = p.to(w.dtype)
        dh = _dot(p, w, dh, UPCAST_INPUTS, ALLOW_TF32)
    mask = (rows < N)[:, None] & (cols_d < D)[None, :]
    tl.store(DhPart + (split * N + rows).to(tl.int64)[:, None] * D + cols_d[None, :], dh, mask=mask)


def block_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, num_warps) for inputs of ``dtype``: tiles whose logits, W and h tiles and
    gradient accumulator fit the registers without spills on sm_80 / sm_90 (16-bit dots run on
    the tensor cores; fp32 and fp64 dots on FMA units, every operand in registers)."""
    if dtype in (torch.float16, torch.bfloat16):
        return (64, 64, 4) if block_d <= 32 else (64, 64, 8) if block_d <= 64 else (32, 32, 8)
    if dtype == torch.float32:
        return (32, 32, 8) if block_d <= 32 else (16, 32, 8) if block_d <= 64 else (16, 16, 8)
    return (16, 32, 4) if block_d <= 16 else (16, 16, 4)


def _config(h: torch.Tensor, W: torch.Tensor) -> tuple[int, int, int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_D, num_warps, row blocks, item tiles, splits, tiles per split) for
    this call."""
    n, d = h.shape
    block_d = max(16, next_power_of_2(d))
    block_m, block_v, warps = block_config(h.dtype, block_d)
    row_blocks = cdiv(n, block_m)
    tiles = cdiv(W.shape[0], block_v)
    splits = max(1, min(MAX_SPLITS, tiles, cdiv(4 * 132, row_blocks)))  # ~4 programs per SM of an H100
    per_split = cdiv(tiles, splits)
    return block_m, block_v, block_d, warps, row_blocks, tiles, cdiv(tiles, per_split), per_split


def _check(h: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> None:
    if h.dtype not in TRITON_DTYPES:
        raise TypeError(f"h must be float16, bfloat16, float32 or float64, got {h.dtype}")
    if h.dim() != 2 or W.dim() != 2 or W.shape[1] != h.shape[1] or W.dtype != h.dtype:
        raise ValueError(f"h (N, d) and W (V, d) of one dtype expected, got {tuple(h.shape)} and {tuple(W.shape)}")
    if bias is not None and (bias.shape != (W.shape[0],) or bias.dtype != h.dtype):
        raise ValueError(f"bias must be (V,) = ({W.shape[0]},) of h's dtype, got {tuple(bias.shape)}")


def _flags(h: torch.Tensor, allow_tf32: bool) -> dict:
    interpreter = h.device.type == "cpu"
    return dict(UPCAST_INPUTS=interpreter, ALLOW_TF32=bool(allow_tf32) and h.dtype == torch.float32)


def lse_forward(h: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, allow_tf32: bool) -> torch.Tensor:
    """Launcher: lse (N,) of ``z = h W^T (+ bias)``, fp32 (fp64 for fp64 inputs)."""
    _check(h, W, bias)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    h = h.contiguous()
    n, d = h.shape
    if n == 0:
        return h.new_empty(0, dtype=acc)
    block_m, block_v, block_d, warps, row_blocks, _tiles, splits, per_split = _config(h, W)
    part = torch.empty(splits, n, dtype=acc, device=h.device)
    _lse_kernel[(row_blocks, splits)](
        h,
        W,
        h if bias is None else bias,
        part,
        n,
        W.shape[0],
        d,
        h.stride(0),
        W.stride(0),
        W.stride(1),
        per_split,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=NUM_STAGES,
        **_flags(h, allow_tf32),
    )
    return part[0] if splits == 1 else torch.logsumexp(part, 0)


def lse_backward(
    g: torch.Tensor,
    h: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    lse: torch.Tensor,
    label_smoothing: float,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: (dh, dW, db) of the row losses weighted by g (see the module docstring)."""
    _check(h, W, bias)
    h, g, target, lse = h.contiguous(), g.contiguous(), target.contiguous(), lse.contiguous()
    n, d = h.shape
    v = W.shape[0]
    dW = torch.empty(v, d, dtype=h.dtype, device=h.device)
    db = torch.empty(v, dtype=h.dtype, device=h.device)
    if n == 0 or v == 0:
        return torch.zeros_like(h), dW.zero_(), db.zero_()
    block_m, block_v, block_d, warps, row_blocks, tiles, splits, per_split = _config(h, W)
    eps = torch.full((1,), float(label_smoothing), dtype=lse.dtype, device=h.device)  # a fill: capturable
    common = dict(HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, **_flags(h, allow_tf32))
    common.update(num_warps=warps, num_stages=NUM_STAGES)
    b = h if bias is None else bias
    _dw_kernel[(tiles,)](h, W, b, g, target, lse, eps, dW, db, n, v, d, h.stride(0), W.stride(0), W.stride(1), **common)
    part = torch.empty(splits, n, d, dtype=lse.dtype, device=h.device)
    _dh_kernel[(row_blocks, splits)](
        h,
        W,
        b,
        g,
        target,
        lse,
        eps,
        part,
        n,
        v,
        d,
        h.stride(0),
        W.stride(0),
        W.stride(1),
        per_split,
        **common,
    )
    dh = part[0] if splits == 1 else part.sum(0)
    return dh.to(h.dtype), dW, db


# ------------------------------------------------------------------------------------------------
# every variant the launchers can pick (for the compile-only test)
# ------------------------------------------------------------------------------------------------
BLOCK_D_BUCKETS = (16, 32, 64, 128)  # the hidden sizes the check covers (d <= 128)
COVERAGE_ALTERNATE_FLAGS = ("ALLOW_TF32",)


def kernel_variants() -> list[KernelVariant]:
    """Every kernel x input dtype x BLOCK_D bucket x flag combination (HAS_BIAS; ALLOW_TF32 for
    fp32), with the launchers' tiles (``block_config``), warps and stages, no interpreter upcast."""
    variants = []
    for torch_dtype, dt in TRITON_DTYPES.items():
        acc = "fp64" if dt == "fp64" else "fp32"
        ptrs = {"H": dt, "W": dt, "B": dt, "DW": dt, "DB": dt, "T": "i64", "G": acc, "Lse": acc, "Eps": acc}
        ptrs.update(LsePart=acc, DhPart=acc)
        tf32 = (False, True) if dt == "fp32" else (False,)
        for name, fn in (("lse", _lse_kernel), ("dw", _dw_kernel), ("dh", _dh_kernel)):
            for block_d in BLOCK_D_BUCKETS:
                for has_bias in (False, True):
                    for allow_tf32 in tf32:
                        flags = {"HAS_BIAS": has_bias, "ALLOW_TF32": allow_tf32}
                        block_m, block_v, warps = block_config(torch_dtype, block_d)
                        constexprs = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d, UPCAST_INPUTS=False)
                        constexprs.update(flags)

                        def arg_type(arg: str, ptrs=ptrs, acc=acc) -> str | int:
                            if arg == "stride_wd":
                                return 1
                            return "*" + ptrs[arg] if arg in ptrs else "i32"

                        signature, consts, attrs = variant_signature(fn, constexprs, arg_type)
                        on = tuple(k for k, v in flags.items() if v)
                        variants.append(
                            KernelVariant(
                                name=f"linear_cross_entropy.{name}[{dt},BLOCK_D={block_d},{'+'.join(on) or '-'}]",
                                fn=fn,
                                signature=signature,
                                constexprs=consts,
                                attrs=attrs,
                                options=dict(num_warps=warps, num_stages=NUM_STAGES),
                                dtype=dt,
                                flags=on,
                                kernel=name,
                                bucket=f"BLOCK_D={block_d}",
                            )
                        )
    return variants


__all__ = ["block_config", "kernel_variants", "lse_backward", "lse_forward"]
