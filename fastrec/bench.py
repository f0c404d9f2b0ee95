"""``fastrec bench``: fastrec against the baselines a user would otherwise run, as ratios.

Every row times fastrec and its baselines in the same process, interleaved round by round,
and reports the median per call. On CUDA the inputs rotate through several copies so that the
L2 cache flatters no side, and each figure also gets its fraction of the card's measured
memory bandwidth and bf16 matmul rate. Families add their cases to ``CASES``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fastrec
from fastrec import backends


@dataclass
class Case:
    """One benchmark row: ``fns['fastrec']`` against every other entry of ``fns``."""

    family: str
    name: str
    shape: str
    dtype: str
    mode: str  # "forward" or "forward+backward"
    fns: dict[str, Callable[[], object]]
    flops: float = 0.0  # useful floating-point work per call (for the achieved rate)
    bytes: float = 0.0  # minimum memory traffic per call (for the achieved bandwidth)


@dataclass
class Result:
    family: str
    name: str
    shape: str
    dtype: str
    mode: str
    ms: dict[str, float]
    speedup: dict[str, float] = field(default_factory=dict)  # baseline ms / fastrec ms
    tflops: float | None = None
    bandwidth_fraction: float | None = None
    flops_fraction: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, min_round_s: float
) -> dict[str, float]:
    """Median milliseconds per call of each function, alternating them round by round."""
    calls: dict[str, int] = {}
    for name, fn in fns.items():  # warm up (and compile/tune), then size a round
        fn()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - start, 1e-6)
        calls[name] = max(1, min(1000, int(min_round_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------------- attention cases
def _padding_mask(batch: int, length: int, fraction: float, left: bool, device, gen) -> torch.Tensor:
    """Bool (batch, length), True = padding; each row padded by up to ``2 * fraction`` of L."""
    pad = (torch.rand(batch, generator=gen) * 2 * fraction * length).long().clamp(max=length - 1)
    positions = torch.arange(length)
    mask = positions[None, :] < pad[:, None] if left else positions[None, :] >= (length - pad)[:, None]
    return mask.to(device)


def _rotating(make: Callable[[], tuple], copies: int) -> Callable[[], tuple]:
    """Cycles through ``copies`` input sets made by ``make`` (L2-cache rotation on GPU)."""
    pool = [make() for _ in range(copies)]
    state = {"next": 0}

    def draw() -> tuple:
        index = state["next"]
        state["next"] = (index + 1) % copies
        return pool[index]

    return draw


def _forward_only(forward: Callable, inputs: Callable[[], tuple]) -> Callable[[], object]:
    def run() -> object:
        tensors, _ = inputs()
        with torch.no_grad():
            return forward(*tensors)

    return run


def _training_step(forward: Callable, inputs: Callable[[], tuple], params: tuple = ()) -> Callable[[], object]:
    """Forward, then the gradients of every input and parameter for a random upstream grad."""

    def run() -> object:
        tensors, grad = inputs()
        out = forward(*tensors)
        return torch.autograd.grad(out, (*tensors, *params), grad)

    return run


def _pair(family, name, shape, dtype_name, forwards, inputs, flops, io, params=None, inference=None) -> list[Case]:
    """A forward row (``inference`` functions if given, under no_grad) and a forward+backward
    row for the same inputs."""
    params = params or {}
    fwd = {k: _forward_only(f, inputs) for k, f in (inference or forwards).items()}
    train = {k: _training_step(f, inputs, params.get(k, ())) for k, f in forwards.items()}
    return [
        Case(family, name, shape, dtype_name, "forward", fwd, flops, io),
        Case(family, name, shape, dtype_name, "forward+backward", train, flops * 3.5, io * 2.5),
    ]


def attention_cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """Attention core vs SDPA with the same mask, and the MHA module vs torch's, causal +
    key padding (30% of keys padded on average, left or right)."""
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
    dtype_name = str(dtype).removeprefix("torch.")
    copies = 4 if cuda else 1
    cases: list[Case] = []
    for batch, heads, length, head_dim, side, p in grid:
        kpm = _padding_mask(batch, length, 0.3, side == "left", device, gen)
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
        cases += _pair(
            "attention", "core vs SDPA+mask", shape, dtype_name, forwards, _rotating(make, copies), flops, io
        )
        if heads == 2 and head_dim == 32 and side == "right":
            cases += _mha_cases(device, dtype, batch, length, p, kpm, causal, copies)
    if device.type == "cpu":
        cases += [_encoder_inference_case(dtype, batch) for batch in (1, 128)]
    return cases


def _encoder_inference_case(dtype, batch, length=50) -> Case:
    """A SASRec block at inference (eval, no_grad, causal): fastrec.nn.TransformerEncoderLayer
    (one C++ op on the CPU) against torch's layer, which takes its native fast path in eval."""
    embed, heads, ff = 64, 2, 256
    torch.manual_seed(0)
    kwargs = dict(dropout=0.2, activation="gelu", batch_first=True, dtype=dtype)
    ref = torch.nn.TransformerEncoderLayer(embed, heads, ff, **kwargs).eval()
    ours = fastrec.nn.TransformerEncoderLayer(embed, heads, ff, **kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    mask = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=dtype)
    x = torch.randn(batch, length, embed, dtype=dtype)

    def run(module):
        def call():
            with torch.no_grad():
                return module(x, src_mask=mask, is_causal=True)

        return call

    fns = {"fastrec": run(ours), "nn.TransformerEncoderLayer": run(ref)}
    flops = 2 * batch * length * (4 * embed * embed + 2 * embed * ff) + 2 * batch * length * length * embed
    io = 2 * batch * length * embed * dtype.itemsize
    shape = f"B={batch} L={length} E={embed} H={heads} F={ff} causal"
    return Case("attention", "encoder layer, eval", shape, _dtype_name(dtype), "forward", fns, flops, io)


