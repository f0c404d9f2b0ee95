"""The encoder layer at inference: a stack of ``torch.nn.TransformerEncoderLayer`` forwards in
eval mode (no dropout, no autograd) as one op, for serving at small batches.

The contract every backend implements (C++: ``csrc/encoder.cpp``; elsewhere ``encoder_torch``
below, the readable reference, whose attention core is ``fastrec.ops.attention``):

``encoder_inference(x, weights, heads, eps1, eps2, gelu, norm_first, causal, lengths, last_query) -> y``

- x ``(B, L, E)`` batch-first; ``heads`` divides E.
- weights: 12 tensors per layer, in the order of ``fastrec.nn.encoder.encoder_layer_weights``:
  in_proj weight ``(3E, E)`` and bias, out_proj weight and bias, norm1 weight and bias, linear1
  weight ``(F, E)`` and bias, linear2 weight ``(E, F)`` and bias, norm2 weight and bias; biases
  and norm weights may be None. Every layer shares ``heads``, the norms' eps, the activation
  (GELU if ``gelu`` else ReLU) and ``norm_first``.
- ``causal``: position i attends to keys ``j <= i``. ``lengths``: integer ``(B,)``; keys
  ``j >= lengths[b]`` are masked in every layer (only padding positions change, for right-padded
  rows under ``causal``).
- ``last_query``: the last layer computes only each row's last real position (``lengths[b] - 1``,
  or ``L - 1`` without lengths) and ``y`` is ``(B, 1, E)``; else ``y`` is ``(B, L, E)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends
from fastrec.ops import attention as attention_ops

OP = "encoder"
WEIGHTS_PER_LAYER = 12

HAVE_CPP = backends.available()["cpp"] is None and hasattr(torch.ops.fastrec, "encoder_inference_cpp")

if HAVE_CPP:

    @torch.library.register_fake("fastrec::encoder_inference_cpp")
    def _fake_encoder(x, weights, heads, eps1, eps2, gelu, norm_first, causal, lengths, last_query):
        return x.new_empty(x.shape[0], 1 if last_query else x.shape[1], x.shape[2])


# --------------------------------------------------------------------------- torch reference
def encoder_torch(
    x: Tensor,
    weights: list[Tensor | None],
    heads: int,
    eps1: float,
    eps2: float,
    gelu: bool,
    norm_first: bool,
    causal: bool,
    lengths: Tensor | None = None,
    last_query: bool = False,
) -> Tensor:
    """The layers one after the other as torch ops. The attention core is
    ``fastrec.ops.attention.attention``: torch's reference under ``use_backend("torch")``, the
    Triton kernels on CUDA."""
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int32).contiguous()
    n_layers = len(weights) // WEIGHTS_PER_LAYER
    for i in range(n_layers):
        layer = weights[i * WEIGHTS_PER_LAYER : (i + 1) * WEIGHTS_PER_LAYER]
        last = last_query and i == n_layers - 1
        x = _layer_torch(x, layer, heads, eps1, eps2, gelu, norm_first, causal, lengths, last)
    return x


def _layer_torch(x, weights, heads, eps1, eps2, gelu, norm_first, causal, lengths, last_query) -> Tensor:
    w_in, b_in, w_out, b_out, gamma1, beta1, w1, b1, w2, b2, gamma2, beta2 = weights
    batch, length, embed = x.shape
    rows = x  # the positions whose output is computed
    if last_query:
        last = lengths.long() - 1 if lengths is not None else torch.full((batch,), length - 1, device=x.device)
        rows = x[torch.arange(batch, device=x.device), last].unsqueeze(1)
    src = _norm(x, gamma1, beta1, eps1) if norm_first else x
    if last_query:
        q_src = _norm(rows, gamma1, beta1, eps1) if norm_first else rows
        q = F.linear(q_src, w_in[:embed], None if b_in is None else b_in[:embed])
        k, v = F.linear(src, w_in[embed:], None if b_in is None else b_in[embed:]).chunk(2, dim=-1)
    else:
        q, k, v = F.linear(src, w_in, b_in).chunk(3, dim=-1)
    q, k, v = (t.view(batch, t.shape[1], heads, embed // heads).transpose(1, 2) for t in (q, k, v))
    # A last-position query sees every key up to its row's length: the length mask alone.
    a = attention_ops.attention(q, k, v, None, lengths, None, causal and not last_query, None, 0.0)
    a = F.linear(a.transpose(1, 2).reshape(batch, a.shape[2], embed), w_out, b_out)

    def feed_forward(t: Tensor) -> Tensor:
        hidden = F.linear(t, w1, b1)
        return F.linear(F.gelu(hidden) if gelu else F.relu(hidden), w2, b2)

    if norm_first:
        y = rows + a
        return y + feed_forward(_norm(y, gamma2, beta2, eps2))
    y = _norm(rows + a, gamma1, beta1, eps1)
    return _norm(y + feed_forward(y), gamma2, beta2, eps2)


def _norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


# --------------------------------------------------------------------------- dispatch
def encoder_inference(
    x: Tensor,
    weights: list[Tensor | None],
    heads: int,
    eps1: float,
    eps2: float,
    gelu: bool,
    norm_first: bool,
    causal: bool,
    lengths: Tensor | None = None,
    last_query: bool = False,
) -> Tensor:
    """The layers of ``weights`` on ``x`` (see the module docstring); picks the backend per call:
    the C++ op for CPU tensors, else ``encoder_torch``."""
    if x.shape[0] == 0:  # an empty batch: the reference, on every backend
        backends.count(OP, "torch", "empty batch")
        return encoder_torch(x, weights, heads, eps1, eps2, gelu, norm_first, causal, lengths, last_query)
    reason = _unfused_reason(x, weights)
    backend = backends.select(x.device, reason)
    backends.count(OP, backend, reason or "")
    if backend == "cpp":
        return torch.ops.fastrec.encoder_inference_cpp(
            x, weights, heads, eps1, eps2, gelu, norm_first, causal, lengths, last_query
        )
    return encoder_torch(x, weights, heads, eps1, eps2, gelu, norm_first, causal, lengths, last_query)


def _unfused_reason(x: Tensor, weights: list[Tensor | None]) -> str | None:
    """Why the C++ op does not cover this call, or None."""
    if x.device.type == "cpu" and not HAVE_CPP:
        return "fastrec._C has no encoder_inference_cpp"
    if torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad for w in weights)):
        return "autograd (the C++ op is inference only)"
    return None
