"""``CaserConv``: Caser's convolution block (every horizontal filter height and the vertical
filters) as one fused call, with the parameters of the per-height ``nn.Conv2d`` modules a Caser
model holds. ``CaserConv.from_convs`` builds one that shares the tensors of existing modules."""

from __future__ import annotations

import torch
from torch import Tensor

from fastrec import functional as FF
from fastrec.ops._conv_common import ACTIVATIONS


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
            if act not in ACTIVATIONS:
                raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {act!r}")
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
