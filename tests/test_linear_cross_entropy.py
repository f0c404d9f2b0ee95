"""Fused linear cross-entropy: ``fastrec.functional.linear_cross_entropy`` and
``fastrec.nn.LinearCrossEntropyLoss`` on the ``cpp`` and ``triton`` backends (Triton in its
interpreter when there is no CUDA device).

References and bounds:
- ``ref``: ``F.cross_entropy(F.linear(h, W, bias), target, ...)`` in float64 on the same inputs;
  fp32 loss and every gradient (h, W, bias, under a random upstream gradient) within
  ``‖fast − ref‖ / ‖ref‖ <= 1e-5``, float64 within 1e-12; bf16 (Triton) within
  ``2 · maxabs(pt − ref) + floor`` (loss) and ``3 ·`` (gradients), ``pt`` torch's own bf16 path.
- Every reduction, ignore_index (some rows, every row: NaN mean as torch), label smoothing, item
  counts that are not multiples of the tiles, N = 1, unbatched h, empty N, non-contiguous h, W and
  target; C++ shapes that split the work over item tiles and over rows.
- gradcheck in float64 on tiny shapes through each backend.
- Exact: NaN in a row gives the NaN pattern torch's gives (loss, dh, dW); repeated calls are
  bitwise equal; routing of small catalogues to torch's dense path is counted in stats().
- Bad input: errors naming the argument; opcheck on the registered C++ ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastrec
from fastrec import functional as FF
from fastrec import routing
from fastrec.ops import linear_cross_entropy as lce_ops

BACKENDS = ("cpp", "triton")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _unavailable(name: str) -> str | None:
    reason = fastrec.backends.available()[name]
    if reason is None and name == "cpp" and not lce_ops.HAVE_CPP:
        reason = "fastrec._C has no linear_cross_entropy ops"
    return reason


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = _unavailable(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    with fastrec.use_backend(request.param):
        yield request.param


def _device(backend: str) -> torch.device:
    return DEVICE if backend == "triton" else torch.device("cpu")


def _shapes(backend: str) -> list[tuple[int, int, int]]:
    """(N, V, d). C++: several item tiles (2048) with a ragged last one and the row split (one
    tile, N > 256); Triton (interpreted): several item tiles (16-64 items, ``block_config``), ragged."""
    if backend == "cpp":
        return [(300, 5000, 24), (300, 1000, 64), (1, 2100, 7)]
    return [(5, 300, 20), (70, 37, 8), (1, 129, 16)]


def _inputs(n, v, d, dtype, device, bias=True, ignored=(), scale=1.0):
    h = (torch.randn(n, d, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
    W = (torch.randn(v, d, dtype=torch.float64) * 0.5).to(dtype).to(device).requires_grad_()
    b = torch.randn(v, dtype=torch.float64).to(dtype).to(device).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), device=device)
    for i in ignored:
        t[i] = -100
    return h, W, b, t


def _grads(out, inputs, go):
    inputs = [x for x in inputs if x is not None]
    return torch.autograd.grad(out, inputs, go)


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp_min(1e-300))


def _reference(h, W, b, t, **kw):
    """The float64 reference on leaves of its own (so that the fast inputs keep their graph)."""
    hr, Wr = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    return F.cross_entropy(F.linear(hr, Wr, br), t, **kw), (hr, Wr, br)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "reduction,bias,eps", [("mean", True, 0.0), ("sum", False, 0.25), ("none", True, 0.25), ("mean", False, 0.0)]
)
def test_loss_and_gradients_match_torch(backend, dtype, reduction, bias, eps):
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    for n, v, d in _shapes(backend):
        ignored = (0, n - 1) if n > 2 else ()
        h, W, b, t = _inputs(n, v, d, dtype, _device(backend), bias, ignored, scale=3.0)
        out = FF.linear_cross_entropy(h, W, t, bias=b, reduction=reduction, label_smoothing=eps)
        ref, ref_inputs = _reference(h, W, b, t, reduction=reduction, label_smoothing=eps)
        assert out.dtype == dtype and out.shape == ref.shape
        assert _rel(out, ref) <= bound, (n, v, d)
        go = torch.randn_like(ref)
        fast, slow = _grads(out, (h, W, b), go.to(dtype)), _grads(ref, ref_inputs, go)
        for name, g, r in zip(("h", "W", "bias"), fast, slow, strict=False):
            assert _rel(g, r) <= bound, (name, n, v, d)


def test_all_rows_ignored_and_empty_batch(backend):
    device = _device(backend)
    for n in (4, 0):
        h, W, b, t = _inputs(n, 40, 8, torch.float64, device, ignored=range(n))
        for reduction in ("mean", "sum", "none"):
            out = FF.linear_cross_entropy(h, W, t, bias=b, reduction=reduction)
            ref, ref_inputs = _reference(h, W, b, t, reduction=reduction)
            torch.testing.assert_close(out, ref, equal_nan=True)
            if reduction != "mean":
                for g, r in zip(_grads(out.sum(), (h, W, b), None), _grads(ref.sum(), ref_inputs, None), strict=True):
                    torch.testing.assert_close(g, r)


def test_unbatched_and_leading_dims(backend):
    device = _device(backend)
    h, W, b, t = _inputs(6, 50, 8, torch.float64, device)
    h3, t3 = h.view(2, 3, 8), t.view(2, 3)
    out = FF.linear_cross_entropy(h3, W, t3, bias=b, reduction="none")
    ref, _ = _reference(h, W, b, t, reduction="none")  # torch's class dimension is dim 1: flat rows
    assert out.shape == (2, 3)
    ref = ref.view(2, 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    one = FF.linear_cross_entropy(h[0], W, t[0], bias=b)
    ref_one, _ = _reference(h[0], W, b, t[0])
    assert one.shape == ()
    torch.testing.assert_close(one, ref_one, rtol=1e-12, atol=0)


def test_non_contiguous_inputs(backend):
    device = _device(backend)
    n, v, d = (20, 2500, 9) if backend == "cpp" else (6, 150, 9)
    h_big = torch.randn(d, 2 * n, dtype=torch.float32, device=device)
    h = h_big.t()[::2].requires_grad_()  # strided rows and columns
    W = torch.randn(d, v, dtype=torch.float32, device=device).t().requires_grad_()  # transposed
    t = torch.randint(0, v, (2 * n,), device=device)[::2]
    assert not (h.is_contiguous() or W.is_contiguous() or t.is_contiguous())
    out = FF.linear_cross_entropy(h, W, t, label_smoothing=0.1)
    ref, ref_inputs = _reference(h, W, None, t, label_smoothing=0.1)
    assert _rel(out, ref) <= 1e-5
    for g, r in zip(_grads(out, (h, W), None), _grads(ref, ref_inputs, None), strict=True):
        assert _rel(g, r) <= 1e-5


def test_gradcheck(backend):
    device = _device(backend)
    n, v = (3, 2050) if backend == "cpp" else (3, 130)  # several tiles, the last ragged
    h, W, b, t = _inputs(n, v, 4, torch.float64, device, ignored=(1,))

    def f(h, W, b):
        return FF.linear_cross_entropy(h, W, t, bias=b, label_smoothing=0.25, reduction="sum")

    assert torch.autograd.gradcheck(f, (h, W, b), fast_mode=True)


def test_nan_propagates_like_torch(backend):
    device = _device(backend)
    n, v = (8, 3000) if backend == "cpp" else (8, 150)
    h, W, b, t = _inputs(n, v, 8, torch.float32, device)
    with torch.no_grad():
        h[2, 3] = float("nan")
    out = FF.linear_cross_entropy(h, W, t, bias=b, reduction="none")
    ref, ref_inputs = _reference(h, W, b, t, reduction="none")
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    go = torch.randn(n, dtype=torch.float64, device=device)
    for g, r in zip(_grads(out, (h, W, b), go.float()), _grads(ref, ref_inputs, go), strict=True):
        assert torch.equal(g.isnan(), r.isnan())


def test_deterministic(backend):
    device = _device(backend)
    n, v = (300, 4500) if backend == "cpp" else (70, 300)
    h, W, b, t = _inputs(n, v, 16, torch.float32, device, ignored=(3,))
    go = torch.randn((), device=device)
    first = None
    for _ in range(3):
        out = FF.linear_cross_entropy(h, W, t, bias=b, label_smoothing=0.1)
        got = (out, *_grads(out, (h, W, b), go))
        if first is None:
            first = got
        else:
            assert all(torch.equal(a, c) for a, c in zip(first, got, strict=True))


@pytest.mark.skipif(fastrec.backends.available()["triton"] is not None, reason="triton backend unavailable")
def test_bf16_triton():
    with fastrec.use_backend("triton"):
        h, W, b, t = _inputs(40, 300, 32, torch.bfloat16, DEVICE, ignored=(5,), scale=2.0)
        out = FF.linear_cross_entropy(h, W, t, bias=b, label_smoothing=0.1)
    assert out.dtype == torch.bfloat16
    ref, ref_inputs = _reference(h, W, b, t, label_smoothing=0.1)
    hp, Wp, bp = (x.detach().requires_grad_() for x in (h, W, b))
    pt = F.cross_entropy(F.linear(hp, Wp, bp), t, label_smoothing=0.1)
    go = torch.tensor(1.5, dtype=torch.float64, device=DEVICE)
    floor = 4 * 2.0**-8
    assert (out.double() - ref).abs() <= 2 * (pt.double() - ref).abs() + floor * ref.abs()
    fast = _grads(out, (h, W, b), go.bfloat16())
    torch_bf16 = _grads(pt, (hp, Wp, bp), go.bfloat16())
    for name, g, p, r in zip(("h", "W", "bias"), fast, torch_bf16, _grads(ref, ref_inputs, go), strict=True):
        err, torch_err = (g.double() - r).abs().max(), (p.double() - r).abs().max()
        assert err <= 3 * torch_err + floor * r.abs().max(), name


def test_small_catalogue_routes_to_torch_on_cpu():
    if not lce_ops.HAVE_CPP:
        pytest.skip("fastrec._C not built")
    limit = routing.LCE_DENSE_MAX_ITEMS_CPU
    fastrec.stats(reset=True)
    for v in (limit - 1, limit):
        h, W, _b, t = _inputs(4, v, 8, torch.float32, torch.device("cpu"), bias=False)
        out = FF.linear_cross_entropy(h, W, t)
        ref, _ = _reference(h, W, None, t)
        assert _rel(out, ref) <= 1e-5
    counts = fastrec.stats()
    assert counts.get((lce_ops.OP, "torch", routing.LCE_SMALL_CPU.reason)) == 1
    assert counts.get((lce_ops.OP, "cpp", "")) == 1
    assert any(row["name"] == routing.LCE_SMALL_CPU.name and row["applies"] for row in routing.routes("cpu"))


def test_module_is_torchs_with_the_fused_loss():
    torch_loss = torch.nn.LinearCrossEntropyLoss(16, 9000, bias=True, label_smoothing=0.1, ignore_index=-1)
    fast = fastrec.nn.LinearCrossEntropyLoss(16, 9000, bias=True, label_smoothing=0.1, ignore_index=-1)
    fast.load_state_dict(torch_loss.state_dict())
    assert isinstance(fast, torch.nn.LinearCrossEntropyLoss)
    assert list(fast.state_dict()) == list(torch_loss.state_dict())
    x = torch.randn(12, 16)
    t = torch.randint(0, 9000, (12,))
    t[4] = -1
    fastrec.stats(reset=True)
    out = fast(x, t)
    ref = torch_loss(x, t)
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert any(op == lce_ops.OP for op, _b, _r in fastrec.stats())


def test_bad_input_names_the_argument():
    h, W, b, t = _inputs(4, 20, 8, torch.float32, torch.device("cpu"))
    cases = [
        (dict(h=h[:, :5]), ValueError, "W must be"),
        (dict(W=W.double()), TypeError, "W must have"),
        (dict(target=t.int()), TypeError, "target must be"),
        (dict(target=t[:3]), ValueError, "target must have"),
        (dict(target=torch.full_like(t, 20)), ValueError, "target values"),
        (dict(bias=b[:5]), ValueError, "bias must be"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"),
        (dict(h=h.long()), TypeError, "h must be"),
    ]
    for change, exc, text in cases:
        args = dict(h=h, W=W, target=t, bias=b)
        args.update(change)
        kw = {k: args.pop(k) for k in ("bias", "reduction", "label_smoothing", "ignore_index") if k in args}
        with pytest.raises(exc, match=text):
            FF.linear_cross_entropy(args["h"], args["W"], args["target"], **kw)


def test_opcheck_cpp_ops():
    if not lce_ops.HAVE_CPP:
        pytest.skip("fastrec._C not built")
    h, W, b, t = (x.detach() for x in _inputs(5, 30, 8, torch.float32, torch.device("cpu")))
    forward = torch.ops.fastrec.linear_cross_entropy_forward_cpp
    backward = torch.ops.fastrec.linear_cross_entropy_backward_cpp
    torch.library.opcheck(forward, (h, W, b), test_utils=("test_schema", "test_faketensor"))
    lse = forward(h, W, b)
    args = (torch.randn(5), h, W, b, t, lse, 0.1)
    torch.library.opcheck(backward, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_fullgraph_reads_nothing_back(backend, reduction):
    """Under torch.compile(fullgraph=True) any host read (the range check, the ignored-row
    compaction) would break the graph and fail: the sync-free path (ignored rows weighted 0, the
    range asserted on the device) runs instead, with the eager results."""
    device = _device(backend)
    n, v = (9, 2100) if backend == "cpp" else (9, 150)
    h, W, b, t = _inputs(n, v, 8, torch.float64, device, ignored=(0, 4))
    with torch.no_grad():
        h[4] = float("nan")  # an ignored row: no NaN reaches the loss or any gradient

    def step(h, W, b, t):
        return FF.linear_cross_entropy(h, W, t, bias=b, reduction=reduction, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(h, W, b, t)
    keep = t != -100
    ref, ref_inputs = _reference(h[keep].detach(), W, b, t[keep], reduction=reduction, label_smoothing=0.1)
    if reduction == "none":
        assert out[~keep].eq(0).all()
        out_kept = out[keep]
    else:
        out_kept = out
    torch.testing.assert_close(out_kept, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    dh, dW, db = _grads(out, (h, W, b), go)
    go_ref = go[keep] if reduction == "none" else go
    r_h, r_W, r_b = _grads(ref, ref_inputs, go_ref)
    assert dh[~keep].eq(0).all()
    for g, r in ((dh[keep], r_h), (dW, r_W), (db, r_b)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_target_range_checked_on_the_device_path():
    h, W, _b, t = _inputs(4, 20, 8, torch.float32, torch.device("cpu"), bias=False)
    bad = t.clone()
    bad[1] = 20
    lce_ops.check_targets(t, 20, -100, on_device=True)
    with pytest.raises(RuntimeError, match="target values"):
        lce_ops.check_targets(bad, 20, -100, on_device=True)
    compiled = torch.compile(lambda h, t: FF.linear_cross_entropy(h, W, t), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="target values"):
        compiled(h, bad)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_step_never_syncs():
    """Forward and backward on CUDA with ignored rows under sync_debug_mode("error")."""
    with fastrec.use_backend("triton"):
        h, W, b, t = _inputs(300, 5000, 64, torch.float32, DEVICE, ignored=(3, 7))
        for reduction in ("mean", "sum", "none"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = FF.linear_cross_entropy(h, W, t, bias=b, reduction=reduction)
                grads = torch.autograd.grad(out.sum(), (h, W, b))
            finally:
                torch.cuda.set_sync_debug_mode("default")
            ref, ref_inputs = _reference(h, W, b, t, reduction=reduction)
            assert _rel(out, ref) <= 1e-5
            for g, r in zip(grads, _grads(ref.sum(), ref_inputs, None), strict=True):
                assert _rel(g, r) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model,loss,positions", [("sasrec", "ce", "all"), ("gru4rec", "sampled-softmax", "last")])
def test_models_train_with_the_fused_loss_as_with_the_dense_one(monkeypatch, model, loss, positions):
    """Same-seed ``fastrec train`` runs on a 3,000-item synthetic catalogue: the models' loss runs
    the fused op (counted in stats()), and the run ends on the metrics of the run whose loss is
    torch's dense ``F.cross_entropy(F.linear(...))``, within fp32 bounds."""
    from fastrec import train

    if not lce_ops.HAVE_CPP:
        pytest.skip("fastrec._C not built")
    config = train.TrainConfig(
        model=model,
        data="synthetic:items=3000,users=100",
        epochs=1,
        batch_size=128,
        max_len=10,
        loss=loss,
        n_negatives=600,
        positions=positions,
        progress=False,
        seed=3,
    )
    fastrec.stats(reset=True)
    fused = train.run(config, log=lambda _: None)
    assert any(op == lce_ops.OP and b == "cpp" for op, b, _r in fastrec.stats())
    monkeypatch.setattr(lce_ops, "_unfused_reason", lambda h: "dense loss for the comparison")
    fastrec.stats(reset=True)
    dense = train.run(config, log=lambda _: None)
    assert not any(op == lce_ops.OP and b != "torch" for op, b, _r in fastrec.stats())
    assert fused.epochs[-1].loss == pytest.approx(dense.epochs[-1].loss, rel=1e-4)
    assert fused.test.keys() == dense.test.keys()
    for name, value in dense.test.items():
        assert fused.test[name] == pytest.approx(value, rel=1e-3, abs=1e-4), name


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_capture_replays_the_step_on_new_inputs():
    """Forward and backward captured in one CUDA graph (as fastrec.graphs captures a training
    step), replayed after the inputs change in place: the loss and gradients of the new inputs."""
    with fastrec.use_backend("triton"):
        h, W, b, t = _inputs(300, 5000, 64, torch.float32, DEVICE, ignored=(3, 7))

        def step():
            out = FF.linear_cross_entropy(h, W, t, bias=b, label_smoothing=0.1)
            return out, torch.autograd.grad(out, (h, W, b))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, grads = step()
        with torch.no_grad():
            h.mul_(0.5)
            t.copy_(torch.randint(0, 5000, t.shape, device=DEVICE))
            t[5] = -100
        graph.replay()
        torch.cuda.synchronize()
    ref, ref_inputs = _reference(h, W, b, t, label_smoothing=0.1)
    assert _rel(out, ref) <= 1e-5
    for g, r in zip(grads, _grads(ref, ref_inputs, None), strict=True):
        assert _rel(g, r) <= 1e-5
