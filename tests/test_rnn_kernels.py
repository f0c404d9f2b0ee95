"""The C++ recurrence ops ``rnn_forward_cpp`` / ``rnn_backward_cpp`` (csrc/rnn.cpp), checked directly.

A small harness (``Recurrence`` below) does what the ops layer will do: the input projection
``gx = x W_ih^T + b_ih`` as one torch GEMM before the forward op, and after the backward op the
weight gradients as GEMMs (``dW_hh = grad_gh^T hprev``, ``db_hh = sum grad_gh``; ``dW_ih``,
``db_ih`` and ``dx`` by autograd through the projection).

References and bounds:
- ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` in float64 (same weights) for plain sequences; with
  ``lengths`` through ``pack_padded_sequence(enforce_sorted=False)``; ``reverse`` against the
  reverse half of a bidirectional packed module.
- ``reset`` against a float64 Python loop over torch's own cells (``torch.gru_cell`` etc.) that
  zeroes the state of the marked rows before the step.
- fp32 kernel vs float64 reference: relative error ``||fast - ref|| / ||ref|| <= 1e-5`` for out,
  h_n, c_n and the gradients of input, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0 under
  random upstream gradients on out and on h_n / c_n.
- ``gradcheck`` in float64 on tiny shapes; fp16 / bf16 must equal the fp32 kernel on the
  rounded inputs, rounded (they compute in fp32); repeated calls are bitwise equal.
Skipped when the extension does not register the ops.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrec.ops.rnn import rnn_layer_torch

try:
    importlib.import_module("fastrec._C")
except ImportError:
    pass

HAVE_OPS = hasattr(torch.ops.fastrec, "rnn_forward_cpp") and hasattr(torch.ops.fastrec, "rnn_backward_cpp")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="fastrec._C does not register rnn_forward_cpp / rnn_backward_cpp")

MODES = ("tanh", "relu", "gru", "lstm")
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
SLOTS = {"tanh": 2, "relu": 2, "gru": 5, "lstm": 6}
FP32_BOUND = 1e-5


# --------------------------------------------------------------------------- the harness
class Recurrence(torch.autograd.Function):
    """The fused recurrence on a precomputed gx; weight gradients of W_hh / b_hh as GEMMs."""

    @staticmethod
    def forward(ctx, gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse):
        out, h_n, c_n, workspace = torch.ops.fastrec.rnn_forward_cpp(
            gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse
        )
        ctx.save_for_backward(workspace, w_hh, b_hh, h0, c0, lengths, reset)
        ctx.flags = (mode, reverse, b_hh is not None)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        workspace, w_hh, b_hh, h0, c0, lengths, reset = ctx.saved_tensors
        mode, reverse, has_bias = ctx.flags
        grad_gx, grad_gh, grad_h0, grad_c0, hprev = torch.ops.fastrec.rnn_backward_cpp(
            grad_out.contiguous(),
            grad_h_n.contiguous(),
            grad_c_n.contiguous() if mode == "lstm" else None,
            workspace,
            w_hh,
            b_hh,
            h0,
            c0,
            lengths,
            reset,
            mode,
            reverse,
        )
        steps, batch, gh = grad_gh.shape
        grad_w_hh = grad_gh.reshape(steps * batch, gh).t() @ hprev.reshape(steps * batch, -1)
        grad_b_hh = grad_gh.sum((0, 1)) if has_bias else None
        return grad_gx, grad_h0, grad_c0 if mode == "lstm" else None, grad_w_hh, grad_b_hh, None, None, None, None


def fused_rnn(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reset=None, reverse=False):
    """x (T, B, I) time-major -> (out (T, B, H), h_n (B, H), c_n (B, H) or empty)."""
    gx = torch.matmul(x, w_ih.t())
    if b_ih is not None:
        gx = gx + b_ih
    return Recurrence.apply(gx.contiguous(), h0, c0, w_hh, b_hh, lengths, reset, mode, reverse)


# --------------------------------------------------------------------------- references
def make_params(mode, input_size, hidden, bias=True, dtype=torch.float32):
    """torch's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias."""
    g, k = GATES[mode], hidden**-0.5

    def u(*shape):
        return (torch.rand(*shape, dtype=dtype) * 2 - 1) * k

    w_ih, w_hh = u(g * hidden, input_size), u(g * hidden, hidden)
    b_ih, b_hh = (u(g * hidden), u(g * hidden)) if bias else (None, None)
    return w_ih, w_hh, b_ih, b_hh


