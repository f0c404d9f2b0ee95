"""Linear cross-entropy: the softmax cross-entropy of ``h @ W.T (+ bias)`` without the
``(rows, items)`` logits; its registered ops, autograd.Function and dispatch.

The contract every backend implements (Triton: ``kernels/linear_cross_entropy.py``; C++:
``csrc/linear_cross_entropy.cpp``; torch: ``linear_cross_entropy_torch`` below, the readable
reference, which materialises the logits). h ``(N, d)``, W ``(V, d)``, bias ``(V,)`` or None,
target ``(N,)`` int64 in ``[0, V)`` (ignored rows are removed before the kernels run, or kept
with weight 0 on the sync-free path: ``linear_cross_entropy`` below), with
``z = h @ W.T + bias``::

    lse[i] = log sum_j exp(z[i, j])
    loss[i] = lse[i] - (1 - eps) z[i, target[i]] - eps / V sum_j z[i, j]     (eps: label smoothing)

- ``forward(h, W, bias) -> lse`` ``(N,)``: an online log-sum-exp over item tiles; the logits live
  one tile at a time. The target logit and ``sum_j z[i, j] = h[i] . sum_j W[j] + sum_j bias[j]``
  are computed here from h and W directly (two dot products a row).
- ``backward(g, h, W, bias, target, lse, eps) -> (dh, dW, db)``, g ``(N,)`` the gradient of each
  row's loss: recomputes each tile's logits and ``P = g (softmax(z) - eps / V - (1 - eps)
  onehot(target))``, then ``dh = P W``, ``dW = P^T h``, ``db = P.sum(0)``; dW is written tile by
  tile and dh summed over item tiles in a fixed order (deterministic: no atomics).
- Numerics: fp32 in fp32 (Triton: no tf32 unless torch's allow_tf32 flag says so), bf16/fp16
  (Triton) accumulate in fp32 with lse in fp32, fp64 in fp64 (gradcheck). NaN in a row's inputs
  makes its loss and gradients NaN (and dW NaN), as torch's; ignored rows take no part, so their
  gradient is zero even where torch's would carry a NaN of that row's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends, routing

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
HAVE_CPP = (
    backends.available()["cpp"] is None
    and hasattr(torch.ops.fastrec, "linear_cross_entropy_forward_cpp")
    and hasattr(torch.ops.fastrec, "linear_cross_entropy_backward_cpp")
)


# --------------------------------------------------------------------------- torch reference
def linear_cross_entropy_torch(
    h: Tensor,
    W: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(F.linear(h, W, bias), target, ...)``: the readable reference (materialises
    the logits)."""
    return F.cross_entropy(
        F.linear(h, W, bias), target, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse and the row losses: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- registered ops
def _fake_forward(h, W, bias, *rest):
    return h.new_empty(h.shape[0], dtype=_acc_dtype(h.dtype))


def _fake_backward(g, h, W, bias, *rest):
    return h.new_empty(h.shape), W.new_empty(W.shape), W.new_empty(W.shape[0])


@backends.triton_op("linear_cross_entropy_forward_triton")
def linear_cross_entropy_forward_triton(h: Tensor, W: Tensor, bias: Tensor | None, allow_tf32: bool) -> Tensor:
    from fastrec.kernels import linear_cross_entropy as kernels

    return kernels.lse_forward(h, W, bias, allow_tf32)


@backends.triton_op("linear_cross_entropy_backward_triton")
def linear_cross_entropy_backward_triton(
    g: Tensor,
    h: Tensor,
    W: Tensor,
    bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    label_smoothing: float,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastrec.kernels import linear_cross_entropy as kernels

    return kernels.lse_backward(g, h, W, bias, target, lse, label_smoothing, allow_tf32)


backends.register_fake(_fake_forward, linear_cross_entropy_forward_triton, cpp_op="linear_cross_entropy_forward_cpp")
backends.register_fake(_fake_backward, linear_cross_entropy_backward_triton, cpp_op="linear_cross_entropy_backward_cpp")


def _lse(backend: str, h: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    if backend == "triton":
        return linear_cross_entropy_forward_triton(h, W, bias, backends.allow_tf32(h))
    return torch.ops.fastrec.linear_cross_entropy_forward_cpp(h, W, bias)


def _row_losses(h: Tensor, W: Tensor, bias: Tensor | None, target: Tensor, lse: Tensor, eps: float) -> Tensor:
    """``lse - (1 - eps) z[i, target[i]] - eps / V sum_j z[i, j]`` in lse's dtype."""
    acc = lse.dtype
    hc = h.to(acc)
    z_target = (hc * W.index_select(0, target).to(acc)).sum(1)
    if bias is not None:
        z_target = z_target + bias.index_select(0, target).to(acc)
    loss = lse - (1.0 - eps) * z_target if eps != 1.0 else lse.clone()
    if eps != 0.0:
        z_sum = hc @ W.sum(0, dtype=acc)
        if bias is not None:
            z_sum = z_sum + bias.sum(dtype=acc)
        loss = loss - (eps / W.shape[0]) * z_sum
    return loss


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-row losses (in fp32, fp64 for fp64 inputs) of the fused op on the ``triton`` or ``cpp``
    backend; saves h, W, bias, target and the log-sum-exp (N,), never the logits."""

    @staticmethod
    def forward(ctx, h, W, bias, target, label_smoothing, backend):
        lse = _lse(backend, h, W, bias)
        ctx.save_for_backward(h, W, bias, target, lse)
        ctx.flags = (label_smoothing, backend)
        return _row_losses(h, W, bias, target, lse, label_smoothing)

    @staticmethod
    def backward(ctx, grad):
        h, W, bias, target, lse = ctx.saved_tensors
        eps, backend = ctx.flags
        g = grad.to(lse.dtype).contiguous()
        if backend == "triton":
            dh, dW, db = linear_cross_entropy_backward_triton(g, h, W, bias, target, lse, eps, backends.allow_tf32(h))
        else:
            dh, dW, db = torch.ops.fastrec.linear_cross_entropy_backward_cpp(g, h, W, bias, target, lse, eps)
        return dh, dW, db if bias is not None else None, None, None, None


# --------------------------------------------------------------------------- dispatch
def _unfused_reason(h: Tensor) -> str | None:
    """Why the fused kernels do not cover this call, or None. The Triton kernels take every float
    dtype (on CPU tensors: the interpreter, when forced); the C++ kernel float32 / float64."""
    forced = backends.forced()
    if h.device.type not in ("cpu", "cuda"):
        return f"no fused linear_cross_entropy kernel for {h.device.type} tensors"
    if h.device.type == "cpu" and forced != "triton":
        if h.dtype not in (torch.float32, torch.float64):
            return f"{h.dtype} on CPU (the fused CPU kernel runs float32 / float64)"
        if not HAVE_CPP and forced is None:
            return "fastrec._C has no linear_cross_entropy_forward_cpp (rebuild the extension)"
    return None


def sync_free(h: Tensor, backend: str) -> bool:
    """Whether a call must read nothing back to the host: CUDA tensors (``fastrec.graphs`` capture,
    no stream syncs), the Triton kernels (the CUDA code path, also when interpreted on CPU tensors)
    and ``torch.compile`` tracing. Such a call keeps every row (ignored rows weigh 0) instead of
    compacting them, and checks the target range on the device."""
    return h.device.type != "cpu" or backend == "triton" or torch.compiler.is_compiling()


def check_targets(target: Tensor, n_items: int, ignore_index: int, on_device: bool) -> None:
    """ValueError unless every target is in ``[0, n_items)`` or ``ignore_index``. ``on_device``:
    an asynchronous device-side assert instead (no host read; on CUDA a failure surfaces at a
    later synchronisation, as ``F.cross_entropy``'s does)."""
    message = f"target values must be in [0, V) = [0, {n_items}) or ignore_index"
    if on_device:
        ok = ((target >= 0) & (target < n_items)) | (target == ignore_index)
        torch._assert_async(ok.all(), message)
        return
    kept = target[target != ignore_index]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n_items):
        bad = int(kept.min()) if int(kept.min()) < 0 else int(kept.max())
        raise ValueError(f"{message}, got {bad}")


def _reduce(rows: Tensor, count: Tensor | int, reduction: str, dtype: torch.dtype) -> Tensor:
    """The row losses (in their accumulation dtype) reduced, in ``dtype``."""
    if reduction == "sum":
        return rows.sum().to(dtype)
    if reduction == "mean":
        return (rows.sum() / count).to(dtype)
    return rows.to(dtype)


def linear_cross_entropy(
    h: Tensor,
    W: Tensor,
    target: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """The loss on validated inputs, h ``(N, d)`` and target ``(N,)`` (see the module docstring);
    picks the backend per call. "mean" divides by the rows not ignored (NaN when none is, as
    torch). Ignored rows: on the host path (the C++ kernel, eager) dropped before the kernels run;
    on the sync-free path (``sync_free``) kept with h zeroed and target 0, their loss and gradient
    masked to zero, so nothing depends on how many there are."""
    reason = _unfused_reason(h)
    route = routing.linear_cross_entropy(h, W) if reason is None else None
    backend = backends.select(h.device, reason or route)
    backends.count(OP, backend, reason or route or "")
    if backend == "torch":
        return linear_cross_entropy_torch(h, W, target, bias, ignore_index, reduction, label_smoothing)
    keep = target != ignore_index
    if sync_free(h, backend):
        h_rows = torch.where(keep.unsqueeze(1), h, h.new_zeros(())).contiguous()
        t_rows = torch.where(keep, target, target.new_zeros(())).contiguous()
        rows = LinearCrossEntropyFunction.apply(h_rows, W, bias, t_rows, label_smoothing, backend)
        rows = torch.where(keep, rows, rows.new_zeros(()))
        return _reduce(rows, keep.sum(), reduction, h.dtype)
    index = None if bool(keep.all()) else keep.nonzero().squeeze(1)
    h_rows, t_rows = (h, target) if index is None else (h.index_select(0, index), target.index_select(0, index))
    rows = LinearCrossEntropyFunction.apply(h_rows.contiguous(), W, bias, t_rows.contiguous(), label_smoothing, backend)
    if reduction != "none" or index is None:
        return _reduce(rows, rows.shape[0], reduction, h.dtype)
    return rows.new_zeros(target.shape[0]).index_copy(0, index, rows).to(h.dtype)
