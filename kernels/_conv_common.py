"""What the convolution kernels (``conv.py``, ``caser.py``) share: the fused activations as
``@triton.jit`` helpers with their names and constexpr codes, Triton's names of the dtypes the
kernels take, and the description of one kernel variant for tests/test_kernels_compile.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")  # constexpr ACT = index in this tuple
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def activation_code(act: str) -> int:
    """The constexpr ACT of activation ``act``; ValueError naming it when it is not one."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return ACTIVATIONS.index(act)


@triton.jit
def _tanh(z):
    """tanh from exp (the interpreter has no libdevice tanh): sign(z) (1 - e) / (1 + e), e = exp(-2|z|)."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def activate(z, ACT: tl.constexpr):
    """act(z) in z's dtype; NaN stays NaN (relu included, as torch)."""
    if ACT == 1:
        return tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        return _tanh(z)
    elif ACT == 4:
        return 1.0 / (1.0 + tl.exp(-z))
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
        t = _tanh(z)
        return g * (1.0 - t * t)
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        return g * (s * (1.0 - s))
    else:
        return g


@dataclass
class KernelVariant:
    """One GPU compilation unit: triton.compile(ASTSource(fn, signature, constexprs, attrs))."""

    name: str  # e.g. "conv.forward[fp16,O=64,WIN=4,RELU+POOLED]"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "constexpr")
    constexprs: dict  # argument name -> value
    attrs: dict  # (arg index,) -> [["tt.divisibility", 16]] for 16-aligned pointers
    options: dict = field(default_factory=dict)  # num_warps, num_stages
    dtype: str = ""  # Triton dtype of the main input: fp16, bf16, fp32, fp64
    flags: tuple = ()  # the constexpr flags that are on
    kernel: str = ""  # short kernel name: forward, epilogue_backward, horizontal_forward, ...
    bucket: str = ""  # block-config key: "O=64,WIN=4"
    spills_expected: str = ""  # non-empty: known to spill, and why (reported, not failed)
