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


# =========================================================================== training: one layer
# ``encoder_layer(x, weights, heads, eps1, eps2, gelu, norm_first, causal, key_padding_mask,
# lengths, dropout_p, attention_dropout_p, batch_first) -> y``: one ``TransformerEncoderLayer``
# forward in training (or in eval with autograd), differentiable in x and every weight.
#
# - x ``(B, L, E)`` if ``batch_first`` else ``(L, B, E)``; weights: the 12 tensors above (biases
#   all present or all None). ``key_padding_mask`` bool ``(B, L)`` (True = ignored key) and/or
#   ``lengths`` int ``(B,)`` mask keys in the attention; ``causal`` as above.
# - ``dropout_p``: (dropout1, the feed-forward dropout, dropout2) probabilities; each draws
#   fastrec's dropout contract (fastrec/ops/dropout.py) for the tensor the unfused layer drops
#   (``(B, L, E)`` / ``(B, L, F)`` in the caller's layout), and the attention dropout the attention
#   op's contract; the seeds are drawn from torch's generator in the unfused layer's order
#   (attention, dropout1, dropout, dropout2; only for p > 0), so a seed gives the masks of the
#   unfused fastrec layer under Philox masks.
# - triton: forward = the input projection (one GEMM; pre-norm: LN1 first) + the attention
#   kernel + ``kernels/encoder.py``'s block kernel (out_proj, dropout1, residual, LN, linear1,
#   activation, dropout, linear2, dropout2, residual, LN): 3 launches (4 pre-norm) and one seed
#   draw per active dropout. Backward = the block's backward kernel (persistent: one program per
#   SM) + one sum of its per-program partials + the attention backward (3 kernels) + the d(qkv)
#   gather + 3 GEMM/reduction launches for the input projection (+1 pre-norm for LN1): 9 launches
#   (10 pre-norm).
# - torch: ``encoder_layer_torch``, the readable reference, differentiated by autograd.

TRAIN_OP = "encoder_layer"
FUSED_MAX_EMBED = 64  # kernels/encoder.py's MAX_EMBED: the widest E its block configs fit in registers
FUSED_MAX_EMBED_FP64 = 32  # and its MAX_EMBED_FP64


