"""Numerics of the conv family's Triton launchers (``fastrec.kernels.conv``), called directly
(the autograd.Function and custom ops live in fastrec/ops/conv.py); in Triton's interpreter when
there is no CUDA device.

Reference: torch's own ops, ``F.conv2d`` + the activation (``F.relu``, exact ``F.gelu``,
``torch.tanh``, ``torch.sigmoid``) + ``F.max_pool2d(kernel = stride = pool, return_indices=True)``,
differentiated by autograd under one random upstream gradient; the Triton side is
``conv_forward`` -> ``epilogue_backward`` -> ``conv_backward_input`` / ``conv_backward_weight``
(+ db = dz summed over N, H, W), the chain the contract prescribes.
Bounds (docs/testing.md):
- float64: ``‖fast − ref‖ / ‖ref‖ <= 1e-12`` for y, saved z and every gradient; the window
  argmax equals torch's ``return_indices`` exactly.
- fp32: the same against the float64 reference with bound 1e-5 (ieee dots).
- fp16 / bf16: ``maxabs(fast − ref) <= 2 (outputs) or 3 (gradients) * maxabs(pt − ref) + 2 ulps of
  max|ref|``, ``pt`` = the torch ops in the low dtype on the CPU; bf16 in the interpreter one more
  ulp (it truncates fp32 -> bf16 where a GPU rounds to nearest even).
- gradcheck in float64 through a test-local autograd.Function over the launchers.
- Exact: ties and NaN in the pool pick torch's index; dz is exactly zero off the winners and
  outside every window; 20 repeats of forward and backward are bitwise equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_reference import assert_rel_close, assert_two_reference
from fastrec.kernels import conv as kconv
from torch import Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"
ACT_FNS = {"none": lambda z: z, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}

# (name, x shape (N, C, H, W), out channels, kernel (KH, KW), stride, padding, dilation, groups, act, pool)
CASES = [
    ("seed_cnn_3x3_relu_pool2", (2, 3, 8, 8), 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, "relu", (2, 2)),
    ("odd_sizes_floor_pool", (2, 3, 7, 9), 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, "relu", (2, 2)),
    ("groups_dilation_stride", (2, 4, 9, 8), 6, (3, 2), (2, 1), (0, 1), (1, 2), 2, "gelu", (1, 1)),
    ("stride2_pool3_tanh", (1, 2, 13, 11), 4, (3, 3), (2, 2), (1, 1), (1, 1), 1, "tanh", (3, 3)),
    ("one_by_one_sigmoid", (3, 5, 4, 6), 7, (1, 1), (1, 1), (0, 0), (1, 1), 1, "sigmoid", (2, 1)),
    ("channels_1_no_bias_act", (2, 1, 6, 6), 3, (2, 2), (1, 1), (0, 0), (1, 1), 1, "none", (1, 1)),
    ("depthwise_conv1d_k5", (2, 6, 1, 17), 6, (1, 5), (1, 1), (0, 2), (1, 1), 6, "relu", (1, 2)),
    ("caser_full_width_max_over_time", (3, 1, 10, 8), 4, (3, 8), (1, 1), (0, 0), (1, 1), 1, "relu", (8, 1)),
    ("conv1d_max_over_time_chunks", (2, 3, 1, 70), 5, (1, 3), (1, 1), (0, 1), (1, 1), 1, "gelu", (1, 70)),
]
CASE_IDS = [case[0] for case in CASES]


def make_inputs(case, dtype=torch.float64, with_bias=True):
    _, x_shape, out_channels, (kh, kw), *_, groups, _, _ = case
    x = torch.randn(x_shape, dtype=dtype)
    w = torch.randn(out_channels, x_shape[1] // groups, kh, kw, dtype=dtype) / (x_shape[1] * kh * kw) ** 0.5
    b = torch.randn(out_channels, dtype=dtype) if with_bias else None
    return x, w, b


def reference(x, w, b, stride, padding, dilation, groups, act, pool):
    """(z, y, flat indices into Ho * Wo or None) from torch's ops."""
    z = F.conv2d(x, w, b, stride, padding, dilation, groups)
    a = ACT_FNS[act](z)
    if pool == (1, 1):
        return z, a, None
    y, indices = F.max_pool2d(a, pool, pool, return_indices=True)
    return z, y, indices


