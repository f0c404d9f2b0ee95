"""Attention: the autograd.Function, the registered ops of each backend, and dispatch.

The contract every backend implements (Triton: ``kernels/attention.py``; C++:
``csrc/attention.cpp``; torch: ``attention_torch`` below, the readable reference):

``forward(q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p) -> (out, lse)``
(cpp: ``-> (out, lse, probs)``, see ``return_probs`` below)
``backward(grad_out, q, k, v, out, lse, <the same masks and flags>) -> (dq, dk, dv)``

- q ``(B, H, Lq, D)``, k/v ``(B, H, Lk, D)``, any strides, one of fp16/bf16/fp32/fp64.
- ``key_padding_mask``: bool ``(B, Lk)``, True = that key is ignored by every query of row b.
- ``lengths``: int32 ``(B,)``; keys ``j < lengths[b]`` take part (right padding).
- ``bias``: fp32 (fp64 for fp64 q) ``(B|1, H|1, Lq, Lk)``, possibly an expanded view; added to
  the scaled scores ``s_ij = scale * q_i.k_j + bias_ij``; ``-inf`` entries are masked.
- ``causal``: key j is allowed for query i iff ``j <= i``.
- ``dropout_p`` in [0, 1) with ``seed`` int64 ``(1,)`` on q's device: probability ``P_ij`` is
  kept iff the Philox uniform of ``fastrec._philox`` for counter ``(i * ceil(Lk / 4) + j // 4,
  b * H + h)``, output word ``j % 4`` (one Philox call serves four adjacent keys), is
  ``>= dropout_p``; kept ones are scaled by ``1 / (1 - dropout_p)``. Every backend draws the
  same bits. cpp and torch also take a bool ``dropout_mask`` ``(B, H, Lq, Lk)`` (True = kept)
  instead of the seed: torch's own draw, under ``fastrec.use_dropout_stream("torch")``.
- ``out`` ``(B, H, Lq, D)`` contiguous in q's dtype; ``lse`` ``(B, H, Lq)`` fp32 (fp64 for fp64
  q), the natural-log log-sum-exp of the allowed scores before dropout. A row with no allowed
  key has ``out = 0`` and ``lse = +inf``, so its probabilities and gradients are exactly zero.
  A NaN score (NaN in q, k or v) makes its row's output, lse, probabilities and gradients NaN,
  as in torch: a diverging model shows it. A call with no output element (B, H, Lq or D_v 0)
  returns torch's empty result on every backend.
- Backward recomputes ``P = exp(s - lse)`` (nothing of size L x L is saved or written) and
  returns contiguous gradients in the dtypes of q, k, v.
- ``need_weights`` (cpp and torch; the C++ op's ``return_probs``): the forward also returns the
  probabilities after dropout, ``(B, H, Lq, Lk)`` in q's dtype, zero where masked (what
  ``nn.MultiheadAttention`` averages into its weights). A gradient reaching them is added to
  dq and dk by recomputing P with the torch reference (``attention_probs_torch``): an L x L
  cost paid only by callers that differentiate the weights.
- Numerics: fp32 in fp32 (no TF32 unless torch's ``allow_tf32`` flag says so), fp16/bf16
  accumulate in fp32, fp64 in fp64 (for gradcheck).

The masks reach this layer in canonical form from ``fastrec.functional.attention``.
"""

import math

import torch
from torch import Tensor

from fastrec import backends
from fastrec._philox import dropout_keep_mask
from fastrec.ops.dropout import HAVE_TORCH_STREAM_CPP

OP = "attention"


