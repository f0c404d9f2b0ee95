"""Drop-in dropout module: a subclass of ``torch.nn.Dropout``.

Only ``forward`` is overridden, so constructor, ``extra_repr`` and the (empty) ``state_dict`` are
torch's. Which masks it draws is the dropout stream's choice (``fastrec.use_dropout_stream``, see
:class:`Dropout`). ``inplace=True`` runs torch's forward, counted in ``fastrec.stats()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrec import backends
from fastrec.ops import dropout as dropout_ops

_MODULE = "Dropout"


class Dropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` on fastrec's dropout; the masks follow the dropout stream.

    ``"auto"`` (the default) and ``"torch"``: torch's own masks. On the CPU fastrec draws, bit for
    bit, the masks ``torch.nn.Dropout`` draws from the same generator state (the same output,
    gradient and generator state after; float32/float64, other dtypes run ``F.dropout``), so a
    model trains step for step like its torch twin. ``"fastrec"``, and ``"auto"`` under a forced
    ``triton`` backend: the fused kernels' Philox masks, drawn in registers from a seed taken
    from torch's generator (reproducible under ``torch.manual_seed``, the same masks on every
    backend for that seed, no mask tensor: the backward recomputes the mask from the seed). On
    CUDA, unless a backend is forced, every stream runs torch's own dropout kernel.
    """

    def forward(self, input: Tensor) -> Tensor:
        if self.inplace:
            if self.training and self.p > 0.0:
                backends.count(_MODULE, "torch", "inplace=True")
            return super().forward(input)
        return dropout_ops.dropout(input, self.p, self.training)
