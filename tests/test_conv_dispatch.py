"""The conv family's "cudnn" path and GPU dispatch table (fastrec/ops/conv.py, kernels/conv.py
epilogue-only forward, the fastrec.bench.tables writer).

The epilogue kernel runs under the Triton interpreter against torch (act x pool x ties / NaN,
fp64 / fp32 / fp16); the whole cudnn path (torch's CPU convolution standing in for cuDNN, forced
with ``use_conv_path``) against torch's modules for the forward and every gradient; the table's
bucketing, loader and the writer's selection and JSON format on fake timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastrec.kernels import conv as kconv

from fastrec import backends
from fastrec import functional as FF
from fastrec.bench import tables
from fastrec.ops import conv as conv_ops

ACTS = ("none", "relu", "gelu", "tanh", "sigmoid")
POOLS = ((1, 1), (2, 2), (1, 3), (3, 2))


def epilogue_reference(z, bias, act, pool):
    """(y, saved_z, argmax) from torch's ops in z's compute dtype (fp64 stays, else fp32)."""
    compute = torch.float64 if z.dtype == torch.float64 else torch.float32
    zb = z.to(compute) + (bias.to(compute)[:, None, None] if bias is not None else 0)
    a = conv_ops.act_fn(act)(zb)
    if pool == (1, 1):
        return a.to(z.dtype), zb.to(z.dtype), None
    y, flat = F.max_pool2d(a, pool, pool, return_indices=True)
    width = zb.shape[-1]
    rows = torch.arange(y.shape[-2])[:, None] * pool[0]
    cols = torch.arange(y.shape[-1])[None, :] * pool[1]
    argmax = ((flat // width - rows) * pool[1] + (flat % width - cols)).to(torch.int32)
    saved = zb.flatten(2).gather(2, flat.flatten(2)).view_as(y)
    return y.to(z.dtype), saved.to(z.dtype), argmax


def check_epilogue(z, bias, act, pool, atol=0.0):
    y, saved_z, argmax = kconv.epilogue_forward(z, bias, act, pool)
    ref_y, ref_z, ref_argmax = epilogue_reference(z, bias, act, pool)
    torch.testing.assert_close(y, ref_y, atol=atol, rtol=atol, equal_nan=True)
    if act == "none":
        assert saved_z.shape == (0,)
    else:
        torch.testing.assert_close(saved_z, ref_z, atol=atol, rtol=atol, equal_nan=True)
    if ref_argmax is None:
        assert argmax.shape == (0,) and argmax.dtype == torch.int32
    else:
        assert torch.equal(argmax, ref_argmax)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("pool", POOLS)
def test_epilogue_forward_matches_torch_float64(act, pool):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    check_epilogue(z, bias, act, pool, atol=1e-12)
    check_epilogue(z, None, act, pool, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACTS)
def test_epilogue_forward_fp32_fp16_match_fp32_compute(dtype, act):
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 5, 6, 9, generator=gen).to(dtype)
    bias = torch.randn(5, generator=gen).to(dtype)
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    check_epilogue(z, bias, act, (2, 3), atol=atol)
    check_epilogue(z, bias, act, (1, 1), atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["none", "relu"])
def test_epilogue_pool_ties_pick_the_first_maximum(dtype, act):
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-2, 3, (2, 4, 6, 6), generator=gen).to(dtype)  # many exact ties (relu: zeros)
    check_epilogue(z, None, act, (2, 3))
    check_epilogue(z, None, act, (3, 3))
    z_all_equal = torch.full((1, 2, 4, 4), -float("inf"), dtype=dtype)
    y, _, argmax = kconv.epilogue_forward(z_all_equal, None, "none", (2, 2))
    assert torch.equal(argmax, torch.zeros_like(argmax)) and torch.isneginf(y).all()


@pytest.mark.parametrize("act", ACTS)
def test_epilogue_nan_wins_the_pool_as_torch(act):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 2, 4, 6, generator=gen, dtype=torch.float64)
    z[0, 0, 0, 1] = float("nan")  # window (0, 0): one NaN
    z[0, 1, 2, 3] = float("nan")  # window (1, 1): two NaNs, the last wins
    z[0, 1, 3, 5] = float("nan")
    z[0, 1, 2, 4] = 100.0
    check_epilogue(z, None, act, (2, 3), atol=1e-12)


def test_epilogue_bad_input_names_the_argument():
    z = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="bias"):
        kconv.epilogue_forward(z, torch.randn(3), "relu", (2, 2))
    with pytest.raises(ValueError, match="act"):
        kconv.epilogue_forward(z, None, "swish", (2, 2))
    with pytest.raises(ValueError, match="z must"):
        kconv.epilogue_forward(z[0], None, "relu", (2, 2))


# --------------------------------------------------------------------------- the whole path
CASES = [
    # (N, C, O, (KH, KW), (H, W), stride, padding, dilation, groups, act, pool)
    (2, 3, 4, (3, 3), (7, 9), 1, 1, 1, 1, "relu", (2, 2)),
    (2, 4, 6, (2, 3), (8, 7), (2, 1), (0, 1), 1, 2, "gelu", (1, 3)),
    (1, 2, 3, (1, 3), (1, 11), 1, 0, (1, 2), 1, "tanh", (1, 7)),
    (2, 3, 3, (3, 3), (6, 6), 1, 1, 1, 3, "sigmoid", (1, 1)),
    (2, 3, 5, (1, 1), (5, 5), 1, 0, 1, 1, "none", (1, 1)),
    (2, 3, 5, (3, 3), (7, 7), 1, 0, 1, 1, "none", (2, 2)),
]


def _inputs(case, dtype, seed=0):
    n, c, o, kernel, size, stride, padding, dilation, groups, act, pool = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(o, c // groups, *kernel, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(o, generator=gen, dtype=dtype).requires_grad_()
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, kwargs, act, pool


def _torch_module_output(x, w, b, kwargs, act, pool):
    a = conv_ops.act_fn(act)(F.conv2d(x, w, b, **kwargs))
    return F.max_pool2d(a, pool) if pool != (1, 1) else a


def _cudnn_path(x, w, b, kwargs, act, pool):
    with backends.use_backend("triton"), conv_ops.use_conv_path("cudnn"):
        return FF.conv2d(x, w, b, **kwargs, act=act, pool=pool)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[-2]}-pool{c[-1][0]}x{c[-1][1]}-g{c[-3]}")
def test_cudnn_path_forward_and_every_gradient_match_torch(case, dtype):
    x, w, b, kwargs, act, pool = _inputs(case, dtype)
    backends.stats(reset=True)
    y = _cudnn_path(x, w, b, kwargs, act, pool)
    assert any("cudnn" in reason for (_, backend, reason) in backends.stats() if backend == "triton")
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = _torch_module_output(xr, wr, br, kwargs, act, pool)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    got = torch.autograd.grad(y, (x, w, b), grad.to(dtype))
    want = torch.autograd.grad(ref, (xr, wr, br), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), r, **tol)


@pytest.mark.parametrize("case", CASES[:2], ids=["relu-pool", "gelu-groups"])
def test_torch_path_runs_torchs_ops_counted_and_matches(case):
    x, w, b, kwargs, act, pool = _inputs(case, torch.float64)
    backends.stats(reset=True)
    with backends.use_backend("triton"), conv_ops.use_conv_path("torch"):
        y = FF.conv2d(x, w, b, **kwargs, act=act, pool=pool)
    assert backends.stats() == {("conv", "torch", "torch's convolution and epilogue ops (dispatch table)"): 1}
    ref = _torch_module_output(x, w, b, kwargs, act, pool)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad), strict=True):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_cudnn_path_only_weight_gradient():
    x, w, b, kwargs, act, pool = _inputs(CASES[0], torch.float64)
    x = x.detach()
    y = _cudnn_path(x, w, None, kwargs, act, pool)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    ref = _torch_module_output(x, w, None, kwargs, act, pool)
    torch.testing.assert_close(dw, torch.autograd.grad(ref.sum(), (w,))[0])


GRADCHECK_CASES = [
    (1, 2, 2, (2, 2), (4, 5), 1, 1, 1, 1, "relu", (2, 2)),
    (1, 2, 2, (1, 2), (2, 5), 1, 0, 1, 2, "gelu", (1, 2)),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=["relu-pool", "gelu-groups"])
def test_cudnn_path_gradcheck_float64(case):
    x, w, b, kwargs, act, pool = _inputs(case, torch.float64, seed=5)
    fn = lambda x, w, b: _cudnn_path(x, w, b, kwargs, act, pool)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_opcheck_cudnn_path_ops():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(2, 3, 4, 6, generator=gen)
    torch.library.opcheck(torch.ops.fastrec.conv_epilogue_triton.default, (z, torch.randn(3), "relu", [2, 3]))
    torch.library.opcheck(torch.ops.fastrec.conv_epilogue_triton.default, (z, None, "none", [1, 1]))
    x = torch.randn(2, 2, 6, 8, generator=gen)
    w = torch.randn(3, 2, 3, 3, generator=gen)
    y, saved_z, argmax = kconv.epilogue_forward(F.conv2d(x, w, padding=1), None, "gelu", (2, 2))
    args = (torch.randn_like(y), x, w, saved_z, argmax, [1, 1], [1, 1], [1, 1], 1, "gelu", [2, 2], [True, True, True])
    torch.library.opcheck(torch.ops.fastrec.conv_backward_cudnn.default, args)


def test_cudnn_path_compiles_fullgraph():
    x, w, b, kwargs, act, pool = _inputs(CASES[0], torch.float32)
    compiled = torch.compile(lambda x: _cudnn_path(x, w, b, kwargs, act, pool), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), _torch_module_output(x, w, b, kwargs, act, pool), atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- table and writer
def test_shape_class_buckets():
    key = conv_ops.shape_class(32, 64, (3, 3), (32, 32), 1, torch.float32)
    assert key == "c32-o64-k9-s1024-g1-fp32"
    assert conv_ops.shape_class(33, 64, (3, 3), (32, 32), 1, torch.float32).startswith("c64-")
    assert conv_ops.shape_class(1, 16, (3, 64), (8, 1), 1, torch.bfloat16) == "c4-o16-k64+-s64-g1-bf16"
    assert conv_ops.shape_class(64, 64, (3, 3), (200, 200), 64, torch.float16) == "c4-o4-k9-s16384+-gdw-fp16"
    assert conv_ops.shape_class(512, 512, (1, 1), (4, 4), 4, torch.float32) == "c128-o128-k1-s64-gn-fp32"


def test_package_table_loads_and_conv_path_defaults():
    table = conv_ops.dispatch_table()
    assert isinstance(table, dict)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    assert conv_ops.conv_path(x, w, 1, (3, 3)) == conv_ops.DEFAULT_PATH == "triton"
    with conv_ops.use_conv_path("cudnn"):
        assert conv_ops.conv_path(x, w, 1, (3, 3)) == "cudnn"
        with conv_ops.use_conv_path("triton"):
            assert conv_ops.conv_path(x, w, 1, (3, 3)) == "triton"
            with conv_ops.use_conv_path("torch"):
                assert conv_ops.conv_path(x, w, 1, (3, 3)) == "torch"
    with pytest.raises(ValueError, match="path must be one of"):
        with conv_ops.use_conv_path("cublas"):
            pass


def test_table_lookup_by_card_and_class(monkeypatch):
    key = conv_ops.shape_class(32, 64, (3, 3), (32, 32), 1, torch.float32)
    table = {"version": 1, "default": "triton", "cards": {"Fake GPU": {"classes": {key: {"path": "cudnn"}}}}}
    monkeypatch.setattr(conv_ops, "_TABLE", conv_ops.parse_dispatch(table))
    monkeypatch.setattr(conv_ops.backends, "card_name", {0: "Fake GPU", 1: "Other GPU"}.__getitem__)
    assert conv_ops._table_path(0, key) == "cudnn"
    assert conv_ops._table_path(0, "c4-o4-k1-s64-g1-fp32") == "triton"  # unmeasured class
    assert conv_ops._table_path(1, key) == "triton"  # unmeasured card


@pytest.mark.parametrize(
    "table, message",
    [
        ({"version": 2, "default": "triton", "cards": {}}, "version"),
        ({"version": 1, "default": "cudnn", "cards": {}}, "default"),
        ({"version": 1, "default": "triton", "cards": []}, "cards"),
        ({"version": 1, "default": "triton", "cards": {"G": {}}}, "classes"),
        ({"version": 1, "default": "triton", "cards": {"G": {"classes": {"k": {"path": "cublas"}}}}}, "path"),
    ],
)
def test_parse_dispatch_rejects_bad_tables(table, message):
    with pytest.raises(ValueError, match=message):
        conv_ops.parse_dispatch(table)


def test_writer_selects_per_class_and_writes_the_loader_format(tmp_path):
    rows = [
        {"class": "a", "triton_ms": 1.0, "cudnn_ms": 0.5},
        {"class": "a", "triton_ms": 1.0, "cudnn_ms": 1.4},  # summed: 2.0 vs 1.9 -> cudnn (> 3% faster)
        {"class": "b", "triton_ms": 1.0, "cudnn_ms": 0.98},  # within the margin: the fused path stays
        {"class": "c", "triton_ms": 0.5, "cudnn_ms": 2.0},
        {"class": "d", "triton_ms": 1.0, "cudnn_ms": 0.8, "torch_ms": 0.6},  # the fastest of three
        {"class": "e", "triton_ms": 1.0, "cudnn_ms": 1.2, "torch_ms": 0.98},  # within the margin
    ]
    classes = tables.select_dispatch(rows)
    paths = {"a": "cudnn", "b": "triton", "c": "triton", "d": "torch", "e": "triton"}
    assert {k: v["path"] for k, v in classes.items()} == paths
    assert classes["a"]["triton_ms"] == 2.0 and classes["a"]["cudnn_ms"] == 1.9
    assert classes["d"]["torch_ms"] == 0.6 and "torch_ms" not in classes["a"]
    env = {"date": "2026-11-28", "torch": "2.11", "triton": "3.6", "commit": "abc"}
    path = tmp_path / "dispatch.json"
    tables.write_dispatch(path, "Card A", classes, env)
    tables.write_dispatch(path, "Card B", {"b": {"path": "cudnn", "triton_ms": 1.0, "cudnn_ms": 0.5}}, env)
    written = json.loads(path.read_text())
    assert written["version"] == 1 and written["default"] == "triton"
    assert written["cards"]["Card A"]["measured"] == "2026-11-28"
    assert conv_ops.parse_dispatch(written) == {
        "Card A": paths,
        "Card B": {"b": "cudnn"},
    }


def test_kernel_variants_list_every_epilogue_forward_variant():
    names = [v.name for v in kconv.kernel_variants() if v.kernel == "epilogue_forward"]
    assert len(names) == len(set(names)) == 4 * 5 * 2 * 2  # dtype x act x POOLED x HAS_BIAS


def test_writer_dispatch_shapes_have_classes_and_cpu_is_refused(capsys):
    keys = {tables._dispatch_case(torch.device("cpu"), torch.float32, *s)[0] for s in tables.DISPATCH_SHAPES}
    assert len(keys) >= 6

    class Args:
        family = ["conv"]
        write_dispatch = "unused.json"

    assert tables.dispatch_main(Args, torch.device("cpu"), [torch.float32]) == 2
    assert "CUDA" in capsys.readouterr().err


def _bench_conv_shapes() -> list[tuple]:
    """Every convolution the bench's conv rows run, as DISPATCH_SHAPES entries."""
    from fastrec.bench.cases import conv as conv_cases

    shapes = [
        (b, c_in, c_out, (3, 3), (32, 32), 1, (1, 1), "relu", (2, 2))
        for b, c_in, c_out in conv_cases.conv2d_grid(torch.device("cuda"), full=True)
    ]
    shapes += [
        (b, d, d, (1, k), (1, length), 1, (0, 0), "relu", (1, length - k + 1))
        for b, d, length, k in conv_cases.conv1d_grid(full=True)
    ]
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_times_each_bench_shape_in_its_class_at_its_kernel_size(dtype):
    timed: dict[str, set] = {}
    for shape in tables.DISPATCH_SHAPES:
        timed.setdefault(tables.dispatch_class(shape, dtype), set()).add(shape[3])
    for shape in _bench_conv_shapes():
        key = tables.dispatch_class(shape, dtype)
        kernels = timed.get(key, set())
        assert kernels == {shape[3]}, f"{shape} falls in {key}, timed at kernels {kernels or 'none'}"
    # conv1d k=3 and k=5 are classes of their own, apart from each other and from 3x3
    keys = {tables.dispatch_class((512, 64, 64, (1, k), (1, 50), 1, (0, 0), "relu", (1, 1)), dtype) for k in (3, 5)}
    keys.add(tables.dispatch_class((512, 64, 64, (3, 3), (3, 50), 1, (0, 0), "relu", (1, 1)), dtype))
    assert len(keys) == 3


