"""The fused Caser block (fastrec.functional.caser, fastrec.nn.CaserConv) against RecBole's loop.

Reference: the loop Caser implementations run (RecBole, caser_pytorch), written here with
torch.nn modules in float64: per height ``nn.Conv2d(1, nh, (k+1, d))`` + activation +
``F.max_pool1d`` over time, concatenated, and the vertical ``nn.Conv2d(1, nv, (L, 1))`` flattened
with ``.view(B, -1)``; the same weights loaded. Bound: fp32 relative error ``||fast - ref|| /
||ref|| <= 1e-5`` on out_h, out_v and the gradients of E, every w_h[k], b_h[k], w_v and b_v under
random upstream gradients; float64 runs to 1e-12. Every test runs on the cpp, torch and triton
(interpreter on CPU) backends unless it names one. gradcheck in float64 on tiny shapes;
torch.library.opcheck on the four registered ops; torch.compile(fullgraph=True).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.ops import caser as caser_ops

BOUND = 1e-5
BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not caser_ops.HAVE_CPP, reason="fastrec._C not built")),
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(backends.available()["triton"] is not None, reason="no triton")),
]


class RecBoleCaserConvs(torch.nn.Module):
    """The convolution part of RecBole's Caser, as it is written there (the reference)."""

    def __init__(self, L: int, d: int, n_h: int, n_v: int) -> None:
        super().__init__()
        self.conv_v = torch.nn.Conv2d(1, n_v, (L, 1))
        self.conv_h = torch.nn.ModuleList([torch.nn.Conv2d(1, n_h, (i, d)) for i in range(1, L + 1)])

    def forward(self, E: Tensor, act_h=torch.relu, act_v=None) -> tuple[Tensor, Tensor]:
        x = E.unsqueeze(1)
        out_v = self.conv_v(x)
        if act_v is not None:
            out_v = act_v(out_v)
        out_v = out_v.view(E.shape[0], -1)
        pooled = []
        for conv in self.conv_h:
            conv_out = act_h(conv(x).squeeze(3))
            pooled.append(F.max_pool1d(conv_out, conv_out.size(2)).squeeze(2))
        return torch.cat(pooled, 1), out_v


TORCH_ACTS = {"none": lambda x: x, "relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def device_of(backend: str) -> torch.device:
    """triton runs on CUDA where there is a GPU (else in the interpreter on the CPU)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def rel_err(fast: Tensor, ref: Tensor) -> float:
    fast, ref = fast.cpu(), ref.cpu().double()
    diff = (fast.double() - ref).norm()
    return (diff / ref.norm()).item() if ref.norm() > 0 else diff.item()


def make(L, d, n_h, n_v, dtype=torch.float32, bias=True):
    """(CaserConv in ``dtype``, RecBole reference in float64) with the same weights."""
    fast = fnn.CaserConv(L, d, n_h, n_v, dtype=dtype)
    if not bias:
        for conv in [*fast.conv_h, fast.conv_v]:
            conv.bias = None
    ref = RecBoleCaserConvs(L, d, n_h, n_v).double()
    if not bias:
        for conv in [*ref.conv_h, ref.conv_v]:
            conv.bias = None
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def check_against_reference(fast, ref, E, act_h="relu", act_v="none", bound=BOUND, backend="cpp"):
    """Forward and every gradient (E and all parameters) with random upstream gradients."""
    fast.act_h, fast.act_v = act_h, act_v
    device = device_of(backend)
    fast.to(device)
    E_fast = E.detach().to(device).requires_grad_()
    E_ref = E.detach().double().requires_grad_()
    out_h, out_v = fast(E_fast)
    ref_h, ref_v = ref(E_ref, TORCH_ACTS[act_h], None if act_v == "none" else TORCH_ACTS[act_v])
    assert out_h.shape == ref_h.shape and out_v.shape == ref_v.shape
    assert out_h.dtype == E.dtype and out_v.dtype == E.dtype
    assert rel_err(out_h, ref_h) <= bound, rel_err(out_h, ref_h)
    assert rel_err(out_v, ref_v) <= bound, rel_err(out_v, ref_v)
    grad_h, grad_v = torch.randn_like(ref_h), torch.randn_like(ref_v)
    fast_params, ref_params = list(fast.parameters()), list(ref.parameters())
    upstream = (grad_h.to(device, E.dtype), grad_v.to(device, E.dtype))
    fast_grads = torch.autograd.grad((out_h, out_v), [E_fast, *fast_params], upstream)
    ref_grads = torch.autograd.grad((ref_h, ref_v), [E_ref, *ref_params], (grad_h, grad_v))
    names = ["E"] + [name for name, _ in fast.named_parameters()]
    for name, got, want in zip(names, fast_grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= bound, (name, rel_err(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("batch", "L", "d", "n_h", "n_v"),
    [(3, 5, 8, 4, 2), (2, 1, 7, 3, 1), (4, 6, 17, 16, 4), (1, 3, 1, 1, 1), (2, 4, 10, 12, 3), (5, 7, 3, 9, 1)],
)
def test_forward_and_every_gradient_match_recbole_loop(backend, batch, L, d, n_h, n_v):
    fast, ref = make(L, d, n_h, n_v)
    E = torch.randn(batch, L, d)
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recbole_shape_in_float32(backend):
    """L = 10, d = 64, nh = 8, nv = 4 (the benchmark's Caser); the interpreter gets a small batch."""
    fast, ref = make(10, 64, 8, 4)
    E = torch.randn(2 if backend == "triton" else 33, 10, 64)
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("act_h", "act_v"), [("none", "relu"), ("gelu", "tanh"), ("tanh", "sigmoid"), ("sigmoid", "gelu")]
)
def test_activations(backend, act_h, act_v):
    fast, ref = make(4, 9, 5, 3)
    E = torch.randn(3, 4, 9)
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, act_h, act_v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(backend):
    fast, ref = make(4, 6, 3, 2, bias=False)
    E = torch.randn(3, 4, 6)
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_h", [3, 8])
def test_float64_matches_to_rounding(backend, n_h):
    fast, ref = make(5, 6, n_h, 2, dtype=torch.float64)
    E = torch.randn(3, 5, 6, dtype=torch.float64)
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, bound=1e-12, backend=backend)


