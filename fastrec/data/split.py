"""Chronological leave-one-out split and the training examples drawn from it.

Each user's rows are ordered by ``(time, row order in the file)``: equal timestamps keep the
file's order, so the split is deterministic. For a user with ``n >= 3`` items the last item is
the test target, the second-to-last the validation target, and the first ``n - 2`` the training
sequence. Users with fewer than 3 items are kept in training only (their whole sequence) and
are not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastrec.data.loaders import Interactions

MIN_EVAL_LENGTH = 3


@dataclass
class Split:
    """``train[j]`` is the training sequence of user ``users[j]``; the evaluation rows (users with
    ``>= 3`` items) are aligned with ``eval_users``: ``valid_history[r]`` predicts
    ``valid_target[r]`` and ``test_history[r]`` (= valid history + valid target) predicts
    ``test_target[r]``."""

    train: list[np.ndarray]
    users: np.ndarray
    valid_history: list[np.ndarray]
    valid_target: np.ndarray
    test_history: list[np.ndarray]
    test_target: np.ndarray
    eval_users: np.ndarray
    n_items: int
    n_users: int

    def __repr__(self) -> str:
        return (
            f"Split({len(self.train)} train sequences, {sum(len(s) for s in self.train)} train items, "
            f"{len(self.eval_users)} evaluated users, {self.n_items} items)"
        )


def user_sequences(inter: Interactions) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(users, sequences)``: each user's items ordered by ``(time, original row order)``."""
    order = np.lexsort((np.arange(len(inter)), inter.time, inter.user))
    user, item = inter.user[order], inter.item[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    users = user[starts]
    sequences = np.split(item, starts[1:])
    return users.astype(np.int64), sequences


def leave_one_out(inter: Interactions) -> Split:
    """The chronological leave-one-out split (module docstring: order, tie-break, short users)."""
    users, sequences = user_sequences(inter)
    train, valid_history, valid_target, test_history, test_target, eval_users = [], [], [], [], [], []
    for user, seq in zip(users, sequences, strict=True):
        if seq.shape[0] < MIN_EVAL_LENGTH:
            train.append(seq)
            continue
        train.append(seq[:-2])
        valid_history.append(seq[:-2])
        valid_target.append(seq[-2])
        test_history.append(seq[:-1])
        test_target.append(seq[-1])
        eval_users.append(user)
    return Split(
        train=train,
        users=users,
        valid_history=valid_history,
        valid_target=np.asarray(valid_target, dtype=np.int64),
        test_history=test_history,
        test_target=np.asarray(test_target, dtype=np.int64),
        eval_users=np.asarray(eval_users, dtype=np.int64),
        n_items=inter.n_items,
        n_users=inter.n_users,
    )


def train_examples(
    split: Split, max_len: int, augment: bool = True, return_users: bool = False
) -> tuple[list[np.ndarray], np.ndarray] | tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Training ``(histories, targets[, users])``.

    ``augment=True`` (RecBole's sequential setting): every prefix of each training sequence
    predicts the item after it, histories cut to their last ``max_len`` items. ``augment=False``:
    one example per user, the sequence's last item predicted from the rest. Sequences of one
    item give no example.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    histories, targets, users = [], [], []
    for user, seq in zip(split.users, split.train, strict=True):
        steps = range(1, seq.shape[0]) if augment else range(seq.shape[0] - 1, seq.shape[0]) if seq.shape[0] > 1 else ()
        for t in steps:
            histories.append(seq[max(0, t - max_len) : t])
            targets.append(seq[t])
            users.append(user)
    targets_arr = np.asarray(targets, dtype=np.int64)
    if return_users:
        return histories, targets_arr, np.asarray(users, dtype=np.int64)
    return histories, targets_arr


def train_sequences(split: Split, max_len: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """All-positions training examples ``(inputs, targets, users)``: ``targets[e][j]`` is the item
    after ``inputs[e][j]`` (SASRec's training, every position predicting its next item).

    Each training sequence's targets (its items after the first) are cut, from the end, into
    windows of at most ``max_len``; a window's inputs are the items just before its targets, so
    every training item after a sequence's first is a target exactly once and the last window is
    SASRec's (the last ``max_len + 1`` items). A window's positions see only the window's items.
    Sequences of one item give no example.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    inputs, targets, users = [], [], []
    for user, seq in zip(split.users, split.train, strict=True):
        end = seq.shape[0]
        windows = []
        while end > 1:
            start = max(1, end - max_len)
            windows.append((start, end))
            end = start
        for start, end in reversed(windows):
            inputs.append(seq[start - 1 : end - 1])
            targets.append(seq[start:end])
            users.append(user)
    return inputs, targets, np.asarray(users, dtype=np.int64)
