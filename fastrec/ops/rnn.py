"""Recurrent layers (Elman tanh/relu, GRU, LSTM): one layer and one direction per call.

The C++ ops (``csrc/rnn.cpp``, contract in their docstring) and the Triton ops
(``kernels/rnn.py``, the same contract; CUDA tensors, or CPU tensors in Triton's interpreter) run
the fused recurrence on a precomputed input projection; this module does the big GEMMs around them:

- forward: ``gx = x W_ih^T + b_ih`` for all T*B rows as one GEMM, then ``rnn_forward_<backend>``;
- backward: ``rnn_backward_<backend>`` gives the per-step pre-activation gradients ``dgx``/``dgh``
  and the entering states ``hprev``; then ``dx = dgx W_ih``, ``dW_ih = dgx^T x``,
  ``db_ih = sum dgx``, ``dW_hh = dgh^T hprev``, ``db_hh = sum dgh``.

Semantics (every backend): x ``(T, B, I)`` time-major, ``(B, T, I)`` when ``batch_first``, or
``(N, I)`` packed rows in ``PackedSequence`` order when ``batch_sizes`` (int64 ``(T,)``,
non-increasing, ``batch_sizes[0] = B``) is given; ``out`` and the workspace share x's layout.
``h0``/``c0`` ``(B, H)``; ``lengths`` int32 ``(B,)`` in [1, T] (row b runs steps
``0..len_b-1``; past it ``out = 0`` and the state is frozen); ``reverse`` runs each row from
``len_b - 1`` down to 0; ``reset`` bool ``(T, B)`` (``(B, T)`` when ``batch_first``) zeroes a
row's state before step t. The workspace is ``(.., K*H)`` fp32 (fp64 for fp64), K = 2
(tanh/relu), 5 (gru), 6 (lstm). ``c_n`` is a ``(0, 0)`` tensor for non-LSTM modes.

Packed input is the cheap case: the projection GEMMs run over the N = sum(lengths) real rows
only, and the recurrence steps only the ``batch_sizes[t]`` rows still running at step t (both
backends: the Triton kernels take the packed layout natively, ``batch_sizes`` on the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrec import backends, routing
from fastrec.kernels._common import TRITON_DTYPES

OP = "rnn"
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
SLOTS = {"tanh": 2, "relu": 2, "gru": 5, "lstm": 6}
_CELLS = {"tanh": torch.rnn_tanh_cell, "relu": torch.rnn_relu_cell, "gru": torch.gru_cell}
HAVE_CPP = (
    backends.available()["cpp"] is None
    and hasattr(torch.ops.fastrec, "rnn_forward_cpp")
    and hasattr(torch.ops.fastrec, "rnn_backward_cpp")
    and hasattr(torch.ops.fastrec, "rnn_project_cpp")
)


# --------------------------------------------------------------------------- torch reference
def rnn_layer_torch(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reset: Tensor | None,
    mode: str,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """torch's cells in a Python loop over time, differentiated by autograd (the reference)."""
    steps, batch, _ = x.shape
    hidden = h0.shape[1]
    h, c = h0, c0
    if lengths is None and reset is None:  # the plain case: no masking
        outs = []
        for s in range(steps):
            t = steps - 1 - s if reverse else s
            if mode == "lstm":
                h, c = torch.lstm_cell(x[t], (h, c), w_ih, w_hh, b_ih, b_hh)
            else:
                h = _CELLS[mode](x[t], h, w_ih, w_hh, b_ih, b_hh)
            outs.append(h)
        if reverse:
            outs.reverse()
        out = torch.stack(outs) if outs else x.new_zeros(0, batch, hidden)
    else:
        rows = torch.arange(batch, device=x.device)
        lens = torch.full((batch,), steps, device=x.device) if lengths is None else lengths.long()
        out = x.new_zeros(steps, batch, hidden)
        for s in range(steps):
            active = s < lens
            t = torch.where(active, lens - 1 - s if reverse else torch.full_like(lens, s), 0)
            x_t = x[t, rows]
            if reset is not None:
                zero = (reset[t, rows] & active)[:, None]
                h = torch.where(zero, 0.0, h)
                c = torch.where(zero, 0.0, c) if c is not None else None
            if mode == "lstm":
                h_new, c_new = torch.lstm_cell(x_t, (h, c), w_ih, w_hh, b_ih, b_hh)
                c = torch.where(active[:, None], c_new, c)
            else:
                h_new = _CELLS[mode](x_t, h, w_ih, w_hh, b_ih, b_hh)
            h = torch.where(active[:, None], h_new, h)
            out = out.index_put((t[active], rows[active]), h_new[active])
    c_n = c if mode == "lstm" else h0.new_zeros(0, 0)
    return out, h, c_n