# --------------------------------------------------------------------------- torch reference
def attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    bias: Tensor | None,
    seed: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    dropout_mask: Tensor | None = None,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain torch ops, differentiated by autograd: the readable reference of the contract."""
    probs = attention_probs_torch(q, k, key_padding_mask, lengths, bias, causal, scale)
    if dropout_p > 0.0:
        probs = probs * dropout_keep(q, k, seed, dropout_p, dropout_mask) / (1.0 - dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)
    return (out, probs.to(q.dtype)) if need_weights else out


def attention_probs_torch(
    q: Tensor,
    k: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    scale: float,
) -> Tensor:
    """The attention probabilities before dropout, ``(B, H, Lq, Lk)`` (fp32 for fp16/bf16 q)."""
    len_q, len_k = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(q.shape[0], 1, len_q, len_k)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if lengths is not None:
        positions = torch.arange(len_k, device=q.device)
        allowed = allowed & (positions < lengths[:, None])[:, None, None, :]
    allowed = allowed & (scores != float("-inf"))
    # Rows with no allowed key: softmax over zeros, then zeroed, so neither NaN nor gradient.
    empty_row = ~allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores.float() if q.dtype in (torch.float16, torch.bfloat16) else scores, -1)
    return probs.masked_fill(~allowed, 0.0)


def dropout_keep(q: Tensor, k: Tensor, seed: Tensor | None, dropout_p: float, dropout_mask: Tensor | None) -> Tensor:
    """The bool keep mask ``(B, H, Lq, Lk)``: the given one, else the Philox draw of ``seed``."""
    if dropout_mask is not None:
        return dropout_mask
    return dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[-2], k.shape[-2], dropout_p, q.device)


# --------------------------------------------------------------------------- registered ops
def _fake_forward(q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p, *rest):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, q.new_empty(q.shape[:-1], dtype=lse_dtype)


def _fake_forward_cpp(
    q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p, dropout_mask=None, return_probs=False
):
    out, lse = _fake_forward(q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p)
    return out, lse, q.new_empty((*q.shape[:-1], k.shape[-2]) if return_probs else (0,))


def _fake_backward(grad_out, q, k, v, *rest):
    # The kernels return contiguous gradients whatever the strides of q, k, v.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@backends.triton_op("attention_forward_triton")
def attention_forward_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    bias: Tensor | None,
    seed: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    from fastrec.kernels import attention as kernels

    return kernels.attention_forward(
        q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p, allow_tf32
    )


@backends.triton_op("attention_backward_triton")
def attention_backward_triton(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    bias: Tensor | None,
    seed: Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastrec.kernels import attention as kernels

    return kernels.attention_backward(
        grad_out, q, k, v, out, lse, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p, allow_tf32
    )


attention_forward_triton.register_fake(_fake_forward)
attention_backward_triton.register_fake(_fake_backward)
if backends.available()["cpp"] is None and hasattr(torch.ops.fastrec, "attention_forward_cpp"):
    torch.library.register_fake("fastrec::attention_forward_cpp")(_fake_forward_cpp)
    torch.library.register_fake("fastrec::attention_backward_cpp")(_fake_backward)


class AttentionFunction(torch.autograd.Function):
    """Fused attention on the ``triton`` or ``cpp`` backend: ``(out, lse, probs)``, probs empty
    unless ``need_probs`` (cpp only). Saves q, k, v, out and lse (and a given dropout mask, cpp
    only)."""

    @staticmethod
    def forward(
        ctx, q, k, v, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p, dropout_mask, need_probs, backend
    ):
        masks = (key_padding_mask, lengths, bias, seed, causal, scale, dropout_p)
        if backend == "triton":
            if need_probs:
                raise RuntimeError("the triton attention kernels form no attention probabilities (need_weights)")
            out, lse = attention_forward_triton(q, k, v, *masks, backends.allow_tf32(q))
            probs = q.new_empty(0)
        else:
            out, lse, probs = torch.ops.fastrec.attention_forward_cpp(q, k, v, *masks, dropout_mask, need_probs)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, lengths, bias, seed, dropout_mask)
        ctx.flags = (causal, scale, dropout_p, need_probs, backend)
        ctx.mark_non_differentiable(lse)
        if not need_probs:
            ctx.mark_non_differentiable(probs)
        ctx.set_materialize_grads(False)
        return out, lse, probs

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, grad_probs):
        q, k, v, out, lse, key_padding_mask, lengths, bias, seed, dropout_mask = ctx.saved_tensors
        causal, scale, dropout_p, need_probs, backend = ctx.flags
        dq = dk = dv = None
        if grad_out is not None:
            args = (grad_out, q, k, v, out, lse, key_padding_mask, lengths, bias, seed, causal, scale, dropout_p)
            if backend == "triton":
                dq, dk, dv = attention_backward_triton(*args, backends.allow_tf32(q))
            else:
                dq, dk, dv = torch.ops.fastrec.attention_backward_cpp(*args, dropout_mask)
        if need_probs and grad_probs is not None:  # through the returned weights W = P * Z, P = softmax(S)
            probs = attention_probs_torch(q, k, key_padding_mask, lengths, bias, causal, scale)
            grad_p = grad_probs.to(probs.dtype)
            if dropout_p > 0.0:
                grad_p = grad_p * dropout_keep(q, k, seed, dropout_p, dropout_mask) / (1.0 - dropout_p)
            grad_s = probs * (grad_p - (probs * grad_p).sum(-1, keepdim=True)) * scale
            dq_w = torch.matmul(grad_s, k.to(grad_s.dtype)).to(q.dtype)
            dk_w = torch.matmul(grad_s.transpose(-2, -1), q.to(grad_s.dtype)).to(k.dtype)
            dq = dq_w if dq is None else dq + dq_w
            dk = dk_w if dk is None else dk + dk_w
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    scale: float | None,
    dropout_p: float,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention on canonical inputs (see the module docstring); picks the backend per call.
    ``need_weights``: ``(out, probs)``, probs ``(B, H, Lq, Lk)`` after dropout in q's dtype."""
    if scale is None:  # head_dim 0: every score is 0 whatever the scale (torch: uniform weights)
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    scale = float(scale)
    if q.shape[:-1].numel() == 0 or v.shape[-1] == 0:  # no output element: the reference, any backend
        backends.count(OP, "torch", "empty output")
        return attention_torch(q, k, v, key_padding_mask, lengths, bias, None, causal, scale, 0.0, None, need_weights)
    reason = _unfused_reason(q, k, v, bias, causal, need_weights)
    backend = backends.select(q.device, reason)
    backends.count(OP, backend, reason or "")
    seed = mask = None
    torch_masks = dropout_p > 0.0 and backends.torch_masks(q.device)
    if torch_masks and backend == "triton":  # only under an explicit "torch" stream ("auto" gives Philox there)
        raise RuntimeError("use_dropout_stream('torch') needs the cpp or torch backend; triton draws its own masks")
    if torch_masks:
        mask = torch_dropout_mask(q, k, dropout_p)
    elif dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    masks = (key_padding_mask, lengths, bias, seed, causal, scale, dropout_p)
    if backend == "torch":
        return attention_torch(q, k, v, *masks, mask, need_weights)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # inference: the forward op alone, without autograd.Function's per-call cost
        if backend == "triton":
            return attention_forward_triton(q, k, v, *masks, backends.allow_tf32(q))[0]
        out, _, probs = torch.ops.fastrec.attention_forward_cpp(q, k, v, *masks, mask, need_weights)
        return (out, probs) if need_weights else out
    out, _, probs = AttentionFunction.apply(q, k, v, *masks, mask, need_weights, backend)
    return (out, probs) if need_weights else out


