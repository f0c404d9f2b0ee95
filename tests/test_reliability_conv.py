"""Reliability of conv, Caser and dropout on edge inputs, against torch on every backend.

- empty batches (``Conv1d``, ``Conv2d``, the functional conv with act / pool, ``CaserConv``,
  ``functional.caser``, ``Dropout``, ``functional.dropout``): torch's empty result forward and
  backward (zero weight gradients), no crash. These run in a subprocess, so a segfault is a test
  failure and not a dead test run;
- NaN, +inf and -inf in dropout's input, in conv's input, weight or bias (every activation,
  with and without a pool), and in Caser's E, horizontal and vertical weights and biases (every
  activation), propagate as in torch: the outputs and the gradients have NaN exactly where
  torch's have NaN, and the other values agree (one documented exception: the Triton conv's dx
  may have more NaN).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from isolated import PRELUDE, assert_all_ok, run_isolated

import fastrec
from fastrec import functional as FF
from fastrec.ops._conv_common import act_fn

BACKENDS = ("cpp", "torch", "triton")
ACTS = ("none", "relu", "gelu", "tanh", "sigmoid")
VALUES = (float("nan"), float("inf"), float("-inf"))


# --------------------------------------------------------------------------- empty batches
EMPTY_SCRIPT = (
    PRELUDE
    + """
import torch.nn.functional as F
from fastrec.ops._conv_common import act_fn


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def check(ours_fn, ref_fn, tensors):
    ours_in, ref_in = leaves(*tensors), leaves(*tensors)
    with fastrec.use_backend(backend):
        ours = ours_fn(*ours_in)
    ref = ref_fn(*ref_in)
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for k, (a, b) in enumerate(zip(ours, ref)):
        same(a, b, f"output {k}")
    sum(o.sum() for o in ours).backward()
    sum(o.sum() for o in ref).backward()
    for k, (a, b) in enumerate(zip(ours_in, ref_in)):
        assert a.grad is not None, f"no gradient for input {k}"
        same(a.grad, b.grad, f"grad {k}")


for dim in (1, 2):
    for act in ("none", "relu", "gelu"):
        for pool in (1, 2):
            @case(f"functional.conv{dim}d act={act} pool={pool}")
            def _():
                conv, maxpool = (FF.conv1d, F.max_pool1d) if dim == 1 else (FF.conv2d, F.max_pool2d)
                ref_conv = F.conv1d if dim == 1 else F.conv2d
                x = torch.randn(0, 4, *([6] * dim))
                w = torch.randn(6, 2, *([3] * dim))
                b = torch.randn(6)

                def ref(x, w, b):
                    a = act_fn(act)(ref_conv(x, w, b, padding=1, groups=2))
                    return a if pool == 1 else maxpool(a, pool)

                check(lambda x, w, b: conv(x, w, b, padding=1, groups=2, act=act, pool=pool), ref, (x, w, b))


for dim in (1, 2):
    @case(f"nn.Conv{dim}d")
    def _():
        ours = (fnn.Conv1d if dim == 1 else fnn.Conv2d)(3, 4, 3, padding=1)
        ref = (torch.nn.Conv1d if dim == 1 else torch.nn.Conv2d)(3, 4, 3, padding=1)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(0, 3, *([5] * dim))
        check(lambda x: ours(x), lambda x: ref(x), (x,))
        for p, q in zip(ours.parameters(), ref.parameters()):
            same(p.grad, q.grad, "weight grad")


@case("nn.CaserConv")
def _():
    ours = fnn.CaserConv(5, 8, 3, 2)
    ref = fnn.CaserConv(5, 8, 3, 2)
    ref.load_state_dict(ours.state_dict())
    E = torch.randn(0, 5, 8)
    with fastrec.use_backend("torch"):
        check(lambda E: ours(E), lambda E: ref(E), (E,))
    for p, q in zip(ours.parameters(), ref.parameters()):
        same(p.grad, q.grad, "weight grad")


@case("functional.caser")
def _():
    E = torch.randn(0, 4, 6)
    w_h = [torch.randn(3, 1, k + 1, 6) for k in range(4)]
    b_h = [torch.randn(3) for _ in range(4)]
    w_v, b_v = torch.randn(2, 1, 4, 1), torch.randn(2)
    n = len(w_h)

    def call(fn):
        return lambda E, w_v, b_v, *wb: fn(E, list(wb[:n]), list(wb[n:]), w_v, b_v, "relu", "tanh")

    from fastrec.ops.caser import caser_torch

    check(call(FF.caser), call(caser_torch), (E, w_v, b_v, *w_h, *b_h))


