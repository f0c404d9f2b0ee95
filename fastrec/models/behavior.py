"""Purchase-prediction models over a customer's weekly purchase sequence (CDNOW): CNN, RNN and
causal self-attention regressors built from ``fastrec.nn`` modules.

Each model reads ``(batch, weeks, features)`` from :meth:`fastrec.data.cdnow.CDNOW.features` and
returns a log-rate per customer: the predicted number of repeat-purchase weeks in the hold-out
is its exponential. The experiment that trains and compares them (cross-fitting against the
naive rate and BG/NBD) is ``benchmarks/behavior.py``, run by ``fastrec train --model behavior-*``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import fastrec.nn as fnn

KINDS = ("cnn", "rnn", "attention")


class _Head(nn.Module):
    """Pooled sequence representation -> log-rate."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled).squeeze(-1)


class BehaviorCNN(nn.Module):
    """Two 1-D convolutions over the weeks (kernel 3, then dilated 3), pooled by mean, max and the
    last week, on ``fastrec.nn.Conv1d``."""

    def __init__(self, n_features: int = 4, channels: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = fnn.Conv1d(n_features, channels, 3, padding=1)
        self.conv2 = fnn.Conv1d(channels, channels, 3, padding=2, dilation=2)
        self.head = _Head(3 * channels, hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x.transpose(1, 2)))
        h = torch.relu(self.conv2(h))
        return self.head(torch.cat([h.mean(dim=2), h.amax(dim=2), h[:, :, -1]], dim=1))


class BehaviorRNN(nn.Module):
    """``fastrec.nn.GRU`` over the weeks; the last hidden state feeds the head."""

    def __init__(self, n_features: int = 4, hidden_size: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.gru = fnn.GRU(n_features, hidden_size, batch_first=True)
        self.head = _Head(hidden_size, hidden)

    def forward(self, x: Tensor) -> Tensor:
        _, h_n = self.gru(x)
        return self.head(h_n[-1])


class BehaviorAttention(nn.Module):
    """Causal self-attention blocks (``fastrec.nn.MultiheadAttention``, pre-norm, learned week
    positions); the last week's output feeds the head."""

    def __init__(
        self, n_features: int = 4, n_weeks: int = 40, dim: int = 32, n_heads: int = 2, n_blocks: int = 2
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, dim)
        self.position = nn.Embedding(n_weeks, dim)
        self.attn = nn.ModuleList(fnn.MultiheadAttention(dim, n_heads, batch_first=True) for _ in range(n_blocks))
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_blocks))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_blocks))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(n_blocks)
        )
        self.head = _Head(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        weeks = x.shape[1]
        if weeks > self.position.num_embeddings:
            raise ValueError(f"x has {weeks} weeks, the model was built for at most {self.position.num_embeddings}")
        h = self.inp(x) + self.position.weight[:weeks]
        causal = torch.ones(weeks, weeks, dtype=torch.bool, device=x.device).triu(1)
        for attn, norm1, norm2, ffn in zip(self.attn, self.norm1, self.norm2, self.ffn, strict=True):
            q = norm1(h)
            h = h + attn(q, q, q, attn_mask=causal, need_weights=False, is_causal=True)[0]
            h = h + ffn(norm2(h))
        return self.head(h[:, -1])


def build(kind: str, n_features: int, n_weeks: int) -> nn.Module:
    """The model of ``kind`` (one of ``KINDS``) for ``n_weeks`` weeks of ``n_features`` features."""
    if kind == "cnn":
        return BehaviorCNN(n_features)
    if kind == "rnn":
        return BehaviorRNN(n_features)
    if kind == "attention":
        return BehaviorAttention(n_features, n_weeks)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
