"""Helpers shared by the kernel families: dtype names and the kernel-variant record.

``TRITON_DTYPES`` names the float dtypes every kernel takes as Triton spells them (the variant
signatures, shape-class keys); ``DTYPE_CLASSES`` is the key of the per-dtype block-config tables
(fp16 and bf16 share theirs). ``KernelVariant`` is one GPU compilation unit of the compile-only
check (tests/test_kernels_compile.py), which every family's ``kernel_variants()`` lists;
``variant`` and ``variant_signature`` build one the way the JIT would specialise the call.
Imports torch only (no triton), so that ``fastrec.ops`` can use it where triton is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
DTYPE_CLASSES = {torch.float16: "16", torch.bfloat16: "16", torch.float32: "32", torch.float64: "64"}


def dtype_name(dtype: torch.dtype) -> str:
    """Triton's name of a float dtype ("fp16", "bf16", "fp32", "fp64"), else torch's ("int64")."""
    return TRITON_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def accumulator_type(dt: str) -> str:
    """Triton type of the accumulators for inputs of Triton type ``dt``: fp64 for fp64, else fp32."""
    return "fp64" if dt == "fp64" else "fp32"


def tf32_choices(dtype: torch.dtype) -> tuple[bool, ...]:
    """The ALLOW_TF32 values a launcher can pass for ``dtype`` (True only for fp32 dots)."""
    return (False, True) if dtype == torch.float32 else (False,)


@dataclass
class KernelVariant:
    """One GPU compilation unit: triton.compile(ASTSource(fn, signature, constexprs, attrs))."""

    name: str  # e.g. "attention.forward[fp16,BLOCK_D=64,CAUSAL+DROPOUT]"
    fn: object  # the @triton.jit function (or its launcher)
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict  # argument name -> value
    attrs: dict  # (arg index,) -> [["tt.divisibility", 16]] for 16-aligned pointers / strides
    options: dict = field(default_factory=dict)  # num_warps, num_stages
    dtype: str = ""  # Triton dtype of the inputs: fp16, bf16, fp32, fp64
    flags: tuple = ()  # the constexpr flags that are on
    kernel: str = ""  # the family's short kernel name, e.g. "forward", "dkdv"
    bucket: str = ""  # block-config key, e.g. "BLOCK_D=64"
    spills_expected: str = ""  # non-empty: known to spill, and why (reported, not failed)


def variant_signature(
    fn, constexprs: dict, arg_type: Callable[[str], str | int], aligned: Callable[[str, str], bool] | None = None
) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``fn``'s arguments as the JIT builds them for the common
    case: the given constexprs; ``arg_type(arg)`` gives every other argument's Triton type, or the
    int 1 for a unit stride (the JIT specialises it to the constant 1); ``aligned(arg, type)``
    (default: the pointers) says which arguments are 16-byte aligned / divisible by 16."""
    if aligned is None:

        def aligned(arg: str, kind: str) -> bool:
            return kind.startswith("*")

    signature, consts, attrs = {}, dict(constexprs), {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        kind = arg_type(arg)
        if kind == 1:
            signature[arg] = "constexpr"
            consts[arg] = 1
            continue
        signature[arg] = kind
        if aligned(arg, kind):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def variant(
    family: str,
    kernel: str,
    fn,
    dt: str,
    bucket: str,
    constexprs: dict,
    options: dict,
    flags: tuple,
    arg_type: Callable[[str], str | int],
    aligned: Callable[[str, str], bool] | None = None,
    spills_expected: str = "",
) -> KernelVariant:
    """A variant named ``"<family>.<kernel>[<dt>,<bucket>,<flags or 'plain'>]"`` whose signature
    is ``variant_signature(fn, constexprs, arg_type, aligned)``."""
    signature, consts, attrs = variant_signature(fn, constexprs, arg_type, aligned)
    name = f"{family}.{kernel}[{dt},{bucket},{'+'.join(flags) or 'plain'}]"
    return KernelVariant(name, fn, signature, consts, attrs, options, dt, flags, kernel, bucket, spills_expected)