def _split_heads(t: Tensor, heads: int, batch_first: bool) -> Tensor:
    """(B, L, E) or (L, B, E) tokens -> a (B, H, L, D) view."""
    outer, inner, embed = t.shape
    t = t.view(outer, inner, heads, embed // heads)
    return t.transpose(1, 2) if batch_first else t.permute(1, 2, 0, 3)


def encoder_layer_torch(
    x: Tensor,
    weights: list[Tensor | None],
    heads: int,
    eps1: float,
    eps2: float,
    gelu: bool,
    norm_first: bool,
    causal: bool,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    dropout_p: tuple[float, float, float],
    attention_dropout_p: float,
    batch_first: bool,
    seeds: list[Tensor | None],
) -> Tensor:
    """The layer as torch ops with the contract's masks (``seeds``: attention, dropout1, dropout,
    dropout2; None where p is 0)."""
    from fastrec.ops import dropout as dropout_ops

    w_in, b_in, w_out, b_out, g1, be1, w1, b1, w2, b2, g2, be2 = weights
    embed = x.shape[-1]
    p1, pf, p2 = dropout_p

    def drop(t: Tensor, seed: Tensor | None, p: float) -> Tensor:
        return dropout_ops.dropout_torch(t, seed, p) if p > 0.0 else t

    def attention_block(t: Tensor) -> Tensor:
        q, k, v = (_split_heads(c, heads, batch_first) for c in F.linear(t, w_in, b_in).chunk(3, dim=-1))
        scale = 1.0 / (embed // heads) ** 0.5
        a = attention_ops.attention_torch(
            q, k, v, key_padding_mask, lengths, None, seeds[0], causal, scale, attention_dropout_p
        )
        a = a.transpose(1, 2) if batch_first else a.permute(2, 0, 1, 3)
        return drop(F.linear(a.reshape(t.shape), w_out, b_out), seeds[1], p1)

    def feed_forward(t: Tensor) -> Tensor:
        hidden = F.linear(t, w1, b1)
        hidden = drop(F.gelu(hidden) if gelu else F.relu(hidden), seeds[2], pf)
        return drop(F.linear(hidden, w2, b2), seeds[3], p2)

    if norm_first:
        h = x + attention_block(_norm(x, g1, be1, eps1))
        return h + feed_forward(_norm(h, g2, be2, eps2))
    h = _norm(x + attention_block(x), g1, be1, eps1)
    return _norm(h + feed_forward(h), g2, be2, eps2)


class EncoderLayerFunction(torch.autograd.Function):
    """The layer on the triton backend. Saves x, the qkv projection, the attention output and its
    log-sum-exp, post-norm's pre-LN2 sum and the seeds (pre-norm: LN1's input statistics and
    output); every dropout mask is recomputed."""

    @staticmethod
    def forward(ctx, config, x, key_padding_mask, lengths, seed_a, seed1, seedf, seed2, *weights):
        from fastrec.kernels import encoder as kernels

        heads, eps1, eps2, gelu, norm_first, causal, ps, p_attn, batch_first = config
        w_in, b_in, _w_out, _b_out, g1, be1 = weights[:6]
        embed = x.shape[-1]
        xc = x.contiguous()
        tf32 = backends.allow_tf32(xc)
        mean1 = rstd1 = None
        src = xc
        if norm_first:
            src, mean1, rstd1 = torch.native_layer_norm(xc, (embed,), g1, be1, eps1)
        qkv = F.linear(src, w_in, b_in)
        q, k, v = (_split_heads(t, heads, batch_first) for t in qkv.chunk(3, dim=-1))
        scale = 1.0 / (embed // heads) ** 0.5
        masks = (key_padding_mask, lengths, None, seed_a, causal, scale, p_attn)
        a, lse = attention_ops.attention_forward_triton(q, k, v, *masks, tf32)
        seeds = [seed1, seedf, seed2]
        out, pre = kernels.block_forward(
            xc.view(-1, embed), a, batch_first, list(weights[2:]), seeds, ps, (eps1, eps2), norm_first, gelu, tf32
        )
        ctx.save_for_backward(xc, src, mean1, rstd1, qkv, a, lse, pre, key_padding_mask, lengths, seed_a, *seeds)
        ctx.weights = weights
        ctx.config = config
        return out.view(xc.shape)

    @staticmethod
    def backward(ctx, grad_out):
        from fastrec.kernels import encoder as kernels

        xc, src, mean1, rstd1, qkv, a, lse, pre, key_padding_mask, lengths, seed_a, *seeds = ctx.saved_tensors
        weights = ctx.weights
        heads, eps1, eps2, gelu, norm_first, causal, ps, p_attn, batch_first = ctx.config
        w_in, b_in, g1, be1 = weights[0], weights[1], weights[4], weights[5]
        embed = xc.shape[-1]
        tf32 = backends.allow_tf32(xc)
        dx, da, block_grads = kernels.block_backward(
            grad_out.reshape(-1, embed), xc.view(-1, embed), a, pre, batch_first, list(weights[2:]), seeds, ps,
            (eps1, eps2), norm_first, gelu, tf32,
        )  # fmt: skip
        q, k, v = (_split_heads(t, heads, batch_first) for t in qkv.chunk(3, dim=-1))
        scale = 1.0 / (embed // heads) ** 0.5
        masks = (key_padding_mask, lengths, None, seed_a, causal, scale, p_attn)
        dq, dk, dv = attention_ops.attention_backward_triton(da, q, k, v, a, lse, *masks, tf32)
        order = (0, 2, 1, 3) if batch_first else (2, 0, 1, 3)  # (B, H, L, D) -> the caller's token layout
        dqkv = torch.cat([t.permute(order) for t in (dq, dk, dv)], dim=2).view(-1, 3 * embed)
        src2d = src.reshape(-1, embed)
        dw_in = dqkv.t().mm(src2d)
        db_in = dqkv.sum(0) if b_in is not None else None
        dg1 = dbe1 = None
        if norm_first:
            dsrc = dqkv.mm(w_in).view(xc.shape)
            mask = [True, True, be1 is not None]
            dln, dg1, dbe1 = torch.ops.aten.native_layer_norm_backward(dsrc, xc, (embed,), mean1, rstd1, g1, be1, mask)
            dx = dx.view(xc.shape) + dln
        else:
            dx = torch.addmm(dx, dqkv, w_in).view(xc.shape)
            dg1, dbe1 = block_grads[2], block_grads[3]
        grads = [dw_in, db_in, block_grads[0], block_grads[1], dg1, dbe1, *block_grads[4:]]
        return None, dx, None, None, None, None, None, None, *grads


def _draw_seeds(device: torch.device, dropout_p: tuple[float, float, float], attention_dropout_p: float):
    """One int64 seed per active dropout, in the unfused layer's order (as ``fastrec.ops.dropout``
    and the attention op draw them: graph-safe, no host sync)."""
    return [
        torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device) if p > 0.0 else None
        for p in (attention_dropout_p, *dropout_p)
    ]


def encoder_layer(
    x: Tensor,
    weights: list[Tensor | None],
    heads: int,
    eps1: float,
    eps2: float,
    gelu: bool,
    norm_first: bool,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    lengths: Tensor | None = None,
    dropout_p: float | tuple[float, float, float] = 0.0,
    attention_dropout_p: float = 0.0,
    batch_first: bool = True,
) -> Tensor:
    """One encoder layer on ``x`` for training (see the contract above this function); picks the
    backend per call: triton for CUDA tensors (or forced, in the interpreter), else the torch
    reference. Bad arguments raise an error naming them."""
    ps = tuple(float(p) for p in dropout_p) if isinstance(dropout_p, (tuple, list)) else (float(dropout_p),) * 3
    _check_layer_args(x, weights, heads, key_padding_mask, lengths, ps, attention_dropout_p, batch_first)
    reason = train_unfused_reason(x)
    backend = backends.select(x.device, reason)
    backends.count(TRAIN_OP, backend, reason or "")
    seeds = _draw_seeds(x.device, ps, attention_dropout_p)
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int32).contiguous()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    args = (heads, eps1, eps2, gelu, norm_first, causal)
    if backend != "triton":
        return encoder_layer_torch(
            x, weights, *args, key_padding_mask, lengths, ps, attention_dropout_p, batch_first, seeds
        )
    config = (*args, ps, float(attention_dropout_p), batch_first)
    return EncoderLayerFunction.apply(config, x, key_padding_mask, lengths, *seeds, *weights)


def _check_layer_args(x, weights, heads, key_padding_mask, lengths, ps, attention_dropout_p, batch_first) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor (B, L, E) or (L, B, E), got {getattr(x, 'shape', type(x))}")
    if len(weights) != WEIGHTS_PER_LAYER:
        raise ValueError(f"weights must hold {WEIGHTS_PER_LAYER} tensors (one layer), got {len(weights)}")
    embed = x.shape[-1]
    if not isinstance(heads, int) or heads <= 0 or embed % heads:
        raise ValueError(f"heads must be a positive divisor of the embedding size {embed}, got {heads!r}")
    batch, length = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "norm1.weight", "norm1.bias")
    names += ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "norm2.weight", "norm2.bias")
    ff = weights[6].shape[0] if isinstance(weights[6], Tensor) else 0
    shapes = [(3 * embed, embed), (3 * embed,), (embed, embed), (embed,), (embed,), (embed,), (ff, embed), (ff,)]
    shapes += [(embed, ff), (embed,), (embed,), (embed,)]
    has_bias = weights[1] is not None
    for name, w, shape in zip(names, weights, shapes, strict=True):
        optional = name.endswith("bias")
        if w is None and optional and not has_bias:
            continue
        if not isinstance(w, Tensor) or tuple(w.shape) != shape:
            got = tuple(w.shape) if isinstance(w, Tensor) else w
            raise ValueError(f"{name} must be a tensor of shape {shape}, got {got}")
        if optional and not has_bias:
            raise ValueError(f"{name}: the biases must be all present or all None")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"{name} must be {x.dtype} on {x.device} like x, got {w.dtype} on {w.device}")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, length)
    ):
        raise ValueError(
            f"key_padding_mask must be a bool tensor (B, L) = {(batch, length)}, "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if lengths is not None and tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape (B,) = ({batch},), got {tuple(lengths.shape)}")
    for name, p in [*(("dropout_p", p) for p in ps), ("attention_dropout_p", attention_dropout_p)]:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")


def train_unfused_reason(x: Tensor) -> str | None:
    """Why the fused training kernels do not cover this call, or None."""
    from fastrec.kernels._common import TRITON_DTYPES

    if x.device.type == "cpu" and backends.forced() != "triton":
        return TRAIN_CPU_REASON
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype}"
    if x.numel() == 0:
        return "empty input"
    if x.shape[-1] > FUSED_MAX_EMBED:
        return f"embed_dim > {FUSED_MAX_EMBED} (the fused block kernels would spill registers)"
    if x.dtype == torch.float64 and x.shape[-1] > FUSED_MAX_EMBED_FP64:
        return f"float64 with embed_dim > {FUSED_MAX_EMBED_FP64} (the fused block backward would spill registers)"
    if torch.compiler.is_compiling():
        return "torch.compile (the fused block kernels are not registered ops)"
    return None


TRAIN_CPU_REASON = "CPU: no whole-layer C++ kernel in training (its attention and dropouts run fastrec's C++ kernels)"