def _mha_cases(device, dtype, batch, length, p, kpm, causal, copies) -> list[Case]:
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
    dtype_name = str(dtype).removeprefix("torch.")
    inputs = _rotating(make, copies)
    cases = _pair("attention", "MHA module", shape, dtype_name, forwards, inputs, flops, io, params, inference)
    name = "MHA module, need_weights=True"
    return cases + _pair("attention", name, shape, dtype_name, weighted, inputs, flops, io, params)


# --------------------------------------------------------------------------- rnn cases
def rnn_cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.GRU/LSTM/RNN vs torch's (padded, batch_first); GRU and LSTM (and RNN with
    ``full``) on packed input (the same PackedSequence on both sides, lengths uniform in
    [1, T]); the fused GRU against the Python loop of nn.GRUCell that the GRU4Rec reference
    code runs; single cell steps (fastrec.nn.GRUCell vs torch.nn.GRUCell, hidden 100)."""
    gen = torch.Generator().manual_seed(0)
    # (batch, steps, hidden): the default set keeps `fastrec bench` short; --full adds the
    # rest of BENCHMARKS.md's envelope.
    shapes = [(128, 50, 64)]
    if full:
        shapes += [(1, 50, 64), (32, 200, 64), (512, 20, 64), (128, 50, 128), (128, 50, 256), (512, 50, 128)]
    cases: list[Case] = []
    for batch, steps, hidden in shapes:
        cases += _rnn_padded_cases(device, dtype, batch, steps, hidden)
        for kind in ("GRU", "LSTM") + (("RNN",) if full else ()):
            cases += _rnn_packed_cases(device, dtype, kind, batch, steps, hidden, gen)
    for batch in (1, 64, 512):
        cases += _rnn_cell_cases(device, dtype, batch, 100, 100)
    return cases


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rnn_pair(device, dtype, kind, hidden, **kwargs):
    """(torch module, patched deep copy) with the same weights."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(hidden, hidden, device=device, dtype=dtype, **kwargs)
    ours = copy.deepcopy(ref)
    fastrec.patch(ours)
    return ref, ours


def _rnn_padded_cases(device, dtype, batch, steps, hidden) -> list[Case]:
    copies = 4 if device.type == "cuda" else 1

    def make():
        x = torch.randn(batch, steps, hidden, device=device, dtype=dtype, requires_grad=True)
        return (x,), torch.randn(batch, steps, hidden, device=device, dtype=dtype)

    inputs = _rotating(make, copies)
    cases: list[Case] = []
    for kind in ("GRU", "LSTM", "RNN"):
        ref, ours = _rnn_pair(device, dtype, kind, hidden, batch_first=True)
        gates = {"GRU": 3, "LSTM": 4, "RNN": 1}[kind]
        flops = 2 * batch * steps * 2 * hidden * gates * hidden
        forwards = {"fastrec": lambda x, m=ours: m(x)[0], f"nn.{kind}": lambda x, m=ref: m(x)[0]}
        params = {"fastrec": tuple(ours.parameters()), f"nn.{kind}": tuple(ref.parameters())}
        if kind == "GRU":
            cell = torch.nn.GRUCell(hidden, hidden, device=device, dtype=dtype)
            cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
            forwards["GRUCell loop"] = lambda x, c=cell: _cell_loop(c, x)
            params["GRUCell loop"] = tuple(cell.parameters())
        shape = f"B={batch} T={steps} in=hidden={hidden} padded"
        io = 2 * batch * steps * hidden * dtype.itemsize
        cases += _pair("rnn", kind, shape, _dtype_name(dtype), forwards, inputs, flops, io, params)
    return cases