def torch_module(mode, input_size, hidden, params, bias=True, bidirectional=False):
    """The float64 torch module whose (reverse, when bidirectional) direction has ``params``."""
    if mode == "lstm":
        module = torch.nn.LSTM(input_size, hidden, bias=bias, bidirectional=bidirectional)
    elif mode == "gru":
        module = torch.nn.GRU(input_size, hidden, bias=bias, bidirectional=bidirectional)
    else:
        module = torch.nn.RNN(input_size, hidden, nonlinearity=mode, bias=bias, bidirectional=bidirectional)
    module = module.double()
    suffix = "_reverse" if bidirectional else ""
    with torch.no_grad():
        for name, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), params, strict=True):
            if value is not None:
                getattr(module, f"{name}_l0{suffix}").copy_(value)
    return module


def reference_loop(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reset=None, reverse=False):
    """fastrec's torch reference (``rnn_layer_torch``): torch's own cells one step at a time, with
    row-wise lengths, reverse order and state resets; ``c`` is None unless LSTM."""
    out, h, c = rnn_layer_torch(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, reverse)
    return out, h, c if mode == "lstm" else None


def rel_err(fast: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    return ((fast.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_all(fast_results, ref_results, names):
    errors = {name: rel_err(a, b) for name, a, b in zip(names, fast_results, ref_results, strict=True)}
    bad = {k: v for k, v in errors.items() if not v <= FP32_BOUND}
    assert not bad, f"relative errors above {FP32_BOUND}: {bad} (all: {errors})"


def random_inputs(mode, steps, batch, input_size, hidden, bias=True):
    x = torch.randn(steps, batch, input_size)
    h0 = torch.randn(batch, hidden) * 0.5
    c0 = torch.randn(batch, hidden) * 0.5 if mode == "lstm" else None
    return x, h0, c0, make_params(mode, input_size, hidden, bias)


def leaves(*tensors, dtype=None):
    """Fresh leaf tensors requiring grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def compare(mode, x, h0, c0, params, lengths=None, reset=None, reverse=False, reference="module"):
    """Runs fused (fp32) and reference (fp64) with the same random upstream gradients; asserts."""
    steps, batch, input_size = x.shape
    hidden = h0.shape[1]
    bias = params[2] is not None
    lstm = mode == "lstm"
    grad_out = torch.randn(steps, batch, hidden)
    grad_h_n = torch.randn(batch, hidden)
    grad_c_n = torch.randn(batch, hidden) if lstm else None

    fx, fh0, fc0, *fparams = leaves(x, h0, c0, *params)
    out, h_n, c_n = fused_rnn(mode, fx, fh0, fc0, *fparams, lengths=lengths, reset=reset, reverse=reverse)
    inputs = [t for t in (fx, fh0, fc0, *fparams) if t is not None]
    outputs, grads = [out, h_n], [grad_out, grad_h_n]
    if lstm:
        outputs.append(c_n)
        grads.append(grad_c_n)
    fast_grads = torch.autograd.grad(outputs, inputs, grads)

    rx, rh0, rc0, *rparams = leaves(x, h0, c0, *params, dtype=torch.float64)
    if reference == "loop":
        r_out, r_h, r_c = reference_loop(mode, rx, rh0, rc0, *rparams, lengths=lengths, reset=reset, reverse=reverse)
    else:
        module = torch_module(mode, input_size, hidden, rparams, bias=bias, bidirectional=reverse)
        suffix = "_reverse" if reverse else ""
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
        rparams = [getattr(module, f"{name}_l0{suffix}") for name in names]
        r_out, r_h, r_c = run_module(module, mode, rx, rh0, rc0, lengths, reverse)
    r_inputs = [t for t in (rx, rh0, rc0, *rparams) if t is not None]
    r_outputs = [r_out, r_h] + ([r_c] if lstm else [])
    ref_grads = torch.autograd.grad(r_outputs, r_inputs, [g.double() for g in grads])

    names = ["out", "h_n"] + (["c_n"] if lstm else [])
    check_all([out, h_n] + ([c_n] if lstm else []), r_outputs, names)
    grad_names = ["x", "h0"] + (["c0"] if lstm else []) + ["weight_ih", "weight_hh"]
    grad_names += ["bias_ih", "bias_hh"] if bias else []
    check_all(fast_grads, ref_grads, ["grad_" + n for n in grad_names])


def run_module(module, mode, x, h0, c0, lengths, reverse):
    """Runs the float64 module; returns the (reverse, when bidirectional) direction's out, h_n, c_n.

    The module's parameters carry our weights in that direction; the other direction (if any)
    gets its own initial state of zeros and no upstream gradient.
    """
    steps, batch, _ = x.shape
    hidden = h0.shape[1]
    if reverse:
        h0 = torch.stack([torch.zeros_like(h0), h0])
        c0 = torch.stack([torch.zeros_like(c0), c0]) if c0 is not None else None
    else:
        h0, c0 = h0[None], (c0[None] if c0 is not None else None)
    state = (h0, c0) if mode == "lstm" else h0
    if lengths is not None:
        packed = pack_padded_sequence(x, lengths.long(), enforce_sorted=False)
        out, state = module(packed, state)
        out, _ = pad_packed_sequence(out, total_length=steps)
    else:
        out, state = module(x, state)
    h_n, c_n = state if mode == "lstm" else (state, None)
    d = 1 if reverse else 0
    out = out[..., d * hidden : (d + 1) * hidden]
    return out, h_n[d], (c_n[d] if c_n is not None else None)


# --------------------------------------------------------------------------- tests
SHAPES = [  # (hidden, steps, batch)
    (1, 1, 1),
    (7, 2, 3),
    (50, 17, 64),
    (100, 50, 3),
    (7, 50, 64),
    (100, 17, 1),
    (50, 1, 3),
    (1, 50, 64),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-T{s[1]}-B{s[2]}")
def test_matches_torch_module_output_state_and_all_gradients(mode, shape):
    hidden, steps, batch = shape
    x, h0, c0, params = random_inputs(mode, steps, batch, 5, hidden)
    compare(mode, x, h0, c0, params)


@pytest.mark.parametrize("mode", MODES)
def test_without_biases_matches_torch_module(mode):
    x, h0, c0, params = random_inputs(mode, 9, 5, 4, 13, bias=False)
    compare(mode, x, h0, c0, params)


def random_lengths(steps, batch):
    """Values in [1, T], including both 1 and T."""
    lengths = torch.randint(1, steps + 1, (batch,), dtype=torch.int32)
    lengths[0], lengths[-1] = steps, 1
    return lengths[torch.randperm(batch)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("shape", [(7, 17, 3), (50, 17, 64), (100, 50, 3)], ids=lambda s: f"H{s[0]}-T{s[1]}-B{s[2]}")
def test_lengths_match_torch_packed_sequences(mode, reverse, shape):
    hidden, steps, batch = shape
    x, h0, c0, params = random_inputs(mode, steps, batch, 6, hidden)
    compare(mode, x, h0, c0, params, lengths=random_lengths(steps, batch), reverse=reverse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_all_lengths_one_match_torch_packed_sequences(mode, reverse):
    x, h0, c0, params = random_inputs(mode, 5, 4, 3, 7)
    compare(mode, x, h0, c0, params, lengths=torch.ones(4, dtype=torch.int32), reverse=reverse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_reset_zeroes_the_state_before_the_step(mode, reverse, with_lengths):
    steps, batch, hidden = 17, 9, 50
    x, h0, c0, params = random_inputs(mode, steps, batch, 4, hidden)
    reset = torch.rand(steps, batch) < 0.2
    lengths = random_lengths(steps, batch) if with_lengths else None
    compare(mode, x, h0, c0, params, lengths=lengths, reset=reset, reverse=reverse, reference="loop")


@pytest.mark.parametrize("mode", MODES)
def test_reference_loop_agrees_with_torch_module(mode):
    """The loop that pins reset semantics computes torch's recurrence when nothing is reset."""
    steps, batch, hidden = 6, 3, 5
    x, h0, c0, params = random_inputs(mode, steps, batch, 4, hidden)
    x, h0 = x.double(), h0.double()
    c0 = c0.double() if c0 is not None else None
    params = [p.double() for p in params]
    lengths = torch.tensor([6, 1, 4], dtype=torch.int32)
    loop = reference_loop(mode, x, h0, c0, *params, lengths=lengths, reverse=True)
    module = torch_module(mode, 4, hidden, params, bidirectional=True)
    with torch.no_grad():
        ref = run_module(module, mode, x, h0, c0, lengths, reverse=True)
    for a, b in zip(loop, ref, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masks", ["plain", "lengths_reset_reverse"])
def test_gradcheck_float64(mode, masks):
    steps, batch, input_size, hidden = 4, 3, 2, 3
    x, h0, c0, params = random_inputs(mode, steps, batch, input_size, hidden)
    lengths = reset = None
    reverse = False
    if masks != "plain":
        lengths = torch.tensor([4, 1, 3], dtype=torch.int32)
        reset = torch.zeros(steps, batch, dtype=torch.bool)
        reset[2, 0] = reset[1, 2] = True
        reverse = True
    inputs = leaves(x, h0, c0, *params, dtype=torch.float64)

    def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        out, h_n, c_n = fused_rnn(mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, reverse)
        return (out, h_n, c_n) if mode == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_workspace_shape_and_outputs_of_steps_not_run(mode):
    steps, batch, hidden = 5, 3, 7
    g, lstm = GATES[mode], mode == "lstm"
    gx = torch.randn(steps, batch, g * hidden)
    h0 = torch.randn(batch, hidden)
    c0 = torch.randn(batch, hidden) if lstm else None
    w_hh = torch.randn(g * hidden, hidden) * 0.3
    lengths = torch.tensor([5, 2, 1], dtype=torch.int32)
    out, h_n, c_n, ws = torch.ops.fastrec.rnn_forward_cpp(gx, h0, c0, w_hh, None, lengths, None, mode, False)
    assert ws.shape == (steps, batch, SLOTS[mode] * hidden) and ws.dtype == torch.float32
    assert c_n.shape == ((batch, hidden) if lstm else (0,) * 2)
    assert out[2:, 1].abs().sum() == 0 and out[1:, 2].abs().sum() == 0
    torch.testing.assert_close(h_n[1], out[1, 1], rtol=0, atol=0)
    grads = torch.ops.fastrec.rnn_backward_cpp(
        torch.randn(steps, batch, hidden),
        torch.randn(batch, hidden),
        torch.randn(batch, hidden) if lstm else None,
        ws,
        w_hh,
        None,
        h0,
        c0,
        lengths,
        None,
        mode,
        False,
    )
    grad_gx, grad_gh, grad_h0, grad_c0, hprev = grads
    assert grad_gx.shape == grad_gh.shape == (steps, batch, g * hidden)
    assert grad_c0.shape == ((batch, hidden) if lstm else (0,) * 2)
    for t in (grad_gx, grad_gh, hprev):
        assert t[2:, 1].abs().sum() == 0 and t[1:, 2].abs().sum() == 0
    torch.testing.assert_close(hprev[0], h0, rtol=0, atol=0)
    torch.testing.assert_close(hprev[1, 0], out[0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(mode, dtype):
    steps, batch, hidden = 7, 5, 19
    g, lstm = GATES[mode], mode == "lstm"
    gx = torch.randn(steps, batch, g * hidden).to(dtype)
    h0 = torch.randn(batch, hidden).to(dtype)
    w_hh = (torch.randn(g * hidden, hidden) * 0.3).to(dtype)
    b_hh = torch.randn(g * hidden).to(dtype)
    c0 = torch.randn(batch, hidden).to(dtype) if lstm else None
    low = torch.ops.fastrec.rnn_forward_cpp(gx, h0, c0, w_hh, b_hh, None, None, mode, False)
    f32 = [t.float() if t is not None else None for t in (gx, h0, c0, w_hh, b_hh)]
    high = torch.ops.fastrec.rnn_forward_cpp(*f32, None, None, mode, False)
    for a, b in zip(low[:3], high[:3], strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(low[3], high[3], rtol=0, atol=0)  # workspace stays fp32
    grad_out = torch.randn(steps, batch, hidden).to(dtype)
    grad_h_n = torch.randn(batch, hidden).to(dtype)
    grad_c_n = torch.randn(batch, hidden).to(dtype) if lstm else None
    args = (low[3], w_hh, b_hh, h0, c0, None, None, mode, False)
    low_grads = torch.ops.fastrec.rnn_backward_cpp(grad_out, grad_h_n, grad_c_n, *args)
    f32_args = (high[3], f32[3], f32[4], f32[1], f32[2], None, None, mode, False)
    high_grads = torch.ops.fastrec.rnn_backward_cpp(
        grad_out.float(), grad_h_n.float(), grad_c_n.float() if lstm else None, *f32_args
    )
    for a, b in zip(low_grads, high_grads, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_repeated_calls_are_bitwise_equal(mode):
    steps, batch, hidden = 12, 19, 50
    x, h0, c0, params = random_inputs(mode, steps, batch, 8, hidden)
    lengths = random_lengths(steps, batch)
    reset = torch.rand(steps, batch) < 0.1
    grad_out = torch.randn(steps, batch, hidden)
    first = None
    for _ in range(20):
        fx, *rest = leaves(x, h0, c0, *params)
        out, h_n, _ = fused_rnn(mode, fx, *rest, lengths=lengths, reset=reset, reverse=True)
        grads = torch.autograd.grad((out * grad_out).sum() + h_n.sum(), [fx, rest[3]])
        result = [out, h_n, *grads]
        if first is None:
            first = result
        for a, b in zip(result, first, strict=True):
            assert torch.equal(a, b)


def test_bad_mode_and_shapes_are_rejected():
    gx, h0, w_hh = torch.randn(3, 2, 12), torch.randn(2, 4), torch.randn(12, 4)
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.fastrec.rnn_forward_cpp(gx, h0, None, w_hh, None, None, None, "lstmx", False)
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        torch.ops.fastrec.rnn_forward_cpp(gx, h0, None, w_hh[:, :3], None, None, None, "gru", False)
    with pytest.raises(RuntimeError, match="lengths must be in"):
        bad = torch.tensor([4, 1], dtype=torch.int32)
        torch.ops.fastrec.rnn_forward_cpp(gx, h0, None, w_hh, None, bad, None, "gru", False)


# --------------------------------------------------------------------------- layouts and opcheck
def _layout_inputs(mode, steps, batch, hidden, lengths):
    g, lstm = GATES[mode], mode == "lstm"
    gx = torch.randn(steps, batch, g * hidden)
    h0 = torch.randn(batch, hidden)
    c0 = torch.randn(batch, hidden) if lstm else None
    w_hh = torch.randn(g * hidden, hidden) * 0.3
    b_hh = torch.randn(g * hidden) * 0.3
    return gx, h0, c0, w_hh, b_hh


def _packed_rows(t: Tensor, lengths: Tensor) -> Tensor:
    """(T, B, ..) time-major rows of a batch sorted by decreasing length -> PackedSequence order."""
    return pack_padded_sequence(t, lengths.long()).data


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_batch_major_and_packed_layouts_match_time_major(mode, reverse):
    """The same problem in the three layouts gives the same forward outputs, workspace and
    backward outputs (packed: only the real rows; time-major with lengths is the reference)."""
    steps, batch, hidden = 9, 7, 19
    lengths = torch.tensor([9, 9, 6, 4, 4, 2, 1], dtype=torch.int32)  # sorted, as packed rows are
    gx, h0, c0, w_hh, b_hh = _layout_inputs(mode, steps, batch, hidden, lengths)
    lstm = mode == "lstm"
    fwd, bwd = torch.ops.fastrec.rnn_forward_cpp, torch.ops.fastrec.rnn_backward_cpp
    ref = fwd(gx, h0, c0, w_hh, b_hh, lengths, None, mode, reverse)
    grad_out = torch.randn(steps, batch, hidden)
    grad_h_n = torch.randn(batch, hidden)
    grad_c_n = torch.randn(batch, hidden) if lstm else None
    mask = (torch.arange(steps)[:, None] < lengths[None, :])[..., None]
    grad_out = grad_out * mask  # the padded entries carry no gradient in any layout
    ref_b = bwd(grad_out, grad_h_n, grad_c_n, ref[3], w_hh, b_hh, h0, c0, lengths, None, mode, reverse)

    def bm(t):
        return t.transpose(0, 1).contiguous()

    got = fwd(bm(gx), h0, c0, w_hh, b_hh, lengths, None, mode, reverse, True)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, bm(b) if a.dim() == 3 else b)
    got_b = bwd(bm(grad_out), grad_h_n, grad_c_n, got[3], w_hh, b_hh, h0, c0, lengths, None, mode, reverse, True)
    for a, b in zip(got_b, ref_b, strict=True):
        assert torch.equal(a, bm(b) if a.dim() == 3 else b)

    batch_sizes = pack_padded_sequence(gx, lengths.long()).batch_sizes
    packed = fwd(_packed_rows(gx, lengths), h0, c0, w_hh, b_hh, None, None, mode, reverse, False, batch_sizes)
    for a, b in zip(packed, ref, strict=True):
        assert torch.equal(a, _packed_rows(b, lengths) if b.dim() == 3 else b)
    packed_b = bwd(
        _packed_rows(grad_out, lengths), grad_h_n, grad_c_n, packed[3], w_hh, b_hh, h0, c0, None, None, mode, reverse,
        False, batch_sizes,
    )  # fmt: skip
    for a, b in zip(packed_b, ref_b, strict=True):
        assert torch.equal(a, _packed_rows(b, lengths) if b.dim() == 3 else b)


@pytest.mark.parametrize("mode", MODES)
def test_registered_ops_pass_opcheck(mode):
    steps, batch, hidden = 5, 4, 9
    lengths = torch.tensor([5, 3, 3, 1], dtype=torch.int32)
    gx, h0, c0, w_hh, b_hh = _layout_inputs(mode, steps, batch, hidden, lengths)
    lstm = mode == "lstm"
    reset = torch.rand(steps, batch) < 0.3
    batch_sizes = pack_padded_sequence(gx, lengths.long()).batch_sizes
    layouts = [
        (gx, lengths, reset, False, None),
        (gx.transpose(0, 1).contiguous(), lengths, reset.t().contiguous(), True, None),
        (_packed_rows(gx, lengths), None, None, False, batch_sizes),
    ]
    forward = torch.ops.fastrec.rnn_forward_cpp.default
    backward = torch.ops.fastrec.rnn_backward_cpp.default
    for x, lens, rst, batch_first, sizes in layouts:
        args = (x, h0, c0, w_hh, b_hh, lens, rst, mode, True, batch_first, sizes)
        torch.library.opcheck(forward, args)
        torch.library.opcheck(forward, (*args, False))  # inference: no workspace
        out, h_n, c_n, workspace = forward(*args)
        grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(h_n) if lstm else None)
        torch.library.opcheck(
            backward, (*grads, workspace, w_hh, b_hh, h0, c0, lens, rst, mode, True, batch_first, sizes)
        )


def test_projection_op_passes_opcheck():
    x, w, b = torch.randn(30, 8), torch.randn(12, 8), torch.randn(12)
    torch.library.opcheck(torch.ops.fastrec.rnn_project_cpp.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastrec.rnn_project_cpp.default, (x, w, None))


def test_bad_batch_sizes_are_rejected():
    gx, h0, _, w_hh, b_hh = _layout_inputs("gru", 3, 2, 5, None)
    rows = gx.reshape(6, 15)
    fwd = torch.ops.fastrec.rnn_forward_cpp
    with pytest.raises(RuntimeError, match="batch_sizes must sum"):
        fwd(rows, h0, None, w_hh, b_hh, None, None, "gru", False, False, torch.tensor([2, 2, 1]))
    with pytest.raises(RuntimeError, match="non-increasing"):
        fwd(rows[:5], h0, None, w_hh, b_hh, None, None, "gru", False, False, torch.tensor([2, 1, 2]))
    with pytest.raises(RuntimeError, match="batch_sizes"):
        fwd(rows, h0, None, w_hh, b_hh, None, None, "gru", False, False, torch.tensor([2, 2, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="lengths and reset"):
        fwd(rows, h0, None, w_hh, b_hh, torch.tensor([3, 3], dtype=torch.int32), None, "gru", False, False,
            torch.tensor([2, 2, 2]))  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["time_major", "batch_major", "packed"])
def test_inference_without_workspace_gives_the_same_outputs(mode, layout):
    """need_workspace=False (what the modules run under no_grad) returns a (.., 0) workspace
    and bitwise the outputs of the training forward, with lengths and resets, in every layout."""
    steps, batch, hidden = 9, 7, 37  # two row blocks, a partial SIMD chunk
    lengths = torch.tensor([9, 9, 6, 4, 4, 2, 1], dtype=torch.int32)
    gx, h0, c0, w_hh, b_hh = _layout_inputs(mode, steps, batch, hidden, lengths)
    reset = torch.rand(steps, batch) < 0.2
    fwd = torch.ops.fastrec.rnn_forward_cpp
    for reverse in (False, True):
        if layout == "packed":
            batch_sizes = pack_padded_sequence(gx, lengths.long()).batch_sizes
            args = (_packed_rows(gx, lengths), h0, c0, w_hh, b_hh, None, None, mode, reverse, False, batch_sizes)
        elif layout == "batch_major":
            args = (
                gx.transpose(0, 1).contiguous(),
                h0,
                c0,
                w_hh,
                b_hh,
                lengths,
                reset.t().contiguous(),
                mode,
                reverse,
                True,
                None,
            )
        else:
            args = (gx, h0, c0, w_hh, b_hh, lengths, reset, mode, reverse, False, None)
        train = fwd(*args)
        infer = fwd(*args, False)
        assert infer[3].shape == (*train[3].shape[:-1], 0)
        for a, b in zip(infer[:3], train[:3], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_input_projection_op_matches_torch(bias):
    x, w = torch.randn(300, 24), torch.randn(57, 24)
    b = torch.randn(57) if bias else None
    ref = x @ w.t() + (b if bias else 0)
    torch.testing.assert_close(torch.ops.fastrec.rnn_project_cpp(x, w, b), ref, rtol=1e-5, atol=1e-5)
    big = torch.randn(20000, 64)  # an 80 MB result: the huge-page buffer
    w2 = torch.randn(1000, 64)
    torch.testing.assert_close(torch.ops.fastrec.rnn_project_cpp(big, w2, None), big @ w2.t(), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="rnn_project_cpp takes"):
        torch.ops.fastrec.rnn_project_cpp(x, w[:, :3], None)
