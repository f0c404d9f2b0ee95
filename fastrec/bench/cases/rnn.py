"""Recurrent rows: fastrec.nn.GRU/LSTM/RNN against torch's, the fused GRU against the GRU4Rec
reference code's nn.GRUCell loop, and single GRUCell steps."""

from __future__ import annotations

import copy

import torch

import fastrec
from fastrec.bench.harness import Case, input_copies, pair, rotating

GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}


def cases(device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """fastrec.nn.GRU/LSTM/RNN vs torch's (padded, batch_first; 16-bit rows also against
    torch's module in fp32, the fastest path a user could pick on CUDA); GRU and LSTM (and RNN with
    ``full``) on packed input (the same PackedSequence on both sides, lengths uniform in
    [1, T]); the fused GRU against the Python loop of nn.GRUCell that the GRU4Rec reference
    code runs; single cell steps (fastrec.nn.GRUCell vs torch.nn.GRUCell, hidden 100)."""
    gen = torch.Generator().manual_seed(0)
    # (batch, steps, hidden): the default set keeps `fastrec bench` short; ``full`` adds the rest
    # of the recommender envelope (batch 1-512, 20-200 steps, hidden 64-256).
    shapes = [(128, 50, 64)]
    if full:
        shapes += [(1, 50, 64), (32, 200, 64), (512, 20, 64), (128, 50, 128), (128, 50, 256), (512, 50, 128)]
    rows: list[Case] = []
    for batch, steps, hidden in shapes:
        rows += _padded_cases(device, dtype, batch, steps, hidden)
        for kind in ("GRU", "LSTM") + (("RNN",) if full else ()):
            rows += _packed_cases(device, dtype, kind, batch, steps, hidden, gen)
    for batch in (1, 64, 512):
        rows += _cell_cases(device, dtype, batch, 100, 100)
    return rows


def _module_pair(device, dtype, kind, hidden, **kwargs):
    """(torch module, patched deep copy) with the same weights, each with its weights in one
    flat buffer (``flatten_parameters``) so that cuDNN does not compact them at every call."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(hidden, hidden, device=device, dtype=dtype, **kwargs)
    ours = copy.deepcopy(ref)
    fastrec.patch(ours)
    ref.flatten_parameters()
    ours.flatten_parameters()
    return ref, ours


def _fp32_twin(ref: torch.nn.RNNBase) -> torch.nn.RNNBase | None:
    """An fp32 copy of a 16-bit torch module, weights flattened (torch's fp32 cuDNN path: a user
    with a 16-bit model may still run the RNN in fp32, often faster); None for fp32/fp64."""
    if ref.weight_ih_l0.dtype not in (torch.float16, torch.bfloat16):
        return None
    twin = copy.deepcopy(ref).float()
    twin.flatten_parameters()
    return twin


def _fp32_inputs(inputs):
    """``inputs`` (rotating 16-bit (tensors, grad) sets) as fp32 leaves, made once per set."""
    cache: dict[int, tuple] = {}

    def draw() -> tuple:
        tensors, grad = inputs()
        key = id(tensors[0])
        if key not in cache:
            cache[key] = (tuple(t.detach().float().requires_grad_() for t in tensors), grad.float())
        return cache[key]

    return draw


def _padded_cases(device, dtype, batch, steps, hidden) -> list[Case]:
    def make():
        x = torch.randn(batch, steps, hidden, device=device, dtype=dtype, requires_grad=True)
        return (x,), torch.randn(batch, steps, hidden, device=device, dtype=dtype)

    inputs = rotating(make, input_copies(device))
    rows: list[Case] = []
    for kind in ("GRU", "LSTM", "RNN"):
        ref, ours = _module_pair(device, dtype, kind, hidden, batch_first=True)
        flops = 2 * batch * steps * 2 * hidden * GATES[kind] * hidden
        forwards = {"fastrec": lambda x, m=ours: m(x)[0], f"nn.{kind}": lambda x, m=ref: m(x)[0]}
        params = {"fastrec": tuple(ours.parameters()), f"nn.{kind}": tuple(ref.parameters())}
        side_inputs = {}
        if (twin := _fp32_twin(ref)) is not None:
            forwards[f"nn.{kind} fp32"] = lambda x, m=twin: m(x)[0]
            params[f"nn.{kind} fp32"] = tuple(twin.parameters())
            side_inputs[f"nn.{kind} fp32"] = _fp32_inputs(inputs)
        if kind == "GRU":
            cell = torch.nn.GRUCell(hidden, hidden, device=device, dtype=dtype)
            cell.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
            forwards["GRUCell loop"] = lambda x, c=cell: _cell_loop(c, x)
            params["GRUCell loop"] = tuple(cell.parameters())
        shape = f"B={batch} T={steps} in=hidden={hidden} padded"
        io = 2 * batch * steps * hidden * dtype.itemsize
        rows += pair("rnn", kind, shape, dtype, forwards, inputs, flops, io, params, side_inputs=side_inputs)
    return rows


def _packed_cases(device, dtype, kind, batch, steps, hidden, gen) -> list[Case]:
    """``kind`` (GRU, LSTM, RNN) on one PackedSequence (built once, unsorted lengths) given to
    both modules; the gradient is taken with respect to its data."""
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

    ref, ours = _module_pair(device, dtype, kind, hidden, batch_first=True)
    flops = 2 * rows * 2 * hidden * GATES[kind] * hidden
    shape = f"B={batch} T={steps} in=hidden={hidden} packed"
    params = {"fastrec": tuple(ours.parameters()), f"nn.{kind}": tuple(ref.parameters())}
    forwards = {"fastrec": run(ours), f"nn.{kind}": run(ref)}
    io = 2 * rows * hidden * dtype.itemsize
    inputs = rotating(make, input_copies(device))
    side_inputs = {}
    if (twin := _fp32_twin(ref)) is not None:
        forwards[f"nn.{kind} fp32"] = run(twin)
        params[f"nn.{kind} fp32"] = tuple(twin.parameters())
        side_inputs[f"nn.{kind} fp32"] = _fp32_inputs(inputs)
    return pair("rnn", kind, shape, dtype, forwards, inputs, flops, io, params, side_inputs=side_inputs)


def _cell_cases(device, dtype, batch, input_size, hidden) -> list[Case]:
    """One GRUCell step (x and h given) against torch.nn.GRUCell."""
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
    inputs = rotating(make, input_copies(device))
    return pair("rnn", "GRUCell", shape, dtype, forwards, inputs, flops, io, params)


def _cell_loop(cell: torch.nn.GRUCell, x: torch.Tensor) -> torch.Tensor:
    """The GRU4Rec reference code's recurrence: one nn.GRUCell call per step."""
    h = x.new_zeros(x.shape[0], cell.hidden_size)
    outputs = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        outputs.append(h)
    return torch.stack(outputs, dim=1)