def _rnn_packed_cases(device, dtype, kind, batch, steps, hidden, gen) -> list[Case]:
    """``kind`` (GRU, LSTM, RNN) on one PackedSequence (built once, unsorted lengths) given to both modules; the
    gradient is taken with respect to its data."""
    copies = 4 if device.type == "cuda" else 1
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    template = torch.nn.utils.rnn.pack_padded_sequence(
        torch.zeros(batch, steps, 1), lengths, batch_first=True, enforce_sorted=False
    )
    layout = (template.batch_sizes, template.sorted_indices, template.unsorted_indices)
    layout = tuple(t.to(device) if i else t for i, t in enumerate(layout))  # batch_sizes stays on the CPU
    rows = int(lengths.sum())

    def make():
        data = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        return (data,), torch.randn(rows, hidden, device=device, dtype=dtype)

    def run(module):
        return lambda data: module(torch.nn.utils.rnn.PackedSequence(data, *layout))[0].data

    ref, ours = _rnn_pair(device, dtype, kind, hidden, batch_first=True)
    flops = 2 * rows * 2 * hidden * {"GRU": 3, "LSTM": 4, "RNN": 1}[kind] * hidden
    shape = f"B={batch} T={steps} in=hidden={hidden} packed"
    params = {"fastrec": tuple(ours.parameters()), f"nn.{kind}": tuple(ref.parameters())}
    forwards = {"fastrec": run(ours), f"nn.{kind}": run(ref)}
    io = 2 * rows * hidden * dtype.itemsize
    return _pair("rnn", kind, shape, _dtype_name(dtype), forwards, _rotating(make, copies), flops, io, params)


def _rnn_cell_cases(device, dtype, batch, input_size, hidden) -> list[Case]:
    """One GRUCell step (x and h given) against torch.nn.GRUCell."""
    copies = 4 if device.type == "cuda" else 1
    torch.manual_seed(0)
    ref = torch.nn.GRUCell(input_size, hidden, device=device, dtype=dtype)
    ours = copy.deepcopy(ref)
    fastrec.patch(ours)

    def make():
        x = torch.randn(batch, input_size, device=device, dtype=dtype, requires_grad=True)
        h = torch.randn(batch, hidden, device=device, dtype=dtype, requires_grad=True)
        return (x, h), torch.randn(batch, hidden, device=device, dtype=dtype)

    forwards = {"fastrec": lambda x, h, m=ours: m(x, h), "nn.GRUCell": lambda x, h, m=ref: m(x, h)}
    params = {"fastrec": tuple(ours.parameters()), "nn.GRUCell": tuple(ref.parameters())}
    flops = 2 * batch * (input_size + hidden) * 3 * hidden
    io = (2 * batch * hidden + batch * input_size + 3 * hidden * (input_size + hidden)) * dtype.itemsize
    shape = f"B={batch} in={input_size} hidden={hidden} step"
    inputs = _rotating(make, copies)
    return _pair("rnn", "GRUCell", shape, _dtype_name(dtype), forwards, inputs, flops, io, params)


def _cell_loop(cell: torch.nn.GRUCell, x: torch.Tensor) -> torch.Tensor:
    """The GRU4Rec reference code's recurrence: one nn.GRUCell call per step."""
    h = x.new_zeros(x.shape[0], cell.hidden_size)
    outputs = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        outputs.append(h)
    return torch.stack(outputs, dim=1)


# --------------------------------------------------------------------------- conv cases
def conv_cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """The seed CNN's conv + ReLU + 2x2 max-pool stages (fastrec.functional.conv2d with act and
    pool fused) against F.conv2d + F.relu + F.max_pool2d, and Conv1d over (B, d, L) + ReLU +
    max-over-time against F.conv1d + F.relu + F.max_pool1d."""
    dtype_name = str(dtype).removeprefix("torch.")
    copies = 4 if device.type == "cuda" else 1
    batches = (64, 256) if full or device.type == "cuda" else (64,)
    grid2d = [(b, c_in, c_out) for b in batches for c_in, c_out in ((32, 64), (1, 32))]
    cases: list[Case] = []
    for batch, c_in, c_out in grid2d:
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
        cases += _pair(
            "conv", "conv2d+relu+pool", shape, dtype_name, forwards, _rotating(make, copies), flops, io, params
        )
    grid1d = [(512, 64, 50, k) for k in (3, 5)] + ([(2048, 64, 50, 3)] if full else [])
    for batch, dim, length, k in grid1d:
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
        cases += _pair(
            "conv", "conv1d+relu+maxtime", shape, dtype_name, forwards, _rotating(make, copies), flops, io, params
        )
    return cases