def window_index(indices: Tensor, pool, out_w: int) -> Tensor:
    """torch's flat indices (into Ho * Wo) as the contract's in-window index i * pool_w + j."""
    hp = torch.arange(indices.shape[2]).view(-1, 1)
    wp = torch.arange(indices.shape[3]).view(1, -1)
    i = indices // out_w - hp * pool[0]
    j = indices % out_w - wp * pool[1]
    return (i * pool[1] + j).to(torch.int32)


def fused(x, w, b, stride, padding, dilation, groups, act, pool, grad_y):
    """y, saved_z, argmax, dz and (dx, dw, db) from the launchers, on DEVICE."""
    x, w, grad_y = (t.to(DEVICE) for t in (x, w, grad_y))
    b = None if b is None else b.to(DEVICE)
    y, saved_z, argmax = kconv.conv_forward(x, w, b, stride, padding, dilation, groups, act, pool)
    out_h = kconv.conv_output_size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])
    out_w = kconv.conv_output_size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])
    dz = kconv.epilogue_backward(grad_y, saved_z, argmax, act, pool, (x.shape[0], w.shape[0], out_h, out_w))
    dx = kconv.conv_backward_input(dz, w, x.shape, stride, padding, dilation, groups)
    dw = kconv.conv_backward_weight(dz, x, w.shape, stride, padding, dilation, groups)
    db = dz.sum((0, 2, 3))
    return y, saved_z, argmax, dz, (dx, dw, db)


def reference_grads(x, w, b, stride, padding, dilation, groups, act, pool, grad_y, dtype):
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    z, y, indices = reference(
        *inputs[:2], inputs[2] if b is not None else None, stride, padding, dilation, groups, act, pool
    )
    grads = torch.autograd.grad(y, inputs, grad_y.to(dtype))
    return z.detach(), y.detach(), indices, grads


def check_case(case, dtype, bound):
    _, _, _, _, stride, padding, dilation, groups, act, pool = case
    with_bias = act != "none"
    x, w, b = make_inputs(case, dtype, with_bias)
    conf = (stride, padding, dilation, groups, act, pool)
    _, y_probe, _ = reference(x.double(), w.double(), None if b is None else b.double(), *conf)
    grad_y = torch.randn(y_probe.shape, dtype=dtype)
    z_ref, y_ref, indices, grads_ref = reference_grads(x, w, b, *conf, grad_y, torch.float64)
    y, saved_z, argmax, _, grads = fused(x, w, b, *conf, grad_y)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, "y", bound)
    if indices is not None:
        out_w = z_ref.shape[3]
        assert argmax.dtype == torch.int32 and argmax.shape == y.shape
        assert torch.equal(argmax.cpu(), window_index(indices, pool, out_w)), "argmax differs from torch's indices"
        z_at = z_ref.flatten(2).gather(2, indices.flatten(2)).view_as(y_ref)
    else:
        assert argmax.numel() == 0
        z_at = z_ref
    if act != "none":
        assert_rel_close(saved_z, z_at, "saved_z", bound)
    else:
        assert saved_z.numel() == 0
    names = ("dx", "dw", "db")[: len(grads_ref)]
    for name, actual, expected in zip(names, grads, grads_ref, strict=False):
        assert actual.dtype == dtype
        assert_rel_close(actual, expected, name, bound)


# --------------------------------------------------------------------------- forward + gradients
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_every_gradient_match_torch_in_float64(case):
    check_case(case, torch.float64, 1e-12)


@pytest.mark.parametrize("case", CASES[:5] + CASES[7:], ids=CASE_IDS[:5] + CASE_IDS[7:])
def test_fp32_matches_float64_reference(case):
    check_case(case, torch.float32, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[7]], ids=[CASE_IDS[0], CASE_IDS[2], CASE_IDS[7]])
