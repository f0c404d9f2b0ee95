"""Drop-in recurrent modules: subclasses of ``torch.nn.RNN`` / ``GRU`` / ``LSTM``.

Only ``forward`` is overridden, so constructor, defaults, initialisation, parameters and
``state_dict`` are torch's by construction. Fused: any ``num_layers``, ``bidirectional``,
``batch_first``, ``bias``, dropout between layers, given or zero initial states, unbatched
input and ``PackedSequence`` input (returned packed, with torch's ordering of ``h_n``; only the
real rows are computed). Unless a backend is forced, some calls run torch's forward where it is
faster: padded CPU ``LSTM``, fp32/fp64 or packed CUDA input, CUDA cells (``fastrec.routing``).
``proj_size != 0`` and other uncovered calls run torch's own forward too; both are counted in
``fastrec.stats()``.

fastrec extensions, keyword-only on ``forward`` (padded, batched input):
``lengths`` ``(B,)`` in [1, T]: right-padded rows; outputs past a row's length are zero and
``h_n`` is each row's state at its own last step (the reverse direction starts there), as if
the batch had been packed. ``reset`` bool ``(B, T)`` if ``batch_first`` else ``(T, B)``: the
hidden (and cell) state of row b restarts at zero before step t where set, for
session-parallel batches. Both always run the fused path (torch has no such options); a
``lengths`` tensor on the input's device is checked there, with no host sync, and under CUDA
autocast the Triton recurrence runs in the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastrec import backends, routing
from fastrec import functional as FF
from fastrec.ops import rnn as rnn_ops

_MODES = {"RNN_TANH": "tanh", "RNN_RELU": "relu", "GRU": "gru", "LSTM": "lstm"}


def _unfused_reason(module: torch.nn.RNNBase, input, hx) -> str | None:
    """Why this call runs torch's forward, or None: what the fused path does not cover, then the
    routes to torch's op (``fastrec.routing.rnn``)."""
    if getattr(module, "proj_size", 0):
        return "proj_size != 0"
    if module.mode not in _MODES:
        return f"mode {module.mode}"
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if isinstance(data, Tensor) and data.device.type not in ("cpu", "cuda") and backends.forced() is None:
        return f"no fused RNN kernel for {data.device.type} tensors"
    if not isinstance(data, Tensor) or data.is_nested:
        return "input is not a dense tensor"
    if backends.autocast_dtype(data.device.type) is not None and (
        backends.forced() != "triton" or _autocast_to(data) is None
    ):
        # The fused recurrence takes one dtype for input, states and weights; under autocast its
        # input projection would come out in the autocast dtype and the states not. The forced
        # Triton recurrence (and ``lengths`` / ``reset`` on CUDA) runs in the autocast dtype.
        return "autocast enabled"
    if not packed and data.dim() not in (2, 3):
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
    return routing.rnn(module.mode, data, packed)


def _autocast_to(data: Tensor) -> torch.dtype | None:
    """The dtype the fused path casts input, states and weights to under autocast, or None: the
    16-bit autocast dtype on CUDA tensors or under the forced triton backend (the Triton
    recurrence runs 16-bit); the C++ kernels compute in fp32 / fp64 and take no cast."""
    dtype = backends.autocast_dtype(data.device.type)
    if dtype not in (torch.float16, torch.bfloat16) or data.dtype not in (torch.float32, torch.float64):
        return None
    return dtype if data.device.type == "cuda" or backends.forced() == "triton" else None


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


def _cast(weights, hx, dtype: torch.dtype):
    """Weights and states in ``dtype`` (autocast's; the casts are differentiable, as autocast's)."""
    cast = lambda t: t.to(dtype) if t is not None else None
    weights = [tuple(cast(w) for w in ws) for ws in weights]
    hx = tuple(cast(t) for t in hx) if isinstance(hx, tuple) else cast(hx)
    return weights, hx


def _fused_forward(module: torch.nn.RNNBase, input, hx, lengths=None, reset=None):
    """Returns ``(output, h_n, c_n or None)`` in torch's forms."""
    if getattr(module, "proj_size", 0):
        raise ValueError("lengths and reset are not supported with proj_size != 0")
    mode = _MODES[module.mode]
    weights = _weights(module)
    data = input.data if isinstance(input, PackedSequence) else input
    dtype = _autocast_to(data) if isinstance(data, Tensor) else None
    if dtype is not None:
        weights, hx = _cast(weights, hx, dtype)
        input = input.to(dtype)
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
        if lengths is not None or reset is not None:
            raise ValueError("lengths and reset apply to padded input, got a PackedSequence")
        # torch's convention: states are given and returned in the caller's batch order, the
        # packed rows are in sorted order.
        order, unorder = input.sorted_indices, input.unsorted_indices
        if order is not None:
            h0 = h0.index_select(1, order) if h0 is not None else None
            c0 = c0.index_select(1, order) if c0 is not None else None
        out, h_n, c_n = FF.rnn_packed(input.data, input.batch_sizes, weights, h0, c0, **kwargs)
        if unorder is not None:
            h_n = h_n.index_select(1, unorder)
            c_n = c_n.index_select(1, unorder) if c_n is not None else None
        return PackedSequence(out, input.batch_sizes, order, unorder), h_n, c_n
    batched = input.dim() == 3
    if not batched and (lengths is not None or reset is not None):
        raise ValueError(f"lengths and reset need batched (3-D) input, got shape {tuple(input.shape)}")
    if not batched:
        input = input.unsqueeze(1)
        h0 = h0.unsqueeze(1) if h0 is not None else None
        c0 = c0.unsqueeze(1) if c0 is not None else None
    out, h_n, c_n = FF.rnn(
        input,
        weights,
        h0,
        c0,
        batch_first=module.batch_first and batched,
        lengths=lengths,
        reset=reset,
        **kwargs,
    )
    if not batched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    return out, h_n, c_n