# --------------------------------------------------------------------------- registered ops
def _ws_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_forward(
    gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, batch_first=False, batch_sizes=None, need_workspace=True
):
    lead = gx.shape[:-1]
    batch, hidden = h0.shape
    out = gx.new_empty(*lead, hidden)
    h_n = h0.new_empty(batch, hidden)
    c_n = h0.new_empty(batch, hidden) if mode == "lstm" else h0.new_empty(0, 0)
    workspace = gx.new_empty(*lead, SLOTS[mode] * hidden if need_workspace else 0, dtype=_ws_dtype(gx))
    return out, h_n, c_n, workspace


def _fake_backward(grad_out, grad_h_n, grad_c_n, workspace, w_hh, b_hh, h0, c0, lengths, reset, mode, *rest):
    lead = grad_out.shape[:-1]
    batch, hidden = h0.shape
    gh = GATES[mode] * hidden
    grad_c0 = h0.new_empty(batch, hidden) if mode == "lstm" else h0.new_empty(0, 0)
    return (
        h0.new_empty(*lead, gh),
        h0.new_empty(*lead, gh),
        h0.new_empty(batch, hidden),
        grad_c0,
        h0.new_empty(*lead, hidden),
    )


def _fake_project(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


if HAVE_CPP:
    torch.library.register_fake("fastrec::rnn_project_cpp")(_fake_project)
    torch.library.register_fake("fastrec::rnn_forward_cpp")(_fake_forward)
    torch.library.register_fake("fastrec::rnn_backward_cpp")(_fake_backward)


# --------------------------------------------------------------------------- triton ops
@backends.triton_op("rnn_forward_triton")
def rnn_forward_triton(
    gx: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reset: Tensor | None,
    mode: str,
    reverse: bool,
    allow_tf32: bool,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``rnn_forward_cpp``'s contract on the Triton kernels, time-major or packed (``batch_sizes``
    on the CPU, as PackedSequence holds it); ``allow_tf32``: fp32 dots may use TF32."""
    from fastrec.kernels import rnn as kernels

    return kernels.rnn_forward(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, allow_tf32, batch_sizes)


@backends.triton_op("rnn_backward_triton")
def rnn_backward_triton(
    grad_out: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor | None,
    workspace: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    lengths: Tensor | None,
    reset: Tensor | None,
    mode: str,
    reverse: bool,
    allow_tf32: bool,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``rnn_backward_cpp``'s contract on the Triton kernels, time-major or packed."""
    from fastrec.kernels import rnn as kernels

    return kernels.rnn_backward(
        grad_out,
        grad_h_n,
        grad_c_n,
        workspace,
        w_hh,
        b_hh,
        h0,
        c0,
        lengths,
        reset,
        mode,
        reverse,
        allow_tf32,
        batch_sizes,
    )


@rnn_forward_triton.register_fake
def _fake_forward_triton(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, allow_tf32, batch_sizes=None):
    return _fake_forward(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, batch_sizes=batch_sizes)


@rnn_backward_triton.register_fake
def _fake_backward_triton(*args):
    return _fake_backward(*args[:12])


def _forward_triton(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, batch_sizes):
    tf32 = backends.allow_tf32(gx)
    return rnn_forward_triton(gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, tf32, batch_sizes)


def _backward_triton(
    grad_out, grad_h_n, grad_c_n, workspace, w_hh, b_hh, h0, c0, lengths, reset, mode, reverse, batch_sizes
):
    tf32 = backends.allow_tf32(h0)
    return rnn_backward_triton(
        grad_out, grad_h_n, grad_c_n, workspace, w_hh, b_hh, h0, c0, lengths, reset, mode, reverse, tf32, batch_sizes
    )


def _project(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x (.., I) -> x W^T + b`` as one GEMM over all rows, ``(.., G*H)`` contiguous (on the CPU
    into a huge-page buffer, see csrc/buffers.h)."""
    flat = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and HAVE_CPP:
        out = torch.ops.fastrec.rnn_project_cpp(flat, w, b)
    else:
        out = torch.mm(flat, w.t()) if b is None else torch.addmm(b, flat, w.t())
    return out.view(*x.shape[:-1], w.shape[0])


class RNNLayerFunction(torch.autograd.Function):
    """One layer, one direction; the input projection and the weight gradients as big GEMMs
    over the real rows. ``backend`` "cpp" takes any of the three layouts; "triton" time-major
    or packed (``rnn_layer`` transposes batch-first input with ``time_major_call``)."""

    @staticmethod
    def forward(
        ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, reverse, batch_first, batch_sizes, backend
    ):
        gx = _project(x, w_ih, b_ih)
        if backend == "triton":
            out, h_n, c_n, workspace = _forward_triton(
                gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, batch_sizes
            )
        else:
            out, h_n, c_n, workspace = torch.ops.fastrec.rnn_forward_cpp(
                gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, batch_first, batch_sizes
            )
        ctx.save_for_backward(x, w_ih, w_hh, b_hh, h0, c0, lengths, reset, batch_sizes, workspace)
        ctx.flags = (mode, reverse, batch_first, b_ih is not None, b_hh is not None, backend)
        if mode != "lstm":
            ctx.mark_non_differentiable(c_n)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        x, w_ih, w_hh, b_hh, h0, c0, lengths, reset, batch_sizes, workspace = ctx.saved_tensors
        mode, reverse, batch_first, has_b_ih, has_b_hh, backend = ctx.flags
        size = x.shape[-1]
        grads = (grad_out.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous() if mode == "lstm" else None)
        state = (workspace, w_hh, b_hh, h0, c0, lengths, reset, mode, reverse)
        if backend == "triton":
            grad_gx, grad_gh, grad_h0, grad_c0, hprev = _backward_triton(*grads, *state, batch_sizes)
        else:
            grad_gx, grad_gh, grad_h0, grad_c0, hprev = torch.ops.fastrec.rnn_backward_cpp(
                *grads, *state, batch_first, batch_sizes
            )
        gates = grad_gx.shape[-1]
        rows = grad_gx.shape[:-1].numel()
        dgx = grad_gx.view(rows, gates).to(x.dtype)
        dgh = grad_gh.view(rows, gates).to(w_hh.dtype)
        need = ctx.needs_input_grad
        grad_x = torch.mm(dgx, w_ih).view(x.shape) if need[0] else None
        grad_w_ih = torch.mm(dgx.t(), x.reshape(rows, size)) if need[3] else None
        grad_w_hh = torch.mm(dgh.t(), hprev.view(rows, -1).to(w_hh.dtype)) if need[4] else None
        grad_b_ih = dgx.sum(0) if has_b_ih and need[5] else None
        grad_b_hh = dgh.sum(0) if has_b_hh and need[6] else None
        grad_c0 = grad_c0 if mode == "lstm" else None
        return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh) + (None,) * 7


def _unfused_reason(x: Tensor, h0: Tensor, mode: str) -> str | None:
    """Why the fused kernels (cpp on CPU, triton on CUDA or forced) do not cover this call, or None."""
    if x.device.type not in ("cpu", "cuda"):
        return f"no fused rnn kernel for {x.device.type} tensors"
    if x.device.type == "cpu" and not HAVE_CPP and backends.forced() != "triton":
        return "fastrec._C does not register rnn_forward_cpp"
    if h0.shape[1] > 1024:
        return "hidden_size > 1024"
    if x.shape[:-1].numel() == 0 or h0.shape[0] == 0:
        return "empty input"
    return None


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rnn_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reset: Tensor | None,
    mode: str,
    reverse: bool,
    batch_first: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction on canonical inputs (see the module docstring)."""
    reason = _unfused_reason(x, h0, mode)
    backend = backends.select(x.device, reason)
    backends.count(OP, backend, reason or "")
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, reverse)
    if backend == "cpp":
        if not _needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh):  # inference: no workspace written
            out, h_n, c_n, _ = torch.ops.fastrec.rnn_forward_cpp(
                _project(x, w_ih, b_ih),
                h0,
                c0,
                w_hh,
                b_hh,
                lengths,
                reset,
                mode,
                reverse,
                batch_first,
                batch_sizes,
                False,
            )
            return out, h_n, c_n
        return RNNLayerFunction.apply(*args, batch_first, batch_sizes, "cpp")
    if backend == "triton":
        if batch_sizes is not None:  # the packed layout natively: no pad / unpad copies
            return RNNLayerFunction.apply(*args, False, batch_sizes, "triton")
        fn = lambda *a: RNNLayerFunction.apply(*a, False, None, "triton")
        return time_major_call(fn, *args, batch_first=batch_first, batch_sizes=None)
    return time_major_call(rnn_layer_torch, *args, batch_first=batch_first, batch_sizes=batch_sizes)


