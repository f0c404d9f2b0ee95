"""Drop-in convolution modules (subclasses of ``torch.nn.Conv1d`` / ``Conv2d``) and ``ConvBlock``.

``Conv1d`` / ``Conv2d`` override only ``forward``, so constructor, initialisation, parameters
and ``state_dict`` are torch's. ``padding_mode`` other than ``"zeros"`` and inputs whose dtype
or device differ from the weights run torch's own forward, counted in ``fastrec.stats()``.

``ConvBlock`` is conv + activation + max-pool in one fused call (the CNN stage of the source
document: Conv2d 3x3 pad 1 -> ReLU -> MaxPool2d(2)); ``ConvBlock.from_modules`` builds one
that shares the tensors of an existing ``Conv2d -> ReLU -> MaxPool2d`` chain.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrec import backends
from fastrec import functional as FF
from fastrec.ops.conv import act_fn

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


class Conv1d(torch.nn.Conv1d):
    """``torch.nn.Conv1d`` running fastrec's fused convolution."""

    def forward(self, input: Tensor) -> Tensor:
        reason = _unfused_reason(self, input)
        if reason is not None:
            backends.count("conv", "torch", reason)
            return super().forward(input)
        return FF.conv1d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` running fastrec's fused convolution."""

    def forward(self, input: Tensor) -> Tensor:
        reason = _unfused_reason(self, input)
        if reason is not None:
            backends.count("conv", "torch", reason)
            return super().forward(input)
        return FF.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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


# =============================================================================================
# Caser block
# =============================================================================================


class CaserConv(torch.nn.Module):
    """Caser's convolution block: horizontal filters of every height 1..max_len (``n_h`` each,
    width ``dim``) + ``act_h`` + max over time, and ``n_v`` vertical filters of size max_len x 1.

    Parameters are laid out and named as a Caser model holds them (RecBole, caser_pytorch):
    ``conv_v`` = ``nn.Conv2d(1, n_v, (max_len, 1))`` and ``conv_h[k]`` =
    ``nn.Conv2d(1, n_h, (k+1, dim))``, created in that order, so a Caser's ``state_dict``
    entries ``conv_h.{k}.*`` / ``conv_v.*`` load both ways and the same seed gives the same
    initialisation. ``forward(E)`` takes ``(B, L, d)`` or ``(B, 1, L, d)`` and returns
    ``(out_h (B, max_len * n_h), out_v (B, n_v * dim))``, which Caser concatenates into its
    fully connected layer; every height runs in one fused launch.
    """

    def __init__(
        self,
        max_len: int,
        dim: int,
        n_h: int,
        n_v: int,
        act_h: str = "relu",
        act_v: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("max_len", max_len), ("dim", dim), ("n_h", n_h), ("n_v", n_v)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kw = {"device": device, "dtype": dtype}
        self.conv_v = torch.nn.Conv2d(1, n_v, (max_len, 1), **kw)
        self.conv_h = torch.nn.ModuleList(torch.nn.Conv2d(1, n_h, (i, dim), **kw) for i in range(1, max_len + 1))
        self._set_activations(act_h, act_v)

    def _set_activations(self, act_h: str, act_v: str | None) -> None:
        act_v = "none" if act_v is None else act_v
        for name, act in (("act_h", act_h), ("act_v", act_v)):
            if act not in FF.conv_ops.ACTIVATIONS:
                raise ValueError(f"{name} must be one of {FF.conv_ops.ACTIVATIONS}, got {act!r}")
        self.act_h, self.act_v = act_h, act_v

    @classmethod
    def from_convs(
        cls,
        conv_h: list[torch.nn.Conv2d] | torch.nn.ModuleList,
        conv_v: torch.nn.Conv2d,
        act_h: str = "relu",
        act_v: str | None = None,
    ) -> CaserConv:
        """A block that holds the given modules (and so shares their parameter tensors):
        ``conv_h[k]`` must be ``Conv2d(1, n_h, (k+1, dim))`` and ``conv_v`` ``Conv2d(1, n_v,
        (len(conv_h), 1))``, with stride 1, no padding or dilation, one group, zeros padding."""
        if isinstance(conv_h, torch.nn.Module) and not isinstance(conv_h, torch.nn.ModuleList):
            raise TypeError(f"conv_h must be a list or ModuleList of nn.Conv2d, got {type(conv_h).__name__}")
        conv_h = list(conv_h)
        if not conv_h:
            raise ValueError("conv_h must hold at least one nn.Conv2d (height 1), got none")
        length = len(conv_h)
        dim = _check_plain_conv("conv_h[0]", conv_h[0]).kernel_size[1]
        n_h = conv_h[0].out_channels
        for k, conv in enumerate(conv_h):
            _check_plain_conv(f"conv_h[{k}]", conv)
            if conv.kernel_size != (k + 1, dim) or conv.out_channels != n_h:
                raise ValueError(
                    f"conv_h[{k}] must be Conv2d(1, {n_h}, kernel_size=({k + 1}, {dim})), "
                    f"got Conv2d(1, {conv.out_channels}, kernel_size={conv.kernel_size})"
                )
            if (conv.bias is None) != (conv_h[0].bias is None):
                raise ValueError(f"conv_h[{k}] must have a bias like conv_h[0] (all or none), got bias={conv.bias}")
        _check_plain_conv("conv_v", conv_v)
        if conv_v.kernel_size != (length, 1):
            raise ValueError(f"conv_v must have kernel_size ({length}, 1), got {conv_v.kernel_size}")
        block = cls.__new__(cls)
        torch.nn.Module.__init__(block)
        block.conv_v = conv_v
        block.conv_h = torch.nn.ModuleList(conv_h)
        block._set_activations(act_h, act_v)
        return block

    def forward(self, E: Tensor) -> tuple[Tensor, Tensor]:
        convs = list(self.conv_h._modules.values())
        try:  # the parameter dicts directly: nn.Module.__getattr__ per height is a visible cost
            w_h = [conv._parameters["weight"] for conv in convs]
            b_h = [conv._parameters["bias"] for conv in convs]
        except KeyError:  # parametrized (e.g. weight-normed) convs compute theirs as attributes
            w_h = [conv.weight for conv in convs]
            b_h = [conv.bias for conv in convs]
        b_h = None if b_h[0] is None else b_h
        return FF.caser(E, w_h, b_h, self.conv_v.weight, self.conv_v.bias, self.act_h, self.act_v)

    def extra_repr(self) -> str:
        conv = self.conv_h[0]
        return (
            f"max_len={len(self.conv_h)}, dim={conv.kernel_size[1]}, n_h={conv.out_channels}, "
            f"n_v={self.conv_v.out_channels}, act_h={self.act_h!r}, act_v={self.act_v!r}"
        )


def _check_plain_conv(name: str, conv: torch.nn.Module) -> torch.nn.Conv2d:
    """A Conv2d with one input channel and the defaults Caser uses for every other option."""
    if not isinstance(conv, torch.nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    options = {
        "in_channels": (conv.in_channels, 1),
        "stride": (conv.stride, (1, 1)),
        "padding": (conv.padding, (0, 0)),
        "dilation": (conv.dilation, (1, 1)),
        "groups": (conv.groups, 1),
        "padding_mode": (conv.padding_mode, "zeros"),
    }
    for option, (got, want) in options.items():
        if got != want:
            raise ValueError(f"{name} must have {option}={want!r} (a Caser convolution), got {got!r}")
    return conv