class _FusedForward:
    """``forward`` of the drop-in RNN modules, a base listed before the torch class it overrides:
    torch's forward where ``_unfused_reason`` gives a reason (and neither ``lengths`` nor ``reset`` is
    given), counted in ``fastrec.stats()`` as ``_STATS_OP``; else the fused recurrence."""

    _STATS_OP: str

    def forward(self, input, hx=None, *, lengths: Tensor | None = None, reset: Tensor | None = None):
        """torch's forward, plus the ``lengths`` / ``reset`` extensions (module docstring)."""
        reason = _unfused_reason(self, input, hx)
        if reason is not None and lengths is None and reset is None:
            backends.count(self._STATS_OP, "torch", reason)
            return super().forward(input, hx)
        out, h_n, c_n = _fused_forward(self, input, hx, lengths, reset)
        return (out, (h_n, c_n)) if self.mode == "LSTM" else (out, h_n)


class RNN(_FusedForward, torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on fastrec's fused recurrence."""

    _STATS_OP = "RNN"


class GRU(_FusedForward, torch.nn.GRU):
    """``torch.nn.GRU`` on fastrec's fused recurrence."""

    _STATS_OP = "GRU"


class LSTM(_FusedForward, torch.nn.LSTM):
    """``torch.nn.LSTM`` on fastrec's fused recurrence (``proj_size`` runs torch's forward)."""

    _STATS_OP = "LSTM"


# --------------------------------------------------------------------------- single-step cells
def _cell_unfused_reason(module: torch.nn.RNNCellBase, input, hx) -> str | None:
    """Why torch's forward runs this call, or None (lean: a GRU4Rec loop calls it per step)."""
    if not isinstance(input, Tensor) or input.dim() not in (1, 2) or input.shape[-1] != module.input_size:
        return "input shape"  # torch raises its own error
    dtype, cpu = input.dtype, input.is_cpu
    weight = module._parameters["weight_ih"]
    if dtype != weight.dtype or not (cpu and weight.is_cpu) and input.device != weight.device:
        return "input dtype/device differs from the weights"
    if hx is None:
        return None
    if isinstance(hx, tuple) != isinstance(module, torch.nn.LSTMCell):
        return "hx form"  # LSTMCell takes (h, c), the others a tensor: torch raises its own error
    rank, hidden = input.dim(), module.hidden_size
    for t in hx if isinstance(hx, tuple) else (hx,):
        if not isinstance(t, Tensor) or t.dtype != dtype or t.is_cpu != cpu or not cpu and t.device != input.device:
            return "hx dtype/device differs from the input"
        if t.dim() != rank or t.shape[-1] != hidden or rank == 2 and t.shape[0] != input.shape[0]:
            return "hx shape"  # torch raises its own error
    return None


def _cell_forward(module: torch.nn.RNNCellBase, mode: str, input: Tensor, hx):
    """torch's cell conventions around the fused step: unbatched (1-D) input, hx None = zeros.
    The arguments were checked by ``_cell_unfused_reason`` (and the weights have their shapes
    by construction), so this calls the op layer directly: a GRU4Rec loop calls it per step."""
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    zeros = input.new_zeros(input.shape[0], module.hidden_size) if hx is None else None
    params = module._parameters
    bias = (params["bias_ih"], params["bias_hh"]) if module.bias else (None, None)
    if mode == "lstm":
        h, c = hx if hx is not None else (zeros, zeros)
        if not batched and hx is not None:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        h, c = rnn_ops.rnn_cell(input, h, c, params["weight_ih"], params["weight_hh"], *bias, mode)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
    h = hx if hx is not None else zeros
    if not batched and hx is not None:
        h = h.unsqueeze(0)
    h, _ = rnn_ops.rnn_cell(input, h, None, params["weight_ih"], params["weight_hh"], *bias, mode)
    return h if batched else h.squeeze(0)


class _FusedCellForward:
    """``forward`` of the drop-in cells, a base listed before the torch class it overrides:
    torch's forward where ``_cell_unfused_reason`` gives a reason, counted in ``fastrec.stats()``
    as ``_STATS_OP``; else one fused step of ``_CELL_MODE`` (None: the module's nonlinearity)."""

    _STATS_OP: str
    _CELL_MODE: str | None

    def forward(
        self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """torch's forward: ``h'`` (``(h', c')`` for LSTMCell)."""
        reason = _cell_unfused_reason(self, input, hx)
        if reason is not None:
            backends.count(self._STATS_OP, "torch", reason)
            return super().forward(input, hx)
        return _cell_forward(self, self._CELL_MODE or self.nonlinearity, input, hx)


class RNNCell(_FusedCellForward, torch.nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) as one fused op per step (forward and backward)."""

    _STATS_OP, _CELL_MODE = "RNNCell", None


class GRUCell(_FusedCellForward, torch.nn.GRUCell):
    """``torch.nn.GRUCell`` as one fused op per step (forward and backward)."""

    _STATS_OP, _CELL_MODE = "GRUCell", "gru"


class LSTMCell(_FusedCellForward, torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` as one fused op per step (forward and backward)."""

    _STATS_OP, _CELL_MODE = "LSTMCell", "lstm"