def torch_dropout_mask(q: Tensor, k: Tensor, dropout_p: float) -> Tensor:
    """The keep mask torch's CPU attention draws for these shapes: ``bernoulli_(1 - p)`` over
    ``(B, H, Lq, Lk)`` from the default generator (SDPA's math path, ``at::dropout``)."""
    if q.device.type != "cpu":
        raise RuntimeError(
            f"use_dropout_stream('torch') reproduces torch's attention-dropout masks on CPU only; "
            f"on {q.device.type} torch draws them inside its own kernels (got q on {q.device})"
        )
    shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
    if HAVE_TORCH_STREAM_CPP and not torch.compiler.is_compiling():
        # the same bits, ~10x faster (csrc/dropout.cpp)
        return torch.ops.fastrec.torch_stream_mask_cpp(list(shape), 1.0 - dropout_p)
    return torch.empty(shape, dtype=torch.bool).bernoulli_(1.0 - dropout_p)


def _unfused_reason(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, causal: bool, need_weights: bool = False
) -> str | None:
    """Why the fused kernels do not cover this call, or None."""
    if need_weights and (q.device.type != "cpu" or backends.forced() == "triton"):
        return "need_weights (the triton kernels form no attention probabilities)"
    if v.shape[-1] != q.shape[-1]:
        return "value head_dim differs from query head_dim"
    if q.shape[-1] > 256:
        return "head_dim > 256"
    if causal and q.shape[-2] != k.shape[-2]:
        return "causal with L_q != L_k"
    if bias is not None and bias.requires_grad:
        return "attn_mask requires grad"
    return None