@case("dropout")
def _():
    x = torch.randn(0, 7)
    check(lambda x: FF.dropout(x, 0.3, True), lambda x: F.dropout(x, 0.3, True), (x,))
    check(lambda x: fnn.Dropout(0.3)(x), lambda x: F.dropout(x, 0.3, True), (x,))
    check(lambda x: FF.dropout(x, 1.0, True), lambda x: F.dropout(x, 1.0, True), (x,))


print(json.dumps(results))
"""
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_match_torch_without_crashing(backend):
    results = run_isolated(EMPTY_SCRIPT, backend)
    assert_all_ok(results)
    assert len(results) == 17


# --------------------------------------------------------------------------- NaN and Inf
def _same_with_nan(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """NaN exactly where torch's result has NaN; every other value (inf included) as torch's."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b), f"{what}: NaN at {nan_a.nonzero().tolist()} vs torch's {nan_b.nonzero().tolist()}"
    torch.testing.assert_close(a[~nan_a], b[~nan_b], atol=1e-4, rtol=1e-4, msg=what)


def _grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
def test_dropout_nan_inf_propagate_as_torch(value, backend):
    """torch's dropout is ``x * mask / (1 - p)``: a NaN stays NaN where dropped too, an inf
    dropped is NaN; the gradient (``grad * mask / (1 - p)``) stays finite."""
    p = 0.4
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)).abs() + 0.5
    bad = x.clone()
    bad[::3, ::5] = value
    with fastrec.use_backend(backend):
        torch.manual_seed(7)
        kept = FF.dropout(x, p, True) != 0
        torch.manual_seed(7)
        leaf = bad.clone().requires_grad_()
        y = FF.dropout(leaf, p, True)
        grad = torch.rand(y.shape) + 0.5
        y.backward(grad)
    scale = torch.where(kept, torch.tensor(1 / (1 - p)), torch.tensor(0.0))
    _same_with_nan(y.detach(), bad * scale, "output")
    _same_with_nan(leaf.grad, grad * scale, "grad")
    if backend != "triton":  # cpp and torch draw torch's masks: F.dropout's result itself
        torch.manual_seed(7)
        _same_with_nan(y.detach(), F.dropout(bad, p, True), "F.dropout")