# --------------------------------------------------------------------------- conv dispatch table
DISPATCH_MARGIN = 0.03  # cuDNN takes a class only when its summed time is at least 3% lower
# (batch, C_in, C_out, (KH, KW), (H, W), groups, padding, act, pool): recommender convolutions
# (the seed CNN's stages, 1x1 channel mixes, a depthwise 3x3, text-CNN / Caser-style 1-D
# convolutions with max over time, Caser's vertical conv), each with its usual epilogue.
DISPATCH_SHAPES = (
    (64, 3, 32, (3, 3), (32, 32), 1, (1, 1), "relu", (2, 2)),
    (64, 32, 64, (3, 3), (32, 32), 1, (1, 1), "relu", (2, 2)),
    (256, 32, 64, (3, 3), (16, 16), 1, (1, 1), "relu", (2, 2)),
    (64, 64, 128, (3, 3), (16, 16), 1, (1, 1), "relu", (1, 1)),
    (64, 64, 64, (1, 1), (32, 32), 1, (0, 0), "none", (1, 1)),
    (64, 64, 64, (3, 3), (32, 32), 64, (1, 1), "relu", (1, 1)),
    (512, 64, 64, (1, 3), (1, 50), 1, (0, 0), "relu", (1, 48)),
    (512, 64, 100, (1, 5), (1, 50), 1, (0, 0), "relu", (1, 46)),
    (512, 1, 16, (3, 64), (10, 64), 1, (0, 0), "relu", (8, 1)),
    (512, 1, 4, (10, 1), (10, 64), 1, (0, 0), "none", (1, 1)),
)


