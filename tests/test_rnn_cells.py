"""fastrec.nn.RNNCell / GRUCell / LSTMCell and fastrec.functional's cell functions against torch.

References and bounds:
- the torch module (``torch.nn.RNNCell`` / ``GRUCell`` / ``LSTMCell``) in float64 with the same
  state_dict; fp32 fastrec vs that reference: relative error ``||fast - ref|| / ||ref|| <= 1e-5``
  on h' (and c') and on the gradients of input, h, c, every weight and bias, under random
  upstream gradients on h' and c';
- the functional cells against torch's own ``torch.gru_cell`` etc. in float64 (same bound);
- ``gradcheck`` in float64 through the cpp autograd.Function; ``torch.library.opcheck`` on the
  two registered C++ cell ops.
The cpp backend is forced (where built) so that every test runs the fused cell.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import fastrec
from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.ops import rnn as rnn_ops

BOUND = 1e-5
MODES = ("tanh", "relu", "gru", "lstm")
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
needs_cpp = pytest.mark.skipif(not rnn_ops.HAVE_CELL_CPP, reason="fastrec._C does not register the cell ops")


@pytest.fixture(autouse=True)
def _fused_backend():
    if not rnn_ops.HAVE_CELL_CPP:
        yield
        return
    with backends.use_backend("cpp"):
        yield


def make(mode: str, input_size: int, hidden: int, bias: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fastrec fp32 cell, torch fp64 cell) with the same weights."""
    if mode == "gru":
        fast, ref = fnn.GRUCell(input_size, hidden, bias), torch.nn.GRUCell(input_size, hidden, bias)
    elif mode == "lstm":
        fast, ref = fnn.LSTMCell(input_size, hidden, bias), torch.nn.LSTMCell(input_size, hidden, bias)
    else:
        fast = fnn.RNNCell(input_size, hidden, bias, nonlinearity=mode)
        ref = torch.nn.RNNCell(input_size, hidden, bias, nonlinearity=mode)
    ref.load_state_dict(fast.state_dict())
    return fast, ref.double()


