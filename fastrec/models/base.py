"""What every sequential recommender here shares: scoring against the (tied) item table, the
training losses, and the serving call ``recommend``.

A batch is anything with ``items`` (B, L) long (0 = padding), ``lengths`` (B,) long and, for
models with a user embedding, ``user`` (B,) long; the loss also reads ``target``, (B,) long for
last-position training or (B, L) long (0 = no target) for all-positions training
(``fastrec.data.Batch`` has all four; ``ModelInput`` below is the minimal one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.functional import topk_scores
from fastrec.ops.sampled_softmax import _ce_over_table

BACKENDS = ("fastrec", "torch")
LOSSES = ("ce", "sampled-softmax", "gbce", "bce")


class ModelInput(NamedTuple):
    """A batch of histories: ``items`` (B, L) long (0 = padding), ``lengths`` (B,) long,
    ``user`` (B,) long or None, ``target`` (B,) or (B, L) long or None (training only; ``loss``)."""

    items: Tensor
    lengths: Tensor
    user: Tensor | None = None
    target: Tensor | None = None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_dropout(dropout: float) -> None:
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


class SequentialRecommender(torch.nn.Module):
    """Base class: builds what every model has, ``item_embedding`` ((n_items + 1, dim), row 0 =
    padding; tied with the output layer) and ``dropout`` (``fastrec.nn.Dropout`` on the fastrec
    backend, else torch's); subclasses define ``forward(batch) -> (B, dim)`` and
    ``padding_side`` (how ``recommend`` lays out histories)."""

    padding_side = "right"
    uses_users = False
    pads_to_max_len = False  # Caser's vertical filter spans exactly max_len rows

    def __init__(self, n_items: int, max_len: int, dim: int, backend: str, dropout: float) -> None:
        super().__init__()
        check_positive(n_items=n_items, max_len=max_len, dim=dim)
        check_dropout(dropout)
        self.n_items, self.max_len, self.dim = n_items, max_len, dim
        self.backend = check_backend(backend)
        self.item_embedding = torch.nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.dropout = (fnn.Dropout if backend == "fastrec" else torch.nn.Dropout)(dropout)

    def scores(self, batch) -> Tensor:
        """(B, n_items + 1) scores of every item; column 0 (padding) is -inf."""
        logits = self(batch) @ self.item_embedding.weight.t()
        logits[:, 0] = float("-inf")
        return logits

    def hidden_states(self, batch) -> Tensor:
        """(B, L, dim): the representation at every position of ``batch.items`` (position j's
        from the items up to j), for all-positions training; models without one raise."""
        raise ValueError(
            f"{type(self).__name__} has no per-position output, so it trains on last-position targets only: "
            "batch.target must be (B,), not (B, L)"
        )

    def loss(self, batch, kind: str = "ce", n_negatives: int = 1) -> Tensor:
        """Mean training loss of the batch's next-item targets.

        ``batch.target`` (B,): each row's next item after its history (last-position training);
        (B, L), aligned with ``batch.items``: the item each position predicts, 0 where none
        (all-positions training, ``hidden_states``; positions with target 0 do not count).

        ``ce``: softmax cross-entropy over the whole catalogue (items 1..n_items).
        ``sampled-softmax``: ``fastrec.functional.sampled_softmax_loss`` over ``n_negatives``
        uniform negatives shared by the batch plus the other rows' targets, log-Q corrected.
        ``gbce``: ``fastrec.functional.gbce_loss`` (gSASRec's gBCE, t = 0.75) over ``n_negatives``
        uniform negatives shared by the batch.
        ``bce``: binary cross-entropy of the target against ``n_negatives`` items per row drawn
        uniformly from the other items (never the target), from torch's RNG.

        Rows whose target is 0 (the padding item: the padded rows of a fixed-shape batch, see
        ``fastrec.graphs``) count in neither loss: the mean is over the other rows.

        The torch backend computes it with torch's ops only (the fused losses run on the fastrec
        backend), so the two backends stay a kernel-for-kernel comparison.
        """
        with _torch_ops_for(self.backend):
            return self._loss(batch, kind, n_negatives)

    def _loss(self, batch, kind: str, n_negatives: int) -> Tensor:
        if kind not in LOSSES:
            raise ValueError(f"kind must be one of {LOSSES}, got {kind!r}")
        target = batch.target
        if target is None:
            raise ValueError("batch.target is required for the loss, got None")
        if target.dim() == 2:
            if target.shape != batch.items.shape:
                shape = tuple(batch.items.shape)
                raise ValueError(f"batch.target must be (B,) or (B, L) like items {shape}, got {tuple(target.shape)}")
            hidden = self.hidden_states(batch)
            keep = target > 0
            hidden, target = hidden[keep], target[keep]
        else:
            hidden = self(batch)
        table = self.item_embedding.weight
        if kind == "ce":
            return _full_ce(hidden, table, target)
        check_positive(n_negatives=n_negatives)
        if kind == "sampled-softmax":
            return FF.sampled_softmax_loss(hidden, table[1:], target - 1, n_negatives, ignore_index=-1)
        if self.n_items < 2:
            raise ValueError(f"{kind} needs n_items >= 2 to draw negatives, got {self.n_items}")
        if kind == "gbce":
            return FF.gbce_loss(hidden, table[1:], target - 1, n_negatives, ignore_index=-1)
        # Uniform over the n_items - 1 items other than the target: shift the target's index.
        shift = torch.randint(1, self.n_items, (target.shape[0], n_negatives), device=target.device)
        negatives = (target.unsqueeze(1) - 1 + shift) % self.n_items + 1
        positive_logit = (hidden * table[target]).sum(-1)
        negative_logit = torch.einsum("bd,bnd->bn", hidden, table[negatives])
        real = (target > 0).to(positive_logit.dtype)
        positive = F.binary_cross_entropy_with_logits(positive_logit, torch.ones_like(positive_logit), weight=real)
        negative = F.binary_cross_entropy_with_logits(
            negative_logit, torch.zeros_like(negative_logit), weight=real.unsqueeze(1)
        )
        return (positive + negative) * (target.shape[0] / real.sum().clamp(min=1))

    def make_input(
        self, histories: Sequence | Tensor, users: Sequence[int] | Tensor | None = None, *, full_length: bool = False
    ) -> ModelInput:
        """Lay out histories (sequences of item ids 1..n_items, oldest first) as this model's
        input: the last ``max_len`` items of each, on ``padding_side``, padded to the longest
        history in the batch (or to ``max_len`` where the model needs it or ``full_length``)."""
        device = self.item_embedding.weight.device
        rows = [_as_ids(h, i) for i, h in enumerate(histories)]
        if not rows:
            raise ValueError("histories must hold at least one history, got none")
        for i, row in enumerate(rows):
            if row.size and (row.min() < 1 or row.max() > self.n_items):
                raise ValueError(f"history {i} must hold item ids in 1..{self.n_items}, got {row.min()}..{row.max()}")
        lengths = [min(len(r), self.max_len) for r in rows]
        if min(lengths) == 0:
            raise ValueError(f"every history needs at least one item, history {lengths.index(0)} is empty")
        width = self.max_len if (self.pads_to_max_len or full_length) else max(lengths)
        if len(rows) == 1 and lengths[0] == width:
            items = torch.as_tensor(rows[0][-width:], dtype=torch.long).view(1, width)
        else:
            padded = np.zeros((len(rows), width), dtype=np.int64)
            for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
                if self.padding_side == "right":
                    padded[i, :n] = row[len(row) - n :]
                else:
                    padded[i, width - n :] = row[len(row) - n :]
            items = torch.from_numpy(padded)
        user = None
        if users is not None:
            user = torch.as_tensor(users, dtype=torch.long).view(-1).to(device)
            if user.shape[0] != len(rows):
                raise ValueError(f"users must hold one id per history ({len(rows)}), got {user.shape[0]}")
        elif self.uses_users:
            raise ValueError(f"{type(self).__name__} needs users= (one user id per history), got None")
        return ModelInput(items.to(device), torch.tensor(lengths, device=device), user)

    def recommend(
        self,
        histories: Sequence | Tensor,
        k: int,
        exclude_seen: bool = True,
        users: Sequence[int] | Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-``k`` items for each history: ``(item ids (B, k), scores (B, k))``, best first.

        ``histories``: one sequence of item ids (1..n_items, oldest first) per user, as lists,
        numpy arrays or 1-D tensors. ``exclude_seen`` drops every item of the whole history
        (not only the last ``max_len``) from the ranking. Runs in eval mode without autograd, in
        item tiles on large catalogues (``fastrec.functional.topk_scores``: memory O(B x k), equal
        scores by lower item id).
        """
        check_positive(k=k)
        if k > self.n_items:
            raise ValueError(f"k must be at most n_items = {self.n_items}, got {k}")
        batch = self.make_input(histories, users)
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.inference_mode():
                hidden = self.serve(batch) if self.backend == "fastrec" else self(batch)
                # Items 1..n_items are rows 1.. of the table: score against rows 1.., ids shifted by one.
                seen = [_as_ids(h, i) - 1 for i, h in enumerate(histories)] if exclude_seen else None
                with _torch_ops_for(self.backend):
                    top_scores, top_items = topk_scores(hidden, self.item_embedding.weight[1:], k, exclude=seen)
        finally:
            if was_training:
                self.train()
        return top_items + 1, top_scores

    def serve(self, batch) -> Tensor:
        """``forward`` in eval mode without autograd, as ``recommend`` runs it on the fastrec
        backend; models override it with a leaner path through ``fastrec.functional``."""
        return self(batch)


def _torch_ops_for(backend: str) -> contextlib.AbstractContextManager:
    """Inside the block fastrec's ops run their torch reference when ``backend`` is "torch"."""
    return backends.use_backend("torch") if backend == "torch" else contextlib.nullcontext()


def _full_ce(hidden: Tensor, table: Tensor, target: Tensor) -> Tensor:
    """Mean softmax cross-entropy of ``hidden`` (R, dim) over every item (rows 1.. of the tied
    ``table``) at ``target`` (R,) item ids (0: a padded row, left out of the mean): the one place the models
    compute full-catalogue CE."""
    return _ce_over_table(hidden, table[1:], target - 1, None, -1, "mean")


def _as_ids(history, index: int) -> np.ndarray:
    if isinstance(history, Tensor):
        history = history.detach().cpu().numpy()
    ids = np.asarray(history)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"history {index} must be a 1-D sequence of int item ids, got {ids.dtype} of shape {ids.shape}")
    return ids
