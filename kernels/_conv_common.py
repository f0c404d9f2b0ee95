"""What the convolution kernels (``conv.py``, ``caser.py``) share: the fused activations as
``@triton.jit`` helpers with their names and constexpr codes, and the GEMM step of their dots."""

from __future__ import annotations

import triton
import triton.language as tl
from fastrec.kernels._math import sigmoid, tanh

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")  # constexpr ACT = index in this tuple


def activation_code(act: str) -> int:
    """The constexpr ACT of activation ``act``; ValueError naming it when it is not one."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return ACTIVATIONS.index(act)


@triton.jit
def activate(z, ACT: tl.constexpr):
    """act(z) in z's dtype; NaN stays NaN (relu included, as torch)."""
    if ACT == 1:
        return tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        return tanh(z)
    elif ACT == 4:
        return sigmoid(z)
    else:
        return z


@triton.jit
def activation_backward(g, z, ACT: tl.constexpr):
    """g * act'(z); relu: 0 where z <= 0, else g (torch's threshold_backward: a NaN z passes g)."""
    if ACT == 1:
        return tl.where(z <= 0, 0.0, g)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return g * (cdf + z * pdf)
    elif ACT == 3:
        t = tanh(z)
        return g * (1.0 - t * t)
    elif ACT == 4:
        s = sigmoid(z)
        return g * (s * (1.0 - s))
    else:
        return g


@triton.jit
def accumulate_dot(a, b, acc, UPCAST_INPUTS: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc + a @ b in acc's dtype: fp32 dots in ieee fp32 unless ALLOW_TF32, fp16/bf16 dots in the
    input dtype; UPCAST_INPUTS (the interpreter, whose bf16 is broken) casts a and b to acc's
    dtype first."""
    if UPCAST_INPUTS:
        a = a.to(acc.dtype)
        b = b.to(acc.dtype)
    PRECISION: tl.constexpr = "tf32" if ALLOW_TF32 else "ieee"
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