def test_package_table_classes_are_the_classes_of_the_shapes_they_were_timed_at():
    table = json.loads((Path(conv_ops.__file__).parent.parent / "conv_dispatch.json").read_text())
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for card, entry in table["cards"].items():
        for key, row in entry["classes"].items():
            assert row.get("shapes"), f"{card}: {key} does not say which shapes it was timed at"
            dtype = dtypes[key.rsplit("-", 1)[1]]
            for spec in row["shapes"]:
                shape = tuple(tuple(v) if isinstance(v, list) else v for v in spec)
                assert tables.dispatch_class(shape, dtype) == key, f"{card}: {spec} is not of class {key}"


def test_writer_records_the_shapes_of_each_class():
    rows = [
        {"class": "a", "spec": [1, 2], "triton_ms": 1.0, "cudnn_ms": 2.0, "torch_ms": 3.0},
        {"class": "a", "spec": [3, 4], "triton_ms": 1.0, "cudnn_ms": 2.0, "torch_ms": 3.0},
        {"class": "b", "spec": [5, 6], "triton_ms": 1.0, "cudnn_ms": 2.0, "torch_ms": 0.5},
    ]
    classes = tables.select_dispatch(rows)
    assert classes["a"]["shapes"] == [[1, 2], [3, 4]] and classes["b"]["shapes"] == [[5, 6]]
    assert classes["b"]["path"] == "torch"
