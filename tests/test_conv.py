"""fastrec.functional.conv1d / conv2d, fastrec.nn.Conv1d / Conv2d / ConvBlock against torch.

Reference: ``torch.nn.functional.conv1d/conv2d`` + ``F.relu/gelu/tanh/sigmoid`` +
``F.max_pool1d/max_pool2d`` in float64 on the same weights. Every test runs on each backend
available here (``cpp``; ``torch``; ``triton`` once ``fastrec.kernels.conv`` exists, in the
interpreter on CPU), forced with ``use_backend``. Bounds:
- fp32: relative error ``||fast - ref|| / ||ref|| <= 1e-5`` on y and on the gradients of x, w
  and b for a random upstream gradient (torch.autograd.grad);
- fp16 / bf16: ``maxabs(fast - ref) <= 2 * maxabs(pt - ref) + floor`` (outputs) and ``3 *``
  (gradients), pt = torch in the same dtype, floor = 4 ulps of ref's magnitude;
- float64 ``gradcheck`` on tiny shapes; ties and NaN in the pool compared exactly with torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastrec
from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.ops import conv as conv_ops
from fastrec.ops._conv_common import ACTIVATIONS

BOUND = 1e-5
BACKENDS = ["torch"]
if conv_ops.HAVE_CPP:
    BACKENDS.insert(0, "cpp")
if conv_ops.HAVE_TRITON_KERNELS and (torch.cuda.is_available() or backends.interpreter_enabled()):
    BACKENDS.append("triton")
ACT_FNS = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend, forced; triton's tests make their tensors on the GPU where there is one."""
    device = "cuda" if request.param == "triton" and torch.cuda.is_available() else "cpu"
    with backends.use_backend(request.param), torch.device(device):
        yield request.param


def reference(x, w, b, stride, padding, dilation, groups, act, pool, dims=2):
    conv = F.conv2d if dims == 2 else F.conv1d
    mp = F.max_pool2d if dims == 2 else F.max_pool1d
    a = ACT_FNS[act](conv(x, w, b, stride, padding, dilation, groups))
    return a if pool in (1, (1, 1), (1,)) else mp(a, pool)


