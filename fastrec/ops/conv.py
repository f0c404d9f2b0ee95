"""Convolution: the fused conv + bias + activation + max-pool op, its registered ops, dispatch.

The contract every backend implements (Triton: ``kernels/conv.py``; C++: ``csrc/conv.cpp``;
torch: ``conv_torch`` below, the readable reference). Canonical form, 2-D only (conv1d on
``(N, C, L)`` is conv2d on ``(N, C, 1, L)`` with a ``(1, k)`` kernel)::

    z = conv2d(x, w, stride, padding, dilation, groups) + bias
    a = act(z)        act in ACTIVATIONS (ops/_conv_common.py); "gelu" is the exact erf form
    y = maxpool(a)    window = stride = pool; (1, 1) = no pool; floor division of the output
                      size, as F.max_pool2d(kernel=stride=pool, ceil_mode=False)

- x ``(N, C, H, W)``, w ``(O, C / groups, KH, KW)``, bias ``(O,)`` or None, y ``(N, O, Hp, Wp)``.
  ``stride``, ``padding`` (explicit, symmetric), ``dilation`` and ``pool`` are ``(int, int)``.
- Pool semantics are torch's max_pool2d on the activated values: the first maximum in row-major
  window order wins ties; NaN propagates (a NaN wins). Max-over-time is a pool whose window is
  the whole output dimension.
- ``forward(x, w, bias, stride, padding, dilation, groups, act, pool) -> (y, saved_z, argmax)``:
  ``saved_z`` is z at y's positions (y's shape) when ``act != "none"``, else an empty ``(0,)``
  tensor; ``argmax`` int32 (y's shape) holds ``i * pool_w + j``, the winner's place in its
  window, when pooled, else an empty ``(0,)`` int32 tensor.
- ``backward(grad_y, x, w, saved_z, argmax, <the same geometry>, output_mask) -> (dx, dw, db)``:
  ``dz`` = scatter of ``grad_y * act'(z)`` to the argmax positions (zero elsewhere, and at conv
  outputs no window covers); ``dx`` = conv-transpose of dz with w, ``dw`` = correlation of x
  with dz, ``db`` = dz summed over (N, H, W). An output not asked for by ``output_mask``
  (dx, dw, db) is an empty ``(0,)`` tensor. relu' is ``0 if z <= 0 else 1`` (torch's
  threshold_backward: a NaN z passes its gradient).
- Numerics: fp32 in fp32 (no TF32 unless torch's ``allow_tf32`` flags allow it), fp16/bf16
  accumulate in fp32, fp64 in fp64 (gradcheck).

Routes (``fastrec.routing``, unless a backend is forced): on the CPU the C++ kernel runs calls
with an epilogue to fuse (an activation or a pool), and torch's oneDNN convolution runs plain
convolutions and conv outputs narrower than 16 columns (full-width kernels such as Caser's); on
CUDA the per-card table below picks the path.

CUDA dispatch (the triton backend): two paths compute the same contract. "triton" is the fused
implicit GEMM (kernels/conv.py conv_forward and its backward kernels); "cudnn" is torch's
convolution (cuDNN) followed by the Triton epilogue-only kernel (epilogue_forward), and in the
backward the Triton epilogue_backward followed by torch's convolution_backward. The choice per
shape class is data: fastrec/conv_dispatch.json, written by
``fastrec bench --family conv --write-dispatch PATH`` on the card (see ``conv_path``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends, routing
from fastrec._tables import package_table, parse_card_table
from fastrec.kernels._common import dtype_name
from fastrec.ops._conv_common import act_derivative, act_fn

OP = "conv"

HAVE_CPP = backends.available()["cpp"] is None and hasattr(torch.ops.fastrec, "conv_forward_cpp")
try:
    HAVE_TRITON_KERNELS = importlib.util.find_spec("fastrec.kernels.conv") is not None
except ImportError:  # fastrec.kernels itself not importable (no triton)
    HAVE_TRITON_KERNELS = False


def conv_output_size(x_shape, w_shape, stride, padding, dilation) -> tuple[int, int]:
    """``(Ho, Wo)`` of the convolution (before the pool)."""
    return tuple(
        (x_shape[2 + d] + 2 * padding[d] - dilation[d] * (w_shape[2 + d] - 1) - 1) // stride[d] + 1 for d in range(2)
    )


# --------------------------------------------------------------------------- torch reference
def conv_torch(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    act: str,
    pool: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """F.conv2d + act + F.max_pool2d (autograd differentiates ``y``): the readable reference of
    the contract, what the fused forwards must return.

    Returns ``(y, saved_z, argmax)`` as the contract defines them.
    """
    z = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    a = act_fn(act)(z)
    empty_index = torch.empty(0, dtype=torch.int32, device=x.device)
    if tuple(pool) == (1, 1):
        return a, (z if act != "none" else z.new_empty(0)), empty_index
    y, flat = F.max_pool2d(a, pool, pool, return_indices=True)
    width = z.shape[-1]
    rows = torch.arange(y.shape[-2], device=x.device)[:, None] * pool[0]
    cols = torch.arange(y.shape[-1], device=x.device)[None, :] * pool[1]
    argmax = ((flat // width - rows) * pool[1] + (flat % width - cols)).to(torch.int32)
    saved_z = z.flatten(2).gather(2, flat.flatten(2)).view_as(y) if act != "none" else z.new_empty(0)
    return y, saved_z, argmax


# --------------------------------------------------------------------------- registered ops
def _fake_outputs(z_shape, like: Tensor, act: str, pool) -> tuple[Tensor, Tensor, Tensor]:
    """Empty ``(y, saved_z, argmax)`` of the contract for a convolution output of ``z_shape``."""
    pooled = tuple(pool) != (1, 1)
    shape = (z_shape[0], z_shape[1], z_shape[2] // pool[0], z_shape[3] // pool[1])
    y = like.new_empty(shape)
    saved_z = like.new_empty(shape) if act != "none" else like.new_empty(0)
    argmax = like.new_empty(shape if pooled else (0,), dtype=torch.int32)
    return y, saved_z, argmax


def _fake_forward(x, w, bias, stride, padding, dilation, groups, act, pool, *allow_tf32):
    z_shape = (x.shape[0], w.shape[0], *conv_output_size(x.shape, w.shape, stride, padding, dilation))
    return _fake_outputs(z_shape, x, act, pool)


def _fake_backward(grad_y, x, w, saved_z, argmax, stride, padding, dilation, groups, act, pool, output_mask, *rest):
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty(0)
    dw = w.new_empty(w.shape) if output_mask[1] else w.new_empty(0)
    db = w.new_empty(w.shape[0]) if output_mask[2] else w.new_empty(0)
    return dx, dw, db


def _grad_z(grad_y, x, w, bias, saved_z, argmax, stride, padding, dilation, groups, act, pool) -> Tensor:
    """dz, the first step of both Triton backward paths: the Triton epilogue backward of grad_y,
    then the conv outputs no pool window covers (see ``_fill_uncovered``)."""
    from fastrec.kernels import conv as kernels

    conv_out = (x.shape[0], w.shape[0], *conv_output_size(x.shape, w.shape, stride, padding, dilation))
    dz = kernels.epilogue_backward(grad_y, saved_z, argmax, act, tuple(pool), conv_out)
    if act in ("gelu", "tanh", "sigmoid"):
        _fill_uncovered(dz, x, w, bias, stride, padding, dilation, groups, act, pool)
    return dz


def _strip_z(x, w, bias, stride, padding, dilation, groups, dim: int, first: int, count: int) -> Tensor:
    """z = conv + bias at conv outputs ``first .. first + count - 1`` along spatial ``dim`` (0: rows,
    1: columns), every position along the other: a convolution of the input rows (columns) they read."""
    size = x.shape[2 + dim]
    lo = first * stride[dim] - padding[dim]
    hi = (first + count - 1) * stride[dim] - padding[dim] + (w.shape[2 + dim] - 1) * dilation[dim] + 1
    part = x.narrow(2 + dim, max(lo, 0), min(hi, size) - max(lo, 0))
    before, after = max(-lo, 0), max(hi - size, 0)
    part = F.pad(part, (before, after, 0, 0) if dim == 1 else (0, 0, before, after))
    pad = [padding[0], padding[1]]
    pad[dim] = 0
    return F.conv2d(part, w, bias, stride, pad, dilation, groups)


def _fill_uncovered(dz, x, w, bias, stride, padding, dilation, groups, act, pool) -> None:
    """dz at the conv outputs no pool window covers: torch's dense backward gives them
    ``0 * act'(z)``, NaN where act'(z) is (gelu at a non-finite z, tanh / sigmoid at NaN). Only
    those outputs are convolved (a strip of rows and one of columns), and only when there are some."""
    out_h, out_w = dz.shape[2:]
    covered_h, covered_w = out_h // pool[0] * pool[0], out_w // pool[1] * pool[1]
    geometry = (stride, padding, dilation, groups)
    if covered_h < out_h:
        z = _strip_z(x, w, bias, *geometry, 0, covered_h, out_h - covered_h)
        dz[:, :, covered_h:, :] = 0 * act_derivative(act, z).to(dz.dtype)
    if covered_w < out_w:
        z = _strip_z(x, w, bias, *geometry, 1, covered_w, out_w - covered_w)[:, :, :covered_h]
        dz[:, :, :covered_h, covered_w:] = 0 * act_derivative(act, z).to(dz.dtype)


def _grad_bias(dz: Tensor, w: Tensor, needed: bool) -> Tensor:
    """db = dz summed over (N, Ho, Wo) in fp32 (fp64 for fp64), in w's dtype; empty if not needed."""
    if not needed:
        return w.new_empty(0)
    return dz.sum((0, 2, 3), dtype=torch.float64 if dz.dtype == torch.float64 else torch.float32).to(w.dtype)