@pytest.mark.parametrize("backend", ["triton"])
def test_float16_within_twice_torchs_own_error(backend):
    """fp16 (Triton; the interpreter computes in fp32 and rounds at the store): the error against
    the float64 reference is at most 2x (outputs) / 3x (gradients) that of the RecBole loop run
    in fp16 by torch, plus a floor of a few fp16 ulps of the reference's magnitude."""
    fast, ref = make(5, 16, 8, 4)
    half = copy.deepcopy(ref).half()
    fast = fast.half().to(device_of(backend))
    E = torch.randn(4, 5, 16)
    E_fast = E.to(device_of(backend), torch.float16).requires_grad_()
    E_half, E_ref = (E.to(t).requires_grad_() for t in (torch.float16, torch.float64))
    with backends.use_backend(backend):
        outs = fast(E_fast)
    outs_half, outs_ref = half(E_half), ref(E_ref)
    upstream = [torch.randn_like(o) for o in outs_ref]
    grads = torch.autograd.grad(outs, [E_fast, *fast.parameters()], [u.to(E_fast) for u in upstream])
    grads_half = torch.autograd.grad(outs_half, [E_half, *half.parameters()], [u.half() for u in upstream])
    grads_ref = torch.autograd.grad(outs_ref, [E_ref, *ref.parameters()], upstream)

    def check(got, pt, want, factor):
        got = got.cpu()
        floor = 4 * 2**-10 * want.abs().max().item()
        bound = factor * (pt.double() - want).abs().max().item() + floor
        assert (got.double() - want).abs().max().item() <= bound

    for got, pt, want in zip(outs, outs_half, outs_ref, strict=True):
        assert got.dtype == torch.float16
        check(got, pt, want, 2)
    for got, pt, want in zip(grads, grads_half, grads_ref, strict=True):
        check(got, pt, want, 3)


