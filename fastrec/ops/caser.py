"""Caser's convolution block: horizontal filters of every height 1..L and the vertical filters,
fused; its registered ops, autograd.Function and dispatch.

The contract every backend implements (Triton: ``kernels/caser.py``; C++: ``csrc/caser.cpp``;
torch: ``caser_torch`` below, the readable reference). E ``(B, L, d)`` item embeddings; heights
k = 0..L-1 with ``w_h[k]`` ``(nh, 1, k+1, d)`` (torch's ``nn.Conv2d(1, nh, (k+1, d))`` weight),
``b_h`` ``(L, nh)`` or None (row k = the bias of height k+1), ``w_v`` ``(nv, 1, L, 1)``, ``b_v``
``(nv,)`` or None; ``act_h``, ``act_v`` in ACTIVATIONS (ops/_conv_common.py)::

    z[b, k, f, t] = b_h[k, f] + sum_{i <= k} E[b, t + i, :] . w_h[k][f, 0, i, :]   (t < L - k)
    out_h[b, k * nh + f] = max_t act_h(z[b, k, f, t])      (B, L * nh): torch.cat over heights
    out_v[b, v * d + j] = act_v(b_v[v] + sum_l w_v[v, 0, l, 0] E[b, l, j])   (B, nv * d)

- The max is max_pool1d's: the first maximum in t order wins, and a NaN always wins (the last
  NaN, as max_pool1d's index).
- ``forward(E, w_h, b_h, w_v, b_v, act_h, act_v) -> (out_h, out_v, z_h, argmax, z_v)``: ``z_h``
  the pre-activation at the maximum and ``argmax`` (int32) its t, both ``(B, L * nh)``, with bit
  30 (``1 << 30``) set in argmax where some ``z[b, k, f, t]`` (any t) is not finite; ``z_v`` the
  vertical pre-activation ``(B, nv * d)``, or an empty ``(0,)`` tensor when act_v is "none".
- ``backward(grad_h, grad_v, E, w_h, b_h, w_v, z_h, argmax, z_v, act_h, act_v) -> (grad_E,
  grad_w_h (list), grad_b_h (L, nh), grad_w_v, grad_b_v)``: the gradient of out_h flows through
  each maximum's window, g = grad_h * act_h'(z_h) (relu': z > 0, a NaN z passes as in torch).
  Torch's dense backward also adds, at every other window, ``0 * act_h'(z)`` times the window's
  E and weights: zero unless a z or an operand is not finite, which is exactly the flagged
  (b, k, f). There the backends add those terms too (C++: recomputes z and runs every window;
  Triton: writes NaN where one of them is NaN), so NaN and inf land where torch's do.
- Numerics: fp32 in fp32 (Triton: no tf32 unless torch's allow_tf32 flag says so), fp16/bf16
  accumulate in fp32, fp64 in fp64 (gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends
from fastrec.ops._conv_common import act_fn

OP = "caser"
HAVE_CPP = (
    backends.available()["cpp"] is None
    and hasattr(torch.ops.fastrec, "caser_forward_cpp")
    and hasattr(torch.ops.fastrec, "caser_backward_cpp")
)


# --------------------------------------------------------------------------- torch reference
def caser_torch(
    E: Tensor,
    w_h: tuple[Tensor, ...],
    b_h: tuple[Tensor, ...] | None,
    w_v: Tensor,
    b_v: Tensor | None,
    act_h: str,
    act_v: str,
) -> tuple[Tensor, Tensor]:
    """RecBole's Caser loop (one Conv2d + activation + max-pool per height, then the vertical
    conv), differentiated by autograd: the readable reference."""
    x = E.unsqueeze(1)
    pooled = []
    for k, w in enumerate(w_h):
        a = act_fn(act_h)(F.conv2d(x, w, None if b_h is None else b_h[k]).squeeze(3))
        pooled.append(F.max_pool1d(a, a.shape[2]).squeeze(2))
    out_h = torch.cat(pooled, 1)
    out_v = act_fn(act_v)(F.conv2d(x, w_v, b_v)).flatten(1)
    return out_h, out_v


# --------------------------------------------------------------------------- registered ops
def _fake_forward(E, w_h, b_h, w_v, b_v, act_h, act_v, *rest):
    batch, length, dim = E.shape
    heights = length * w_h[0].shape[0]
    vertical = w_v.shape[0] * dim
    z_v = E.new_empty(0) if act_v == "none" else E.new_empty(batch, vertical)
    return (
        E.new_empty(batch, heights),
        E.new_empty(batch, vertical),
        E.new_empty(batch, heights),
        E.new_empty(batch, heights, dtype=torch.int32),
        z_v,
    )


def _fake_backward(grad_h, grad_v, E, w_h, b_h, w_v, *rest):
    length, filters = E.shape[1], w_h[0].shape[0]
    grad_w_h = [w.new_empty(w.shape) for w in w_h]
    return (
        E.new_empty(E.shape),
        grad_w_h,
        E.new_empty(length, filters),
        w_v.new_empty(w_v.shape),
        w_v.new_empty(w_v.shape[0]),
    )


@backends.triton_op("caser_forward_triton")
def caser_forward_triton(
    E: Tensor,
    w_h: list[Tensor],
    b_h: Tensor | None,
    w_v: Tensor,
    b_v: Tensor | None,
    act_h: str,
    act_v: str,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from fastrec.kernels import caser as kernels

    return kernels.caser_forward(E, w_h, b_h, w_v, b_v, act_h, act_v, allow_tf32)


@backends.triton_op("caser_backward_triton")
def caser_backward_triton(
    grad_h: Tensor,
    grad_v: Tensor,
    E: Tensor,
    w_h: list[Tensor],
    b_h: Tensor | None,
    w_v: Tensor,
    z_h: Tensor,
    argmax: Tensor,
    z_v: Tensor,
    act_h: str,
    act_v: str,
    allow_tf32: bool,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
    from fastrec.kernels import caser as kernels

    return kernels.caser_backward(grad_h, grad_v, E, w_h, b_h, w_v, z_h, argmax, z_v, act_h, act_v, allow_tf32)


backends.register_fake(_fake_forward, caser_forward_triton, cpp_op="caser_forward_cpp")
backends.register_fake(_fake_backward, caser_backward_triton, cpp_op="caser_backward_cpp")


def _forward(backend: str, E, w_h: list[Tensor], b_h, w_v, b_v, act_h, act_v) -> tuple[Tensor, ...]:
    """``(out_h, out_v, z_h, argmax, z_v)`` of the forward op of ``backend`` ("triton" or "cpp")."""
    if backend == "triton":
        return caser_forward_triton(E, w_h, b_h, w_v, b_v, act_h, act_v, backends.allow_tf32(E))
    return torch.ops.fastrec.caser_forward_cpp(E, w_h, b_h, w_v, b_v, act_h, act_v)


class CaserFunction(torch.autograd.Function):
    """The fused Caser block on the ``triton`` or ``cpp`` backend; saves E, the weights, b_h, and
    the pre-activations and argmax of the maxima. ``w_h`` comes last, one argument per height."""

    @staticmethod
    def forward(ctx, E, b_h, w_v, b_v, act_h, act_v, backend, *w_h):
        w_h = list(w_h)
        out_h, out_v, z_h, argmax, z_v = _forward(backend, E, w_h, b_h, w_v, b_v, act_h, act_v)
        ctx.save_for_backward(E, b_h, w_v, z_h, argmax, z_v, *w_h)
        ctx.flags = (act_h, act_v, backend, b_h is not None, b_v is not None)
        return out_h, out_v

    @staticmethod
    def backward(ctx, grad_h, grad_v):
        E, b_h, w_v, z_h, argmax, z_v, *w_h = ctx.saved_tensors
        act_h, act_v, backend, has_b_h, has_b_v = ctx.flags
        args = (grad_h.contiguous(), grad_v.contiguous(), E, w_h, b_h, w_v, z_h, argmax, z_v, act_h, act_v)
        if backend == "triton":
            grad_E, grad_w_h, grad_b_h, grad_w_v, grad_b_v = caser_backward_triton(*args, backends.allow_tf32(E))
        else:
            grad_E, grad_w_h, grad_b_h, grad_w_v, grad_b_v = torch.ops.fastrec.caser_backward_cpp(*args)
        return (
            grad_E,
            grad_b_h if has_b_h else None,
            grad_w_v,
            grad_b_v if has_b_v else None,
            None,
            None,
            None,
            *grad_w_h,
        )


# --------------------------------------------------------------------------- dispatch
def _unfused_reason(E: Tensor) -> str | None:
    """Why the fused kernels do not cover this call, or None. The Triton kernels cover every
    float dtype (on CPU tensors: the interpreter, when forced); the C++ kernel fp32 / fp64."""
    cpu_half = E.device.type == "cpu" and E.dtype not in (torch.float32, torch.float64)
    if cpu_half and backends.forced() != "triton":
        return f"{E.dtype} on CPU (the fused CPU kernel runs float32 / float64)"
    return None


def caser(
    E: Tensor,
    w_h: tuple[Tensor, ...],
    b_h: tuple[Tensor, ...] | None,
    w_v: Tensor,
    b_v: Tensor | None,
    act_h: str,
    act_v: str,
) -> tuple[Tensor, Tensor]:
    """The Caser block on validated inputs (see the module docstring); picks the backend per call."""
    if E.shape[0] == 0:  # an empty batch runs torch's reference on every backend
        backends.count(OP, "torch", "empty batch")
        return caser_torch(E, w_h, b_h, w_v, b_v, act_h, act_v)
    reason = _unfused_reason(E)
    backend = backends.select(E.device, reason)
    backends.count(OP, backend, reason or "")
    if backend == "torch":
        return caser_torch(E, w_h, b_h, w_v, b_v, act_h, act_v)
    stacked_b_h = None if b_h is None else torch.stack(b_h)
    if not torch.is_grad_enabled():  # inference: the forward op alone, without autograd's wrapper
        out_h, out_v, *_ = _forward(backend, E, list(w_h), stacked_b_h, w_v, b_v, act_h, act_v)
        return out_h, out_v
    return CaserFunction.apply(E, stacked_b_h, w_v, b_v, act_h, act_v, backend, *w_h)