def _dispatch_case(device, dtype, batch, c_in, c_out, kernel, size, groups, padding, act, pool):
    """(shape class, description, {path: step} for each of conv_ops.CONV_PATHS): forward + every
    gradient of fastrec.functional.conv2d on the triton backend, forced onto each path."""
    from fastrec.ops import conv as conv_ops

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(c_out, c_in // groups, *kernel, generator=gen) / (c_in // groups * kernel[0] * kernel[1]) ** 0.5
    w = w.to(device, dtype).requires_grad_()
    b = torch.randn(c_out, generator=gen).to(device, dtype).requires_grad_()
    out = conv_ops.conv_output_size((batch, c_in, *size), w.shape, (1, 1), padding, (1, 1))

    def make():
        x = torch.randn(batch, c_in, *size, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(batch, c_out, out[0] // pool[0], out[1] // pool[1], generator=gen).to(device, dtype)
        return (x,), grad

    inputs = _rotating(make, 4 if device.type == "cuda" else 1)

    def forced(path):
        def forward(x):
            with backends.use_backend("triton"), conv_ops.use_conv_path(path):
                return fastrec.functional.conv2d(x, w, b, padding=padding, groups=groups, act=act, pool=pool)

        return _training_step(forward, inputs, (w, b))

    key = conv_ops.shape_class(c_in, c_out, kernel, out, groups, dtype)
    desc = f"B={batch} {c_in}->{c_out} {kernel[0]}x{kernel[1]} {size[0]}x{size[1]} g={groups} {act} pool {pool}"
    return key, desc, {path: forced(path) for path in conv_ops.CONV_PATHS}


def time_dispatch(device: torch.device, dtypes, rounds: int, min_round_s: float, progress=None) -> list[dict]:
    """Interleaved medians (ms) of the paths, forward + backward, per DISPATCH_SHAPES x dtype."""
    rows = []
    for dtype in dtypes:
        for shape in DISPATCH_SHAPES:
            key, desc, fns = _dispatch_case(device, dtype, *shape)
            ms = time_interleaved(fns, device, rounds, min_round_s)
            row = {"class": key, "shape": desc, "dtype": _dtype_name(dtype), **{f"{k}_ms": v for k, v in ms.items()}}
            rows.append(row)
            if progress:
                progress(row)
    return rows


def select_dispatch(rows: list[dict], margin: float = DISPATCH_MARGIN) -> dict[str, dict]:
    """Per shape class: each path's times summed over its measured shapes and the path, the fastest
    one where its sum is below (1 - margin) x the fused Triton path's (otherwise "triton" stays)."""
    from fastrec.ops import conv as conv_ops

    sums: dict[str, dict[str, float]] = {}
    for row in rows:
        total = sums.setdefault(row["class"], {})
        for path in conv_ops.CONV_PATHS:
            if f"{path}_ms" in row:
                total[path] = total.get(path, 0.0) + row[f"{path}_ms"]
    classes = {}
    for key, times in sorted(sums.items()):
        best = min(times, key=times.__getitem__)
        path = best if times[best] < times["triton"] * (1 - margin) else "triton"
        classes[key] = {"path": path, **{f"{p}_ms": round(t, 4) for p, t in times.items()}}
    return classes


def write_dispatch(path: str | Path, card: str, classes: dict[str, dict], env: dict) -> dict:
    """Write ``classes`` as ``card``'s entry of the table at ``path`` (other cards kept), in the
    format fastrec.ops.conv.parse_dispatch reads; returns the whole table."""
    from fastrec.ops import conv as conv_ops

    empty = {"version": conv_ops.DISPATCH_VERSION, "default": conv_ops.DEFAULT_PATH, "cards": {}}
    return _write_card_entry(path, card, "classes", classes, env, empty, conv_ops.parse_dispatch)


def _write_card_entry(path: str | Path, card: str, field: str, entries: dict, env: dict, empty: dict, parse) -> dict:
    """Set ``cards[card]`` of the JSON table at ``path`` (``empty`` if there is none; other cards
    kept) to ``entries`` under ``field`` with the date and versions of ``env``; ``parse`` checks
    the table before and after. Returns the whole table."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else empty
    parse(table, str(path))
    table.pop("note", None)
    table["cards"][card] = {
        "measured": env["date"],
        "torch": env["torch"],
        "triton": env["triton"],
        "commit": env["commit"],
        field: entries,
    }
    parse(table, str(path))
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table


def _table_writer_unusable(args, device: torch.device, flag: str, family: str, what: str) -> bool:
    """Say why (and return True) when a ``--write-*`` table writer cannot run with these arguments."""
    if device.type != "cuda":
        print(f"{flag} times {what}: it needs a CUDA device", file=sys.stderr)
        return True
    if args.family and family not in args.family:
        print(f"{flag} belongs to --family {family}", file=sys.stderr)
        return True
    return False


def dispatch_main(args, device: torch.device, dtypes: list[torch.dtype]) -> int:
    """``fastrec bench --family conv --write-dispatch PATH``: time the paths, write the table."""
    from fastrec.ops import conv as conv_ops

    if _table_writer_unusable(args, device, "--write-dispatch", "conv", "cuDNN against the Triton kernels"):
        return 2

    def progress(row: dict) -> None:
        times = "  ".join(f"{path} {row[f'{path}_ms']:.4f} ms" for path in conv_ops.CONV_PATHS)
        print(f"{row['class']:28s} {row['shape']:55s} {times}", flush=True)

    rows = time_dispatch(device, dtypes, args.rounds, args.min_round_s, progress)
    card = torch.cuda.get_device_name(device)
    write_dispatch(args.write_dispatch, card, select_dispatch(rows), environment(device))
    print(f"wrote {card}'s conv dispatch table to {args.write_dispatch}")
    return 0


# --------------------------------------------------------------------------- attention configs
# The tuner times each Triton attention kernel's candidate block configs on the bench's flag set
# (causal + right key padding, no dropout) and large-batch shapes, one kernel at a time (the
# backward's dK/dV pass with the default dQ pass, then the dQ pass with the chosen dK/dV pass),
# and keeps a candidate only if its median over TUNE_ROUNDS interleaved rounds beats the default
# config's by TUNE_MARGIN.
TUNE_SHAPES = ((1024, 2, 200), (1024, 2, 50))  # (B, H, L); times are summed over them
TUNE_HEAD_DIMS = (32, 64)  # one per BLOCK_D bucket that recommender head dims (17-64) fall in
TUNE_MARGIN = 0.05  # the H200 run saw one config's time move ~20% between two sweeps of 1 round
TUNE_ROUNDS = 5
_BF16_CANDIDATES = {
    "forward": ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)),
    "dkdv": ((32, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2)),
    "dq": ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 16, 4, 3), (128, 128, 8, 3)),
}
# (dtype class, BLOCK_D) -> kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the candidates
# that compile without spills for sm_90 (triton 3.6 and 3.9) with every flag the tuned table
# serves (causal, key padding, lengths) and with none; fp32 tiles need 8 warps, and at BLOCK_D=64
# few fit at all.
_TUNE_CANDIDATES = {
    ("16", 32): _BF16_CANDIDATES,
    ("16", 64): _BF16_CANDIDATES,
    ("32", 32): {
        "forward": ((64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 3)),
        "dkdv": ((32, 128, 8, 3), (16, 64, 4, 3), (32, 64, 8, 3), (16, 128, 8, 3)),
        "dq": ((128, 32, 8, 3), (64, 16, 4, 3), (64, 32, 8, 3), (64, 64, 8, 3)),
    },
    ("32", 64): {"forward": ((64, 32, 8, 2),), "dkdv": (), "dq": ((64, 16, 4, 3), (64, 32, 8, 3))},
}


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def tune_attention(device: torch.device, dtypes, progress=None) -> tuple[dict[str, dict], list[dict]]:
    """``(configs, rows)``: the table entries ({tuned_key: config and times}) that beat the default,
    and every candidate's measurement (``error`` for one that did not compile or run)."""
    from fastrec.kernels import attention as K

    configs: dict[str, dict] = {}
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for head_dim in TUNE_HEAD_DIMS:
            cases = []
            for batch, heads, length in TUNE_SHAPES:
                q, k, v, grad = (
                    torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype) for _ in range(4)
                )
                kpm = _padding_mask(batch, length, 0.3, False, device, gen)
                masks = (kpm, None, None, None, True, head_dim**-0.5, 0.0)
                out, lse = K.attention_forward(q, k, v, *masks)
                cases.append((q, k, v, grad, masks, out, lse, K.attention_backward(grad, q, k, v, out, lse, *masks)))

            def forward(cfg):
                return [functools.partial(K.attention_forward, *c[:3], *c[4], config=cfg) for c in cases]

            def backward(configs):  # configs: dkdv_config and dq_config
                return [
                    functools.partial(K.attention_backward, c[3], *c[:3], c[5], c[6], *c[4], **configs) for c in cases
                ]

            chosen: dict[str, K.BlockConfig] = {}
            for kernel in K.TUNED_KERNELS:
                key = K.tuned_key(kernel, dtype, K.block_d_for(head_dim))
                default = K.block_config(kernel, dtype, head_dim, interpreter=False)
                # the dK/dV pass is timed beside the default dQ pass, the dQ pass beside the chosen dK/dV
                fixed = dict(dq_config=K.block_config("dq", dtype, head_dim, False), dkdv_config=chosen.get("dkdv"))
                own = _TUNE_CANDIDATES["16" if dtype.itemsize == 2 else "32", K.block_d_for(head_dim)][kernel]
                candidates = [default] + [K.BlockConfig(*c) for c in own]
                runnable: dict[K.BlockConfig, list] = {}
                kernel_rows: dict[K.BlockConfig, dict] = {}
                for cfg in dict.fromkeys(candidates):  # default first, no repeats
                    row = {"key": key, "dtype": _dtype_name(dtype), "head_dim": head_dim, **asdict(cfg)}
                    kernel_rows[cfg] = row
                    try:  # compile, run and check each candidate before any timing
                        fns = forward(cfg) if kernel == "forward" else backward({**fixed, f"{kernel}_config": cfg})
                        _check_tuned(kernel, [fn() for fn in fns], cases)
                        runnable[cfg] = fns
                    except Exception as error:  # a candidate that does not compile, fit or agree
                        row["error"] = f"{type(error).__name__}: {error}"[:300]
                # Rounds over all candidates, the order reversed every other round, so that drift
                # (clocks, the compile pauses before) falls on every candidate alike; medians.
                order = list(runnable)
                for round_index in range(TUNE_ROUNDS):
                    for cfg in order if round_index % 2 == 0 else order[::-1]:
                        kernel_rows[cfg].setdefault("rounds_ms", []).append(sum(_median_ms(f) for f in runnable[cfg]))
                for cfg, row in kernel_rows.items():
                    if cfg in runnable:
                        row["ms"] = statistics.median(row["rounds_ms"])
                    rows.append(row)
                    if progress:
                        progress(row)
                timed = {cfg: kernel_rows[cfg]["ms"] for cfg in runnable}
                best = min(timed, key=timed.get, default=default)
                default_ms = timed.get(default, math.inf)
                chosen[kernel] = best if timed.get(best, math.inf) < default_ms * (1 - TUNE_MARGIN) else default
                if chosen[kernel] != default:
                    configs[key] = {**asdict(best), "ms": round(timed[best], 5), "default_ms": round(default_ms, 5)}
    return configs, rows


def _check_tuned(kernel: str, results: list, cases: list) -> None:
    """A candidate's outputs must match the default config's (same math, other tiling)."""
    for got, case in zip(results, cases, strict=True):
        want = case[5:7] if kernel == "forward" else case[7]
        for g, w in zip(got, want, strict=True):
            bound = 2e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
            finite = torch.isfinite(w)
            err = (g.float() - w.float())[finite].abs().max().item() if finite.any() else 0.0
            if not err <= bound * max(1.0, w.float()[finite].abs().max().item()):
                raise AssertionError(f"differs from the default config's result by {err:.3g}")


def write_configs(path: str | Path, card: str, configs: dict[str, dict], env: dict) -> dict:
    """Write ``configs`` as ``card``'s entry of the table at ``path`` (other cards kept), in the
    format fastrec.kernels.attention.parse_configs reads; returns the whole table."""
    from fastrec.kernels import attention as K

    empty = {"version": K.CONFIGS_VERSION, "cards": {}}
    return _write_card_entry(path, card, "configs", configs, env, empty, K.parse_configs)


def configs_main(args, device: torch.device, dtypes: list[torch.dtype]) -> int:
    """``fastrec bench --family attention --write-configs PATH``: tune, write the table."""
    if _table_writer_unusable(args, device, "--write-configs", "attention", "the Triton attention kernels"):
        return 2

    def progress(row: dict) -> None:
        tiles = f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
        result = f"{row['ms']:.4f} ms" if "ms" in row else row["error"]
        print(f"{row['key']:12s} {row['dtype']:9s} d={row['head_dim']:<3d} {tiles:18s} {result}", flush=True)

    card = torch.cuda.get_device_name(device)
    configs, rows = tune_attention(device, [d for d in (torch.bfloat16, torch.float32) if d in dtypes], progress)
    write_configs(args.write_configs, card, configs, environment(device))
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "configs": configs, "rows": rows}, indent=2))
    print(f"wrote {card}'s attention configs ({len(configs)} changed from the defaults) to {args.write_configs}")
    return 0