def time_major_call(fn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, reverse, *, batch_first, batch_sizes):
    """Runs ``fn`` (a time-major layer: x ``(T, B, I)``, reset ``(T, B)``) on x in any layout,
    converting the input and the output (packed rows go through padding with their lengths)."""
    if batch_sizes is not None:
        padded, lens = pad_packed_sequence(PackedSequence(x, batch_sizes))
        out, h_n, c_n = fn(padded, h0, c0, w_ih, w_hh, b_ih, b_hh, lens.to(torch.int32), None, mode, reverse)
        return pack_padded_sequence(out, lens).data, h_n, c_n
    if batch_first:
        reset = reset.t() if reset is not None else None
        out, h_n, c_n = fn(x.transpose(0, 1), h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, reverse)
        return out.transpose(0, 1), h_n, c_n
    return fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, reverse)


# --------------------------------------------------------------------------- single-step cells
CELL_SLOTS = {"tanh": 1, "relu": 1, "gru": 4, "lstm": 5}
CELL_OP = "rnn_cell"
_CELL_DTYPES = (torch.float32, torch.float64)
HAVE_CELL_CPP = (
    backends.available()["cpp"] is None
    and hasattr(torch.ops.fastrec, "rnn_cell_forward_cpp")
    and hasattr(torch.ops.fastrec, "rnn_cell_backward_cpp")
)