def rel_err(fast: Tensor, ref: Tensor) -> float:
    ref = ref.double()
    return ((fast.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(dims, shape, weight_shape, bias=True, stride=1, padding=0, dilation=1, groups=1, act="relu", pool=1):
    """fastrec fp32 vs torch fp64: forward and the gradients of x, w, b."""
    x = torch.randn(shape, requires_grad=True)
    w = (torch.randn(weight_shape) / weight_shape[1] ** 0.5).requires_grad_()
    b = torch.randn(weight_shape[0], requires_grad=True) if bias else None
    fn = FF.conv2d if dims == 2 else FF.conv1d
    y = fn(x, w, b, stride, padding, dilation, groups, act=act, pool=pool)
    leaves = [t for t in (x, w, b) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rb = refs[2] if bias else None
    y_ref = reference(refs[0], refs[1], rb, stride, padding, dilation, groups, act, pool, dims)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert rel_err(y, y_ref) <= BOUND, rel_err(y, y_ref)
    grad = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, leaves, grad.float())
    want = torch.autograd.grad(y_ref, refs, grad)
    for name, g, r in zip(("x", "w", "b"), got, want, strict=False):
        assert g.shape == r.shape, name
        assert rel_err(g, r) <= BOUND, (name, rel_err(g, r))


# --------------------------------------------------------------------------- conv2d numerics
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("pool", [1, 2, (3, 2)])
def test_conv2d_act_pool_matches_torch(backend, act, pool):
    check(2, (2, 5, 11, 13), (7, 5, 3, 3), padding=1, act=act, pool=pool)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1),
        dict(stride=(2, 3), padding=(2, 0)),
        dict(dilation=2, padding=2),
        dict(dilation=(1, 3), padding=(0, 3), stride=(1, 2)),
        dict(groups=3, padding=1),
        dict(groups=9, padding=1, stride=2),
        dict(padding="same", dilation=(2, 1)),
        dict(padding="valid"),
    ],
    ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()),
)
@pytest.mark.parametrize("pool", [1, 2])
def test_conv2d_geometry_matches_torch(backend, kwargs, pool):
    check(2, (3, 9, 13, 10), (18, 9 // kwargs.get("groups", 1), 3, 3), act="relu", pool=pool, **kwargs)


def test_conv2d_same_padding_even_kernel_pads_the_end(backend):
    check(2, (2, 3, 9, 8), (5, 3, 4, 2), padding="same", act="tanh", pool=1)


@pytest.mark.parametrize(
    "weight_shape", [(5, 1, 1, 1), (4, 3, 1, 1), (6, 3, 2, 7)], ids=["1x1-c1", "1x1", "full-width"]
)
def test_conv2d_small_and_full_width_kernels(backend, weight_shape):
    check(2, (3, weight_shape[1], 5, 7), weight_shape, act="relu", pool=1)


def test_conv2d_channels_one_and_odd_without_bias(backend):
    check(2, (4, 1, 17, 9), (13, 1, 3, 3), bias=False, padding=1, act="sigmoid", pool=2)
    check(2, (1, 13, 6, 6), (1, 13, 2, 2), bias=False, act="none", pool=(5, 5))


def test_conv2d_max_over_time_pool(backend):
    """Caser's horizontal filter: kernel (k, d), output (L - k + 1, 1), pool over all of it."""
    check(2, (5, 1, 10, 8), (4, 1, 3, 8), act="relu", pool=(8, 1))


def test_conv2d_seed_cnn_stage(backend):
    check(2, (2, 32, 32, 32), (64, 32, 3, 3), padding=1, act="relu", pool=2)


def test_conv2d_unbatched_input(backend):
    x, w = torch.randn(3, 8, 8), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(FF.conv2d(x, w, act="relu", pool=2), F.max_pool2d(F.relu(F.conv2d(x, w)), 2))


def test_conv2d_non_contiguous_input(backend):
    x = torch.randn(4, 9, 10, 3).permute(0, 3, 1, 2)
    w = torch.randn(5, 3, 3, 3)
    torch.testing.assert_close(
        FF.conv2d(x, w, padding=1, act="gelu", pool=2), reference(x, w, None, 1, 1, 1, 1, "gelu", 2)
    )


# --------------------------------------------------------------------------- conv1d numerics
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("pool", [1, 2, "time"])
def test_conv1d_matches_torch(backend, k, pool):
    length = 23
    out_len = length + 2 * (k // 2) - k + 1
    check(1, (3, 7, length), (6, 7, k), padding=k // 2, act="relu", pool=out_len if pool == "time" else pool)


def test_conv1d_geometry_matches_torch(backend):
    check(1, (2, 6, 31), (9, 2, 4), stride=2, padding=3, dilation=2, groups=3, act="tanh", pool=3)
    check(1, (2, 6, 12), (4, 6, 4), padding="same", act="none", pool=1)


# --------------------------------------------------------------------------- pool semantics
def test_pool_ties_pick_the_first_maximum_like_torch(backend):
    """ReLU zeros and repeated values: argmax (and so the gradient) lands where torch's does."""
    x = torch.randint(-2, 3, (2, 3, 8, 8)).float().requires_grad_()
    w = torch.ones(4, 3, 1, 1).requires_grad_()
    y = FF.conv2d(x, w, act="relu", pool=2)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = F.max_pool2d(F.relu(F.conv2d(xr, wr)), 2)
    assert torch.equal(y, y_ref)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), grad)
    want = torch.autograd.grad(y_ref, (xr, wr), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_pool_propagates_nan(backend):
    x = torch.randn(1, 2, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    w = torch.randn(3, 2, 1, 1)
    y = FF.conv2d(x, w, act="relu", pool=2)
    y_ref = F.max_pool2d(F.relu(F.conv2d(x, w)), 2)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).any()
    torch.testing.assert_close(y, y_ref, equal_nan=True)


@pytest.mark.parametrize("act", ["none", "relu"])
def test_wide_window_ties_and_nan_like_torch(backend, act):
    """Max-over-time windows (>= 32 wide): repeated maxima pick the first; NaN wins."""
    x = torch.randint(-1, 2, (3, 2, 70)).float()
    x[1, 0, 33] = float("nan")
    x[2, :, :] = -2.0  # relu: the whole window is zeros
    x.requires_grad_()
    w = torch.ones(4, 2, 1).requires_grad_()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = FF.conv1d(x, w, act=act, pool=70)
    y_ref = F.max_pool1d(ACT_FNS[act](F.conv1d(xr, wr)), 70)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, x, grad)[0]
    want = torch.autograd.grad(y_ref, xr, grad)[0]
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.skipif(not conv_ops.HAVE_CPP, reason="fastrec._C not built")
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_cpp_op_returns_the_contract_saved_z_and_argmax(act):
    args = (torch.randn(2, 3, 9, 7), torch.randn(5, 3, 3, 3), torch.randn(5), [1, 1], [1, 0], [1, 1], 1, act, [2, 3])
    y, saved_z, argmax = torch.ops.fastrec.conv_forward_cpp(*args)
    y_ref, z_ref, argmax_ref = conv_ops.conv_torch(*args)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(argmax, argmax_ref) and argmax.dtype == torch.int32
    assert saved_z.shape == ((0,) if act == "none" else y.shape)
    torch.testing.assert_close(saved_z, z_ref)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(backend, dtype):
    x = torch.randn(2, 6, 10, 10)
    w = torch.randn(8, 6, 3, 3) / 4
    b = torch.randn(8)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    pts = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    # The float64 reference sees the rounded inputs the kernel sees. From the fp32 originals, one
    # conv output on the H200 was -7e-5 in float64 and +3e-4 in fastrec from the fp16 inputs (torch
    # fp16: 0.0): input rounding alone put it on the other side of the ReLU, and that channel's bias
    # gradient with it.
    refs = [t.to(dtype).double().requires_grad_() for t in (x, w, b)]
    y = FF.conv2d(*leaves, padding=1, act="relu", pool=2)
    y_pt = reference(*pts, 1, 1, 1, 1, "relu", 2)
    y_ref = reference(*refs, 1, 1, 1, 1, "relu", 2)
    assert y.dtype == dtype

    def bounded(fast, pt, ref, factor):
        floor = 4 * torch.finfo(dtype).eps * ref.abs().max().item()
        return (fast.double() - ref).abs().max().item() <= factor * (pt.double() - ref).abs().max().item() + floor

    assert bounded(y, y_pt, y_ref, 2)
    grad = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, leaves, grad.to(dtype))
    pt = torch.autograd.grad(y_pt, pts, grad.to(dtype))
    want = torch.autograd.grad(y_ref, refs, grad)
    for g, p, r in zip(got, pt, want, strict=True):
        assert g.dtype == dtype
        assert bounded(g, p, r, 3)


@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_gradcheck_float64(backend, act):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: FF.conv2d(*t, padding=1, act=act, pool=2), (x, w, b))
    assert torch.autograd.gradcheck(lambda *t: FF.conv2d(*t, stride=2, dilation=(1, 2), groups=1, act=act), (x, w, b))