def rel_err(fast: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    return ((fast.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _outs(result) -> list[Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def compare(mode, fast, ref, x, states):
    """Run both cells with grads on input, states and parameters; check every tensor."""
    x32, x64 = x.float().clone().requires_grad_(), x.double().clone().requires_grad_()
    s32 = [s.float().clone().requires_grad_() for s in states]
    s64 = [s.double().clone().requires_grad_() for s in states]

    def hx(ss):
        if not ss:
            return None
        return tuple(ss) if mode == "lstm" else ss[0]

    outs32, outs64 = _outs(fast(x32, hx(s32))), _outs(ref(x64, hx(s64)))
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    torch.autograd.backward(outs32, [g.float() for g in grads])
    torch.autograd.backward(outs64, grads)
    for a, b in zip(outs32, outs64, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert rel_err(a, b) <= BOUND
    assert rel_err(x32.grad, x64.grad) <= BOUND
    for a, b in zip(s32, s64, strict=True):
        assert rel_err(a.grad, b.grad) <= BOUND
    for (name, p32), (_, p64) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert rel_err(p32.grad, p64.grad) <= BOUND, name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden,batch", [(7, 1), (100, 2), (17, 4), (100, 5), (64, 33), (1, 9), (100, 130)])
def test_cell_matches_torch_output_and_every_gradient(mode, hidden, batch):
    fast, ref = make(mode, 11, hidden)
    states = [torch.randn(batch, hidden) for _ in range(2 if mode == "lstm" else 1)]
    backends.stats(reset=True)
    compare(mode, fast, ref, torch.randn(batch, 11), states)
    if rnn_ops.HAVE_CELL_CPP:
        assert backends.stats()[("rnn_cell", "cpp", "")] == 1


@pytest.mark.parametrize("mode", MODES)
def test_cell_without_bias_matches_torch(mode):
    fast, ref = make(mode, 6, 9, bias=False)
    states = [torch.randn(4, 9) for _ in range(2 if mode == "lstm" else 1)]
    compare(mode, fast, ref, torch.randn(4, 6), states)


@pytest.mark.parametrize("mode", MODES)
def test_cell_hx_none_is_zero_state(mode):
    fast, ref = make(mode, 5, 8)
    compare(mode, fast, ref, torch.randn(3, 5), [])


@pytest.mark.parametrize("mode", MODES)
def test_cell_unbatched_input(mode):
    fast, ref = make(mode, 5, 8)
    states = [torch.randn(8) for _ in range(2 if mode == "lstm" else 1)]
    compare(mode, fast, ref, torch.randn(5), states)
    compare(mode, fast, ref, torch.randn(5), [])


@pytest.mark.parametrize("mode", MODES)
def test_cell_parameters_and_state_dict_are_torchs(mode):
    fast, ref = make(mode, 5, 8)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert isinstance(fast, type(ref))


def test_cell_loop_matches_torch_over_steps():
    """A GRU4Rec-style loop of GRUCell steps: gradients flow through every fused step."""
    fast, ref = make("gru", 6, 10)
    x = torch.randn(7, 4, 6)
    x32, x64 = x.float().clone().requires_grad_(), x.double().clone().requires_grad_()
    h32, h64 = torch.zeros(4, 10), torch.zeros(4, 10, dtype=torch.float64)
    outs32, outs64 = [], []
    for t in range(7):
        h32, h64 = fast(x32[t], h32), ref(x64[t], h64)
        outs32.append(h32)
        outs64.append(h64)
    o32, o64 = torch.stack(outs32), torch.stack(outs64)
    g = torch.randn(o64.shape, dtype=torch.float64)
    o32.backward(g.float())
    o64.backward(g)
    assert rel_err(o32, o64) <= BOUND and rel_err(x32.grad, x64.grad) <= BOUND
    for (name, p32), (_, p64) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert rel_err(p32.grad, p64.grad) <= BOUND, name


@pytest.mark.parametrize("mode", MODES)
def test_functional_cells_match_torch_cell_functions(mode):
    batch, size, hidden = 6, 5, 13
    g = GATES[mode]
    tensors = [torch.randn(batch, size), torch.randn(batch, hidden), torch.randn(batch, hidden)]
    tensors += [torch.randn(g * hidden, size) * 0.3, torch.randn(g * hidden, hidden) * 0.3]
    tensors += [torch.randn(g * hidden), torch.randn(g * hidden)]
    t32 = [t.float().clone().requires_grad_() for t in tensors]
    t64 = [t.double().clone().requires_grad_() for t in tensors]

    def run(ts, fused):
        x, h, c, w_ih, w_hh, b_ih, b_hh = ts
        if mode == "lstm":
            fn = FF.lstm_cell if fused else torch.lstm_cell
            return list(fn(x, (h, c), w_ih, w_hh, b_ih, b_hh))
        fused_fns = {"tanh": FF.rnn_tanh_cell, "relu": FF.rnn_relu_cell, "gru": FF.gru_cell}
        torch_fns = {"tanh": torch.rnn_tanh_cell, "relu": torch.rnn_relu_cell, "gru": torch.gru_cell}
        return [(fused_fns if fused else torch_fns)[mode](x, h, w_ih, w_hh, b_ih, b_hh)]

    outs32, outs64 = run(t32, True), run(t64, False)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    inputs32 = [t for i, t in enumerate(t32) if mode == "lstm" or i != 2]
    inputs64 = [t for i, t in enumerate(t64) if mode == "lstm" or i != 2]
    d32 = torch.autograd.grad(outs32, inputs32, [gr.float() for gr in grads])
    d64 = torch.autograd.grad(outs64, inputs64, grads)
    for a, b in zip(outs32, outs64, strict=True):
        assert rel_err(a, b) <= BOUND
    for a, b in zip(d32, d64, strict=True):
        assert rel_err(a, b) <= BOUND


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(mode, bias):
    batch, size, hidden = 3, 4, 5
    g = GATES[mode]

    def leaf(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()

    x, h, c = leaf(batch, size), leaf(batch, hidden), leaf(batch, hidden) if mode == "lstm" else None
    w_ih, w_hh = leaf(g * hidden, size), leaf(g * hidden, hidden)
    b_ih, b_hh = (leaf(g * hidden), leaf(g * hidden)) if bias else (None, None)

    def fn(*args):
        h_new, c_new = rnn_ops.RNNCellFunction.apply(*args, mode, "cpp")
        return (h_new, c_new) if mode == "lstm" else h_new

    assert torch.autograd.gradcheck(fn, (x, h, c, w_ih, w_hh, b_ih, b_hh))


@needs_cpp
@pytest.mark.parametrize("mode", MODES)
def test_registered_cell_ops_pass_opcheck(mode):
    batch, size, hidden, g = 4, 6, 9, GATES[mode]
    x, h = torch.randn(batch, size), torch.randn(batch, hidden)
    c = torch.randn(batch, hidden) if mode == "lstm" else None
    w_ih, w_hh = torch.randn(g * hidden, size), torch.randn(g * hidden, hidden)
    b_ih, b_hh = torch.randn(g * hidden), torch.randn(g * hidden)
    forward = torch.ops.fastrec.rnn_cell_forward_cpp.default
    backward = torch.ops.fastrec.rnn_cell_backward_cpp.default
    for biases in ((b_ih, b_hh), (None, None)):
        torch.library.opcheck(forward, (x, h, c, w_ih, w_hh, *biases, mode))
        h_new, c_new, workspace = forward(x, h, c, w_ih, w_hh, *biases, mode)
        assert workspace.shape == (batch, rnn_ops.CELL_SLOTS[mode] * hidden)
        grad_c = torch.randn(batch, hidden) if mode == "lstm" else None
        args = (torch.randn(batch, hidden), grad_c, workspace, x, h, c, w_ih, w_hh, biases[0] is not None, mode)
        torch.library.opcheck(backward, args)


@needs_cpp
def test_compile_fullgraph_cell():
    torch._dynamo.reset()
    fast, ref = make("gru", 5, 7)
    x, h = torch.randn(3, 5, requires_grad=True), torch.randn(3, 7)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    out = compiled(x, h)
    out.backward(torch.ones_like(out))
    x64 = x.detach().double().requires_grad_()
    out64 = ref(x64, h.double())
    out64.backward(torch.ones_like(out64))
    assert rel_err(out, out64) <= BOUND and rel_err(x.grad, x64.grad) <= BOUND


def test_patch_swaps_cells():
    model = torch.nn.Sequential(torch.nn.GRUCell(4, 6))
    report = fastrec.patch(model)
    assert type(model[0]) is fnn.GRUCell
    assert ("0", "torch.nn.GRUCell", "fastrec.nn.GRUCell") in report.replaced


def test_low_precision_runs_torchs_cell_counted():
    fast = fnn.GRUCell(4, 6).to(torch.bfloat16)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    backends.stats(reset=True)
    with backends.use_backend("torch"):
        out = fast(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 6)
    assert (
        backends.stats()[("rnn_cell", "torch", "torch.bfloat16 cell (the fused cell computes in float32 / float64)")]
        == 1
    )


def test_bad_inputs_name_the_argument():
    w_ih, w_hh = torch.randn(21, 5), torch.randn(21, 7)
    x, h = torch.randn(4, 5), torch.randn(4, 7)
    with pytest.raises(ValueError, match="input"):
        FF.gru_cell(torch.randn(4, 2, 5), h, w_ih, w_hh)
    with pytest.raises(ValueError, match="weight_ih"):
        FF.gru_cell(torch.randn(4, 6), h, w_ih, w_hh)
    with pytest.raises(ValueError, match="hx"):
        FF.gru_cell(x, torch.randn(3, 7), w_ih, w_hh)
    with pytest.raises(ValueError, match="weight_hh"):
        FF.rnn_tanh_cell(x, h, torch.randn(7, 5), w_hh)
    with pytest.raises(ValueError, match="b_ih"):
        FF.gru_cell(x, h, w_ih, w_hh, torch.randn(21), None)
    with pytest.raises(TypeError, match="hx"):
        FF.lstm_cell(x, h, torch.randn(28, 5), torch.randn(28, 7))
    with pytest.raises(TypeError, match="hx"):
        FF.gru_cell(x, h.double(), w_ih, w_hh)
    with pytest.raises(RuntimeError):  # torch's own error, via the counted fallback
        fnn.GRUCell(5, 7)(torch.randn(4, 6))