@backends.triton_op("conv_forward_triton")
def conv_forward_triton(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    pool: list[int],
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastrec.kernels import conv as kernels

    geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    return kernels.conv_forward(x, w, bias, *geometry, act, tuple(pool), allow_tf32)


@backends.triton_op("conv_backward_triton")
def conv_backward_triton(
    grad_y: Tensor,
    x: Tensor,
    w: Tensor,
    saved_z: Tensor,
    argmax: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    pool: list[int],
    output_mask: list[bool],
    allow_tf32: bool,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastrec.kernels import conv as kernels

    geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    dz = _grad_z(grad_y, x, w, bias, saved_z, argmax, stride, padding, dilation, groups, act, pool)
    dx = kernels.conv_backward_input(dz, w, tuple(x.shape), *geometry, allow_tf32) if output_mask[0] else x.new_empty(0)
    dw = (
        kernels.conv_backward_weight(dz, x, tuple(w.shape), *geometry, allow_tf32) if output_mask[1] else w.new_empty(0)
    )
    return dx, dw, _grad_bias(dz, w, output_mask[2])


@backends.triton_op("conv_epilogue_triton")
def conv_epilogue_triton(z: Tensor, bias: Tensor | None, act: str, pool: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, saved_z, argmax) of the contract from z = the convolution without bias (cuDNN's)."""
    from fastrec.kernels import conv as kernels

    return kernels.epilogue_forward(z, bias, act, tuple(pool))


@conv_epilogue_triton.register_fake
def _fake_epilogue(z, bias, act, pool):
    return _fake_outputs(z.shape, z, act, pool)


@backends.triton_op("conv_backward_cudnn")
def conv_backward_cudnn(
    grad_y: Tensor,
    x: Tensor,
    w: Tensor,
    saved_z: Tensor,
    argmax: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    pool: list[int],
    output_mask: list[bool],
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The "cudnn" path's backward: the Triton epilogue backward, then torch's convolution
    backward (cuDNN on CUDA) for dx and dw; db sums dz."""
    dz = _grad_z(grad_y, x, w, bias, saved_z, argmax, stride, padding, dilation, groups, act, pool)
    dx, dw = x.new_empty(0), w.new_empty(0)
    if output_mask[0] or output_mask[1]:
        mask = [output_mask[0], output_mask[1], False]
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dz, x, w, None, stride, padding, dilation, False, [0, 0], groups, mask
        )
        dx = gx if output_mask[0] else dx
        dw = gw if output_mask[1] else dw
    return dx, dw, _grad_bias(dz, w, output_mask[2])


backends.register_fake(_fake_forward, conv_forward_triton, cpp_op="conv_forward_cpp")
backends.register_fake(_fake_backward, conv_backward_triton, conv_backward_cudnn, cpp_op="conv_backward_cpp")


class ConvFunction(torch.autograd.Function):
    """The fused op on the ``cpp`` backend or the triton backend's ``triton`` / ``cudnn`` path;
    saves x, w, bias, saved_z and argmax."""

    @staticmethod
    def forward(ctx, x, w, bias, stride, padding, dilation, groups, act, pool, backend):
        args = (x, w, bias, stride, padding, dilation, groups, act, pool)
        if backend == "cudnn":
            z = F.conv2d(x, w, None, stride, padding, dilation, groups)
            y, saved_z, argmax = conv_epilogue_triton(z, bias, act, pool)
        elif backend == "triton":
            y, saved_z, argmax = conv_forward_triton(*args, backends.allow_tf32(x, convolution=True))
        else:
            y, saved_z, argmax = torch.ops.fastrec.conv_forward_cpp(*args)
        ctx.save_for_backward(x, w, bias, saved_z, argmax)
        ctx.flags = (stride, padding, dilation, groups, act, pool, backend, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w, bias, saved_z, argmax = ctx.saved_tensors
        stride, padding, dilation, groups, act, pool, backend, has_bias = ctx.flags
        need = ctx.needs_input_grad
        mask = [need[0], need[1], has_bias and need[2]]
        args = (grad_y.contiguous(), x, w, saved_z, argmax, stride, padding, dilation, groups, act, pool, mask)
        if backend == "cudnn":
            dx, dw, db = conv_backward_cudnn(*args, bias)
        elif backend == "triton":
            dx, dw, db = conv_backward_triton(*args, backends.allow_tf32(x, convolution=True), bias)
        else:
            dx, dw, db = torch.ops.fastrec.conv_backward_cpp(*args, bias)
        return (
            dx if mask[0] else None,
            dw if mask[1] else None,
            db if mask[2] else None,
            *([None] * 7),
        )


def _unfused_reason(x: Tensor) -> str | None:
    """Why the fused kernels do not cover this call, or None."""
    if x.device.type == "cuda" and not HAVE_TRITON_KERNELS:
        return "no triton conv kernels (fastrec.kernels.conv) in this build"
    if x.device.type == "cpu" and not HAVE_CPP:
        return "fastrec._C does not register conv_forward_cpp"
    if x.device.type not in ("cpu", "cuda"):
        return f"no fused conv kernel for {x.device.type} tensors"
    return None


def conv(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    act: str,
    pool: tuple[int, int],
) -> Tensor:
    """The fused op on canonical inputs (see the module docstring); picks the backend per call."""
    stride, padding, dilation, pool = (list(v) for v in (stride, padding, dilation, pool))
    if x.numel() == 0:  # an empty batch (or empty spatial input) runs torch's ops on every backend
        backends.count(OP, "torch", "empty batch")
        return conv_torch(x, w, bias, stride, padding, dilation, groups, act, pool)[0]
    out_size = conv_output_size(x.shape, w.shape, stride, padding, dilation)
    reason = _unfused_reason(x) or routing.conv(x, act, pool, out_size[1])
    backend = path = backends.select(x.device, reason)
    if backend == "triton":  # the dispatch table's path: "triton", "cudnn" or "torch"
        path = conv_path(x, w, groups, out_size)
        reason = {"cudnn": routing.CONV_TABLE_CUDNN, "torch": routing.CONV_TABLE_TORCH}.get(path, reason)
        backend = "torch" if path == "torch" else backend
    backends.count(OP, backend, reason or "")
    if backend == "torch":  # torch's ops, unfused, output only (conv_torch's saved_z, argmax cost launches)
        a = act_fn(act)(F.conv2d(x, w, bias, stride, padding, dilation, groups))
        return a if tuple(pool) == (1, 1) else F.max_pool2d(a, pool, pool)
    return ConvFunction.apply(x, w, bias, stride, padding, dilation, groups, act, pool, path)


# --------------------------------------------------------------------------- GPU dispatch table
CONV_PATHS = ("triton", "cudnn", "torch")
DEFAULT_PATH = "triton"
DISPATCH_VERSION = 1
_CHANNEL_BUCKETS = (4, 8, 16, 32, 64, 128, 256)  # upper bounds; above the last: "256+"
_KERNEL_BUCKETS = (1, 3, 5, 9, 25, 64)  # KH * KW upper bounds (1x1, 1-D k=3 and k=5, up to 3x3, up to 5x5, wide)
_OUTPUT_BUCKETS = (64, 256, 1024, 4096, 16384)  # Ho * Wo upper bounds
_override = threading.local()


def _bucket(value: int, bounds: tuple[int, ...]) -> str:
    for bound in bounds:
        if value <= bound:
            return str(bound)
    return f"{bounds[-1]}+"


def shape_class(
    in_channels: int, out_channels: int, kernel: tuple[int, int], out_size: tuple[int, int], groups: int, dtype
) -> str:
    """The dispatch table's key of one convolution, e.g. ``"c32-o64-k9-s1024-g1-fp32"``: input and
    output channels per group and KH * KW rounded up to a bucket bound, output positions
    Ho * Wo likewise, groups as 1, "dw" (depthwise: one input channel per group) or "n", and the
    dtype. Shapes of one class share a path."""
    per_group = in_channels // groups
    group_class = "1" if groups == 1 else "dw" if per_group == 1 else "n"
    return "-".join(
        (
            "c" + _bucket(per_group, _CHANNEL_BUCKETS),
            "o" + _bucket(out_channels // groups, _CHANNEL_BUCKETS),
            "k" + _bucket(kernel[0] * kernel[1], _KERNEL_BUCKETS),
            "s" + _bucket(out_size[0] * out_size[1], _OUTPUT_BUCKETS),
            "g" + group_class,
            dtype_name(dtype),
        )
    )


def parse_dispatch(table: dict, source: str = "conv dispatch table") -> dict[str, dict[str, str]]:
    """``{card name: {shape class: path}}`` from the JSON table; ValueError naming what is wrong.

    Format: ``{"version": 1, "default": "triton", "cards": {card: {"measured": date, "torch":
    version, "triton": version, "classes": {shape class: {"path": "triton" | "cudnn" | "torch",
    "triton_ms": float, "cudnn_ms": float, "torch_ms": float}}}}}``.
    """
    required = {"version": DISPATCH_VERSION, "default": DEFAULT_PATH}
    return parse_card_table(table, source, required, "classes", _parse_path)


def _parse_path(where: str, key: str, row: object) -> str:
    """One class's path (``row["path"]``); ValueError naming ``where`` when it is not one of CONV_PATHS."""
    path = row.get("path") if isinstance(row, dict) else None
    if path not in CONV_PATHS:
        raise ValueError(f"{where}.path must be one of {CONV_PATHS}")
    return path


_TABLE: dict[str, dict[str, str]] | None = None  # a parsed table standing in for the package's (tests)


def dispatch_table() -> dict[str, dict[str, str]]:
    """The package's table (fastrec/conv_dispatch.json), parsed once."""
    return _TABLE if _TABLE is not None else package_table("conv_dispatch.json", parse_dispatch)


@torch.compiler.assume_constant_result
def _table_path(device_index: int, key: str) -> str:
    """The table's path for ``key`` on the card at ``device_index`` (a constant under torch.compile)."""
    return dispatch_table().get(backends.card_name(device_index), {}).get(key, DEFAULT_PATH)


@contextlib.contextmanager
def use_conv_path(path: str) -> Iterator[None]:
    """Force the triton backend's conv path (``"triton"``, ``"cudnn"`` or ``"torch"``) inside the
    block (this thread): the table writer times the paths this way, and the CPU tests run the
    cudnn path (torch's CPU convolution standing in for cuDNN) under the interpreter."""
    if path not in CONV_PATHS:
        raise ValueError(f"path must be one of {CONV_PATHS}, got {path!r}")
    stack = getattr(_override, "stack", None)
    if stack is None:
        stack = _override.stack = []
    stack.append(path)
    try:
        yield
    finally:
        stack.pop()


def conv_path(x: Tensor, w: Tensor, groups: int, out_size: tuple[int, int]) -> str:
    """The triton backend's path for this call: the ``use_conv_path`` override, else on CUDA the
    table's entry for (card name, ``shape_class``), else DEFAULT_PATH. This is the CUDA route of
    ``fastrec.routing`` (rule ``conv-table-cuda``), which ``fastrec info --routes`` lists per card.

    Unmeasured classes (and cards the table does not list) default to "triton", the fused implicit
    GEMM: a class goes to cuDNN only where a benchmark on that card showed cuDNN's
    convolution plus the separate epilogue faster, and the fused path keeps the epilogue's
    memory traffic out of the convolution. "torch" (torch's own convolution, activation and pool,
    unfused) is the third path: at recommender sizes a convolution is microseconds of GPU work and
    the host cost of a call decides (the H200 table sends every class it measured to torch).
    """
    stack = getattr(_override, "stack", None)
    if stack:
        return stack[-1]
    if x.device.type != "cuda":
        return DEFAULT_PATH
    key = shape_class(x.shape[1], w.shape[0], tuple(w.shape[2:]), tuple(out_size), groups, x.dtype)
    return _table_path(x.device.index if x.device.index is not None else torch.cuda.current_device(), key)
