"""SASRec (Kang & McAuley, 2018): causal self-attention over the item history, learned
positions, item embeddings tied with the output layer. Laid out as RecBole's SASRec (post-norm
blocks, GELU feed-forward of 4 x dim, embedding layer norm, normal(0, 0.02) initialisation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrec import nn as fnn
from fastrec.models.base import SequentialRecommender, check_positive
from fastrec.nn.encoder import encoder_layer_weights
from fastrec.ops import encoder as encoder_ops

_PADDING_SIDES = ("right", "left")


class SASRec(SequentialRecommender):
    """SASRec on ``fastrec.nn.TransformerEncoderLayer`` (``backend="fastrec"``) or on
    ``torch.nn.TransformerEncoderLayer`` (``backend="torch"``); the same seed gives the same
    initial weights in both.

    Padding: ``padding_side="right"`` (default) or ``"left"``, with ``lengths`` either way.
    Positions count from the oldest item of the (last ``max_len``) history; left-padded batches
    are moved to the right first, so the two sides compute the same function. The
    representation is the output at the last real item.
    """

    def __init__(
        self,
        n_items: int,
        max_len: int = 50,
        dim: int = 64,
        n_blocks: int = 2,
        n_heads: int = 2,
        dropout: float = 0.2,
        backend: str = "fastrec",
        padding_side: str = "right",
    ) -> None:
        super().__init__(n_items, max_len, dim, backend, dropout)
        check_positive(n_blocks=n_blocks, n_heads=n_heads)
        if dim % n_heads:
            raise ValueError(f"dim must be divisible by n_heads = {n_heads}, got {dim}")
        if padding_side not in _PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {_PADDING_SIDES}, got {padding_side!r}")
        self.padding_side = padding_side
        self.position_embedding = torch.nn.Embedding(max_len, dim)
        self.norm = torch.nn.LayerNorm(dim, eps=1e-12)
        layer = fnn.TransformerEncoderLayer if backend == "fastrec" else torch.nn.TransformerEncoderLayer
        self.blocks = torch.nn.ModuleList(
            layer(
                dim,
                n_heads,
                dim_feedforward=4 * dim,
                dropout=dropout,
                activation="gelu",
                layer_norm_eps=1e-12,
                batch_first=True,
            )
            for _ in range(n_blocks)
        )
        self._masks: dict[tuple[int, torch.device], Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """RecBole's initialisation: weights normal(0, 0.02), biases 0, layer norms 1."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.zeros_(param)
            elif ".norm" in name or name.startswith("norm"):
                torch.nn.init.ones_(param)
            else:
                torch.nn.init.normal_(param, std=0.02)

    def _causal_mask(self, length: int, device: torch.device) -> Tensor:
        key = (length, device)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        return mask

    def _encode(self, items: Tensor, lengths: Tensor) -> Tensor:
        """(B, L, dim): the last block's output at every position, rows right-aligned (a
        left-padded batch is rotated first)."""
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"items must have at most max_len = {self.max_len} columns, got {length}")
        if self.padding_side == "left":  # rotate each row so that its items start at column 0
            shift = (torch.arange(length, device=items.device) + (length - lengths).unsqueeze(1)) % length
            items = items.gather(1, shift)
        x = self.item_embedding(items) + self.position_embedding.weight[:length]
        x = self.dropout(self.norm(x))
        # Right padding: a real item sees only earlier (real) items under the causal mask, so no
        # key-padding mask is needed; padded positions compute ignored values.
        mask = self._causal_mask(length, items.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return x

    def forward(self, batch) -> Tensor:
        """(B, dim): the last block's output at each history's last real item."""
        lengths = batch.lengths
        x = self._encode(batch.items, lengths)
        return x[torch.arange(x.shape[0], device=x.device), lengths - 1]

    def hidden_states(self, batch) -> Tensor:
        """(B, L, dim): the last block's output at every column of ``batch.items`` (the causal
        encoder's every output, SASRec's all-positions training), in the batch's own layout;
        padding columns hold values the loss ignores."""
        items, lengths = batch.items, batch.lengths
        x = self._encode(items, lengths)
        if self.padding_side == "left":  # undo the rotation: column j is rotated column (j + length) % L
            length = items.shape[1]
            back = (torch.arange(length, device=items.device) + lengths.unsqueeze(1)) % length
            x = x.gather(1, back.unsqueeze(2).expand(-1, -1, x.shape[2]))
        return x

    def serve(self, batch) -> Tensor:
        """Inference through the encoder op (``fastrec.ops.encoder``; on the CPU one C++ call for
        every block, whose Python and per-op dispatch would cost more than the arithmetic at batch
        1). The last block computes only the rows that are returned (one query per history); keys
        past each row's length are masked in every block, which changes only padding positions."""
        items, lengths = batch.items, batch.lengths
        length = items.shape[1]
        if self.padding_side == "left":
            shift = (torch.arange(length, device=items.device) + (length - lengths).unsqueeze(1)) % length
            items = items.gather(1, shift)
        if items.device.type == "cpu":  # right-aligned now: columns past the longest history never matter
            length = int(lengths.max())
            items = items[:, :length]
        x = F.embedding(items, self.item_embedding.weight) + self.position_embedding.weight[:length]
        x = F.layer_norm(x, (self.dim,), self.norm.weight, self.norm.bias, self.norm.eps)
        weights = [w for block in self.blocks for w in encoder_layer_weights(block)]
        first = self.blocks[0]
        x = encoder_ops.encoder_inference(
            x, weights, first.self_attn.num_heads, first.norm1.eps, first.norm2.eps,
            gelu=True, norm_first=False, causal=True, lengths=lengths, last_query=True,
        )  # fmt: skip
        return x[:, 0]
