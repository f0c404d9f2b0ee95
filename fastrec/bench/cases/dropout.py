"""Dropout rows: fastrec.nn.Dropout against torch.nn.Dropout (training mode) on SASRec's
activations, with the default mask stream and with fastrec's Philox stream."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastrec
from fastrec import backends
from fastrec.bench.harness import Case, input_copies, pair, rotating


def _in_stream(module: torch.nn.Module, stream: str) -> Callable:
    """``module`` called under ``fastrec.use_dropout_stream(stream)``."""

    def forward(*args):
        with backends.use_dropout_stream(stream):
            return module(*args)

    return forward


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """B=512, L=50, d=64, p = 0.2 and 0.5, with the default stream (torch's masks on the CPU)
    and with fastrec's Philox stream; ``full`` adds d=256. Only the Philox rows are followed by
    a forced-kernel row where they route to torch's dropout: the kernels draw Philox masks."""
    copies = input_copies(device)
    shapes = [(512, 50, 64)] + ([(512, 50, 256)] if full else [])
    rows: list[Case] = []
    for batch, length, dim in shapes:
        for p in (0.2, 0.5):

            def make(batch=batch, length=length, dim=dim):
                x = torch.randn(batch, length, dim, device=device, dtype=dtype, requires_grad=True)
                return (x,), torch.randn_like(x)

            io = 2 * batch * length * dim * dtype.itemsize  # read x, write out
            shape = f"B={batch} L={length} d={dim} p={p}"
            for stream, name in (("auto", "Dropout"), ("fastrec", "Dropout, Philox stream")):
                forwards = {
                    "fastrec": _in_stream(fastrec.nn.Dropout(p), stream),
                    "torch.nn.Dropout": torch.nn.Dropout(p),
                }
                inputs = rotating(make, copies)
                forceable = stream == "fastrec"
                rows += pair("dropout", name, shape, dtype, forwards, inputs, 0.0, io, force_when_routed=forceable)
    return rows
