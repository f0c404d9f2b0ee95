"""Conv rows: an image-style CNN's conv + ReLU + 2x2 max-pool stages and Conv1d + ReLU +
max-over-time, fused, against torch's three ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fastrec
from fastrec import backends
from fastrec.bench.harness import Case, input_copies, pair, rotating
from fastrec.ops import conv as conv_ops


@contextlib.contextmanager
def kernel_forced(backend: str) -> Iterator[None]:
    """``backend`` forced, and on triton the fused Triton path (not the card's dispatch table)."""
    with backends.use_backend(backend), conv_ops.use_conv_path("triton"):
        yield


def conv2d_grid(device: torch.device, full: bool) -> list[tuple[int, int, int]]:
    """(batch, C_in, C_out) of the conv2d rows: 3x3 pad 1 on 32x32, ReLU, 2x2 max-pool."""
    batches = (64, 256) if full or device.type == "cuda" else (64,)
    return [(b, c_in, c_out) for b in batches for c_in, c_out in ((32, 64), (1, 32))]


def conv1d_grid(full: bool) -> list[tuple[int, int, int, int]]:
    """(batch, d, L, k) of the conv1d rows: d -> d channels, ReLU, max over time."""
    return [(512, 64, 50, k) for k in (3, 5)] + ([(2048, 64, 50, 3)] if full else [])


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.functional.conv2d with act and pool fused against F.conv2d + F.relu +
    F.max_pool2d, and conv1d over (B, d, L) + ReLU + max-over-time against F.conv1d + F.relu +
    F.max_pool1d."""
    copies = input_copies(device)
    rows: list[Case] = []
    for batch, c_in, c_out in conv2d_grid(device, full):
        size = 32
        w = torch.randn(c_out, c_in, 3, 3, device=device, dtype=dtype) / (3 * c_in**0.5)
        b = torch.randn(c_out, device=device, dtype=dtype)
        w.requires_grad_()
        b.requires_grad_()

        def make(n=batch, c=c_in, s=size, o=c_out):
            x = torch.randn(n, c, s, s, device=device, dtype=dtype, requires_grad=True)
            return (x,), torch.randn(n, o, s // 2, s // 2, device=device, dtype=dtype)

        forwards = {
            "fastrec": lambda x, w=w, b=b: fastrec.functional.conv2d(x, w, b, padding=1, act="relu", pool=2),
            "torch conv+relu+pool": lambda x, w=w, b=b: F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2),
        }
        params = {k: (w, b) for k in forwards}
        shape = f"B={batch} {c_in}->{c_out} 3x3 pad 1 {size}x{size} relu pool 2"
        flops = 2 * batch * c_out * c_in * 9 * size * size
        io = (batch * c_in * size * size + batch * c_out * size * size // 4) * dtype.itemsize
        inputs = rotating(make, copies)
        rows += pair("conv", "conv2d+relu+pool", shape, dtype, forwards, inputs, flops, io, params, force=kernel_forced)
    for batch, dim, length, k in conv1d_grid(full):
        w = (torch.randn(dim, dim, k, device=device, dtype=dtype) / (k * dim) ** 0.5).requires_grad_()
        b = torch.randn(dim, device=device, dtype=dtype).requires_grad_()
        out_len = length - k + 1

        def make(n=batch, d=dim, s=length):
            x = torch.randn(n, d, s, device=device, dtype=dtype, requires_grad=True)
            return (x,), torch.randn(n, d, 1, device=device, dtype=dtype)

        forwards = {
            "fastrec": lambda x, w=w, b=b, t=out_len: fastrec.functional.conv1d(x, w, b, act="relu", pool=t),
            "torch conv+relu+pool": lambda x, w=w, b=b, t=out_len: F.max_pool1d(F.relu(F.conv1d(x, w, b)), t),
        }
        params = {key: (w, b) for key in forwards}
        shape = f"B={batch} d={dim} L={length} k={k} relu max-over-time"
        flops = 2 * batch * dim * dim * k * out_len
        io = (batch * dim * length + batch * dim) * dtype.itemsize
        inputs = rotating(make, copies)
        name = "conv1d+relu+maxtime"
        rows += pair("conv", name, shape, dtype, forwards, inputs, flops, io, params, force=kernel_forced)
    return rows