def _fake_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh, mode):
    batch, hidden = h.shape
    c_new = h.new_empty(batch, hidden) if mode == "lstm" else h.new_empty(0, 0)
    return h.new_empty(batch, hidden), c_new, h.new_empty(batch, CELL_SLOTS[mode] * hidden)


def _fake_cell_backward(grad_h_new, grad_c_new, workspace, x, h, c, w_ih, w_hh, has_bias, mode):
    batch, hidden = h.shape
    bias = GATES[mode] * hidden if has_bias else 0
    return (
        x.new_empty(x.shape),
        h.new_empty(batch, hidden),
        h.new_empty(batch, hidden) if mode == "lstm" else h.new_empty(0, 0),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        h.new_empty(bias),
        h.new_empty(bias),
    )


if HAVE_CELL_CPP:
    torch.library.register_fake("fastrec::rnn_cell_forward_cpp")(_fake_cell_forward)
    torch.library.register_fake("fastrec::rnn_cell_backward_cpp")(_fake_cell_backward)
    # the overloads themselves: calling them skips the packet's overload resolution (per step)
    _cell_forward_op = torch.ops.fastrec.rnn_cell_forward_cpp.default
    _cell_backward_op = torch.ops.fastrec.rnn_cell_backward_cpp.default


def rnn_cell_torch(x, h, c, w_ih, w_hh, b_ih, b_hh, mode) -> tuple[Tensor, Tensor | None]:
    """torch's own cell functions (the reference): ``(h_new, c_new or None)``."""
    if mode == "lstm":
        return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    return _CELLS[mode](x, h, w_ih, w_hh, b_ih, b_hh), None


def _cell_forward(backend, x, h, c, w_ih, w_hh, b_ih, b_hh, mode):
    """The forward op of ``backend`` ("cpp" or "triton"): ``(h_new, c_new, workspace)``."""
    if backend == "cpp":
        return _cell_forward_op(x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
    return rnn_cell_forward_triton(x, h, c, w_ih, w_hh, b_ih, b_hh, mode, backends.allow_tf32(x))


class RNNCellFunction(torch.autograd.Function):
    """One step of one cell. cpp: both GEMMs and the gate arithmetic in one op, every gradient
    (input, state, weights, biases) in one op; triton: one fused kernel forward, the gate
    gradients by one kernel and the input / state / weight / bias gradients as GEMMs backward."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh, mode, backend):
        h_new, c_new, workspace = _cell_forward(backend, x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, workspace)
        ctx.flags = (mode, b_ih is not None, backend)
        if mode != "lstm":
            ctx.mark_non_differentiable(c_new)
        return h_new, c_new

    @staticmethod
    def backward(ctx, grad_h_new, grad_c_new):
        x, h, c, w_ih, w_hh, workspace = ctx.saved_tensors
        mode, has_bias, backend = ctx.flags
        lstm = mode == "lstm"
        op = _cell_backward_op if backend == "cpp" else rnn_cell_backward_triton
        dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh = op(
            grad_h_new, grad_c_new if lstm else None, workspace, x, h, c, w_ih, w_hh, has_bias, mode
        )
        bias = (db_ih, db_hh) if has_bias else (None, None)
        return dx, dh, dc if lstm else None, dw_ih, dw_hh, *bias, None, None


# --------------------------------------------------------------------------- triton cells
_CELL_TRITON_DTYPES = tuple(TRITON_DTYPES)


@backends.triton_op("rnn_cell_forward_triton")
def rnn_cell_forward_triton(
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    mode: str,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``rnn_cell_forward_cpp``'s contract on the Triton kernel (also fp16 / bf16; the workspace
    in the compute dtype; ``allow_tf32``: fp32 dots may use TF32)."""
    from fastrec.kernels import rnn as kernels

    return kernels.rnn_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh, mode, allow_tf32)


