"""Fused dropout in Triton: one pass over x (read x, write out; no mask tensor).

Contract: the docstring of fastrec/ops/dropout.py (shared with the C++ and torch backends).
``_dropout_kernel``: grid (cdiv(numel, BLOCK),); program i handles the flat elements
[i * BLOCK, (i + 1) * BLOCK) of the contiguous x, drawing Philox4x32-10 with counter
(n & 0xffffffff, n >> 32, 0, 0) for element n (``tl.philox``), u = (out0 >> 8) * 2^-24, keep iff
u >= p. The backward is the same kernel on the gradient.

Python floats reach a kernel as fp32, so the launcher passes the factor 1 / (1 - p) as three
fp32 parts (hi, mid, lo) whose fp64 sum is exactly the fp64 factor: fp64 inputs get the factor
torch would use, fp32 / fp16 / bf16 use hi (the fp32 rounding), all bit-exact with the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from fastrec.kernels._common import TRITON_DTYPES, KernelVariant, variant_signature
from fastrec.kernels._host import cdiv, launcher

BLOCK = 1024
NUM_WARPS = 4


@launcher
@triton.jit
def _dropout_kernel(
    X,  # (numel,) contiguous input, fp16 / bf16 / fp32 / fp64
    Out,  # (numel,) contiguous output, X's dtype
    Seed,  # (1,) int64
    numel,
    p,  # drop probability (fp32)
    scale_hi,  # 1 / (1 - p) = scale_hi + scale_mid + scale_lo (fp32 parts)
    scale_mid,
    scale_lo,
    BLOCK: tl.constexpr,
):
    """out[n] = x[n] * (keep(n) ? 1 / (1 - p) : 0) for this program's BLOCK elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    seed = tl.load(Seed)
    c0 = offs.to(tl.uint32)  # low 32 bits
    c1 = (offs >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, _r1, _r2, _r3 = tl.philox(seed, c0, c1, zero, zero)
    u = (r0 >> 8).to(tl.float32) * 5.960464477539063e-08  # 2**-24
    keep = u >= p
    x = tl.load(X + offs, mask=in_range, other=0.0)
    if X.dtype.element_ty == tl.float64:
        scale = tl.cast(scale_hi, tl.float64) + tl.cast(scale_mid, tl.float64) + tl.cast(scale_lo, tl.float64)
        out = x * tl.where(keep, scale, 0.0)
    else:
        out = x.to(tl.float32) * tl.where(keep, tl.cast(scale_hi, tl.float32), 0.0)
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=in_range)


def _scale_parts(p: float) -> tuple[float, float, float]:
    """fp32 values (hi, mid, lo) with hi + mid + lo == 1 / (1 - p) exactly in fp64."""
    scale = 1.0 / (1.0 - p)
    hi = float(np.float32(scale))
    mid = float(np.float32(scale - hi))
    lo = float(np.float32(scale - hi - mid))
    return hi, mid, lo


def dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Launcher: dropout of x with the Philox stream of ``seed`` (int64 ``(1,)`` on x's device)."""
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if seed.dtype != torch.int64 or seed.numel() < 1 or seed.device != x.device:
        raise ValueError(f"seed must be an int64 tensor of shape (1,) on {x.device}, got {seed.dtype} on {seed.device}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    numel = xc.numel()
    if numel == 0:
        return out
    grid = (cdiv(numel, BLOCK),)
    _dropout_kernel[grid](xc, out, seed, numel, p, *_scale_parts(p), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


# ------------------------------------------------------------------------------------------------
# every variant the launcher can pick (for the compile-only test)
# ------------------------------------------------------------------------------------------------


def kernel_variants() -> list[KernelVariant]:
    """One variant per dtype (numel as i32 and as i64: the JIT types numel >= 2**31 as i64)."""
    variants = []
    for dt in TRITON_DTYPES.values():
        for numel_type in ("i32", "i64"):
            types = {"X": "*" + dt, "Out": "*" + dt, "Seed": "*i64", "numel": numel_type}
            signature, constexprs, attrs = variant_signature(
                _dropout_kernel, {"BLOCK": BLOCK}, lambda arg: types.get(arg, "fp32")
            )
            variants.append(
                KernelVariant(
                    name=f"dropout.forward[{dt},BLOCK={BLOCK},numel:{numel_type}]",
                    fn=_dropout_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    attrs=attrs,
                    options=dict(num_warps=NUM_WARPS, num_stages=1),
                    dtype=dt,
                    kernel="forward",
                    bucket=f"numel:{numel_type}",
                )
            )
    return variants


__all__ = ["BLOCK", "KernelVariant", "dropout", "kernel_variants"]
