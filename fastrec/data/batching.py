"""Padding and mini-batches of ``(history, target, user)`` examples."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SIDES = ("left", "right")


@dataclass
class Batch:
    """``items`` (B, L) long, 0 = padding; ``lengths`` (B,) real items per row; ``target`` (B,)
    (or (B, L), the item each position predicts, 0 = none, from ``PositionBatches``);
    ``user`` (B,) user index (0 where the examples carry none)."""

    items: Tensor
    lengths: Tensor
    target: Tensor
    user: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            *(t.to(device, non_blocking=non_blocking) for t in (self.items, self.lengths, self.target, self.user))
        )

    def __len__(self) -> int:
        return int(self.items.shape[0])


def _pad_numpy(histories: Sequence[np.ndarray], max_len: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    items = np.zeros((len(histories), max_len), dtype=np.int64)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, history in enumerate(histories):
        tail = np.asarray(history, dtype=np.int64)[-max_len:] if len(history) else np.empty(0, dtype=np.int64)
        n = tail.shape[0]
        lengths[row] = n
        if n:
            if side == "left":
                items[row, max_len - n :] = tail
            else:
                items[row, :n] = tail
    return items, lengths


def pad(histories: Sequence[np.ndarray], max_len: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """``(items (B, max_len) long, lengths (B,) long)`` keeping the LAST ``max_len`` items of each
    history; ``side="left"`` puts the padding (0) before the items, ``"right"`` after them."""
    items, lengths = _pad_numpy(histories, max_len, side)
    return torch.from_numpy(items), torch.from_numpy(lengths)


class Batches:
    """Mini-batches over examples, padded once up front.

    ``shuffle=True`` draws a new order each epoch (each ``iter()``) from a generator seeded with
    ``seed``, so a run is reproducible; the last batch may be smaller.
    """

    def __init__(
        self,
        histories: Sequence[np.ndarray],
        targets: np.ndarray,
        users: np.ndarray | None = None,
        max_len: int = 50,
        batch_size: int = 256,
        side: str = "left",
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        targets = np.asarray(targets, dtype=np.int64)
        if targets.shape != (len(histories),):
            raise ValueError(f"targets must be ({len(histories)},) like histories, got {targets.shape}")
        if users is None:
            users = np.zeros(len(histories), dtype=np.int64)
        users = np.asarray(users, dtype=np.int64)
        if users.shape != (len(histories),):
            raise ValueError(f"users must be ({len(histories)},) like histories, got {users.shape}")
        items, lengths = _pad_numpy(histories, max_len, side)
        self.items = torch.from_numpy(items)
        self.lengths = torch.from_numpy(lengths)
        self.targets = torch.from_numpy(targets)
        self.users = torch.from_numpy(users)
        self.batch_size, self.side, self.shuffle = batch_size, side, shuffle
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return (self.targets.shape[0] + self.batch_size - 1) // self.batch_size

    @property
    def n_examples(self) -> int:
        return int(self.targets.shape[0])

    def __iter__(self) -> Iterator[Batch]:
        n = self.n_examples
        order = torch.from_numpy(self._rng.permutation(n)) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                rows = slice(start, start + self.batch_size)
            else:
                rows = order[start : start + self.batch_size]
            yield Batch(self.items[rows], self.lengths[rows], self.targets[rows], self.users[rows])


class PositionBatches(Batches):
    """Mini-batches for all-positions training: ``targets[e]`` holds the item each position of
    ``histories[e]`` predicts (same length), padded on the same side with 0 (= no target), so a
    batch's ``target`` is (B, L) aligned with its ``items``. Shuffling as ``Batches``."""

    def __init__(
        self,
        histories: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        users: np.ndarray | None = None,
        max_len: int = 50,
        batch_size: int = 256,
        side: str = "left",
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if len(targets) != len(histories):
            raise ValueError(f"targets must hold one sequence per history ({len(histories)}), got {len(targets)}")
        for i, (history, target) in enumerate(zip(histories, targets, strict=True)):
            if len(target) != len(history):
                raise ValueError(f"targets[{i}] must have history {i}'s length {len(history)}, got {len(target)}")
        super().__init__(
            histories, np.zeros(len(histories), dtype=np.int64), users, max_len, batch_size, side, shuffle, seed
        )
        self.targets = torch.from_numpy(_pad_numpy(targets, max_len, side)[0])
