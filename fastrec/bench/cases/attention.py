"""Attention rows: the attention core against SDPA with the same mask, and the MHA module
against torch's, causal + key padding (30% of keys padded on average, left or right)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import fastrec
from fastrec.bench.harness import Case, input_copies, padding_mask, pair, rotating


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """The core at recommender shapes (a larger grid on CUDA, ``full`` widens the CPU one); the
    MHA module rows at H=2, d=32, right padding."""
    gen = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        grid = [(b, 2, n, d, "right", 0.0) for b in (128, 1024) for n in (50, 200) for d in (25, 32, 64)]
        grid += [(1024, h, 200, 32, "right", 0.0) for h in (1, 4)]
        grid += [(1024, 2, 200, 50, "left", 0.0), (1024, 2, 200, 32, "right", 0.2)]
    else:
        grid = [(128, 2, 50, 32, "right", 0.0), (128, 2, 50, 32, "left", 0.0), (128, 2, 50, 25, "right", 0.0)]
        grid += [(128, 2, 50, 32, "right", 0.2), (128, 2, 200, 64, "right", 0.0)]
        if full:
            grid += [(128, h, n, d, "right", 0.0) for h in (1, 4) for n in (50, 200) for d in (25, 50, 64)]
    copies = input_copies(device)
    rows: list[Case] = []
    for batch, heads, length, head_dim, side, p in grid:
        kpm = padding_mask(batch, length, 0.3, side == "left", device, gen)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        sdpa_mask = ~(causal[None, None] | kpm[:, None, None, :])  # SDPA: True = take part

        def make(b=batch, h=heads, n=length, d=head_dim):
            q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            return (q, k, v), torch.randn(b, h, n, d, device=device, dtype=dtype)

        forwards = {
            "fastrec": lambda q, k, v, m=kpm, p=p: fastrec.functional.attention(
                q, k, v, causal=True, key_padding_mask=m, dropout_p=p
            ),
            "sdpa": lambda q, k, v, m=sdpa_mask, p=p: F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p),
        }
        shape = f"B={batch} H={heads} L={length} d={head_dim} {side}-pad p={p}"
        flops = 4 * batch * heads * length * length * head_dim / 2  # causal: half the scores
        io = 4 * batch * heads * length * head_dim * dtype.itemsize
        rows += pair("attention", "core vs SDPA+mask", shape, dtype, forwards, rotating(make, copies), flops, io)
        if heads == 2 and head_dim == 32 and side == "right":
            rows += _mha_cases(device, dtype, batch, length, p, kpm, causal, copies)
    return rows


def _mha_cases(device, dtype, batch, length, p, kpm, causal, copies) -> list[Case]:
    """fastrec.nn.MultiheadAttention against torch's with the same weights: need_weights=False
    (training and eval), and torch's default need_weights=True."""
    embed, heads = 64, 2
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(embed, heads, dropout=p, batch_first=True, device=device, dtype=dtype)
    ours = fastrec.nn.MultiheadAttention(embed, heads, dropout=p, batch_first=True, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())

    def make():
        x = torch.randn(batch, length, embed, device=device, dtype=dtype, requires_grad=True)
        return (x,), torch.randn(batch, length, embed, device=device, dtype=dtype)

    def call(module, need_weights=False):
        return lambda x: module(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=need_weights)[0]

    forwards = {"fastrec": call(ours), "nn.MultiheadAttention": call(ref)}
    # torch's default, what most SASRec code calls (the weights unused): torch's math path.
    weighted = {"fastrec": call(ours, True), "nn.MultiheadAttention": call(ref, True)}
    # Inference runs the modules in eval mode, where torch takes its native fused MHA path.
    inference = {"fastrec": call(copy.deepcopy(ours).eval()), "nn.MultiheadAttention": call(copy.deepcopy(ref).eval())}
    params = {"fastrec": tuple(ours.parameters()), "nn.MultiheadAttention": tuple(ref.parameters())}
    shape = f"B={batch} E={embed} H={heads} L={length} right-pad p={p}"
    flops = 4 * batch * heads * length * length * (embed // heads) / 2 + 8 * batch * length * embed * embed
    io = 2 * batch * length * embed * dtype.itemsize
    inputs = rotating(make, copies)
    rows = pair("attention", "MHA module", shape, dtype, forwards, inputs, flops, io, params, inference)
    # Off the CPU the kernels form no weights, forced or not: no forced row follows these.
    name = "MHA module, need_weights=True"
    return rows + pair("attention", name, shape, dtype, weighted, inputs, flops, io, params, force_when_routed=False)
