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