def _conv_case(where: str, value: float):
    """x (2, 3, 7, 7), w, b in float64 with ``value`` put in ``where``, and the conv's keywords.
    A 7x7 output with pool 2 leaves a row and a column no window covers; "x-edge" is a 1x1
    convolution with the value only where the uncovered outputs read it."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64)
    kernel, padding = (1, 0) if where == "x-edge" else (3, 1)
    w = torch.randn(4, 3, kernel, kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    if where == "x":
        x[0, 1, 2, 3] = x[1, 0, 5, 5] = x[1, 2, 2, 3] = value  # two in one pool window of z
        x[1, 2, 2, 2] = value
    elif where == "x-edge":
        x[0, 1, 6, 2] = x[1, 0, 3, 6] = value
    elif where == "w":
        w[1, 0, 1, 1] = value
    else:
        b[2] = value
    return (x, w, b), {"padding": padding}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", (1, 2))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("where", ("x", "x-edge", "w", "b"))
def test_conv_nan_inf_propagate_as_torch(where, act, pool, backend):
    """NaN / +-inf in x, w or b: out, dx, dw and db have NaN and inf where torch's ops (F.conv2d,
    the activation, F.max_pool2d, autograd's dense backward) have them, and the same finite values.
    torch's backward gives ``0 * act'(z)`` to every conv output a pool window does not take (NaN
    at a bad z); the Triton kernels know only the window, not the position, so their dx may have
    NaN at more places in a window's receptive field, never at fewer."""
    for value in VALUES:
        tensors, kw = _conv_case(where, value)

        def ref(x, w, b):
            a = act_fn(act)(F.conv2d(x, w, b, **kw))
            return a if pool == 1 else F.max_pool2d(a, pool)

        grad = torch.rand(ref(*tensors).shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
        y_ref, grads_ref = _grads(ref, tensors, grad)
        with fastrec.use_backend(backend):
            y, grads = _grads(lambda x, w, b: FF.conv2d(x, w, b, act=act, pool=pool, **kw), tensors, grad)
        _same_with_nan(y, y_ref, f"out ({value} in {where})")
        for name, ours, theirs in zip(("dx", "dw", "db"), grads, grads_ref, strict=True):
            if backend == "triton" and name == "dx" and act in ("gelu", "tanh", "sigmoid") and pool > 1:
                missing = theirs.isnan() & ~ours.isnan()
                assert not missing.any(), f"dx: no NaN at {missing.nonzero().tolist()} where torch has NaN"
                both = ~(ours.isnan() | theirs.isnan())
                torch.testing.assert_close(ours[both], theirs[both], atol=1e-4, rtol=1e-4, msg=name)
            else:
                _same_with_nan(ours, theirs, f"{name} ({value} in {where})")


CASER_LENGTH = 4


def _caser_case(where: str, value: float):
    """E (3, 4, 4), w_h[k] (5, 1, k+1, 4), b_h[k] (5,), w_v (2, 1, 4, 1), b_v (2,) in float64, with
    ``value`` put in ``where``: "E" at a middle position, the first and the last (each covered by
    windows of several t), "E-pair" twice in one row of E (two bad windows of one maximum). Five
    filters: the C++ kernel's vector path (4 float64 lanes) and its scalar rest."""
    gen = torch.Generator().manual_seed(13)
    length, dim, filters, vertical = CASER_LENGTH, 4, 5, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    E = randn(3, length, dim)
    w_h = [randn(filters, 1, k + 1, dim) for k in range(length)]
    b_h = [randn(filters) for _ in range(length)]
    w_v, b_v = randn(vertical, 1, length, 1), randn(vertical)
    if where == "E":
        E[0, 2, 1] = E[1, 0, 3] = E[2, 3, 0] = value
    elif where == "E-pair":
        E[1, 1, 2] = E[1, 3, 0] = value
    elif where == "w_h":
        w_h[2][1, 0, 1, 2] = w_h[1][4, 0, 0, 3] = value
    elif where == "b_h":
        b_h[1][0] = b_h[3][4] = value
    elif where == "w_v":
        w_v[1, 0, 3, 0] = value
    else:
        b_v[0] = value
    return [E, w_v, b_v, *w_h, *b_h]


def _caser_nan_params():
    """Every (where, act, backend); the Triton interpreter (about 1 s a call) takes the subset
    that reaches each of its paths: tanh's NaN rule is sigmoid's (act' NaN only at a NaN z), and
    b_v goes through w_v's dense vertical kernels."""
    for where in ("E", "E-pair", "w_h", "b_h", "w_v", "b_v"):
        for act in ACTS:
            for backend in BACKENDS:
                if backend != "triton" or (act != "tanh" and where != "b_v"):
                    yield pytest.param(where, act, backend, id=f"{where}-{act}-{backend}")


@pytest.mark.parametrize("where, act, backend", _caser_nan_params())
def test_caser_nan_inf_propagate_as_torch(where, act, backend):
    """NaN / +-inf in E, a w_h, a b_h, w_v or b_v (act_h = act_v = ``act``): out_h, out_v and the
    gradients of E, every w_h[k], b_h[k], w_v and b_v have NaN and inf exactly where torch's ops
    (per height F.conv2d + activation + F.max_pool1d, the vertical F.conv2d; autograd's dense
    backward, where a window that is not the maximum still gives ``0 * act'(z)`` and ``0 * inf``)
    have them, and the same finite values."""
    length = CASER_LENGTH

    def split(tensors):
        E, w_v, b_v, *rest = tensors
        return E, rest[:length], rest[length:], w_v, b_v

    def ref(*tensors):
        E, w_h, b_h, w_v, b_v = split(tensors)
        x = E.unsqueeze(1)
        pooled = []
        for w, b in zip(w_h, b_h, strict=True):
            a = act_fn(act)(F.conv2d(x, w, b).squeeze(3))
            pooled.append(F.max_pool1d(a, a.shape[2]).squeeze(2))
        return torch.cat(pooled, 1), act_fn(act)(F.conv2d(x, w_v, b_v)).flatten(1)

    def ours(*tensors):
        E, w_h, b_h, w_v, b_v = split(tensors)
        return FF.caser(E, w_h, b_h, w_v, b_v, act_h=act, act_v=act)

    names = ["E", "w_v", "b_v", *(f"w_h[{k}]" for k in range(length)), *(f"b_h[{k}]" for k in range(length))]
    for value in VALUES:
        tensors = _caser_case(where, value)
        gen = torch.Generator().manual_seed(5)
        leaves_ref = [t.clone().requires_grad_() for t in tensors]
        outs_ref = ref(*leaves_ref)
        grads = [torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5 for o in outs_ref]
        grads_ref = torch.autograd.grad(outs_ref, leaves_ref, grads)
        leaves = [t.clone().requires_grad_() for t in tensors]
        with fastrec.use_backend(backend):
            outs = ours(*leaves)
            grads_ours = torch.autograd.grad(outs, leaves, grads)
        for name, a, b in zip(("out_h", "out_v"), outs, outs_ref, strict=True):
            _same_with_nan(a.detach(), b.detach(), f"{name} ({value} in {where})")
        for name, a, b in zip(names, grads_ours, grads_ref, strict=True):
            _same_with_nan(a, b, f"grad {name} ({value} in {where})")