def test_low_precision_within_two_reference_bound(case, dtype):
    _, _, _, _, stride, padding, dilation, groups, act, pool = case
    conf = (stride, padding, dilation, groups, act, pool)
    # Ties between low-precision values would let the two sides pick different winners: fp32
    # inputs rounded to the dtype, pooled on a continuous activation.
    x, w, b = make_inputs(case, dtype)
    _, y_probe, _ = reference(x.double(), w.double(), b.double(), *conf)
    grad_y = torch.randn(y_probe.shape, dtype=dtype)
    z_ref, y_ref, _, grads_ref = reference_grads(x, w, b, *conf, grad_y, torch.float64)
    _, y_pt, _, grads_pt = reference_grads(x, w, b, *conf, grad_y, dtype)
    y, _, _, _, grads = fused(x, w, b, *conf, grad_y)
    extra = 1 if (dtype == torch.bfloat16 and INTERPRETED) else 0
    assert y.dtype == dtype
    assert_two_reference(y, y_pt, y_ref, "y", 2, extra)
    for name, actual, pt, ref in zip(("dx", "dw", "db"), grads, grads_pt, grads_ref, strict=True):
        assert actual.dtype == dtype
        assert_two_reference(actual, pt, ref, name, 3, extra)


def test_non_contiguous_input_and_gradient_match_reference():
    x_full = torch.randn(3, 8, 10, 2 * 9, dtype=torch.float64)
    x = x_full[::2, 1::2, :, ::2]  # strided in N, C and W
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    conf = ((1, 1), (1, 1), (1, 1), 1, "none", (1, 1))
    dz_full = torch.randn(2, 5, 2 * 10, 9, dtype=torch.float64)
    dz = dz_full[:, :, ::2]  # strided upstream gradient
    z_ref, _, _, (dx_ref, dw_ref) = reference_grads(x, w, None, *conf, dz, torch.float64)
    x_full, dz_full, w_dev = x_full.to(DEVICE), dz_full.to(DEVICE), w.to(DEVICE)
    x_dev, dz_dev = x_full[::2, 1::2, :, ::2], dz_full[:, :, ::2]
    y, _, _ = kconv.conv_forward(x_dev, w_dev, None, *conf[:4], "none", (1, 1))
    assert_rel_close(y, z_ref, "y", 1e-12)
    assert_rel_close(kconv.conv_backward_input(dz_dev, w_dev, x.shape, *conf[:4]), dx_ref, "dx", 1e-12)
    assert_rel_close(kconv.conv_backward_weight(dz_dev, x_dev, w.shape, *conf[:4]), dw_ref, "dw", 1e-12)


# --------------------------------------------------------------------------- pool semantics
def test_pool_ties_pick_the_first_maximum_in_window_order():
    # 1x1 identity conv on small integers: many exact ties in every 2x3 window, and relu's zeros.
    x = torch.randint(-2, 3, (2, 1, 6, 9)).double()
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    conf = ((1, 1), (0, 0), (1, 1), 1, "relu", (2, 3))
    grad_y = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    z_ref, y_ref, indices, grads_ref = reference_grads(x, w, b, *conf, grad_y, torch.float64)
    y, _, argmax, dz, grads = fused(x, w, b, *conf, grad_y)
    assert torch.equal(y.cpu(), y_ref)
    assert torch.equal(argmax.cpu(), window_index(indices, (2, 3), 9))
    assert torch.equal(grads[0].cpu(), grads_ref[0])


def test_max_over_time_ties_across_window_chunks_pick_the_first():
    # A 70-long window is reduced in chunks; equal maxima in different chunks: the first wins.
    x = torch.full((1, 1, 1, 70), -1.0, dtype=torch.float64)
    x[0, 0, 0, [5, 33, 66]] = 4.0
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    y, _, argmax = kconv.conv_forward(x.to(DEVICE), w.to(DEVICE), None, (1, 1), (0, 0), (1, 1), 1, "none", (1, 70))
    assert kconv.window_block(70, 64) < 70  # the case really runs several chunks
    assert y.item() == 4.0 and argmax.item() == 5


