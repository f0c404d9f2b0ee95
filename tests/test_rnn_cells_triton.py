"""The Triton single-step cells (fastrec.nn.RNNCell / GRUCell / LSTMCell on the triton backend)
against torch's cells; Triton's interpreter on CPU (tests/conftest.py), the GPU where there is one.

References and bounds:
- the torch module (``torch.nn.RNNCell`` / ``GRUCell`` / ``LSTMCell``) in float64 with the same
  weights, on the inputs rounded to the tested dtype; relative error ``||fast - ref|| / ||ref||``
  on h' (and c') and on the gradients of input, h, c, every weight and bias under random upstream
  gradients: fp64 1e-12, fp32 1e-5 (ieee dots), fp16 5e-3 (operands, outputs and the gate
  gradients fed to the GEMMs are rounded to fp16: a few units of its 2^-11 rounding), bf16 4e-2
  (CUDA only: the same for its 2^-8);
- ``gradcheck`` (fast mode) in float64 through the triton autograd.Function; ``torch.library.opcheck`` on the
  two custom ops; two runs bitwise equal; ``torch.compile(fullgraph=True)`` on a cell module.
The triton backend is forced so that every test runs the Triton kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch import Tensor

from fastrec import backends
from fastrec import nn as fnn
from fastrec.ops import rnn as rnn_ops

MODES = ("tanh", "relu", "gru", "lstm")
GATES = {"tanh": 1, "relu": 1, "gru": 3, "lstm": 4}
BOUNDS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _triton_backend(request):
    if request.node.get_closest_marker("cuda") is not None:  # the default routing under test
        yield
        return
    with backends.use_backend("triton"):
        yield


def make(mode: str, input_size: int, hidden: int, dtype: torch.dtype, bias: bool = True):
    """(fastrec cell in dtype on DEVICE, torch fp64 cell on CPU) with the same (dtype-rounded) weights."""
    if mode == "gru":
        fast, ref = fnn.GRUCell(input_size, hidden, bias), torch.nn.GRUCell(input_size, hidden, bias)
    elif mode == "lstm":
        fast, ref = fnn.LSTMCell(input_size, hidden, bias), torch.nn.LSTMCell(input_size, hidden, bias)
    else:
        fast = fnn.RNNCell(input_size, hidden, bias, nonlinearity=mode)
        ref = torch.nn.RNNCell(input_size, hidden, bias, nonlinearity=mode)
    fast = fast.to(DEVICE, dtype)
    ref.load_state_dict({k: v.double().cpu() for k, v in fast.state_dict().items()})
    return fast, ref.double()


def rel_err(fast: Tensor, ref: Tensor) -> float:
    ref = ref.double().cpu()
    return ((fast.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _outs(result) -> list[Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def run_both(mode, fast, ref, x, states, dtype):
    """Both cells with grads on input, states and parameters: (fast outs, ref outs, fast leaves, ref leaves)."""
    xf = x.to(DEVICE, dtype).requires_grad_()
    x64 = xf.detach().double().cpu().requires_grad_()
    sf = [s.to(DEVICE, dtype).requires_grad_() for s in states]
    s64 = [s.detach().double().cpu().requires_grad_() for s in sf]

    def hx(ss):
        if not ss:
            return None
        return tuple(ss) if mode == "lstm" else ss[0]

    outs, outs64 = _outs(fast(xf, hx(sf))), _outs(ref(x64, hx(s64)))
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs64]
    torch.autograd.backward(outs, [g.to(DEVICE, dtype) for g in grads])
    torch.autograd.backward(outs64, grads)
    return outs, outs64, [xf, *sf, *fast.parameters()], [x64, *s64, *ref.parameters()]


def check(mode, fast, ref, x, states, dtype):
    outs, outs64, leaves, leaves64 = run_both(mode, fast, ref, x, states, dtype)
    bound = BOUNDS[dtype]
    for a, b in zip(outs, outs64, strict=True):
        assert a.dtype == dtype and a.shape == b.shape
        assert rel_err(a, b) <= bound
    for i, (a, b) in enumerate(zip(leaves, leaves64, strict=True)):
        assert a.grad is not None and a.grad.dtype == dtype, i
        assert rel_err(a.grad, b.grad) <= bound, i


CASES = [(1, 1), (1, 3), (7, 1), (7, 3), (50, 1), (50, 3)]  # (hidden, batch)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden,batch", CASES)
def test_fp32_cell_matches_torch_output_and_every_gradient(mode, hidden, batch):
    fast, ref = make(mode, 5, hidden, torch.float32)
    states = [torch.randn(batch, hidden) for _ in range(2 if mode == "lstm" else 1)]
    backends.stats(reset=True)
    check(mode, fast, ref, torch.randn(batch, 5), states, torch.float32)
    assert backends.stats()[("rnn_cell", "triton", "")] == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden,batch", [(7, 3), (50, 1)])
def test_fp64_fp16_cell_matches_torch(mode, dtype, hidden, batch):
    fast, ref = make(mode, 6, hidden, dtype)
    states = [torch.randn(batch, hidden) for _ in range(2 if mode == "lstm" else 1)]
    check(mode, fast, ref, torch.randn(batch, 6), states, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_cell_without_bias_and_hx_none(mode):
    fast, ref = make(mode, 6, 9, torch.float32, bias=False)
    check(
        mode,
        fast,
        ref,
        torch.randn(4, 6),
        [torch.randn(4, 9) for _ in range(2 if mode == "lstm" else 1)],
        torch.float32,
    )
    fast, ref = make(mode, 6, 9, torch.float32)
    check(mode, fast, ref, torch.randn(4, 6), [], torch.float32)


def test_lstm_gradient_of_h_only():
    """c_new unused: its gradient arrives as None (the kernel's HAS_GRAD_C off)."""
    fast, ref = make("lstm", 4, 7, torch.float32)
    x, h, c = torch.randn(3, 4), torch.randn(3, 7), torch.randn(3, 7)
    xf = x.to(DEVICE, copy=True).requires_grad_()
    x64 = x.double().requires_grad_()
    fast(xf, (h.to(DEVICE), c.to(DEVICE)))[0].sum().backward()
    ref(x64, (h.double(), c.double()))[0].sum().backward()
    assert rel_err(xf.grad, x64.grad) <= BOUNDS[torch.float32]


def _leaves(mode, batch, size, hidden, bias, dtype=torch.float64):
    g = GATES[mode]

    def leaf(*shape):
        return (torch.randn(*shape, dtype=dtype, device=DEVICE) * 0.5).requires_grad_()

    x, h, c = leaf(batch, size), leaf(batch, hidden), leaf(batch, hidden) if mode == "lstm" else None
    w_ih, w_hh = leaf(g * hidden, size), leaf(g * hidden, hidden)
    b_ih, b_hh = (leaf(g * hidden), leaf(g * hidden)) if bias else (None, None)
    return x, h, c, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(mode, bias):
    def fn(*args):
        h_new, c_new = rnn_ops.RNNCellFunction.apply(*args, mode, "triton")
        return (h_new, c_new) if mode == "lstm" else h_new

    # fast mode (random projections of the Jacobian: a few interpreted launches instead of one per
    # input element); the full Jacobians are pinned by the float64 comparisons with torch above.
    assert torch.autograd.gradcheck(fn, _leaves(mode, 2, 3, 4, bias), fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_custom_ops_pass_opcheck(mode):
    batch, hidden = 3, 5
    args = [t.detach() if t is not None else None for t in _leaves(mode, batch, 4, hidden, True, torch.float32)]
    forward = torch.ops.fastrec.rnn_cell_forward_triton.default
    backward = torch.ops.fastrec.rnn_cell_backward_triton.default
    for biases in ((args[5], args[6]), (None, None)):
        torch.library.opcheck(forward, (*args[:5], *biases, mode, False))
        h_new, c_new, workspace = forward(*args[:5], *biases, mode, False)
        assert workspace.shape == (batch, rnn_ops.CELL_SLOTS[mode] * hidden) and workspace.dtype == torch.float32
        grad_c = torch.randn(batch, hidden, device=DEVICE) if mode == "lstm" else None
        grads = (torch.randn(batch, hidden, device=DEVICE), grad_c, workspace)
        torch.library.opcheck(backward, (*grads, *args[:5], biases[0] is not None, mode))


@pytest.mark.parametrize("mode", ["gru", "lstm"])
def test_two_runs_are_bitwise_equal(mode):
    leaves = _leaves(mode, 3, 5, 20, True, torch.float32)
    tensors = [t for t in leaves if t is not None]

    def run():
        h_new, c_new = rnn_ops.RNNCellFunction.apply(*leaves, mode, "triton")
        out = h_new.sum() + (c_new.square().sum() if mode == "lstm" else 0)
        return [h_new.detach(), *torch.autograd.grad(out, tensors)]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_compile_fullgraph_cell():
    torch._dynamo.reset()
    fast, ref = make("gru", 5, 7, torch.float32)
    x, h = torch.randn(3, 5, device=DEVICE, requires_grad=True), torch.randn(3, 7, device=DEVICE)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    out = compiled(x, h)
    out.backward(torch.ones_like(out))
    x64 = x.detach().double().cpu().requires_grad_()
    out64 = ref(x64, h.double().cpu())
    out64.backward(torch.ones_like(out64))
    assert rel_err(out, out64) <= BOUNDS[torch.float32] and rel_err(x.grad, x64.grad) <= BOUNDS[torch.float32]


def test_inference_runs_the_forward_op_alone():
    fast, ref = make("lstm", 5, 6, torch.float32)
    x, h, c = torch.randn(2, 5), torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():
        h_new, c_new = fast(x.to(DEVICE), (h.to(DEVICE), c.to(DEVICE)))
        h64, c64 = ref(x.double(), (h.double(), c.double()))
    assert rel_err(h_new, h64) <= BOUNDS[torch.float32] and rel_err(c_new, c64) <= BOUNDS[torch.float32]


def test_launcher_bad_inputs_name_the_argument():
    forward = torch.ops.fastrec.rnn_cell_forward_triton
    x, h, w_ih, w_hh = (torch.randn(4, 5), torch.randn(4, 7), torch.randn(21, 5), torch.randn(21, 7))
    with pytest.raises(ValueError, match="mode"):
        forward(x, h, None, w_ih, w_hh, None, None, "lstmx", False)
    with pytest.raises(ValueError, match="w_hh"):
        forward(x, h, None, w_ih, torch.randn(21, 6), None, None, "gru", False)
    with pytest.raises(TypeError, match="h must be torch.float32"):
        forward(x, h.double(), None, w_ih, w_hh, None, None, "gru", False)
    with pytest.raises(ValueError, match="c must be given"):
        forward(x, h, None, torch.randn(28, 5), torch.randn(28, 7), None, None, "lstm", False)
    with pytest.raises(ValueError, match="b_ih and b_hh"):
        forward(x, h, None, w_ih, w_hh, torch.randn(21), None, "gru", False)
    with pytest.raises(ValueError, match="workspace"):
        torch.ops.fastrec.rnn_cell_backward_triton(h, None, torch.randn(4, 7), x, h, None, w_ih, w_hh, True, "gru")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cells_route_to_torchs_cell_unforced(mode, dtype):
    fast, ref = make(mode, 24, 100, dtype)
    states = [torch.randn(64, 100) for _ in range(2 if mode == "lstm" else 1)]
    backends.stats(reset=True)
    check(mode, fast, ref, torch.randn(64, 24), states, dtype)
    assert backends.stats()[("rnn_cell", "torch", rnn_ops.CELL_CUDA_ROUTE)] == 1
