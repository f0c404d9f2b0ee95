"""What the convolution ops (``conv``, ``caser``) share: the activations they fuse.

Every backend takes an activation by name from ACTIVATIONS; ``act_fn`` gives torch's function
for it, as torch's modules compute it ("gelu" is the exact erf form, torch's default).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid")
_ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def act_fn(act: str) -> Callable[[Tensor], Tensor]:
    """The torch function of activation ``act`` (one of ACTIVATIONS)."""
    return _ACT_FNS[act]


def act_derivative(act: str, z: Tensor) -> Tensor:
    """d act / d z at ``z`` by the formulas of torch's backward (gelu's is NaN at a non-finite z,
    tanh's and sigmoid's at a NaN z); "none" and "relu" are never NaN, so they give ones."""
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if act == "tanh":
        return 1 - torch.tanh(z) ** 2
    if act == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    return torch.ones_like(z)
