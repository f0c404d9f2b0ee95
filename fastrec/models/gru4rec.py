"""GRU4Rec (Hidasi et al., 2016; the session-parallel GRU over item histories) as RecBole lays it
out: item embedding -> dropout -> GRU (no biases) -> linear projection back to the embedding
size, scored against the tied item embeddings."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from fastrec import backends, routing
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.models.base import SequentialRecommender, check_positive


class GRU4Rec(SequentialRecommender):
    """GRU4Rec on ``fastrec.nn.GRU`` (``backend="fastrec"``) or ``torch.nn.GRU``
    (``backend="torch"``); the same seed gives the same initial weights in both.

    Padding: right, with ``lengths``; the representation is the GRU output at the last real
    item (steps after it never reach it). The fastrec backend runs the GRU on the packed batch
    (its final state is that output, and no step of padding is computed) on the CPU; on CUDA
    (and under the forced triton backend) the Triton recurrence with the device ``lengths``
    (``fastrec.nn.GRU(x, lengths=...)``: its final state is that output, with no gather and no
    host sync; under autocast it runs in the autocast dtype), unless the route
    ``fastrec.routing.rnn_lengths`` sends it to cuDNN (fp32). Elsewhere, and on the torch
    backend, the padded GRU runs (RecBole's way) and the output is gathered."""

    padding_side = "right"

    def __init__(
        self,
        n_items: int,
        dim: int = 64,
        hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.3,
        backend: str = "fastrec",
        max_len: int = 50,
    ) -> None:
        super().__init__(n_items, max_len, dim, backend, dropout)
        check_positive(hidden=hidden, n_layers=n_layers)
        gru = fnn.GRU if backend == "fastrec" else torch.nn.GRU
        self.gru = gru(dim, hidden, num_layers=n_layers, bias=False, batch_first=True)
        self.projection = torch.nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """RecBole's initialisation: xavier-normal embeddings (the padding row too), xavier-uniform
        GRU weights, torch's default for the projection (RecBole leaves it as it is)."""
        torch.nn.init.xavier_normal_(self.item_embedding.weight)
        for param in self.gru.parameters():
            torch.nn.init.xavier_uniform_(param)
        self.projection.reset_parameters()

    def forward(self, batch) -> Tensor:
        """(B, dim): the projected GRU output at each history's last real item."""
        items, lengths = batch.items, batch.lengths
        if items.shape[1] > self.max_len:
            raise ValueError(f"items must have at most max_len = {self.max_len} columns, got {items.shape[1]}")
        x = self.dropout(self.item_embedding(items))
        if self.backend == "fastrec":
            triton = x.is_cuda or backends.forced() == "triton"
            if x.device.type == "cpu" and not triton:  # packed: no step of padding computed
                packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
                _, h_n = self.gru(packed)
                return self.projection(h_n[-1])
            if triton and routing.rnn_lengths(x) is None:  # stops at each row's length: h_n is the last output
                _, h_n = self.gru(x, lengths=lengths)
                return self.projection(h_n[-1])
        output, _ = self.gru(x)  # RecBole's way: the padded GRU, then the output at the last item
        last = output[torch.arange(items.shape[0], device=items.device), lengths - 1]
        return self.projection(last)

    def hidden_states(self, batch) -> Tensor:
        """(B, L, dim): the projected GRU output at every step (all-positions training); the
        padded GRU runs, and steps past a row's length hold values the loss ignores."""
        items = batch.items
        if items.shape[1] > self.max_len:
            raise ValueError(f"items must have at most max_len = {self.max_len} columns, got {items.shape[1]}")
        output, _ = self.gru(self.dropout(self.item_embedding(items)))
        return self.projection(output)

    def serve(self, batch) -> Tensor:
        """Inference: the fused recurrence called directly (no module dispatch, no output
        gather: with ``lengths`` its final state is the state at each row's last item)."""
        x = torch.nn.functional.embedding(batch.items, self.item_embedding.weight)
        weights = [
            (getattr(self.gru, f"weight_ih_l{i}"), getattr(self.gru, f"weight_hh_l{i}"), None, None)
            for i in range(self.gru.num_layers)
        ]
        _, h_n, _ = FF.rnn(
            x, weights, mode="gru", num_layers=self.gru.num_layers, batch_first=True, lengths=batch.lengths
        )
        return self.projection(h_n[-1])