def test_nan_wins_the_pool_as_in_torch():
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    x[0, 0, 0, 1] = float("nan")  # window (0, 0)
    x[0, 0, 1, 0] = float("nan")  # the same window: torch keeps the last NaN in window order
    x[0, 0, 3, 6] = float("nan")
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    conf = ((1, 1), (0, 0), (1, 1), 1, "none", (2, 2))
    _, y_ref, indices = reference(x, w, None, *conf)
    y, _, argmax = kconv.conv_forward(x.to(DEVICE), w.to(DEVICE), None, *conf)
    y, argmax = y.cpu(), argmax.cpu()
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().sum() == 2
    assert torch.equal(y[~y.isnan()], y_ref[~y_ref.isnan()])
    assert torch.equal(argmax, window_index(indices, (2, 2), 8))


def test_gradient_is_zero_off_the_winners_and_outside_every_window():
    # 7 x 9 outputs pooled 2 x 2: the last row and column belong to no window.
    x = torch.randn(2, 2, 7, 9, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    conf = ((1, 1), (1, 1), (1, 1), 1, "tanh", (2, 2))
    grad_y = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    z_ref, _, indices, _ = reference_grads(x, w, b, *conf, grad_y, torch.float64)
    _, _, _, dz, _ = fused(x, w, b, *conf, grad_y)
    expected = torch.zeros_like(z_ref).flatten(2)
    expected.scatter_(
        2,
        indices.flatten(2),
        (grad_y * (1 - torch.tanh(z_ref.flatten(2).gather(2, indices.flatten(2)).view_as(grad_y)) ** 2)).flatten(2),
    )
    assert (dz[:, :, 6, :] == 0).all() and (dz[:, :, :, 8] == 0).all()
    assert ((dz != 0).sum((2, 3)) == 12).all()
    assert_rel_close(dz, expected.view_as(z_ref), "dz", 1e-12)


# --------------------------------------------------------------------------- gradcheck, determinism
class _LauncherConv(torch.autograd.Function):
    """Test-local autograd wrapper of the launchers (the package's own is in fastrec/ops/conv.py)."""

    @staticmethod
    def forward(ctx, x, w, b, conf):
        stride, padding, dilation, groups, act, pool = conf
        y, saved_z, argmax = kconv.conv_forward(x, w, b, stride, padding, dilation, groups, act, pool)
        ctx.save_for_backward(x, w, saved_z, argmax)
        ctx.conf = conf
        ctx.conv_out = (
            x.shape[0],
            w.shape[0],
            kconv.conv_output_size(x.shape[2], w.shape[2], stride[0], padding[0], dilation[0]),
            kconv.conv_output_size(x.shape[3], w.shape[3], stride[1], padding[1], dilation[1]),
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, saved_z, argmax = ctx.saved_tensors
        stride, padding, dilation, groups, act, pool = ctx.conf
        dz = kconv.epilogue_backward(grad_y, saved_z, argmax, act, pool, ctx.conv_out)
        dx = kconv.conv_backward_input(dz, w, x.shape, stride, padding, dilation, groups)
        dw = kconv.conv_backward_weight(dz, x, w.shape, stride, padding, dilation, groups)
        return dx, dw, dz.sum((0, 2, 3)), None


@pytest.mark.parametrize(
    "conf",
    [
        ((1, 1), (1, 1), (1, 1), 1, "gelu", (2, 2)),
        ((2, 1), (0, 1), (1, 2), 2, "sigmoid", (1, 1)),
        ((1, 1), (0, 0), (1, 1), 1, "tanh", (1, 4)),
    ],
    ids=["pool2_gelu", "stride_dilation_groups_sigmoid", "max_over_time_tanh"],
)
def test_gradcheck_float64(conf):
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 2 // conf[3], 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _LauncherConv.apply(*t, conf), (x, w, b), fast_mode=INTERPRETED)


def test_forward_and_backward_bitwise_deterministic_over_20_repeats():
    x = torch.randn(1, 2, 16, 16, dtype=torch.float32)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float32)
    b = torch.randn(4, dtype=torch.float32)
    conf = ((1, 1), (1, 1), (1, 1), 1, "relu", (2, 2))
    grad_y = torch.randn(1, 4, 8, 8)
    cfg = kconv.block_config("weight", torch.float32, 4, 18, INTERPRETED)
    assert kconv.weight_split(1, 16 * 16, cfg.depth, DEVICE)[0] > 1  # the split reduction runs
    first = fused(x, w, b, *conf, grad_y)
    for _ in range(19):
        again = fused(x, w, b, *conf, grad_y)
        for a, b_ in zip(first[:4] + first[4], again[:4] + again[4], strict=True):
            assert torch.equal(a, b_)


# --------------------------------------------------------------------------- launcher details
def test_window_block_pads_the_window_least():
    assert kconv.window_block(1, 64) == 1
    assert kconv.window_block(4, 64) == 4
    assert kconv.window_block(9, 64) == 4  # 12 rows in 3 chunks beat 16 in one
    assert kconv.window_block(16, 64) == 16
    assert kconv.window_block(50, 64) == 4  # 52 rows beat 64
    assert kconv.window_block(48, 64) == 16  # 48 rows either way: fewer chunks
    assert kconv.window_block(64, 64) == 64
    assert kconv.window_block(70, 32) == 4  # 72 rows beat 80
    assert kconv.window_block(128, 32) == 16  # no block above the tile's rows


def test_weight_split_covers_every_row_once():
    for total, block in [(1, 16), (63, 16), (4096, 64), (10_000, 32)]:
        splits, rows = kconv.weight_split(1, total, block, torch.device("cpu"))
        assert rows % block == 0 and (splits - 1) * rows < total <= splits * rows


def test_empty_pooled_output_returns_empty_tensors():
    x = torch.randn(2, 3, 1, 5, device=DEVICE)
    w = torch.randn(4, 3, 1, 3, device=DEVICE)
    y, saved_z, argmax = kconv.conv_forward(x, w, None, (1, 1), (0, 0), (1, 1), 1, "relu", (1, 4))
    assert y.shape == (2, 4, 1, 0) and saved_z.shape == y.shape and argmax.shape == y.shape


def test_unknown_activation_is_a_value_error_naming_it():
    x, w = torch.randn(1, 1, 3, 3, device=DEVICE), torch.randn(1, 1, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"act must be one of .*got 'swish'"):
        kconv.conv_forward(x, w, None, (1, 1), (0, 0), (1, 1), 1, "swish", (1, 1))


def test_offsets_beyond_int32_are_a_value_error_naming_the_tensor():
    # Meta tensors: shapes and strides only; the check runs before any launch.
    x = torch.empty_strided((2, 1, 4, 4), (2**31, 16, 4, 1), device="meta")
    w = torch.empty((1, 1, 1, 1), device="meta")
    with pytest.raises(ValueError, match=r"x must have element offsets below 2\*\*31"):
        kconv.conv_forward(x, w, None, (1, 1), (0, 0), (1, 1), 1, "none", (1, 1))


def test_allow_tf32_path_stays_within_tf32_bound():
    # The ALLOW_TF32 variants of the three GEMM kernels (the interpreter computes them in fp32; a
    # GPU rounds the dot inputs to tf32: 10-bit mantissas, hence the 2e-3 bound). No activation
    # and no pool: a tf32 rounding must not move a relu kink or a pool winner.
    x, w, b = make_inputs(CASES[0], torch.float32)
    conf = ((1, 1), (1, 1), (1, 1), 1, "none", (1, 1))
    grad_y = torch.randn(2, 8, 8, 8)
    _, y_ref, _, (dx_ref, dw_ref, _) = reference_grads(x, w, b, *conf, grad_y, torch.float64)
    x, w, b, dz = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), grad_y.to(DEVICE)
    y, _, _ = kconv.conv_forward(x, w, b, *conf, allow_tf32=True)
    dx = kconv.conv_backward_input(dz, w, x.shape, *conf[:4], allow_tf32=True)
    dw = kconv.conv_backward_weight(dz, x, w.shape, *conf[:4], allow_tf32=True)
    for name, actual, expected in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert_rel_close(actual, expected, name, 2e-3)