# --------------------------------------------------------------------------- caser cases
def _recbole_caser_loop(conv_h: torch.nn.ModuleList, conv_v: torch.nn.Conv2d, E: torch.Tensor):
    """RecBole's Caser convolutions: per height Conv2d + ReLU + max-pool over time, then the
    vertical conv flattened."""
    x = E.unsqueeze(1)
    pooled = []
    for conv in conv_h:
        conv_out = F.relu(conv(x).squeeze(3))
        pooled.append(F.max_pool1d(conv_out, conv_out.size(2)).squeeze(2))
    return torch.cat(pooled, 1), conv_v(x).view(E.shape[0], -1)


def caser_cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.CaserConv (every height in one launch) against RecBole's per-height loop of
    nn.Conv2d + ReLU + max_pool1d plus the vertical conv, with the same weights, nv = 4."""
    if full:
        grid = [(b, n, d, h) for b in (512, 2048) for n in (5, 10, 50) for d in (50, 64) for h in (8, 16)]
    else:
        grid = [(512, 10, 64, 8), (512, 5, 50, 16), (512, 50, 64, 8)]
    vertical = 4
    dtype_name = str(dtype).removeprefix("torch.")
    copies = 4 if device.type == "cuda" else 1
    cases: list[Case] = []
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
            "RecBole loop": lambda E, m=ref: _recbole_caser_loop(m.conv_h, m.conv_v, E),
        }
        params = {"fastrec": tuple(ours.parameters()), "RecBole loop": tuple(ref.parameters())}
        windows = filters * dim * length * (length + 1) * (length + 2) // 6  # valid multiply-adds per row
        flops = 2 * batch * (windows + vertical * length * dim)
        io = batch * (length * dim + length * filters + vertical * dim) * dtype.itemsize
        shape = f"B={batch} L={length} d={dim} nh={filters} nv={vertical}"
        cases += _pair("caser", "CaserConv", shape, dtype_name, forwards, _rotating(make, copies), flops, io, params)
    return cases


def _in_stream(module: torch.nn.Module, stream: str) -> Callable:
    """``module`` called under ``fastrec.use_dropout_stream(stream)``."""

    def forward(*args):
        with backends.use_dropout_stream(stream):
            return module(*args)

    return forward


def dropout_cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.Dropout vs torch.nn.Dropout (training mode) on SASRec's activations
    (B=512, L=50, d=64), p = 0.2 and 0.5, with the default stream (torch's masks on the CPU) and
    with fastrec's Philox stream; ``full`` adds d=256."""
    copies = 4 if device.type == "cuda" else 1
    shapes = [(512, 50, 64)] + ([(512, 50, 256)] if full else [])
    dtype_name = _dtype_name(dtype)
    cases: list[Case] = []
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
                cases += _pair("dropout", name, shape, dtype_name, forwards, _rotating(make, copies), 0.0, io)
    return cases


