"""The Triton RNN backend (kernels/rnn.py through fastrec/ops/rnn.py), forced: natively on CUDA,
in Triton's interpreter on the CPU.

The interpreter configuration runs both kernel paths: W_hh resident in registers for hidden sizes
up to 16 (H = 1, 7) and streamed 32 x 16 tiles with the two-phase step above (H = 50); one test
also runs the tile configurations the GPU picks (resident 64, streamed 64 x 32 and 16 x 16).

References and bounds (docs/testing.md):
- ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` in float64 with the same weights; with ``lengths``
  through ``pack_padded_sequence(enforce_sorted=False)`` (outputs padded with zeros); the reverse
  direction as the reverse half of a bidirectional module. float64 kernel: relative error
  ``||fast - ref|| / ||ref|| <= 1e-12``; fp32: ``<= 1e-5``; for out, h_n, c_n and the gradients
  of input, every weight and bias, h0 and c0 under random upstream gradients on out, h_n, c_n.
- ``reset``: ``fastrec.ops.rnn.rnn_layer_torch`` (torch's cells in a Python loop that zeroes the
  state of the marked rows) in float64, same bounds.
- fp16 / bf16: two references, ``maxabs(fast - ref) <= 2 (outputs) or 3 (gradients) *
  maxabs(pt - ref) + floor``, ``pt`` = the torch module in the low dtype on the CPU, ``floor`` =
  2 ulps of ``max|ref|`` (3 for bf16 in the interpreter, which truncates at the store).
- ``gradcheck`` in float64 on tiny shapes; ``torch.library.opcheck`` on both custom ops; two runs
  bitwise equal; ``torch.compile(fullgraph=True)`` through ``fastrec.functional.rnn``; on CUDA,
  ``fastrec.nn.GRU`` runs the triton kernels without a forced backend.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.ops import rnn as rnn_ops

MODES = ("tanh", "relu", "gru", "lstm")
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
BOUND = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _triton_backend(request):
    """Every test runs with the triton backend forced (skipped with the reason where it cannot
    run); tests marked ``default_dispatch`` see the default routing."""
    reason = backends.available()["triton"]
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    if request.node.get_closest_marker("default_dispatch"):
        yield
        return
    with backends.use_backend("triton"):
        yield


@pytest.mark.cuda
@pytest.mark.default_dispatch
def test_cuda_modules_run_triton_in_16_bit_and_cudnn_in_fp32_by_default():
    gru = fnn.GRU(5, 7, batch_first=True).to(DEVICE)
    ref = torch.nn.GRU(5, 7, batch_first=True).to(DEVICE)
    ref.load_state_dict(gru.state_dict())
    x = torch.randn(3, 4, 5, device=DEVICE)
    backends.stats(reset=True)
    out, h_n = gru(x)
    counts = backends.stats(reset=True)
    assert (
        counts.get(
            ("GRU", "torch", "torch.float32 on CUDA (cuDNN is faster there; the Triton recurrence wins in 16-bit)")
        )
        == 1
    )
    torch.testing.assert_close((out, h_n), ref(x))
    out, h_n = gru.to(torch.bfloat16)(x.bfloat16())
    assert backends.stats().get(("rnn", "triton", ""), 0) == 1
    assert out.shape == (3, 4, 7) and h_n.shape == (1, 3, 7) and out.dtype == torch.bfloat16


# --------------------------------------------------------------------------- helpers
def module_for(mode: str, input_size: int, hidden: int, bias: bool = True, bidirectional: bool = False):
    kwargs = dict(bias=bias, bidirectional=bidirectional)
    if mode == "lstm":
        return torch.nn.LSTM(input_size, hidden, **kwargs)
    if mode == "gru":
        return torch.nn.GRU(input_size, hidden, **kwargs)
    return torch.nn.RNN(input_size, hidden, nonlinearity=mode, **kwargs)


def weights_of(module) -> list[tuple]:
    dirs = 2 if module.bidirectional else 1
    out = []
    for d in range(dirs):
        sfx = "_l0" + ("_reverse" if d else "")
        out.append(
            tuple(getattr(module, name + sfx, None) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        )
    return out


def rel_err(fast: Tensor, ref: Tensor) -> float:
    ref = ref.detach().cpu().double()
    return ((fast.detach().cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def torch_result(mode, module, x, h0, c0, lengths=None, upstream=None):
    """torch's module on the CPU in its own dtype: (outputs then gradients of x, h0, c0 and every
    parameter, upstream): random upstream gradients on every output unless given."""
    dtype = next(module.parameters()).dtype
    inputs = [t.detach().cpu().to(dtype).requires_grad_() for t in (x, h0) + ((c0,) if mode == "lstm" else ())]
    hx = (inputs[1], inputs[2]) if mode == "lstm" else inputs[1]
    if lengths is None:
        out, state = module(inputs[0], hx)
    else:
        out_packed, state = module(pack_padded_sequence(inputs[0], lengths, enforce_sorted=False), hx)
        out, _ = pad_packed_sequence(out_packed, total_length=x.shape[0])
    outs = [out, *(state if mode == "lstm" else (state,))]
    upstream = upstream or [torch.randn_like(o, dtype=torch.float64) for o in outs]
    grads = torch.autograd.grad(outs, inputs + list(module.parameters()), [g.to(dtype) for g in upstream])
    return outs + list(grads), upstream


def fast_result(mode, module, dtype, x, h0, c0, upstream, lengths=None):
    """The same through fastrec.functional.rnn (forced triton) on DEVICE in ``dtype``, with the
    weights of ``module``."""
    fast = module_for(mode, module.input_size, module.hidden_size, module.bias, module.bidirectional)
    fast = fast.to(device=DEVICE, dtype=dtype)
    fast.load_state_dict(module.state_dict())
    inputs = [t.detach().to(DEVICE, dtype).requires_grad_() for t in (x, h0) + ((c0,) if mode == "lstm" else ())]
    out, h_n, c_n = FF.rnn(
        inputs[0],
        weights_of(fast),
        inputs[1],
        inputs[2] if mode == "lstm" else None,
        mode=mode,
        bidirectional=module.bidirectional,
        lengths=lengths,
    )
    outs = [out, h_n] + ([c_n] if mode == "lstm" else [])
    grads = torch.autograd.grad(outs, inputs + list(fast.parameters()), [g.to(DEVICE, dtype) for g in upstream])
    return outs + list(grads)


def run_both(mode, ref_module, dtype, x, h0, c0, lengths=None):
    """(fast, ref) lists: outputs then every gradient, under the same random upstream gradients."""
    expected, upstream = torch_result(mode, ref_module, x, h0, c0, lengths)
    return fast_result(mode, ref_module, dtype, x, h0, c0, upstream, lengths), expected


def make_inputs(mode, steps, batch, input_size, hidden, dirs=1):
    x = torch.randn(steps, batch, input_size, dtype=torch.float64)
    h0 = torch.randn(dirs, batch, hidden, dtype=torch.float64)
    c0 = torch.randn(dirs, batch, hidden, dtype=torch.float64) if mode == "lstm" else None
    return x, h0, c0


# --------------------------------------------------------------------------- against torch.nn
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dtype,steps,batch,input_size,hidden",
    [
        (torch.float64, 17, 3, 5, 7),
        (torch.float32, 2, 1, 4, 1),
        (torch.float32, 1, 3, 6, 50),
    ],
)
def test_matches_torch_module_output_state_and_all_gradients(mode, dtype, steps, batch, input_size, hidden):
    ref = module_for(mode, input_size, hidden).double()
    x, h0, c0 = make_inputs(mode, steps, batch, input_size, hidden)
    fast, expected = run_both(mode, ref, dtype, x, h0, c0)
    for i, (a, b) in enumerate(zip(fast, expected, strict=True)):
        assert a.dtype == dtype and a.shape == b.shape, i
        assert rel_err(a, b) <= BOUND[dtype], (i, rel_err(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_without_biases_matches_torch_module(mode):
    ref = module_for(mode, 4, 7, bias=False).double()
    x, h0, c0 = make_inputs(mode, 5, 3, 4, 7)
    fast, expected = run_both(mode, ref, torch.float64, x, h0, c0)
    for a, b in zip(fast, expected, strict=True):
        assert rel_err(a, b) <= BOUND[torch.float64]


@pytest.mark.parametrize("mode,steps,hidden", [(m, 17, 7) for m in MODES] + [("gru", 3, 50), ("lstm", 3, 50)])
def test_lengths_and_reverse_match_torch_bidirectional_packed(mode, steps, hidden):
    """Lengths including 1 and T; the reverse direction starts at each row's own last step."""
    ref = module_for(mode, 3, hidden, bidirectional=True).double()
    x, h0, c0 = make_inputs(mode, steps, 3, 3, hidden, dirs=2)
    lengths = torch.tensor([1, steps, max(1, steps // 2)])
    fast, expected = run_both(mode, ref, torch.float64, x, h0, c0, lengths=lengths)
    assert (fast[0][lengths[0] :, 0] == 0).all()  # past a row's length the output is exactly zero
    for i, (a, b) in enumerate(zip(fast, expected, strict=True)):
        assert rel_err(a, b) <= BOUND[torch.float64], (i, rel_err(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_all_lengths_one(mode):
    ref = module_for(mode, 3, 7, bidirectional=True).double()
    x, h0, c0 = make_inputs(mode, 6, 3, 3, 7, dirs=2)
    fast, expected = run_both(mode, ref, torch.float64, x, h0, c0, lengths=torch.ones(3, dtype=torch.long))
    for a, b in zip(fast, expected, strict=True):
        assert rel_err(a, b) <= BOUND[torch.float64]


# --------------------------------------------------------------------------- reset (reference loop)
def layer_args(mode, steps, batch, input_size, hidden, dtype=torch.float64, bias=True):
    gates = GATES[mode]
    scale = hidden**-0.5

    def u(*shape):
        return ((torch.rand(*shape, dtype=dtype) * 2 - 1) * scale).to(DEVICE)

    x = torch.randn(steps, batch, input_size, dtype=dtype).to(DEVICE)
    h0 = torch.randn(batch, hidden, dtype=dtype).to(DEVICE)
    c0 = torch.randn(batch, hidden, dtype=dtype).to(DEVICE) if mode == "lstm" else None
    w_ih, w_hh = u(gates * hidden, input_size), u(gates * hidden, hidden)
    b_ih, b_hh = (u(gates * hidden), u(gates * hidden)) if bias else (None, None)
    return [x, h0, c0, w_ih, w_hh, b_ih, b_hh]


def layer_grads(fn, tensors, lengths, reset, mode, reverse, upstream=None):
    """Outputs of one layer and the gradients of every differentiable input."""
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out, h_n, c_n = fn(*inputs, lengths, reset, mode, reverse)
    outs = [out, h_n] + ([c_n] if mode == "lstm" else [])
    upstream = upstream or [torch.randn_like(o) for o in outs]
    leaves = [t for t in inputs if t is not None]
    return outs + list(torch.autograd.grad(outs, leaves, upstream)), upstream


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("steps,hidden,reverse", [(17, 7, False), (17, 7, True), (3, 50, True)])
def test_reset_zeroes_the_state_before_the_step(mode, steps, hidden, reverse):
    tensors = layer_args(mode, steps, 3, 4, hidden)
    lengths = torch.tensor([steps, 1, max(1, steps - 2)], dtype=torch.int32, device=DEVICE)
    reset = torch.rand(steps, 3, device=DEVICE) < 0.3
    reset[0, 0] = reset[steps - 1, 2] = True
    fast, upstream = layer_grads(rnn_ops.rnn_layer, tensors, lengths, reset, mode, reverse)
    expected, _ = layer_grads(rnn_ops.rnn_layer_torch, tensors, lengths, reset, mode, reverse, upstream)
    assert any(k[:2] == ("rnn", "triton") for k in backends.stats())
    for i, (a, b) in enumerate(zip(fast, expected, strict=True)):
        assert rel_err(a, b) <= BOUND[torch.float64], (i, rel_err(a, b))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="sets the interpreter's tile configuration")
@pytest.mark.parametrize(
    "mode,hidden,resident_max,streamed",
    [
        ("lstm", 50, 64, (32, 16, 4)),  # the GPU's resident path for H = 50: 64-wide blocks, masked
        ("gru", 100, 16, (64, 32, 8)),  # the 16-bit GPU streamed tiles: 2 output x 4 reduction tiles
        ("tanh", 20, 16, (16, 16, 4)),  # the fp64 GPU streamed tiles
    ],
)
def test_gpu_tile_configurations_in_the_interpreter(monkeypatch, mode, hidden, resident_max, streamed):
    """The block configurations the GPU picks, run by the interpreter against the reference loop."""
    from fastrec.kernels import rnn as kernels

    monkeypatch.setattr(kernels, "INTERPRETER_RESIDENT_MAX", resident_max)
    monkeypatch.setattr(kernels, "INTERPRETER_STREAMED", streamed)
    tensors = layer_args(mode, 3, 3, 4, hidden)
    lengths = torch.tensor([3, 1, 2], dtype=torch.int32)
    reset = torch.tensor([[False, False, True], [True, False, False], [False, False, True]])
    fast, upstream = layer_grads(rnn_ops.rnn_layer, tensors, lengths, reset, mode, True)
    expected, _ = layer_grads(rnn_ops.rnn_layer_torch, tensors, lengths, reset, mode, True, upstream)
    for i, (a, b) in enumerate(zip(fast, expected, strict=True)):
        assert rel_err(a, b) <= BOUND[torch.float64], (i, rel_err(a, b))


# --------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,hidden,steps", [(torch.float16, 7, 9), (torch.float16, 50, 2), (torch.bfloat16, 7, 9)])
def test_low_precision_within_two_reference_bound(mode, dtype, hidden, steps):
    low = module_for(mode, 5, hidden).to(dtype)  # pt: torch's module in the low dtype
    ref = module_for(mode, 5, hidden).double()
    ref.load_state_dict(low.state_dict())  # the rounded weights, in float64
    x, h0, c0 = (t.to(dtype).double() if t is not None else None for t in make_inputs(mode, steps, 3, 5, hidden))
    expected, upstream = torch_result(mode, ref, x, h0, c0)
    pt, _ = torch_result(mode, low, x, h0, c0, upstream=upstream)
    fast = fast_result(mode, ref, dtype, x, h0, c0, upstream)
    ulps = 3 if (dtype == torch.bfloat16 and DEVICE.type == "cpu") else 2
    n_outputs = 3 if mode == "lstm" else 2
    for i, (f, p, r) in enumerate(zip(fast, pt, expected, strict=True)):
        assert f.dtype == dtype and torch.isfinite(f).all(), i
        factor = 2 if i < n_outputs else 3
        floor = ulps * torch.finfo(dtype).eps * r.abs().max().item()
        err, pt_err = (f.cpu().double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        assert err <= factor * pt_err + floor, (i, err, pt_err, floor)


# --------------------------------------------------------------------------- gradcheck, opcheck
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    tensors = layer_args(mode, 3, 2, 2, 3)
    lengths = torch.tensor([3, 2], dtype=torch.int32, device=DEVICE)
    reset = torch.tensor([[False, False], [True, False], [False, True]], device=DEVICE)
    inputs = [t.requires_grad_() for t in tensors if t is not None]

    def fn(*args):
        it = iter(args)
        x, h0 = next(it), next(it)
        c0 = next(it) if mode == "lstm" else None
        w_ih, w_hh, b_ih, b_hh = it
        out, h_n, c_n = rnn_ops.rnn_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reset, mode, True)
        return (out, h_n, c_n) if mode == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("mode", ["gru", "lstm"])
def test_opcheck_custom_ops(mode):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = layer_args(mode, 4, 3, 3, 7, dtype=torch.float32)
    gx = rnn_ops._project(x, w_ih, b_ih).detach()
    lengths = torch.tensor([4, 1, 2], dtype=torch.int32, device=DEVICE)
    reset = torch.rand(4, 3, device=DEVICE) < 0.3
    args = (gx, h0, c0, w_hh, b_hh, lengths, reset, mode, True, False)
    torch.library.opcheck(torch.ops.fastrec.rnn_forward_triton.default, args)
    out, h_n, c_n, workspace = torch.ops.fastrec.rnn_forward_triton(*args)
    grad_c_n = torch.randn_like(c_n) if mode == "lstm" else None
    backward_args = (torch.randn_like(out), torch.randn_like(h_n), grad_c_n, workspace, w_hh, b_hh, h0, c0)
    torch.library.opcheck(
        torch.ops.fastrec.rnn_backward_triton.default, backward_args + (lengths, reset, mode, True, False)
    )


# --------------------------------------------------------------------------- determinism, compile
@pytest.mark.parametrize("mode,hidden", [("gru", 7), ("lstm", 50)])
def test_two_runs_are_bitwise_equal(mode, hidden):
    tensors = layer_args(mode, 3, 3, 4, hidden, dtype=torch.float32)
    lengths = torch.tensor([3, 1, 2], dtype=torch.int32, device=DEVICE)
    first, upstream = layer_grads(rnn_ops.rnn_layer, tensors, lengths, None, mode, False)
    second, _ = layer_grads(rnn_ops.rnn_layer, tensors, lengths, None, mode, False, upstream)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_compile_fullgraph_through_functional_rnn():
    torch._dynamo.reset()
    ref = module_for("gru", 4, 7).double()
    fast = module_for("gru", 4, 7).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    weights = weights_of(fast)

    def fn(x, lengths):
        out, h_n, _ = FF.rnn(x, weights, mode="gru", batch_first=True, lengths=lengths)
        return out, h_n

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6, 4, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([6, 2, 4])
    out, h_n = compiled(x, lengths)
    (out.sum() + (h_n * 2).sum()).backward()
    x64 = x.detach().cpu().double().requires_grad_()
    packed = pack_padded_sequence(x64, lengths, batch_first=True, enforce_sorted=False)
    out64, h64 = ref(packed)
    out64, _ = pad_packed_sequence(out64, batch_first=True, total_length=6)
    (out64.sum() + (h64 * 2).sum()).backward()
    assert rel_err(out, out64) <= 1e-5 and rel_err(h_n, h64) <= 1e-5
    assert rel_err(x.grad, x64.grad) <= 1e-5


def test_bad_arguments_name_the_argument():
    from fastrec.kernels import rnn as kernels

    gx, h0 = torch.randn(4, 2, 21, device=DEVICE), torch.randn(2, 7, device=DEVICE)
    w_hh = torch.randn(21, 7, device=DEVICE)
    with pytest.raises(ValueError, match="mode"):
        kernels.rnn_forward(gx, h0, None, w_hh, None, None, None, "gruu", False)
    with pytest.raises(ValueError, match="w_hh"):
        kernels.rnn_forward(gx, h0, None, w_hh[:, :6], None, None, None, "gru", False)
    with pytest.raises(TypeError, match="lengths"):
        kernels.rnn_forward(gx, h0, None, w_hh, None, torch.ones(2, device=DEVICE), None, "gru", False)
    with pytest.raises(ValueError, match="reset"):
        kernels.rnn_forward(gx, h0, None, w_hh, None, None, torch.zeros(3, 2, dtype=torch.bool), "gru", False)
    with pytest.raises(ValueError, match="c0"):
        gx4 = torch.randn(4, 2, 28, device=DEVICE)
        kernels.rnn_forward(gx4, h0, None, torch.randn(28, 7, device=DEVICE), None, None, None, "lstm", False)


# --------------------------------------------------------------------------- packed layout
def packed_result(module_cls, ref, packed, h0, c0, backend):
    """A fastrec module with ``ref``'s weights on ``packed`` (a PackedSequence) under ``backend``:
    [output data, h_n, (c_n), gradients of the packed data, h0, (c0) and every parameter] under
    fixed upstream gradients."""
    fast = module_cls(ref.input_size, ref.hidden_size, bidirectional=ref.bidirectional, **module_kwargs(ref))
    fast = fast.to(device=packed.data.device, dtype=packed.data.dtype)
    fast.load_state_dict(ref.state_dict())
    data = packed.data.detach().clone().requires_grad_()
    states = [t.detach().clone().requires_grad_() for t in (h0, c0) if t is not None]
    hx = tuple(states) if len(states) == 2 else states[0]
    with backends.use_backend(backend):
        out, state = fast(PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), hx)
    outs = [out.data, *(state if isinstance(state, tuple) else (state,))]
    gen = torch.Generator().manual_seed(1)
    upstream = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
    grads = torch.autograd.grad(outs, [data, *states, *fast.parameters()], upstream)
    return outs + list(grads)


def module_kwargs(ref) -> dict:
    return {"nonlinearity": ref.nonlinearity} if isinstance(ref, torch.nn.RNN) else {}


FAST_CLASSES = {"tanh": fnn.RNN, "relu": fnn.RNN, "gru": fnn.GRU, "lstm": fnn.LSTM}


@pytest.mark.parametrize("mode,hidden", [(m, 7) for m in MODES] + [("gru", 50), ("lstm", 50)])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_layout_matches_cpp_and_torch_modules(mode, hidden, enforce_sorted):
    """The Triton kernels on the packed rows natively (no padding) == torch's module on the same
    PackedSequence (float64, relative error <= 1e-12) == the C++ packed kernels: bidirectional,
    lengths with ties and a row of length 1, h0 (c0) given; output, states and every gradient."""
    ref = module_for(mode, 3, hidden, bidirectional=True).double()
    lengths = torch.tensor([5, 1, 3, 3, 5]) if not enforce_sorted else torch.tensor([5, 5, 3, 3, 1])
    x = torch.randn(5, 5, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted).to(DEVICE)
    h0 = torch.randn(2, 5, hidden, dtype=torch.float64, device=DEVICE)
    c0 = torch.randn(2, 5, hidden, dtype=torch.float64, device=DEVICE) if mode == "lstm" else None
    backends.stats(reset=True)
    fast = packed_result(FAST_CLASSES[mode], ref, packed, h0, c0, "triton")
    assert backends.stats(reset=True) == {("rnn", "triton", ""): 2}
    expected = packed_result(FAST_CLASSES[mode], ref, packed, h0, c0, "torch")
    for i, (a, b) in enumerate(zip(fast, expected, strict=True)):
        assert a.shape == b.shape and rel_err(a, b) <= BOUND[torch.float64], (i, rel_err(a, b))
    torch_outs = packed_result(
        lambda *a, **k: module_for(mode, *a[:2], bidirectional=True), ref, packed, h0, c0, "torch"
    )
    for i, (a, b) in enumerate(zip(fast, torch_outs, strict=True)):
        assert rel_err(a, b) <= BOUND[torch.float64], ("torch.nn", i, rel_err(a, b))
    if rnn_ops.HAVE_CPP and DEVICE.type == "cpu":
        cpp = packed_result(FAST_CLASSES[mode], ref, packed, h0, c0, "cpp")
        for i, (a, b) in enumerate(zip(fast, cpp, strict=True)):
            assert rel_err(a, b) <= BOUND[torch.float64], ("cpp", i, rel_err(a, b))


def test_packed_layout_runs_no_padding_copies(monkeypatch):
    """The packed triton path calls neither pad_packed_sequence nor pack_padded_sequence."""

    def fail(*args, **kwargs):
        raise AssertionError("packed input went through padding")

    monkeypatch.setattr(rnn_ops, "pad_packed_sequence", fail)
    monkeypatch.setattr(rnn_ops, "pack_padded_sequence", fail)
    gru = fnn.GRU(3, 7).to(DEVICE)
    packed = pack_padded_sequence(torch.randn(4, 3, 3), torch.tensor([4, 2, 1]), enforce_sorted=False).to(DEVICE)
    out, h_n = gru(packed)
    out.data.sum().backward()
    assert out.data.shape == (7, 7) and h_n.shape == (1, 3, 7)


@pytest.mark.parametrize("mode", MODES)
def test_packed_gradcheck_float64(mode):
    """gradcheck of one reverse layer through the packed Triton kernels (float64, tiny)."""
    tensors = layer_args(mode, 3, 3, 2, 3)
    batch_sizes = torch.tensor([3, 2, 1])  # lengths 3, 2, 1
    x = tensors[0].reshape(9, 2)[:6].detach()
    inputs = [t.requires_grad_() for t in (x, *tensors[1:]) if t is not None]

    def fn(*args):
        it = iter(args)
        x, h0 = next(it), next(it)
        c0 = next(it) if mode == "lstm" else None
        w_ih, w_hh, b_ih, b_hh = it
        out, h_n, c_n = rnn_ops.rnn_layer(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, mode, True, batch_sizes=batch_sizes
        )
        return (out, h_n, c_n) if mode == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("mode", ["gru", "lstm"])
def test_device_lengths_padded_path_equals_the_packed_result(mode):
    """functional.rnn with ``lengths`` as a tensor on the input's device (no host sync) gives the
    packed result: h_n (the state at each row's last step) and the real rows of the output."""
    module = module_for(mode, 3, 7, bidirectional=True).to(DEVICE)
    x = torch.randn(4, 6, 3, device=DEVICE)
    lengths = torch.tensor([6, 2, 2, 1], device=DEVICE)
    out, h_n, _ = FF.rnn(x, weights_of(module), mode=mode, bidirectional=True, batch_first=True, lengths=lengths)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    p_out, p_h, _ = FF.rnn_packed(packed.data, packed.batch_sizes, weights_of(module), mode=mode, bidirectional=True)
    p_out, _ = pad_packed_sequence(PackedSequence(p_out, packed.batch_sizes), batch_first=True)
    torch.testing.assert_close(out, p_out[packed.unsorted_indices], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n, p_h[:, packed.unsorted_indices], rtol=1e-5, atol=1e-6)


def test_bad_packed_batch_sizes_name_the_argument():
    gx = torch.randn(6, 3 * 7, device=DEVICE)
    h0 = torch.zeros(3, 7, device=DEVICE)
    w_hh = torch.randn(21, 7, device=DEVICE)
    from fastrec.kernels import rnn as kernels

    for bad, message in [
        (torch.tensor([2, 3, 1]), "non-increasing"),
        (torch.tensor([3, 2, 2]), "sum to the 6"),
        (torch.tensor([3.0, 2.0, 1.0]), "batch_sizes must be a 1-D int64"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            kernels.rnn_forward(gx, h0, None, w_hh, None, None, None, "gru", False, batch_sizes=bad)
    with pytest.raises(ValueError, match="lengths and reset cannot be combined"):
        lengths = torch.ones(3, dtype=torch.int32, device=DEVICE)
        kernels.rnn_forward(gx, h0, None, w_hh, None, lengths, None, "gru", False, batch_sizes=torch.tensor([3, 2, 1]))


# --------------------------------------------------------------------------- GRU4Rec on the Triton path
def test_gru4rec_forced_triton_runs_the_lengths_path_and_matches_the_torch_backend():
    """The fastrec backend under the forced triton backend runs the GRU with the device lengths
    (what CUDA runs; no packing, no gather): forward and every gradient == the torch backend."""
    from fastrec.models import GRU4Rec, ModelInput

    torch.manual_seed(0)
    fast = GRU4Rec(30, dim=8, hidden=12, n_layers=2, dropout=0.0, max_len=6, backend="fastrec").to(DEVICE)
    torch.manual_seed(0)
    plain = GRU4Rec(30, dim=8, hidden=12, n_layers=2, dropout=0.0, max_len=6, backend="torch").to(DEVICE)
    items = torch.randint(1, 31, (5, 6), device=DEVICE)
    lengths = torch.tensor([6, 1, 3, 3, 5], device=DEVICE)
    items[torch.arange(6, device=DEVICE)[None, :] >= lengths[:, None]] = 0
    batch = ModelInput(items, lengths)
    backends.stats(reset=True)
    out = fast(batch)
    assert backends.stats(reset=True) == {("rnn", "triton", ""): 2}  # two layers, no packing, no gather
    with backends.use_backend("torch"):
        expected = plain(batch)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(fast.parameters()), upstream)
    with backends.use_backend("torch"):
        expected_grads = torch.autograd.grad(expected, list(plain.parameters()), upstream)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(fast.named_parameters(), grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_gru4rec_forced_triton_under_autocast_runs_the_recurrence_in_bfloat16():
    """Under autocast the lengths path casts input, states and weights to the autocast dtype (the
    Triton recurrence runs 16-bit) instead of failing on mixed dtypes; close to the fp32 result."""
    from fastrec.models import GRU4Rec, ModelInput

    torch.manual_seed(0)
    model = GRU4Rec(30, dim=8, hidden=12, dropout=0.0, max_len=6, backend="fastrec").to(DEVICE)
    items = torch.randint(1, 31, (4, 6), device=DEVICE)
    batch = ModelInput(items, torch.tensor([6, 2, 4, 1], device=DEVICE))
    reference = model(batch)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = model(batch)
    out.float().sum().backward()
    assert model.gru.weight_hh_l0.grad is not None and model.gru.weight_hh_l0.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
