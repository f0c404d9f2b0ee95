"""Drop-in recurrent modules: subclasses of ``torch.nn.RNN`` / ``GRU`` / ``LSTM``.

Only ``forward`` is overridden, so constructor, defaults, initialisation, parameters and
``state_dict`` are torch's by construction. Fused: any ``num_layers``, ``bidirectional``,
``batch_first``, ``bias``, dropout between layers, given or zero initial states, unbatched
input and ``PackedSequence`` input (returned packed, with torch's ordering of ``h_n``; run
fused only when a backend is forced, since torch's packed path is as fast for now; likewise
``LSTM`` on CPU, where oneDNN's LSTM ties the fused kernel).
``proj_size != 0`` and other uncovered calls run torch's own forward, counted in
``fastrec.stats()``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from fastrec import backends
from fastrec import functional as FF

_MODES = {"RNN_TANH": "tanh", "RNN_RELU": "relu", "GRU": "gru", "LSTM": "lstm"}


def _unfused_reason(module: torch.nn.RNNBase, input, hx) -> str | None:
    if getattr(module, "proj_size", 0):
        return "proj_size != 0"
    if module.mode not in _MODES:
        return f"mode {module.mode}"
    if isinstance(input, PackedSequence) and backends.forced() is None:
        # Measured on this CPU (GRU, B=128, T=50, lengths uniform in [1, 50]): the fused kernel
        # still steps finished rows, so it only ties torch's packed path (0.86x-1.08x); route to
        # the faster path unless a backend is forced (as the tests do).
        return "PackedSequence input (torch's packed path is as fast until the kernel skips finished rows)"
    data = input.data if isinstance(input, PackedSequence) else input
    if isinstance(data, Tensor) and data.device.type != "cpu" and backends.forced() is None:
        return "no Triton RNN kernel yet (torch's cuDNN path)"
    if module.mode == "LSTM" and isinstance(data, Tensor) and data.device.type == "cpu" and backends.forced() is None:
        # Measured by `fastrec bench --family rnn` (B=128, T=50, 64/64): oneDNN's LSTM and the
        # fused kernel tie (0.92x-1.11x), so the CPU LSTM stays on torch's path unless forced.
        return "LSTM on CPU (torch's oneDNN LSTM is as fast)"
    if not isinstance(data, Tensor) or data.is_nested:
        return "input is not a dense tensor"
    if torch.amp.is_autocast_available(data.device.type) and torch.is_autocast_enabled(data.device.type):
        # The fused recurrence takes one dtype for input, states and weights; under autocast its
        # input projection would come out in the autocast dtype and the states not.
        return "autocast enabled"
    if not isinstance(input, PackedSequence) and data.dim() not in (2, 3):
        return "input rank"  # torch raises its own error
    if data.numel() == 0:
        return "empty input"
    if data.shape[-1] != module.input_size:
        return "input size"  # torch raises its own error
    weight = module.weight_ih_l0
    if data.dtype != weight.dtype or data.device != weight.device:
        return "input dtype/device differs from the weights"
    states = hx if isinstance(hx, tuple) else (hx,)
    for t in states:
        if t is not None and (not isinstance(t, Tensor) or t.dtype != data.dtype or t.device != data.device):
            return "hx dtype/device differs from the input"
    return None


def _weights(module: torch.nn.RNNBase) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
    dirs = 2 if module.bidirectional else 1
    out = []
    for layer in range(module.num_layers):
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
            b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
            b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
            out.append((w_ih, w_hh, b_ih, b_hh))
    return out


def _fused_forward(module: torch.nn.RNNBase, input, hx):
    """Returns ``(output, h_n, c_n or None)`` in torch's forms."""
    mode = _MODES[module.mode]
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    if mode != "lstm" and isinstance(hx, tuple):
        raise TypeError(f"{type(module).__name__} expects hx as a Tensor, got a tuple")
    kwargs = dict(
        mode=mode,
        num_layers=module.num_layers,
        bidirectional=module.bidirectional,
        dropout=module.dropout,
        training=module.training,
    )
    if isinstance(input, PackedSequence):
        padded, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
        out, h_n, c_n = FF.rnn(padded, _weights(module), h0, c0, lengths=lengths, **kwargs)
        sorted_indices = input.sorted_indices
        if sorted_indices is not None:
            out = out.index_select(1, sorted_indices)
            lengths = lengths.index_select(0, sorted_indices.cpu())
        data, batch_sizes = torch._C._VariableFunctions._pack_padded_sequence(out, lengths, False)
        packed = PackedSequence(data, batch_sizes, sorted_indices, input.unsorted_indices)
        return packed, h_n, c_n
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(1)
        h0 = h0.unsqueeze(1) if h0 is not None else None
        c0 = c0.unsqueeze(1) if c0 is not None else None
    out, h_n, c_n = FF.rnn(input, _weights(module), h0, c0, batch_first=module.batch_first and batched, **kwargs)
    if not batched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    return out, h_n, c_n


class RNN(torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on fastrec's fused recurrence."""

    def forward(self, input, hx=None):
        reason = _unfused_reason(self, input, hx)
        if reason is not None:
            backends.count("RNN", "torch", reason)
            return super().forward(input, hx)
        out, h_n, _ = _fused_forward(self, input, hx)
        return out, h_n


class GRU(torch.nn.GRU):
    """``torch.nn.GRU`` on fastrec's fused recurrence."""

    def forward(self, input, hx=None):
        reason = _unfused_reason(self, input, hx)
        if reason is not None:
            backends.count("GRU", "torch", reason)
            return super().forward(input, hx)
        out, h_n, _ = _fused_forward(self, input, hx)
        return out, h_n


class LSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` on fastrec's fused recurrence (``proj_size`` runs torch's forward)."""

    def forward(self, input, hx=None):
        reason = _unfused_reason(self, input, hx)
        if reason is not None:
            backends.count("LSTM", "torch", reason)
            return super().forward(input, hx)
        out, h_n, c_n = _fused_forward(self, input, hx)
        return out, (h_n, c_n)
