"""Drop-in linear cross-entropy loss: a subclass of ``torch.nn.LinearCrossEntropyLoss``.

Only ``forward`` is overridden, so constructor, the ``linear`` submodule and its parameters,
``state_dict`` and ``extra_repr`` are torch's. The loss runs fastrec's fused op
(``fastrec.functional.linear_cross_entropy``); options it does not cover (K-dimensional
``out_features``, a class ``weight``) run torch's forward, counted in ``fastrec.stats()``.
``options`` (torch's row-chunking strategy) has no effect on the fused path, which never forms the
logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrec import backends
from fastrec import functional as FF

_MODULE = "LinearCrossEntropyLoss"


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """``torch.nn.LinearCrossEntropyLoss`` on fastrec's fused linear cross-entropy."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if self.out_features != () or self.weight is not None:
            backends.count(_MODULE, "torch", "out_features or a class weight (not fused)")
            return super().forward(input, target)
        return FF.linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            bias=self.linear.bias,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
