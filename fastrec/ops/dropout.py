"""Dropout: the autograd.Function, the registered ops of each backend, and dispatch.

The contract every backend implements (Triton: ``kernels/dropout.py``; C++: ``csrc/dropout.cpp``;
torch: ``dropout_torch`` below, the readable reference):

``dropout(x, seed, p) -> out``

- x any shape and strides; out has x's shape, contiguous, x's dtype (cpp: fp32/fp64; Triton:
  fp16/bf16/fp32/fp64, the 16-bit ones computed in fp32).
- Element n of the flat (row-major) x is kept iff the Philox uniform of ``fastrec._philox`` for
  counter ``(n & 0xffffffff, n >> 32)`` and the int64 ``seed`` ``(1,)`` (on x's device) is
  ``>= p`` (p in fp32); ``out = x * (keep ? 1 / (1 - p) : 0)``, the factor rounded to x's dtype
  (fp32 for fp16/bf16) as torch rounds a Python float. Every backend draws the same bits.
- p in [0, 1). The backward is the same op on ``grad_out`` with the same seed and p: the mask is
  recomputed, never stored.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends, routing
from fastrec._philox import philox_uniform
from fastrec.kernels._common import TRITON_DTYPES

OP = "dropout"
_MASK32 = 0xFFFFFFFF
_FLOAT_DTYPES = tuple(TRITON_DTYPES)
HAVE_CPP = backends.available()["cpp"] is None and hasattr(torch.ops.fastrec, "dropout_cpp")
HAVE_TORCH_STREAM_CPP = HAVE_CPP and hasattr(torch.ops.fastrec, "torch_stream_dropout_cpp")


# --------------------------------------------------------------------------- torch reference
def dropout_torch(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """Plain torch ops, differentiated by autograd: the readable reference of the contract."""
    n = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    keep = (philox_uniform(seed, n & _MASK32, n >> 32) >= p).view(x.shape)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    factor = keep.to(compute) * (1.0 / (1.0 - p))
    return (x.to(compute) * factor).to(x.dtype).contiguous()


# --------------------------------------------------------------------------- registered ops
def _fake(x: Tensor, seed: Tensor, p: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@backends.triton_op("dropout_triton")
def dropout_triton(x: Tensor, seed: Tensor, p: float) -> Tensor:
    from fastrec.kernels import dropout as kernels

    return kernels.dropout(x, seed, p)


backends.register_fake(_fake, dropout_triton, cpp_op="dropout_cpp")


class TorchStreamDropoutFunction(torch.autograd.Function):
    """``F.dropout`` on the CPU, bit for bit (output, gradient and the generator's state after),
    with the mask drawn by fastrec's copy of torch's MT19937 loop (csrc/dropout.cpp); saves the
    bool mask. x: contiguous float32 / float64."""

    @staticmethod
    def forward(ctx, x, p):
        scale = torch.ones(1, dtype=x.dtype).div_(1.0 - p).item()  # F.dropout's noise value, by torch
        out, mask = torch.ops.fastrec.torch_stream_dropout_cpp(x, 1.0 - p, scale)
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return MaskedScaleFunction.apply(grad_out, mask, ctx.scale), None


class MaskedScaleFunction(torch.autograd.Function):
    """x * (mask ? scale : 0) (the torch-stream dropout's backward, differentiable again)."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return torch.ops.fastrec.masked_scale_cpp(x, mask, scale)

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return MaskedScaleFunction.apply(grad_out, mask, ctx.scale), None, None


TORCH_STREAM = "torch dropout stream"  # the stats reason of calls that draw torch's masks


def torch_stream_dropout(x: Tensor, p: float) -> Tensor:
    """``F.dropout(x, p, True)``: the same output, gradient and generator state. Contiguous
    float32/float64 CPU input runs TorchStreamDropoutFunction (~10x faster masks, csrc/dropout.cpp);
    a dense permuted layout runs it on the permuted contiguous view (torch draws in memory order
    and its output keeps x's strides); anything else runs F.dropout itself."""
    fast = HAVE_TORCH_STREAM_CPP and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if fast and not torch.compiler.is_compiling():  # compiled: F.dropout, as torch.compile draws it
        if x.is_contiguous():
            backends.count(OP, "cpp", TORCH_STREAM)
            return TorchStreamDropoutFunction.apply(x, p)
        order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d]))
        permuted = x.permute(order)
        if permuted.is_contiguous():
            backends.count(OP, "cpp", TORCH_STREAM)
            inverse = sorted(range(x.dim()), key=order.__getitem__)
            return TorchStreamDropoutFunction.apply(permuted, p).permute(inverse)
    backends.count(OP, "torch", TORCH_STREAM)
    return F.dropout(x, p, True)