CASES: dict[str, Callable[[torch.device, torch.dtype, bool], list[Case]]] = {
    "attention": attention_cases,
    "rnn": rnn_cases,
    "conv": conv_cases,
    "caser": caser_cases,
    "dropout": dropout_cases,
}


# --------------------------------------------------------------------------- pytest-benchmark suites
def suite_device() -> tuple[torch.device, torch.dtype]:
    """The device and dtype the benchmarks/bench_<family>.py suites run on: CUDA bf16, else CPU fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def suite_params(cases: list[Case]) -> list:
    """One pytest param per (case, side), ids naming the case and the side."""
    import pytest

    return [
        pytest.param(case, side, id=f"{case.name}|{case.shape}|{case.mode}|{side}")
        for case in cases
        for side in case.fns
    ]


def suite_run(benchmark, case: Case, side: str) -> None:
    """Times one side of one case with pytest-benchmark, grouped by case (synchronised on CUDA)."""
    benchmark.group = f"{case.name} {case.shape} {case.mode}"
    fn = case.fns[side]
    if torch.cuda.is_available():
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)


# --------------------------------------------------------------------------- the run
def _ceilings(device: torch.device) -> dict[str, float]:
    """The card's measured copy bandwidth (bytes/s, read + write) and bf16 matmul rate."""
    if device.type != "cuda":
        return {}
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_interleaved({"copy": lambda: dst.copy_(src)}, device, 5, 0.05)["copy"]
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = time_interleaved({"mm": lambda: a @ a}, device, 5, 0.05)["mm"]
    return {"bandwidth": 2 * src.numel() * 4 / (copy_ms * 1e-3), "bf16_flops": 2 * 8192**3 / (mm_ms * 1e-3)}