# --------------------------------------------------------------------------- registration
@pytest.mark.skipif(not conv_ops.HAVE_CPP, reason="fastrec._C not built")
def test_opcheck_cpp_ops():
    x, w, b = torch.randn(2, 4, 7, 6), torch.randn(6, 2, 3, 3), torch.randn(6)
    geometry = ([1, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(torch.ops.fastrec.conv_forward_cpp.default, (x, w, b, *geometry, "relu", [2, 2]))
    y, saved_z, argmax = torch.ops.fastrec.conv_forward_cpp(x, w, b, *geometry, "relu", [2, 2])
    args = (torch.randn_like(y), x, w, saved_z, argmax, *geometry, "relu", [2, 2], [True, True, True])
    torch.library.opcheck(torch.ops.fastrec.conv_backward_cpp.default, args)


def test_compile_fullgraph_module(backend):
    block = fnn.ConvBlock(3, 5, 3, padding=1, act="relu", pool=2)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = compiled(x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.max_pool2d(F.relu(F.conv2d(x_ref, block.conv.weight, block.conv.bias, padding=1)), 2)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_ref, x_ref, grad)[0])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: FF.conv2d(torch.randn(2, 3, 8, 8), torch.randn(4, 2, 3, 3)), ValueError, "input must have weight"),
        (lambda: FF.conv2d(torch.randn(2, 3, 4, 4), torch.randn(4, 3, 7, 3), padding=1), ValueError, "kernel"),
        (lambda: FF.conv2d(torch.randn(3, 8), torch.randn(4, 3, 3, 3)), ValueError, "input must be 4-D"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3)), ValueError, "weight must be 4-D"),
        (lambda: FF.conv1d(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3)), ValueError, "input must be 3-D"),
        (lambda: FF.conv2d(torch.randn(1, 4, 8, 8), torch.randn(3, 2, 3, 3), groups=2), ValueError, "divisible"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), act="elu"), ValueError, "act must"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=0), ValueError, "stride"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), pool=7), ValueError, "pool"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding="full"), ValueError, "padding"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 2, "same"), ValueError, "stride 1"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(3)), ValueError, "bias"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3).double()), TypeError, "weight must have"),
        (lambda: FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), dilation=(1,)), TypeError, "dilation"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- modules
