"""Whole training steps at fixed shapes, replayed as one CUDA graph.

At recommender sizes a training step is hundreds of kernel launches of a few microseconds each,
so on a GPU the host's launch cost, not the kernels, sets the step time. A CUDA graph records the
step's launches once and replays them with one call. :func:`capture_train_step` records one
step (forward, loss, backward, optimizer step) of a :class:`~fastrec.models.SequentialRecommender`
and returns a :class:`TrainStep` that copies each batch into the graph's static inputs and
replays it.

What a captured step needs, and how it is met here:

- **Fixed shapes.** Every batch is padded to the captured row count: padded rows repeat the
  batch's first history with target 0 (the padding item), which the models' losses leave out,
  so the loss is the mean over the real rows.
- **No host synchronisation.** The step body (:func:`train_step`) returns the loss as a device
  tensor and reads nothing back; the caller accumulates it on the device.
- **A capturable optimizer**: ``torch.optim.Adam(..., capturable=True)`` (or AdamW) with a tensor
  ``lr`` if a learning-rate scheduler changes it between replays (a float ``lr`` is baked into
  the graph).
- **Graph-safe random streams.** fastrec's dropout and attention dropout take their Philox seed
  from ``torch.randint`` on the device, which CUDA graph capture registers with torch's generator:
  each replay draws a new seed, and a replay draws the seed an eager step would draw from the
  same generator state. torch's own dropout is graph-safe the same way.

The same body runs eagerly (``graph=False``, on any device): the fixed-shape step without a
graph, so eager and captured steps share every line but the replay.

:func:`capture_recommend` does the same for ``recommend()`` at batch 1 (serve, scoring, top-k and
exclusion of the history's items in one graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastrec.models.base import LOSSES, ModelInput, SequentialRecommender, _as_ids

__all__ = [
    "Recommender",
    "StepInputs",
    "TrainStep",
    "capture_recommend",
    "capture_train_step",
    "pad_batch",
    "train_step",
]


@dataclass
class StepInputs:
    """A fixed-shape step's inputs on the device: ``items`` (B, L) long, ``lengths`` (B,) long,
    ``target`` (B,) long (0 on padded rows), ``user`` (B,) long, ``weight`` () float32 (the loss's
    factor: 1 for a whole batch, a data-parallel share's part of the global mean)."""

    items: Tensor
    lengths: Tensor
    target: Tensor
    user: Tensor
    weight: Tensor


def pad_batch(items: Tensor, lengths: Tensor, target: Tensor, user: Tensor, rows: int) -> tuple[Tensor, ...]:
    """``(items, lengths, target, user)`` padded to ``rows`` rows: the padded rows repeat row 0's
    history and user (an input every model accepts) with target 0, which the losses leave out."""
    n = items.shape[0]
    if n == 0:
        raise ValueError("a batch needs at least one row, got 0")
    if n > rows:
        raise ValueError(f"batch has {n} rows, more than the step's {rows}")
    if n == rows:
        return items, lengths, target, user
    extra = rows - n
    items = torch.cat([items, items[:1].expand(extra, -1)])
    lengths = torch.cat([lengths, lengths[:1].expand(extra)])
    target = torch.cat([target, target.new_zeros((extra, *target.shape[1:]))])
    user = torch.cat([user, user[:1].expand(extra)])
    return items, lengths, target, user


def train_step(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    inputs: StepInputs,
    loss_kind: str = "ce",
    n_negatives: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """One training step on ``inputs``: zero the gradients, the weighted loss, backward, the
    optimizer's step. Returns the weighted loss, detached, on the device; reads nothing back to
    the host, so it can be captured. A step whose weight is 0 (no real row) adds nothing."""
    optimizer.zero_grad(set_to_none=True)
    batch = ModelInput(inputs.items, inputs.lengths, inputs.user, inputs.target)
    with autocast():
        loss = model.loss(batch, kind=loss_kind, n_negatives=n_negatives)
    loss = torch.where(inputs.weight > 0, loss, 0.0) * inputs.weight
    loss.backward()
    optimizer.step()
    return loss.detach()


class TrainStep:
    """A training step at fixed shapes (from :func:`capture_train_step`). ``step(items, lengths,
    target, user, weight=1.0)`` copies the batch (at most ``rows`` rows, ``max_len`` columns, on
    any device) into the static inputs, padding it, and runs the step: replays the CUDA graph, or
    runs :func:`train_step` eagerly when built with ``graph=False``. Returns the loss as a device
    tensor, a fresh one per call."""

    def __init__(self, run: Callable[[], Tensor], inputs: StepInputs, graph: torch.cuda.CUDAGraph | None) -> None:
        self._run, self.inputs, self.graph = run, inputs, graph
        self.rows, self.max_len = inputs.items.shape

    def __call__(self, items: Tensor, lengths: Tensor, target: Tensor, user: Tensor, weight: float = 1.0) -> Tensor:
        if items.dim() != 2 or items.shape[1] != self.max_len:
            raise ValueError(f"items must be (B, {self.max_len}) like the captured batch, got {tuple(items.shape)}")
        for name, t in (("lengths", lengths), ("target", target), ("user", user)):
            if t.shape != (items.shape[0],):
                raise ValueError(f"{name} must be ({items.shape[0]},) like items' rows, got {tuple(t.shape)}")
        padded = pad_batch(items, lengths, target, user, self.rows)
        static = self.inputs
        for dst, src in zip((static.items, static.lengths, static.target, static.user), padded, strict=True):
            dst.copy_(src, non_blocking=True)
        static.weight.fill_(weight)
        return self._run().clone()


def _check_optimizer(optimizer: torch.optim.Optimizer, graph: bool) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if graph and not all(group.get("capturable", False) for group in optimizer.param_groups):
        raise ValueError(
            f"optimizer must be capturable to replay in a CUDA graph: build {type(optimizer).__name__}(..., "
            "capturable=True) (and a tensor lr if a scheduler changes it)"
        )


def capture_train_step(
    model: SequentialRecommender,
    optimizer: torch.optim.Optimizer,
    example_batch,
    *,
    loss_kind: str = "ce",
    n_negatives: int = 1,
    rows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    graph: bool = True,
    warmup: int = 3,
) -> TrainStep:
    """A training step of ``model`` and ``optimizer`` at ``example_batch``'s shape, captured as a
    CUDA graph (``graph=True``, the model on a CUDA device) or run eagerly (``graph=False``).

    ``example_batch``: anything with ``items`` (B, L), ``lengths``, ``target`` and ``user`` (e.g.
    ``fastrec.data.Batch``); its width L is the step's, ``rows`` (default B) its row count. The
    graph is recorded after ``warmup`` eager steps on a side stream (torch's requirement); the
    model's and optimizer's state and torch's generators are restored afterwards, so capturing
    trains nothing: the first call is the first step. ``autocast_dtype``: run the loss under
    ``torch.autocast`` in that dtype (``torch.bfloat16``). The model stays in the mode it is in
    (``model.train()`` for dropout).
    """
    if not isinstance(model, SequentialRecommender):
        raise TypeError(f"model must be a fastrec.models.SequentialRecommender, got {type(model).__name__}")
    if loss_kind not in LOSSES:
        raise ValueError(f"loss_kind must be one of {LOSSES}, got {loss_kind!r}")
    _check_optimizer(optimizer, graph)
    device = model.item_embedding.weight.device
    if graph and device.type != "cuda":
        raise ValueError(
            f"graph=True needs the model on a CUDA device, got {device}; graph=False runs the step eagerly"
        )
    items = getattr(example_batch, "items", None)
    if not isinstance(items, Tensor) or items.dim() != 2 or items.shape[0] == 0:
        raise ValueError("example_batch must have items (B, L) with B >= 1, like fastrec.data.Batch")
    rows = items.shape[0] if rows is None else rows
    if not isinstance(rows, int) or rows < items.shape[0]:
        raise ValueError(f"rows must be an int >= the example batch's {items.shape[0]} rows, got {rows!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be a positive int, got {warmup!r}")
    padded = pad_batch(items, example_batch.lengths, example_batch.target, example_batch.user, rows)
    inputs = StepInputs(*(t.to(device).clone() for t in padded), torch.ones((), device=device))

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=not graph)

    def body() -> Tensor:
        return train_step(model, optimizer, inputs, loss_kind, n_negatives, autocast)

    if not graph:
        return TrainStep(body, inputs, None)
    return TrainStep(*_capture(model, optimizer, body, inputs, warmup))


def _capture(model, optimizer, body, inputs, warmup):
    """Record ``body`` as a CUDA graph after ``warmup`` eager runs, leaving model, optimizer and
    torch's generators as they were before the warm-up."""
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_state = _clone(optimizer.state_dict())
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            body()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.copy_(model_state[key])
    _restore_optimizer(optimizer, optimizer_state)
    torch.set_rng_state(cpu_rng)
    torch.cuda.set_rng_state(cuda_rng)
    optimizer.zero_grad(set_to_none=True)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        loss = body()

    def replay() -> Tensor:
        cuda_graph.replay()
        return loss

    return replay, inputs, cuda_graph


def _clone(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Copy ``saved`` (a state_dict) back into the optimizer's state tensors in place, so that
    the tensors the graph will read keep their addresses; state entries the warm-up created are
    zeroed the same way."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        state = optimizer.state.get(param)
        if not state:
            continue
        before = saved["state"].get(index, {})
        with torch.no_grad():
            for key, value in state.items():
                if isinstance(value, Tensor) and key in before:
                    value.copy_(before[key])
                elif isinstance(value, Tensor):
                    value.zero_()
                elif key in before:
                    state[key] = before[key]
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for key, value in saved_group.items():
            if key == "params":
                continue
            if isinstance(group.get(key), Tensor):
                group[key].copy_(value)
            else:
                group[key] = value


# --------------------------------------------------------------------------- recommend at batch 1
class Recommender:
    """``recommend()`` for one history at fixed shapes (from :func:`capture_recommend`).

    ``rec(history, user=None) -> (items (k,), scores (k,))``, best first, as
    ``model.recommend([history], k, exclude_seen, [user])`` returns for its one row. Each call
    lays the history out on the host (the last ``max_len`` items on the model's padding side,
    padded to ``max_len``, plus up to ``max_history`` ids to exclude), copies it into the static
    input with one host-to-device copy, and replays the CUDA graph of serve + scoring + top-k (or
    runs that body eagerly when built with ``graph=False``). Returns fresh tensors per call.
    """

    def __init__(self, model: SequentialRecommender, k: int, exclude_seen: bool, max_history: int, graph: bool) -> None:
        self.model, self.k, self.exclude_seen, self.max_history = model, k, exclude_seen, max_history
        device = model.item_embedding.weight.device
        size = model.max_len + 2 + max_history  # items, length, user, ids to exclude
        self._pin = device.type == "cuda"
        self._static = torch.zeros(size, dtype=torch.long, device=device)
        self._run: Callable[[], tuple[Tensor, Tensor]] = self._body
        self.graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._capture()

    def _body(self) -> tuple[Tensor, Tensor]:
        """Serve + scoring + top-k on the static input, in eval mode without autograd; no host
        synchronisation."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._rank()
        finally:
            model.train(was_training)

    def _rank(self) -> tuple[Tensor, Tensor]:
        model, L = self.model, self.model.max_len
        items = self._static[:L].view(1, L)
        lengths = self._static[L : L + 1]
        user = self._static[L + 1 : L + 2] if model.uses_users else None
        batch = ModelInput(items, lengths, user)
        hidden = model.serve(batch) if model.backend == "fastrec" else model(batch)
        table = model.item_embedding.weight
        scores = hidden @ table[1:].T  # (1, n_items): item i is row i of the table
        if self.exclude_seen:
            seen = torch.zeros(table.shape[0], dtype=torch.bool, device=table.device)
            seen.index_fill_(0, self._static[L + 2 :], True)  # id 0 (padding) marks row 0 only
            scores = scores.masked_fill(seen[1:], float("-inf"))
        top_scores, top = scores.topk(self.k, dim=1)
        return top[0] + 1, top_scores[0]

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._body()
        self.graph = graph

        def replay() -> tuple[Tensor, Tensor]:
            graph.replay()
            return outputs

        self._run = replay

    def __call__(self, history, user: int | None = None) -> tuple[Tensor, Tensor]:
        model, L = self.model, self.model.max_len
        ids = _as_ids(history, 0)
        if ids.size == 0:
            raise ValueError("history must hold at least one item, got none")
        if ids.min() < 1 or ids.max() > model.n_items:
            raise ValueError(f"history must hold item ids in 1..{model.n_items}, got {ids.min()}..{ids.max()}")
        if model.uses_users and user is None:
            raise ValueError(f"{type(model).__name__} needs user= (the history's user id), got None")
        if self.exclude_seen and ids.size > self.max_history:
            raise ValueError(f"history has {ids.size} items, more than max_history = {self.max_history}")
        n = min(ids.size, L)
        # A fresh host buffer per call: the previous call's asynchronous copy may still read its own.
        host = torch.zeros(self._static.shape, dtype=torch.long, pin_memory=self._pin)
        last = torch.from_numpy(ids[ids.size - n :].astype(np.int64))
        if model.padding_side == "right":
            host[:n] = last
        else:
            host[L - n : L] = last
        host[L] = n
        host[L + 1] = 0 if user is None else int(user)
        if self.exclude_seen:
            host[L + 2 : L + 2 + ids.size] = torch.from_numpy(ids.astype(np.int64))
        self._static.copy_(host, non_blocking=True)
        top_items, top_scores = self._run()
        return top_items.clone(), top_scores.clone()


def capture_recommend(
    model: SequentialRecommender,
    k: int,
    *,
    exclude_seen: bool = True,
    max_history: int | None = None,
    graph: bool = True,
) -> Recommender:
    """``model.recommend`` for one history at a time, captured as a CUDA graph (``graph=True``,
    the model on a CUDA device) or run eagerly at the same fixed shapes (``graph=False``).

    At batch 1 the host's launch cost, not the GPU, sets ``recommend()``'s latency; the graph
    replays serve, scoring and top-k with one call. ``max_history`` (default ``max_len``): the
    longest history a call may pass when ``exclude_seen`` (its items are excluded from the ranking
    through a static id buffer of that size). The graph is recorded in eval mode whatever the
    model's mode; parameters are read in place, so updated weights are served by the next call.
    Scores equal ``model.recommend``'s up to float rounding (histories are padded to ``max_len``).
    """
    if not isinstance(model, SequentialRecommender):
        raise TypeError(f"model must be a fastrec.models.SequentialRecommender, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.n_items:
        raise ValueError(f"k must be an int in 1..{model.n_items} (n_items), got {k!r}")
    max_history = model.max_len if max_history is None else max_history
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ValueError(f"max_history must be a positive int, got {max_history!r}")
    device = model.item_embedding.weight.device
    if graph and device.type != "cuda":
        raise ValueError(
            f"graph=True needs the model on a CUDA device, got {device}; graph=False runs the same body eagerly"
        )
    return Recommender(model, k, exclude_seen, max_history if exclude_seen else 0, graph)