def test_autocast_runs_in_the_autocast_dtype():
    fast, _ = make(3, 4, 2, 2)
    E = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_h, out_v = fast(E)
    assert out_h.dtype == out_v.dtype == torch.bfloat16
    expected = fast.to(torch.bfloat16)(E.to(torch.bfloat16))
    assert torch.equal(out_h, expected[0]) and torch.equal(out_v, expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_ties_route_the_gradient_as_torch(backend):
    """Ties: filters whose every window is negative (all ReLU outputs 0: torch picks t = 0 and
    passes no gradient), and equal positive windows (repeated rows: the first t wins)."""
    fast, ref = make(5, 4, 6, 2)
    with torch.no_grad():
        for conv in fast.conv_h:
            conv.bias[:3] = -100.0  # filters 0..2 of every height: all windows negative
    ref.load_state_dict(fast.state_dict())
    row = torch.randn(1, 1, 4)
    E = torch.cat([row.expand(3, 2, 4), torch.randn(3, 1, 4), row.expand(3, 2, 4)], 1)  # rows 0, 1, 3, 4 equal
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, backend=backend)
        out_h, _ = fast(E.to(device_of(backend)))
    assert (out_h.view(3, 5, 6)[:, :, :3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_4d_input(backend):
    fast, ref = make(4, 5, 3, 2)
    E = torch.randn(5, 4, 3).transpose(0, 2)  # (3, 4, 5), non-contiguous
    with backends.use_backend(backend):
        check_against_reference(fast, ref, E, backend=backend)
        out_h, out_v = fast(E.unsqueeze(1).to(device_of(backend)))
    ref_h, ref_v = ref(E.double())
    assert rel_err(out_h, ref_h) <= BOUND and rel_err(out_v, ref_v) <= BOUND


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_through_the_max(backend):
    fast, ref = make(3, 4, 2, 1)
    E = torch.randn(2, 3, 4)
    E[0, 1, 2] = float("nan")
    with backends.use_backend(backend), torch.no_grad():
        out_h, out_v = fast.to(device_of(backend))(E.to(device_of(backend)))
    out_h, out_v = out_h.cpu(), out_v.cpu()
    ref_h, ref_v = ref(E.double())
    assert torch.equal(out_h.isnan(), ref_h.isnan()) and out_h[0].isnan().any()
    assert torch.equal(out_v.isnan(), ref_v.isnan())
    finite = ~ref_h.isnan()
    assert rel_err(out_h[finite], ref_h[finite]) <= BOUND


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_repeated_runs_are_bitwise_equal(backend):
    if backend == "cpp" and not caser_ops.HAVE_CPP:
        pytest.skip("fastrec._C not built")
    device = device_of(backend)
    fast, _ = make(4, 8, 5, 2)
    fast.to(device)
    E = torch.randn(6, 4, 8, device=device, requires_grad=True)
    grads = torch.randn(6, 20, device=device), torch.randn(6, 16, device=device)
    results = []
    with backends.use_backend(backend):
        for _ in range(20 if backend == "cpp" else 3):
            out = fast(E)
            results.append((*out, *torch.autograd.grad(out, [E, *fast.parameters()], grads)))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_gradcheck_float64(backend):
    if backend == "cpp" and not caser_ops.HAVE_CPP:
        pytest.skip("fastrec._C not built")
    L, d, n_h, n_v = 3, 4, 2, 2
    kw = dict(dtype=torch.float64, device=device_of(backend), requires_grad=True)
    E = torch.randn(2, L, d, **kw)
    w_h = [torch.randn(n_h, 1, k + 1, d, **kw) for k in range(L)]
    b_h = [torch.randn(n_h, **kw) for _ in range(L)]
    w_v = torch.randn(n_v, 1, L, 1, **kw)
    b_v = torch.randn(n_v, **kw)

    def fn(E, w_v, b_v, *weights):
        return FF.caser(E, weights[:L], weights[L:], w_v, b_v, "relu", "tanh")

    with backends.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (E, w_v, b_v, *w_h, *b_h), fast_mode=backend == "triton")


def _op_args(device, dtype=torch.float32, act_v="tanh"):
    L, d, n_h, n_v = 4, 5, 3, 2
    kw = dict(dtype=dtype, device=device)
    E = torch.randn(3, L, d, **kw)
    w_h = [torch.randn(n_h, 1, k + 1, d, **kw) for k in range(L)]
    b_h = torch.randn(L, n_h, **kw)
    w_v = torch.randn(n_v, 1, L, 1, **kw)
    b_v = torch.randn(n_v, **kw)
    return E, w_h, b_h, w_v, b_v, "relu", act_v


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("act_v", ["none", "tanh"])
def test_opcheck_registered_ops(backend, act_v):
    if backend == "cpp" and not caser_ops.HAVE_CPP:
        pytest.skip("fastrec._C not built")
    forward = getattr(torch.ops.fastrec, f"caser_forward_{backend}")
    backward = getattr(torch.ops.fastrec, f"caser_backward_{backend}")
    E, w_h, b_h, w_v, b_v, act_h, act_v = _op_args(device_of(backend), act_v=act_v)
    extra = (False,) if backend == "triton" else ()
    forward_args = (E, w_h, b_h, w_v, b_v, act_h, act_v, *extra)
    torch.library.opcheck(forward, forward_args, test_utils=("test_schema", "test_faketensor"))
    out_h, out_v, z_h, argmax, z_v = forward(*forward_args)
    grads = (torch.randn_like(out_h), torch.randn_like(out_v))
    backward_args = (*grads, E, w_h, b_h, w_v, z_h, argmax, z_v, act_h, act_v)
    torch.library.opcheck(backward, (*backward_args, *extra), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    fast, ref = make(4, 6, 3, 2)
    fast.to(device_of(backend))
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    E = torch.randn(3, 4, 6, device=device_of(backend), requires_grad=True)
    with backends.use_backend(backend):
        out_h, out_v = compiled(E)
    (out_h.square().sum() + out_v.sum()).backward()
    E64 = E.detach().double().cpu().requires_grad_()  # ref (float64) stays on the CPU
    ref_h, ref_v = ref(E64)
    (ref_h.square().sum() + ref_v.sum()).backward()
    assert rel_err(out_h, ref_h) <= BOUND and rel_err(out_v, ref_v) <= BOUND
    assert rel_err(E.grad, E64.grad) <= BOUND
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) <= BOUND, name


def test_default_dispatch_uses_cpp_on_cpu_and_torch_for_half():
    fast, _ = make(3, 4, 2, 2)
    backends.stats(reset=True)
    fast(torch.randn(2, 3, 4))
    fast.to(torch.bfloat16)(torch.randn(2, 3, 4, dtype=torch.bfloat16))
    counts = backends.stats()
    expected = "cpp" if caser_ops.HAVE_CPP else "torch"
    assert counts.get(("caser", expected, ""), 0) == 1
    assert sum(n for (op, b, why), n in counts.items() if op == "caser" and b == "torch" and "bfloat16" in why) == 1


def test_from_convs_shares_the_tensors_and_state_dict_round_trips():
    ref = RecBoleCaserConvs(5, 6, 3, 2)
    block = fnn.CaserConv.from_convs(list(ref.conv_h), ref.conv_v)
    assert block.conv_h[2].weight is ref.conv_h[2].weight and block.conv_v.bias is ref.conv_v.bias
    assert block.state_dict().keys() == ref.state_dict().keys()
    other = fnn.CaserConv(5, 6, 3, 2)
    other.load_state_dict(ref.state_dict())
    back = RecBoleCaserConvs(5, 6, 3, 2)
    back.load_state_dict(other.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    E = torch.randn(2, 5, 6)
    for got, want in zip(block(E), ref(E), strict=True):
        assert rel_err(got, want.double()) <= BOUND
    with torch.no_grad():
        ref.conv_h[0].weight.add_(1.0)
    assert torch.equal(block.conv_h[0].weight, ref.conv_h[0].weight)


def test_same_seed_same_initialisation_as_recbole():
    torch.manual_seed(7)
    ref = RecBoleCaserConvs(4, 5, 3, 2)
    torch.manual_seed(7)
    block = fnn.CaserConv(4, 5, 3, 2)
    for a, b in zip(ref.state_dict().values(), block.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_weight_normed_convs_run_fused_with_their_computed_weights():
    ref = RecBoleCaserConvs(3, 4, 2, 2)
    for k, conv in enumerate(ref.conv_h):
        ref.conv_h[k] = torch.nn.utils.parametrizations.weight_norm(conv)
    block = fnn.CaserConv.from_convs(list(ref.conv_h), ref.conv_v)
    E = torch.randn(2, 3, 4)
    for got, want in zip(block(E), ref(E), strict=True):
        assert rel_err(got, want) <= BOUND


def test_deepcopy_and_repr():
    block = fnn.CaserConv(3, 4, 2, 1, act_h="tanh")
    clone = copy.deepcopy(block)
    E = torch.randn(2, 3, 4)
    assert torch.equal(block(E)[0], clone(E)[0])
    assert "act_h='tanh'" in repr(block)


def _weights(L=3, d=4, n_h=2, n_v=2):
    E = torch.randn(2, L, d)
    w_h = [torch.randn(n_h, 1, k + 1, d) for k in range(L)]
    return E, w_h, [torch.randn(n_h) for _ in range(L)], torch.randn(n_v, 1, L, 1), torch.randn(n_v)


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda a: a.update(E=torch.randn(2, 3)), ValueError, ["E must be (B, L, d)", "(2, 3)"]),
        (lambda a: a.update(E=[1.0]), TypeError, ["E must be a torch.Tensor", "list"]),
        (lambda a: a.update(E=a["E"].long()), TypeError, ["E must be float", "torch.int64"]),
        (lambda a: a.update(w_h=a["w_h"][:2]), ValueError, ["w_h must hold L = 3", "got 2"]),
        (lambda a: a.update(w_h=a["w_h"][0]), TypeError, ["w_h must be a sequence", "Tensor"]),
        (
            lambda a: a["w_h"].__setitem__(1, torch.randn(2, 1, 3, 4)),
            ValueError,
            ["w_h[1] must be (out, 1, height, width) = (2, 1, 2, 4)", "(2, 1, 3, 4)"],
        ),
        (lambda a: a["w_h"].__setitem__(2, torch.randn(3, 1, 3, 4)), ValueError, ["w_h[2]", "(3, 1, 3, 4)"]),
        (lambda a: a["w_h"].__setitem__(0, a["w_h"][0].double()), TypeError, ["w_h[0] must have E's dtype"]),
        (lambda a: a["b_h"].__setitem__(1, torch.randn(3)), ValueError, ["b_h[1] must be (2,)", "(3,)"]),
        (lambda a: a.update(w_v=torch.randn(2, 1, 4, 1)), ValueError, ["w_v must be", "(2, 1, 3, 1)", "(2, 1, 4, 1)"]),
        (lambda a: a.update(b_v=torch.randn(3)), ValueError, ["b_v must be (2,)", "(3,)"]),
        (lambda a: a.update(act_h="swish"), ValueError, ["act_h must be one of", "'swish'"]),
        (lambda a: a.update(act_v="elu"), ValueError, ["act_v must be one of", "'elu'"]),
    ],
)
def test_bad_input_errors_name_the_argument(change, error, words):
    E, w_h, b_h, w_v, b_v = _weights()
    args = dict(E=E, w_h=w_h, b_h=b_h, w_v=w_v, b_v=b_v, act_h="relu", act_v="none")
    change(args)
    with pytest.raises(error) as info:
        FF.caser(**args)
    for word in words:
        assert word in str(info.value)


def test_from_convs_rejects_convs_that_are_not_a_caser_block():
    ref = RecBoleCaserConvs(3, 4, 2, 2)
    with pytest.raises(ValueError, match=r"conv_h\[1\] must be Conv2d\(1, 2, kernel_size=\(2, 4\)\)"):
        fnn.CaserConv.from_convs([ref.conv_h[0], ref.conv_h[2]], ref.conv_v)
    with pytest.raises(ValueError, match=r"conv_v must have kernel_size \(3, 1\), got \(2, 1\)"):
        fnn.CaserConv.from_convs(list(ref.conv_h), torch.nn.Conv2d(1, 2, (2, 1)))
    with pytest.raises(ValueError, match=r"conv_h\[0\] must have padding=\(0, 0\)"):
        fnn.CaserConv.from_convs([torch.nn.Conv2d(1, 2, (1, 4), padding=1)], torch.nn.Conv2d(1, 2, (1, 1)))
    with pytest.raises(TypeError, match="conv_v must be an nn.Conv2d, got Linear"):
        fnn.CaserConv.from_convs(list(ref.conv_h), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="act_h must be one of"):
        fnn.CaserConv(3, 4, 2, 2, act_h="elu")