@backends.triton_op("rnn_cell_backward_triton")
def rnn_cell_backward_triton(
    grad_h_new: Tensor,
    grad_c_new: Tensor | None,
    workspace: Tensor,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    has_bias: bool,
    mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``rnn_cell_backward_cpp``'s contract on the Triton kernel (gate gradients) and GEMMs."""
    from fastrec.kernels import rnn as kernels

    return kernels.rnn_cell_backward(grad_h_new, grad_c_new, workspace, x, h, c, w_ih, w_hh, has_bias, mode)


@rnn_cell_forward_triton.register_fake
def _fake_cell_forward_triton(x, h, c, w_ih, w_hh, b_ih, b_hh, mode, allow_tf32):
    h_new, c_new, _ = _fake_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
    return h_new, c_new, h.new_empty(h.shape[0], CELL_SLOTS[mode] * h.shape[1], dtype=_ws_dtype(h))


@rnn_cell_backward_triton.register_fake
def _fake_cell_backward_triton(*args):
    return _fake_cell_backward(*args)


def _cell_triton_unfused_reason(x: Tensor) -> str | None:
    """Why the Triton cell (CUDA, or forced on CPU = interpreter) does not cover this call, or None."""
    if x.dtype not in _CELL_TRITON_DTYPES:
        return f"{x.dtype} cell (the Triton cell takes float16 / bfloat16 / float32 / float64)"
    return None


CELL_CUDA_ROUTE = routing.RNN_CELL_CUDA.reason  # what stats() records for a routed CUDA cell step


def _cell_unfused_reason(x: Tensor, mode: str) -> str | None:
    """Why the fused cells (cpp on CPU, triton on CUDA or forced) do not cover this call, or None."""
    if x.device.type == "cuda" or backends.forced() == "triton":
        return _cell_triton_unfused_reason(x)
    if x.device.type != "cpu":
        return f"no fused rnn cell kernel for {x.device.type} tensors (torch's cell)"
    if not HAVE_CELL_CPP:
        return "fastrec._C does not register rnn_cell_forward_cpp"
    if x.dtype not in _CELL_DTYPES:
        return f"{x.dtype} cell (the fused cell computes in float32 / float64)"
    return None


def rnn_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    mode: str,
) -> tuple[Tensor, Tensor | None]:
    """One step of a cell on ``x (B, I)``, ``h``/``c`` ``(B, H)``: ``(h_new, c_new or None)``.
    An empty batch runs torch's cell on every backend: empty states, zero weight gradients."""
    if x.shape[0] == 0:
        backends.count(CELL_OP, "torch", "empty batch")
        return rnn_cell_torch(x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
    if backends.forced() is None and x.device.type == "cpu" and HAVE_CELL_CPP and x.dtype in _CELL_DTYPES:
        backend, reason = "cpp", None  # the common case, decided without the general selection (per step)
    else:
        reason = _cell_unfused_reason(x, mode) or routing.rnn_cell(x)
        backend = backends.select(x.device, reason)
    backends.count(CELL_OP, backend, reason or "")
    if backend in ("cpp", "triton"):
        if _needs_grad(x, h, c, w_ih, w_hh, b_ih, b_hh):
            h_new, c_new = RNNCellFunction.apply(x, h, c, w_ih, w_hh, b_ih, b_hh, mode, backend)
        else:  # inference: the op alone, without the autograd.Function's bookkeeping
            h_new, c_new, _ = _cell_forward(backend, x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
        return h_new, c_new if mode == "lstm" else None
    return rnn_cell_torch(x, h, c, w_ih, w_hh, b_ih, b_hh, mode)