@pytest.mark.parametrize(
    "cls, torch_cls, shape", [(fnn.Conv1d, torch.nn.Conv1d, (3, 4, 20)), (fnn.Conv2d, torch.nn.Conv2d, (3, 4, 9, 9))]
)
def test_modules_are_drop_in(backend, cls, torch_cls, shape):
    ref = torch_cls(4, 6, 3, stride=2, padding=1, groups=2)
    ours = cls(4, 6, 3, stride=2, padding=1, groups=2)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), ref(x))
    ref.load_state_dict(ours.state_dict())


def test_padding_mode_other_than_zeros_runs_torch_and_is_counted():
    ref = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    ours = fnn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    ours.load_state_dict(ref.state_dict())
    backends.stats(reset=True)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(ours(x), ref(x))
    assert backends.stats()[("conv", "torch", "padding_mode='reflect'")] == 1


def test_plain_and_narrow_cpu_convs_route_to_torch_unless_forced():
    backends.stats(reset=True)
    FF.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))
    assert [k[1] for k in backends.stats()] == ["torch"]
    if conv_ops.HAVE_CPP:
        backends.stats(reset=True)
        FF.conv2d(torch.randn(1, 3, 8, 20), torch.randn(4, 3, 3, 3), act="relu")
        assert [k[1] for k in backends.stats()] == ["cpp"]
        backends.stats(reset=True)
        FF.conv2d(torch.randn(1, 1, 10, 8), torch.randn(4, 1, 3, 8), act="relu", pool=(8, 1))
        assert [k[1] for k in backends.stats()] == ["torch"]


def test_conv_block_matches_the_sequential(backend):
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    block = fnn.ConvBlock.from_modules(*seq)
    assert block.conv.weight is seq[0].weight and block.conv.bias is seq[0].bias
    x = torch.randn(2, 3, 10, 11, requires_grad=True)
    y, y_ref = block(x), seq(x)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, *seq.parameters()), grad)
    want = torch.autograd.grad(y_ref, (x, *seq.parameters()), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_conv_block_state_dict_and_from_modules_rejects_other_pools():
    block = fnn.ConvBlock(3, 8, 3, padding=1)
    assert set(block.state_dict()) == {"conv.weight", "conv.bias"}
    with pytest.raises(ValueError, match="pool must be MaxPool2d"):
        fnn.ConvBlock.from_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, stride=2))
    with pytest.raises(ValueError, match="act must be"):
        fnn.ConvBlock.from_modules(torch.nn.Conv2d(3, 4, 3), torch.nn.ELU())


def test_patch_swaps_conv_layers_keeping_tensors():
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3), torch.nn.Dropout(), torch.nn.Conv2d(1, 2, 3))
    weight = model[0].weight
    report = fastrec.patch(model)
    assert type(model[0]) is fnn.Conv1d and type(model[2]) is fnn.Conv2d and model[0].weight is weight
    assert len(report.replaced) == 2
    assert fastrec.unpatch(model) == 2 and type(model[0]) is torch.nn.Conv1d
