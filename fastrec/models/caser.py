"""Caser (Tang & Wang, 2018): horizontal convolutions of every height 1..L (ReLU, max over time)
and a vertical convolution over the embedded last L items, a user embedding, two dense layers;
laid out as RecBole's Caser (``conv_h.{k}``, ``conv_v``, ``fc1``, ``fc2``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import nn as fnn
from fastrec.models.base import SequentialRecommender, check_positive


class CaserConvLoop(torch.nn.Module):
    """The Caser block as RecBole and caser_pytorch run it: a loop over the horizontal heights.

    ``conv_h[k]`` = ``Conv2d(1, n_h, (k + 1, dim))``, ``conv_v`` = ``Conv2d(1, n_v, (max_len, 1))``.
    ``forward(E (B, L, dim)) -> (out_h (B, L * n_h), out_v (B, n_v * dim))``, the contract of
    ``fastrec.functional.caser``.
    """

    def __init__(self, max_len: int, dim: int, n_h: int, n_v: int) -> None:
        super().__init__()
        self.conv_v = torch.nn.Conv2d(1, n_v, (max_len, 1))
        self.conv_h = torch.nn.ModuleList(torch.nn.Conv2d(1, n_h, (k + 1, dim)) for k in range(max_len))

    def forward(self, embedded: Tensor) -> tuple[Tensor, Tensor]:
        x = embedded.unsqueeze(1)  # (B, 1, L, d)
        pooled = []
        for conv in self.conv_h:
            h = F.relu(conv(x)).squeeze(3)  # (B, n_h, L - k)
            pooled.append(F.max_pool1d(h, h.shape[2]).squeeze(2))
        return torch.cat(pooled, 1), self.conv_v(x).view(x.shape[0], -1)


def _caser_block(backend: str, max_len: int, dim: int, n_h: int, n_v: int) -> torch.nn.Module:
    """``fastrec.nn.CaserConv`` (the fused block) for ``backend="fastrec"``, the per-height loop
    for ``"torch"``: same parameter names, same ``(out_h, out_v)`` output."""
    if backend == "fastrec":
        return fnn.CaserConv(max_len, dim, n_h, n_v)
    return CaserConvLoop(max_len, dim, n_h, n_v)


class Caser(SequentialRecommender):
    """Caser with the fused Caser block (``backend="fastrec"``) or the per-height loop of
    ``torch.nn.Conv2d`` (``backend="torch"``); the same seed gives the same initial weights.

    Input: the last ``max_len`` items, left-padded to exactly ``max_len`` columns (padding rows
    embed to zeros, and the most recent item is always the last row), and ``user`` ids in
    ``0..n_users`` (the table has ``n_users + 1`` rows, so 0- and 1-based ids both fit).

    Defaults are RecBole's except the filter counts and the regularisation: ``n_h=32, n_v=16,
    reg_weight=1e-3`` (RecBole: 8, 4 and 1e-4), with ``fastrec train``'s Caser learning rate 3e-3
    decayed on a cosine, had the best validation NDCG@10 on MovieLens-100K in a sweep over seeds
    the accuracy runs (docs/accuracy.md) do not use (``benchmarks/results/sweep-caser-ml100k.json``).

    Caser has no per-position output (its filters read the whole window at once), so it trains on
    last-position targets only: all-positions targets (B, L) raise.
    """

    padding_side = "left"
    uses_users = True
    pads_to_max_len = True

    def __init__(
        self,
        n_items: int,
        n_users: int,
        max_len: int = 10,
        dim: int = 64,
        n_h: int = 32,
        n_v: int = 16,
        dropout: float = 0.4,
        backend: str = "fastrec",
        reg_weight: float = 1e-3,
    ) -> None:
        super().__init__(n_items, max_len, dim, backend, dropout)
        check_positive(n_users=n_users, n_h=n_h, n_v=n_v)
        if not reg_weight >= 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        self.n_users = n_users
        self.reg_weight = reg_weight
        self.user_embedding = torch.nn.Embedding(n_users + 1, dim)
        self.conv = _caser_block(backend, max_len, dim, n_h, n_v)
        self.fc1 = torch.nn.Linear(n_v * dim + n_h * max_len, dim)
        self.fc2 = torch.nn.Linear(2 * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """RecBole's initialisation (embeddings normal(0, 1/dim), dense layers xavier-normal with
        zero bias) and torch's default Conv2d initialisation, in one fixed order so that both
        blocks start from the same weights."""
        torch.nn.init.normal_(self.item_embedding.weight, std=1.0 / self.dim)
        torch.nn.init.normal_(self.user_embedding.weight, std=1.0 / self.dim)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        conv = dict(self.conv.named_parameters())
        names = ["conv_v"] + [f"conv_h.{k}" for k in range(self.max_len)]
        for name in names:
            weight, bias = conv[name + ".weight"], conv[name + ".bias"]
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(weight[0].numel())
            torch.nn.init.uniform_(bias, -bound, bound)
        for fc in (self.fc1, self.fc2):
            torch.nn.init.xavier_normal_(fc.weight)
            torch.nn.init.zeros_(fc.bias)

    def forward(self, batch) -> Tensor:
        """(B, dim) from the last ``max_len`` items (left-padded) and the user."""
        items, user = batch.items, batch.user
        if items.shape[1] != self.max_len:
            raise ValueError(f"items must have exactly max_len = {self.max_len} columns, got {items.shape[1]}")
        if user is None:
            raise ValueError("Caser needs batch.user (B,) user ids, got None")
        out_h, out_v = self.conv(self.item_embedding(items))
        z = F.relu(self.fc1(self.dropout(torch.cat([out_v, out_h], 1))))
        return F.relu(self.fc2(torch.cat([z, self.user_embedding(user)], 1)))

    def loss(self, batch, kind: str = "ce", n_negatives: int = 1) -> Tensor:
        """The base loss plus RecBole's regularisation: ``reg_weight`` times the sum of the L2
        (Frobenius) norms, not squared, of the embedding tables, every convolution weight and
        the dense weights."""
        loss = super().loss(batch, kind, n_negatives)
        if self.reg_weight == 0:
            return loss
        weights = [self.user_embedding.weight, self.item_embedding.weight, self.fc1.weight, self.fc2.weight]
        weights += [p for name, p in self.conv.named_parameters() if name.endswith("weight")]
        return loss + self.reg_weight * sum(w.norm() for w in weights)
