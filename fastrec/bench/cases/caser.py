"""Caser rows: fastrec.nn.CaserConv (every height in one launch) against RecBole's per-height
loop."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import fastrec
from fastrec.bench.harness import Case, input_copies, pair, rotating


def recbole_caser_loop(conv_h: torch.nn.ModuleList, conv_v: torch.nn.Conv2d, E: torch.Tensor):
    """RecBole's Caser convolutions: per height Conv2d + ReLU + max-pool over time, then the
    vertical conv flattened."""
    x = E.unsqueeze(1)
    pooled = []
    for conv in conv_h:
        conv_out = F.relu(conv(x).squeeze(3))
        pooled.append(F.max_pool1d(conv_out, conv_out.size(2)).squeeze(2))
    return torch.cat(pooled, 1), conv_v(x).view(E.shape[0], -1)


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.CaserConv against RecBole's loop of nn.Conv2d + ReLU + max_pool1d plus the
    vertical conv, with the same weights, nv = 4."""
    if full:
        grid = [(b, n, d, h) for b in (512, 2048) for n in (5, 10, 50) for d in (50, 64) for h in (8, 16)]
    else:
        grid = [(512, 10, 64, 8), (512, 5, 50, 16), (512, 50, 64, 8)]
    vertical = 4
    copies = input_copies(device)
    rows: list[Case] = []
    for batch, length, dim, filters in grid:
        torch.manual_seed(0)
        ours = fastrec.nn.CaserConv(length, dim, filters, vertical, device=device, dtype=dtype)
        ref = copy.deepcopy(ours)

        def make(b=batch, n=length, d=dim, h=filters):
            E = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
            return (E,), (
                torch.randn(b, n * h, device=device, dtype=dtype),
                torch.randn(b, 4 * d, device=device, dtype=dtype),
            )

        forwards = {
            "fastrec": lambda E, m=ours: m(E),
            "RecBole loop": lambda E, m=ref: recbole_caser_loop(m.conv_h, m.conv_v, E),
        }
        params = {"fastrec": tuple(ours.parameters()), "RecBole loop": tuple(ref.parameters())}
        windows = filters * dim * length * (length + 1) * (length + 2) // 6  # valid multiply-adds per row
        flops = 2 * batch * (windows + vertical * length * dim)
        io = batch * (length * dim + length * filters + vertical * dim) * dtype.itemsize
        shape = f"B={batch} L={length} d={dim} nh={filters} nv={vertical}"
        rows += pair("caser", "CaserConv", shape, dtype, forwards, rotating(make, copies), flops, io, params)
    return rows
