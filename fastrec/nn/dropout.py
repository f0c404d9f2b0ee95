"""Drop-in dropout module: a subclass of ``torch.nn.Dropout``.

Only ``forward`` is overridden, so constructor, ``extra_repr`` and the (empty) ``state_dict`` are
torch's. The fused kernel reads the input once and writes the output once (no mask tensor; the
backward recomputes the mask from the seed). ``inplace=True`` runs torch's forward, counted in
``fastrec.stats()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrec import backends
from fastrec.ops import dropout as dropout_ops

_MODULE = "Dropout"


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` on fastrec's fused dropout (the same masks on every backend for a
    given seed; reproducible under ``torch.manual_seed``, not torch's own random stream, except
    inside ``fastrec.use_dropout_stream("torch")``)."""

    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:
            if self.training and self.p > 0.0:
                backends.count(_MODULE, "torch", "inplace=True")
            return super().forward(input)
        return dropout_ops.dropout(input, self.p, self.training)