def environment(device: torch.device) -> dict[str, object]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastrec": fastrec.__version__,
        "commit": commit,
        "backends": {k: v or "available" for k, v in backends.available().items()},
        "date": time.strftime("%Y-%m-%d"),
    }


def run(
    families: list[str],
    device: torch.device,
    dtypes: list[torch.dtype],
    full: bool,
    rounds: int,
    min_round_s: float,
    progress: Callable[[Result], None] | None = None,
) -> dict[str, object]:
    ceilings = _ceilings(device)
    results: list[Result] = []
    for family in families:
        for dtype in dtypes:
            for case in CASES[family](device, dtype, full):
                ms = time_interleaved(case.fns, device, rounds, min_round_s)
                result = Result(case.family, case.name, case.shape, case.dtype, case.mode, ms)
                result.speedup = {k: v / ms["fastrec"] for k, v in ms.items() if k != "fastrec"}
                seconds = ms["fastrec"] * 1e-3
                if case.flops:
                    result.tflops = case.flops / seconds / 1e12
                if ceilings:
                    result.bandwidth_fraction = case.bytes / seconds / ceilings["bandwidth"]
                    result.flops_fraction = case.flops / seconds / ceilings["bf16_flops"]
                results.append(result)
                if progress:
                    progress(result)
    return {"environment": environment(device), "ceilings": ceilings, "results": [asdict(r) for r in results]}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"fastrec {env['fastrec']} @ {env['commit']} on {env['device']} ({env['cpu_threads']} threads), "
        f"torch {env['torch']}, triton {env['triton']}, {env['date']}",
        "",
        "| family | case | shape | dtype | mode | speedup (baseline / fastrec) | fastrec ms | baseline ms | util |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
        base = ", ".join(f"{k} {v:.3f}" for k, v in r["ms"].items() if k != "fastrec")
        util = ""
        if r["bandwidth_fraction"] is not None:
            util = f"{100 * r['bandwidth_fraction']:.0f}% BW, {100 * r['flops_fraction']:.0f}% bf16 MMA"
        elif r["tflops"] is not None:
            util = f"{r['tflops'] * 1e3:.1f} GFLOP/s"
        lines.append(
            f"| {r['family']} | {r['name']} | {r['shape']} | {r['dtype']} | {r['mode']} | {speed} | "
            f"{r['ms']['fastrec']:.3f} | {base} | {util} |"
        )
    return "\n".join(lines)


def main(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        dtypes = [torch.float32, torch.bfloat16]
    else:
        dtypes = [torch.float32]
    if getattr(args, "write_dispatch", None):
        return dispatch_main(args, device, dtypes)
    if getattr(args, "write_configs", None):
        return configs_main(args, device, dtypes)
    families = args.family or list(CASES)

    done: list[dict] = []
    env = environment(device) if args.json else {}

    def progress(r: Result) -> None:
        speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.speedup.items())
        print(f"{r.family:10s} {r.name:18s} {r.shape:40s} {r.dtype:9s} {r.mode:17s} {speed}", flush=True)
        if args.json:  # the rows so far, so that a run cut short keeps them
            done.append(asdict(r))
            Path(args.json).write_text(json.dumps({"environment": env, "partial": True, "results": done}, indent=2))

    report = run(families, device, dtypes, args.full, args.rounds, args.min_round_s, progress)
    table = markdown(report)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0 if all(math.isfinite(v) for r in report["results"] for v in r["ms"].values()) else 1
