"""Drop-in convolution modules (subclasses of ``torch.nn.Conv1d`` / ``Conv2d``) and ``ConvBlock``.

``Conv1d`` / ``Conv2d`` override only ``forward``, so constructor, initialisation, parameters
and ``state_dict`` are torch's. ``padding_mode`` other than ``"zeros"`` and inputs whose dtype
or device differ from the weights run torch's own forward, counted in ``fastrec.stats()``.

``ConvBlock`` is conv + activation + max-pool in one fused call (the CNN stage of the source
document: Conv2d 3x3 pad 1 -> ReLU -> MaxPool2d(2)); ``ConvBlock.from_modules`` builds one
that shares the tensors of an existing ``Conv2d -> ReLU -> MaxPool2d`` chain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fastrec import backends
from fastrec import functional as FF
from fastrec.ops._conv_common import act_fn

_ACT_MODULES = {
    torch.nn.Identity: "none",
    torch.nn.ReLU: "relu",
    torch.nn.Tanh: "tanh",
    torch.nn.Sigmoid: "sigmoid",
}


def _unfused_reason(module: torch.nn.modules.conv._ConvNd, input: Tensor) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if module.transposed:
        return "transposed convolution"
    if not isinstance(input, Tensor):
        return "input is not a tensor"  # torch raises its own error
    if input.dtype != module.weight.dtype or input.device != module.weight.device:
        return "input dtype/device differs from the weights"
    return None


class _FusedForward:
    """The ``forward`` of ``Conv1d`` / ``Conv2d`` (placed before torch's class in their bases):
    ``_functional`` (``FF.conv1d`` / ``FF.conv2d``), or torch's own forward where
    ``_unfused_reason`` says the fused op does not cover the call."""

    _functional: Callable[..., Tensor]

    def forward(self, input: Tensor) -> Tensor:
        reason = _unfused_reason(self, input)
        if reason is not None:
            backends.count("conv", "torch", reason)
            return super().forward(input)
        return self._functional(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv1d(_FusedForward, torch.nn.Conv1d):
    """``torch.nn.Conv1d`` running fastrec's fused convolution."""

    _functional = staticmethod(FF.conv1d)


class Conv2d(_FusedForward, torch.nn.Conv2d):
    """``torch.nn.Conv2d`` running fastrec's fused convolution."""

    _functional = staticmethod(FF.conv2d)


def chain_options(
    conv: torch.nn.Module, act: torch.nn.Module | None, pool: torch.nn.Module | None
) -> tuple[str, int | tuple[int, ...]]:
    """``(act, pool)`` arguments of the fused conv for ``conv -> act -> pool`` modules; raises
    ``TypeError``/``ValueError`` naming the module that the fused kernels do not cover."""
    if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d)):
        raise TypeError(f"conv must be a torch.nn.Conv2d or Conv1d, got {type(conv).__name__}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv must have padding_mode='zeros', got {conv.padding_mode!r}")
    if act is None:
        act_name = "none"
    elif isinstance(act, torch.nn.GELU) and act.approximate == "none":
        act_name = "gelu"
    elif type(act) in _ACT_MODULES:
        act_name = _ACT_MODULES[type(act)]
    else:
        raise ValueError(f"act must be ReLU, GELU, Tanh, Sigmoid, Identity or None, got {act!r}")
    if pool is None:
        return act_name, 1
    one_d = isinstance(conv, torch.nn.Conv1d)
    pool_cls = torch.nn.MaxPool1d if one_d else torch.nn.MaxPool2d
    if not isinstance(pool, pool_cls):
        raise TypeError(f"pool must be a torch.nn.{pool_cls.__name__} or None, got {type(pool).__name__}")
    tup = torch.nn.modules.utils._single if one_d else torch.nn.modules.utils._pair
    kernel = tup(pool.kernel_size)
    stride = tup(pool.stride if pool.stride is not None else pool.kernel_size)
    plain = set(tup(pool.padding)) == {0} and set(tup(pool.dilation)) == {1} and not pool.ceil_mode
    if kernel != stride or not plain or pool.return_indices:
        raise ValueError(
            f"pool must be {pool_cls.__name__} with stride == kernel_size, padding 0, dilation 1, ceil_mode=False "
            f"and return_indices=False, got {pool!r}"
        )
    return act_name, kernel


class ConvBlock(torch.nn.Module):
    """``Conv2d -> act -> MaxPool2d(pool)`` as one fused call; the conv is ``self.conv`` (a
    ``fastrec.nn.Conv2d``), so ``state_dict`` keys are ``conv.weight`` / ``conv.bias``.
    ``from_modules`` also takes a ``Conv1d -> act -> MaxPool1d`` chain.

    ``act`` is ``"none"``, ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"sigmoid"``; ``pool`` the
    max-pool window and stride (1 = no pool). The other arguments are ``torch.nn.Conv2d``'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        act: str = "relu",
        pool: int | tuple[int, int] = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.conv = Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        self.act = act
        self.pool = pool

    @classmethod
    def from_modules(
        cls,
        conv: torch.nn.Conv2d | torch.nn.Conv1d,
        act: torch.nn.Module | None = None,
        pool: torch.nn.MaxPool2d | torch.nn.MaxPool1d | None = None,
    ) -> ConvBlock:
        """A block computing ``pool(act(conv(x)))`` with ``conv``'s own parameter tensors.

        ``conv`` is an ``nn.Conv2d`` (or an ``nn.Conv1d``, with an ``nn.MaxPool1d``); ``act`` is
        ``nn.ReLU``/``nn.GELU`` (approximate='none')/``nn.Tanh``/``nn.Sigmoid``/``nn.Identity`` or
        None; ``pool`` a max-pool with stride equal to its kernel, no padding, dilation 1 and floor
        mode, or None.
        """
        block = cls.__new__(cls)
        torch.nn.Module.__init__(block)
        block.conv = conv
        block.act, block.pool = chain_options(conv, act, pool)
        return block

    def forward(self, input: Tensor) -> Tensor:
        c = self.conv
        one_d = isinstance(c, torch.nn.Conv1d)
        reason = _unfused_reason(c, input)
        if reason is not None:
            backends.count("conv", "torch", reason)
            out = act_fn(self.act)(c._conv_forward(input, c.weight, c.bias))
            if self.pool in (1, (1,), (1, 1)):
                return out
            return (torch.nn.functional.max_pool1d if one_d else torch.nn.functional.max_pool2d)(out, self.pool)
        conv = FF.conv1d if one_d else FF.conv2d
        return conv(input, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, act=self.act, pool=self.pool)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, pool={self.pool!r}"