class DropoutFunction(torch.autograd.Function):
    """Fused dropout on the ``triton`` or ``cpp`` backend; saves only the seed. The backward
    applies the same function to the gradient (so it is differentiable again)."""

    @staticmethod
    def forward(ctx, x, seed, p, backend):
        ctx.save_for_backward(seed)
        ctx.flags = (p, backend)
        if backend == "triton":
            return dropout_triton(x, seed, p)
        return torch.ops.fastrec.dropout_cpp(x, seed, p)

    @staticmethod
    def backward(ctx, grad_out):
        (seed,) = ctx.saved_tensors
        p, backend = ctx.flags
        return DropoutFunction.apply(grad_out, seed, p, backend), None, None, None


CUDA_ROUTE = routing.DROPOUT_CUDA.reason  # what stats() records for a routed CUDA dropout


def check_p(p: float) -> None:
    """ValueError unless p is a number in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be a float in [0, 1], got {p!r}")


def dropout(x: Tensor, p: float, training: bool, seed: int | Tensor | None = None) -> Tensor:
    """Dropout of x (see the module docstring); picks the backend per call.

    Not training or ``p == 0``: x itself. ``p == 1``: zeros (torch's F.dropout). ``seed`` (int or
    int64 ``(1,)``): drawn from torch's default generator when None, so ``torch.manual_seed``
    makes runs reproducible. Calls the fused kernels do not cover run ``F.dropout`` (torch's own
    random stream), counted with the reason; a forced ``torch`` backend runs the reference
    (``dropout_torch``, the same bits as the kernels). Under ``use_dropout_stream("torch")``
    without a ``seed`` (and by default on the CPU), ``F.dropout``'s output and masks
    (``torch_stream_dropout``); unseeded calls that ``fastrec.routing.dropout`` routes (CUDA, unless
    a backend is forced) run ``F.dropout``.
    """
    check_p(p)
    p = float(p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        backends.count(OP, "torch", "p == 1")
        return F.dropout(x, p, True)
    if seed is None and backends.torch_masks(x.device):
        return torch_stream_dropout(x, p)
    if seed is None and (route := routing.dropout(x)) is not None:
        backends.count(OP, "torch", route)
        return F.dropout(x, p, True)
    reason = _unfused_reason(x)
    backend = backends.select(x.device, reason)
    backends.count(OP, backend, reason or "")
    if reason is not None and backend == "torch":
        return F.dropout(x, p, True)
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    elif not isinstance(seed, Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=x.device)
    if backend == "torch":
        return dropout_torch(x, seed, p)
    return DropoutFunction.apply(x, seed, p, backend)


def _unfused_reason(x: Tensor) -> str | None:
    """Why the fused kernels do not cover this call, or None."""
    if not isinstance(x, Tensor) or x.layout != torch.strided or x.is_nested:
        return "input is not a dense tensor"
    if x.dtype not in _FLOAT_DTYPES:
        return f"dtype {x.dtype}"
    forced = backends.forced()
    if x.device.type not in ("cpu", "cuda") and forced is None:
        return f"no fused dropout kernel for {x.device.type} tensors"
    if x.device.type == "cpu" and forced != "triton":
        if x.dtype not in (torch.float32, torch.float64):
            return f"{x.dtype} on CPU (the cpp kernel takes float32 / float64)"
        if not HAVE_CPP and forced is None:
            return "fastrec._C has no dropout_cpp (rebuild the extension)"
    return None
