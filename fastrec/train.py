"""Training and evaluation of the sequential recommenders (``fastrec train``).

Protocol (RecBole's for sequential models): chronological leave-one-out (``fastrec.data``), every
prefix of a training sequence predicts its next item, Adam, full ranking over every item for
HR/NDCG/MRR@K, early stopping on validation NDCG@10, the best epoch's weights for the test line.
Metrics rank against all items (RecBole's setting for sequential models); the same metrics with
the user's earlier items excluded are reported beside them as ``... (seen excluded)``.

Multi-process data parallel: run under ``torchrun`` (gloo on CPU, nccl on CUDA). Every process
walks the same global batches and takes its contiguous share of each; each share's loss is
weighted by its share of the global batch, so the averaged gradient and the logged loss equal one
process's over the whole global batch. A process whose share is empty (a last batch with fewer
rows than processes) still runs the step, on one row at weight 0, so it adds nothing to the loss
and gradients but joins their all-reduce. Every process evaluates (cheap, identical weights, so they
take the same early-stopping decisions); only rank 0 prints and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from fastrec import backends
from fastrec.models import MODELS, ModelInput, SequentialRecommender
from fastrec.models.base import LOSSES

# What a TrainConfig field left None means for each model. Caser's learning rate and schedule
# (with its reg_weight and filter counts) had the best validation NDCG@10 in a sweep over seeds
# the accuracy runs (docs/accuracy.md) do not use (benchmarks/results/sweep-caser-ml100k.json).
# The epoch cap keeps each model's default run on ml-100k (fastrec backend) under 10 minutes on
# 2 CPU cores: a run's seconds per epoch, validation and test included, at most ~100 for SASRec,
# ~33 for GRU4Rec, ~7 for Caser (benchmarks/results/accuracy-ml100k-default-stream.json,
# accuracy-ml100k-sasrec-seeds-2025-2027.json, accuracy-ml100k-caser-lr3e-3-cosine.json), so
# 5 x 100, 12 x 33 and 12 x 7 s. The accuracy protocol (PROTOCOL) caps every model at 12.
MODEL_DEFAULTS = {
    "sasrec": {"max_len": 50, "lr": 1e-3, "lr_schedule": "constant", "epochs": 5},
    "gru4rec": {"max_len": 50, "lr": 1e-3, "lr_schedule": "constant", "epochs": 12},
    "caser": {"max_len": 10, "lr": 3e-3, "lr_schedule": "cosine", "epochs": 12},
}
# The accuracy protocol's schedule (benchmarks/accuracy.py, benchmarks/sweep.py): at most 12
# epochs, early stopping after 3 without a better validation NDCG@10, no time limit.
PROTOCOL = {"epochs": 12, "patience": 3}
KS = (5, 10, 20)
MONITOR = "NDCG@10"
LR_SCHEDULES = ("constant", "cosine")
POSITIONS = ("last", "all")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, not fastrec's, or from another run
    (the message names the file and what differs)."""


@dataclass
class TrainConfig:
    """Everything a run depends on; the defaults are the CLI's, which reads them from here
    (RecBole's defaults, train batch 512, early stopping after 3 epochs without a better
    NDCG@10, no time limit; fields left None, the epoch cap among them, take the model's value
    from MODEL_DEFAULTS)."""

    model: str = "sasrec"
    data: str = "ml-100k"
    data_options: dict = field(default_factory=dict)  # fastrec.data.load's options for a path: a CSV's columns
    backend: str = "fastrec"
    epochs: int | None = None  # None: the model's (MODEL_DEFAULTS), 5 (SASRec) or 12
    batch_size: int = 512
    eval_batch_size: int = 1024
    lr: float | None = None  # None: the model's (MODEL_DEFAULTS)
    lr_schedule: str | None = None  # "constant", or "cosine": per step from lr to 0 over ``epochs``
    loss: str = "ce"  # fastrec.models.base.LOSSES: ce, sampled-softmax, gbce, bce
    n_negatives: int = 1  # sampled negatives per batch (sampled-softmax, gbce) or per example (bce)
    positions: str = "last"  # "last": each prefix predicts its next item; "all": every position does
    max_len: int | None = None  # None: the model's, 50 (SASRec, GRU4Rec) or 10 (Caser)
    dropout: float | None = None  # None: the model's default
    patience: int = 3
    time_limit_s: float | None = None  # opt-in: stop training (mid-epoch if need be) after this long
    device: str = "cpu"
    amp: str | None = None  # "bf16"
    compile: bool = False
    cuda_graphs: bool = False  # replay each training step as one CUDA graph (fastrec.graphs); CUDA only
    log_every: int = 50  # steps between reads of the running loss (the only host reads of a step)
    dropout_stream: str = "auto"  # fastrec.use_dropout_stream: "auto" = torch's masks on the CPU
    seed: int = 2020
    checkpoint: str | None = None  # path written after each epoch
    resume: bool = False  # continue from ``checkpoint`` if it exists
    progress: bool = True
    model_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        for name, default in MODEL_DEFAULTS[self.model].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.dropout_stream not in backends.DROPOUT_STREAMS:
            raise ValueError(f"dropout_stream must be one of {backends.DROPOUT_STREAMS}, got {self.dropout_stream!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "n_negatives", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be positive or None, got {self.time_limit_s!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "all" and self.model == "caser":
            raise ValueError("positions='all' needs a per-position output, which caser has not; use positions='last'")
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise ValueError(f"cuda_graphs=True needs device='cuda', got {self.device!r}")
        if self.cuda_graphs and (self.loss not in ("ce", "bce") or self.positions == "all"):
            raise ValueError(
                "cuda_graphs=True needs fixed shapes inside the step: loss 'ce' or 'bce' and positions 'last', "
                f"got loss={self.loss!r}, positions={self.positions!r}"
            )
        if self.cuda_graphs and self.compile:
            raise ValueError("cuda_graphs=True and compile=True are exclusive: the graph replays the eager step")
        if self.resume and not self.checkpoint:
            raise ValueError("resume=True needs checkpoint= (the path to resume from), got None")
        if self.data.startswith("synthetic:"):
            synthetic_options(self.data)
        if self.data_options and (self.data in ("ml-100k", "synthetic") or self.data.startswith("synthetic:")):
            raise ValueError(f"data_options are a data file's loader options, not {self.data!r}'s")
        takes = model_option_names(self.model)
        unknown = sorted(set(self.model_options) - takes)
        if unknown:
            raise ValueError(f"model_options: {self.model} takes {sorted(takes)}, not {unknown}")


def model_option_names(model: str) -> set[str]:
    """The constructor arguments of ``model`` that ``TrainConfig.model_options`` may set (the
    rest come from the config itself: sizes from the data, ``backend``, ``max_len``, ``dropout``)."""
    own = {"self", "n_items", "n_users", "backend", "max_len", "dropout"}
    return set(inspect.signature(MODELS[model].__init__).parameters) - own


@dataclass
class Data:
    """The split, laid out for one model: training batches and the evaluation sets."""

    n_items: int
    n_users: int
    train: object  # fastrec.data.Batches
    valid: tuple[list[np.ndarray], np.ndarray, np.ndarray]  # histories, targets, users
    test: tuple[list[np.ndarray], np.ndarray, np.ndarray]


@dataclass
class EpochResult:
    epoch: int
    loss: float
    samples_per_s: float
    seconds: float
    valid: dict[str, float]
    lr: float  # the learning rate after the epoch's last step


@dataclass
class RunResult:
    config: TrainConfig
    epochs: list[EpochResult]
    best_epoch: int
    test: dict[str, float]
    seconds: float


def load_data(config: TrainConfig, padding_side: str) -> Data:
    """Load ``config.data`` (``"ml-100k"``, ``"synthetic"``, ``"synthetic:items=N,users=M"`` (a large
    catalogue, ``synthetic_options``) or a path), split it leave-one-out and
    lay out the training examples for a model padded on ``padding_side``."""
    from fastrec import data as fdata
    from fastrec.data.split import MIN_EVAL_LENGTH

    if config.data == "synthetic":
        inter = fdata.synthetic(n_users=120, n_items=60, mean_len=12.0, seed=config.seed)
    elif config.data.startswith("synthetic:"):
        inter = fdata.synthetic_catalogue(**synthetic_options(config.data), seed=config.seed)
    else:
        inter = fdata.load(config.data, **config.data_options)
    split = fdata.leave_one_out(inter)
    if len(split.eval_users) == 0:
        raise fdata.DataError(
            f"{config.data}: no user has {MIN_EVAL_LENGTH} or more items, so the leave-one-out split leaves "
            f"no validation or test users ({inter.n_users} users, {len(inter)} interactions)"
        )
    if config.positions == "all":
        histories, targets, users = fdata.train_sequences(split, config.max_len)
        batches = fdata.PositionBatches
    else:
        histories, targets, users = fdata.train_examples(split, config.max_len, augment=True, return_users=True)
        batches = fdata.Batches
    train = batches(
        histories,
        targets,
        users,
        max_len=config.max_len,
        batch_size=config.batch_size,
        side=padding_side,
        shuffle=True,
        seed=config.seed,
    )
    valid = (split.valid_history, split.valid_target, split.eval_users)
    test = (split.test_history, split.test_target, split.eval_users)
    return Data(split.n_items, split.n_users, train, valid, test)


SYNTHETIC_OPTIONS = {"items": ("n_items", int), "users": ("n_users", int), "mean_len": ("mean_len", float),
                     "zipf": ("zipf", float), "session_continue": ("session_continue", float)}  # fmt: skip


def synthetic_options(data: str) -> dict:
    """``synthetic:items=1000000,users=100000`` (also ``mean_len``, ``zipf``, ``session_continue``)
    as ``fastrec.data.synthetic_catalogue``'s keyword arguments; ValueError naming a bad one."""
    options = {}
    for pair in data.partition(":")[2].split(","):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if key not in SYNTHETIC_OPTIONS or not sep:
            raise ValueError(f"data {data!r}: expected synthetic:KEY=VALUE,... with KEY in {sorted(SYNTHETIC_OPTIONS)}")
        name, kind = SYNTHETIC_OPTIONS[key]
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isnan(number) or (kind is int and not number.is_integer()):
            raise ValueError(f"data {data!r}: {key} must be {'an int' if kind is int else 'a number'}, got {value!r}")
        options[name] = kind(number)
    return options


def build_model(config: TrainConfig, n_items: int, n_users: int) -> SequentialRecommender:
    """The model of ``config`` with weights drawn from ``config.seed``."""
    torch.manual_seed(config.seed)
    options = dict(config.model_options)
    if config.dropout is not None:
        options["dropout"] = config.dropout
    options["max_len"] = config.max_len
    if config.model == "caser":
        model = MODELS["caser"](n_items, n_users, backend=config.backend, **options)
    else:
        model = MODELS[config.model](n_items, backend=config.backend, **options)
    return model.to(config.device)


@torch.no_grad()
def evaluate(
    model: SequentialRecommender,
    histories: list[np.ndarray],
    targets: np.ndarray,
    users: np.ndarray,
    batch_size: int = 1024,
    ks: Iterable[int] = KS,
) -> dict[str, float]:
    """HR/NDCG/MRR@K by full ranking, and the same with each user's earlier items excluded."""
    from fastrec import metrics

    was_training = model.training
    model.eval()
    ranks, ranks_excluded = [], []
    device = model.item_embedding.weight.device
    try:
        for start in range(0, len(histories), batch_size):
            rows = histories[start : start + batch_size]
            batch = model.make_input(rows, users[start : start + batch_size], full_length=True)
            target = torch.as_tensor(targets[start : start + batch_size], device=device)
            # model.scores(batch) ranked without the (batch, n_items + 1) matrix: memory O(batch)
            plain, excluded = metrics.full_ranks(model(batch), model.item_embedding.weight, target, exclude=rows)
            ranks.append(plain.cpu())
            ranks_excluded.append(excluded.cpu())
    finally:
        model.train(was_training)
    ks = tuple(ks)
    result = metrics.metrics_from_ranks(torch.cat(ranks), ks)
    excluded = metrics.metrics_from_ranks(torch.cat(ranks_excluded), ks)
    result.update({f"{name} (seen excluded)": value for name, value in excluded.items()})
    return result


class _LossModule(torch.nn.Module):
    """The training loss as a module's forward, so that DistributedDataParallel (which syncs
    gradients of what runs through its own forward) and torch.compile see the whole step."""

    def __init__(self, model: SequentialRecommender, kind: str, n_negatives: int) -> None:
        super().__init__()
        self.model, self.kind, self.n_negatives = model, kind, n_negatives

    def forward(self, items, lengths, target, user):
        batch = ModelInput(items, lengths, user, target)
        return self.model.loss(batch, kind=self.kind, n_negatives=self.n_negatives)


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FASTREC_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``n`` rows (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _past(deadline: float, world: int) -> bool:
    """Whether the deadline has passed (rank 0's clock decides for every process)."""
    flag = torch.tensor([time.perf_counter() > deadline], dtype=torch.int32)
    if world > 1:
        dist.broadcast(flag, 0)
    return bool(flag)


def _capture_step(model: SequentialRecommender, optimizer: torch.optim.Optimizer, batch, config: TrainConfig):
    """The captured training step (fastrec.graphs) at ``config.batch_size`` rows: shorter batches
    are padded, their padded rows counting in no loss."""
    from fastrec import graphs

    return graphs.capture_train_step(
        model,
        optimizer,
        batch,
        loss_kind=config.loss,
        n_negatives=config.n_negatives,
        rows=config.batch_size,
        autocast_dtype=torch.bfloat16 if config.amp == "bf16" else None,
    )


def _autocast(config: TrainConfig):
    if config.amp == "bf16":
        return torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# The config fields a resumed run must share with the run that wrote the checkpoint: the model
# and its options (the weights' shapes and meaning), the data and seed (the batch order and the
# split the weights were fitted on), the schedule (the optimizer's state).
RESUME_MUST_MATCH = ("model", "model_options", "max_len", "dropout", "data", "data_options", "seed", "lr_schedule")
RESUME_MUST_MATCH += ("loss", "n_negatives", "positions")  # the objective the optimizer's state was fitted to
CHECKPOINT_KEYS = frozenset(
    ("config", "epoch", "model", "optimizer", "schedule", "epochs", "best_epoch", "best_value", "best_state",
     "bad_epochs", "batch_rng", "torch_rng")
)  # fmt: skip


def check_checkpoint_dir(config: TrainConfig) -> None:
    """Raise before training if ``config.checkpoint`` could not be written after the first epoch."""
    if not config.checkpoint:
        return
    directory = os.path.dirname(os.path.abspath(config.checkpoint))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint {config.checkpoint!r}: directory {directory!r} does not exist")
    if os.path.isdir(config.checkpoint):
        raise IsADirectoryError(f"checkpoint {config.checkpoint!r} is a directory; give a file path")


def load_checkpoint(config: TrainConfig, device: torch.device | str = "cpu") -> dict:
    """The training state in ``config.checkpoint``, read with ``weights_only=True`` (tensors and
    plain types only: a checkpoint cannot run code) and checked to come from a run of the same
    model, options, data, seed and schedule (``RESUME_MUST_MATCH``)."""
    path = config.checkpoint
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"resume: checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only" in str(error):
            raise CheckpointError(
                f"{path}: holds not only tensors and plain types, so it is not read (loading it could run code): "
                f"{str(error).splitlines()[0]}"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({error})") from None
    except (EOFError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({error})") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a fastrec training checkpoint (missing {missing})")
    saved = {**dataclasses.asdict(TrainConfig(model=config.model)), **state["config"]}  # older: the defaults
    differ = [
        f"{name}={getattr(config, name)!r}, but {path} was trained with {saved.get(name)!r}"
        for name in RESUME_MUST_MATCH
        if saved.get(name) != getattr(config, name)
    ]
    if differ:
        raise CheckpointError("; ".join(differ) + "; resume with the same settings")
    return state


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam at ``config.lr`` and, for ``lr_schedule="cosine"``, the scheduler to step after every
    batch (``config.epochs * steps_per_epoch`` steps down to 0); None for a constant rate. With
    ``cuda_graphs`` Adam is capturable and its rate a device tensor, which the scheduler updates
    in place between replays."""
    if config.cuda_graphs:
        device = next(model.parameters()).device
        optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(config.lr, device=device), capturable=True)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.lr_schedule == "constant":
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)


def fit(
    model: SequentialRecommender,
    data: Data,
    config: TrainConfig,
    log: Callable[[str], None] = print,
) -> tuple[list[EpochResult], int]:
    """Train ``model`` on ``data.train`` (``make_optimizer``), evaluating on ``data.valid`` after
    each epoch; stop after ``config.patience`` epochs without a better validation NDCG@10 and
    leave the best epoch's weights in ``model``. Returns (per-epoch results, best epoch)."""
    from tqdm import tqdm

    rank, world = _distributed()
    device = torch.device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model.to(device)
    step_module: torch.nn.Module = _LossModule(model, config.loss, config.n_negatives)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(step_module)
    if config.compile:
        torch._dynamo.config.allow_rnn = True  # fastrec.nn.GRU is an RNNBase (docs/design.md: torch.compile)
        step_module = torch.compile(step_module)
    if config.cuda_graphs and world > 1:
        raise ValueError("cuda_graphs=True runs in one process; run data parallel without it")
    if rank == 0:
        check_checkpoint_dir(config)
    optimizer, schedule = make_optimizer(model, config, len(data.train))

    epochs: list[EpochResult] = []
    best_epoch, best_value, best_state, bad_epochs, first_epoch = 0, -math.inf, None, 0, 1
    if config.resume:
        state = load_checkpoint(config, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        epochs = [EpochResult(**e) for e in state["epochs"]]
        best_epoch, best_value, best_state, bad_epochs = (
            state["best_epoch"],
            state["best_value"],
            state["best_state"],
            state["bad_epochs"],
        )
        data.train._rng.bit_generator.state = state["batch_rng"]
        torch.set_rng_state(state["torch_rng"])
        first_epoch = state["epoch"] + 1
        if rank == 0:
            log(f"resumed from {config.checkpoint} after epoch {state['epoch']}")

    deadline = None if config.time_limit_s is None else time.perf_counter() + config.time_limit_s
    out_of_time = False
    captured = None  # with cuda_graphs: the fastrec.graphs.TrainStep, captured at the first batch
    for epoch in range(first_epoch, config.epochs + 1):
        if bad_epochs >= config.patience or out_of_time:
            break
        model.train()
        start = time.perf_counter()
        # The step reads nothing back to the host: the loss is summed on the device (float64,
        # the same sum a host float would give) and read every ``log_every`` steps and at the end.
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        bar = tqdm(data.train, desc=f"epoch {epoch}", leave=False, disable=not config.progress or rank != 0)
        for step, batch in enumerate(bar, 1):
            n = len(batch.target)
            if config.cuda_graphs:
                if captured is None:
                    captured = _capture_step(model, optimizer, batch, config)
                value = captured(batch.items, batch.lengths, batch.target, batch.user)
            else:
                rows = _share(n, rank, world)
                weight = (rows.stop - rows.start) * world / n  # this share's part of the global mean
                if weight == 0:  # an empty share: one row at weight 0, to join the all-reduce
                    rows = slice(0, 1)
                tensors = [t[rows].to(device, non_blocking=True) for t in (batch.items, batch.lengths, batch.target)]
                user = batch.user[rows].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(config):
                    loss = step_module(*tensors, user) * weight
                loss.backward()
                optimizer.step()
                value = loss.detach()
            if schedule is not None:
                schedule.step()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            total += value.double() * n
            count += n
            if step % config.log_every == 0 and not bar.disable:
                bar.set_postfix(loss=f"{float(total) / count:.4f}")
            if deadline is not None and _past(deadline, world):
                out_of_time = True
                break
        epoch_loss = float(total) / max(count, 1)  # also waits for the epoch's last step
        seconds = time.perf_counter() - start
        valid = evaluate(model, *data.valid, batch_size=config.eval_batch_size)
        lr = float(optimizer.param_groups[0]["lr"])
        result = EpochResult(epoch, epoch_loss, count / seconds, seconds, valid, lr)
        epochs.append(result)
        improved = valid[MONITOR] > best_value
        if improved:
            best_epoch, best_value, bad_epochs = epoch, valid[MONITOR], 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        if rank == 0:
            log(
                f"epoch {epoch:3d}  loss {result.loss:.4f}  {result.samples_per_s:8.0f} samples/s  "
                f"{seconds:6.1f} s  valid HR@10 {valid['HR@10']:.4f}  NDCG@10 {valid['NDCG@10']:.4f}"
                + ("  *" if improved else "")
                + (
                    f"  (time limit {config.time_limit_s:.0f} s: epoch cut short, training stops)"
                    if out_of_time
                    else ""
                )
            )
            if config.checkpoint:
                _save(
                    config.checkpoint,
                    {
                        "config": dataclasses.asdict(config),
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": None if schedule is None else schedule.state_dict(),
                        "epochs": [dataclasses.asdict(e) for e in epochs],
                        "best_epoch": best_epoch,
                        "best_value": float(best_value),
                        "best_state": best_state,
                        "bad_epochs": bad_epochs,
                        "batch_rng": data.train._rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state(),
                    },
                )
    if best_state is not None:
        model.load_state_dict(best_state)
    return epochs, best_epoch


def run(config: TrainConfig, log: Callable[[str], None] = print) -> RunResult:
    """Load, build, fit and test one model; prints one line per epoch and a final test line."""
    rank, _ = _distributed()
    start = time.perf_counter()
    data = load_data(config, MODELS[config.model].padding_side)
    model = build_model(config, data.n_items, data.n_users)
    if rank == 0:
        log(
            f"{config.model} ({config.backend} backend) on {config.data}: {data.n_users} users, {data.n_items} items, "
            f"{data.train.n_examples} training examples, max_len {config.max_len}, device {config.device}"
            + (f", amp {config.amp}" if config.amp else "")
            + (", compiled" if config.compile else "")
            + (f", dropout stream {config.dropout_stream}" if config.dropout_stream != "auto" else "")
            + (f", loss {config.loss}" if config.loss != "ce" else "")
            + (", all positions" if config.positions == "all" else "")
        )
    with backends.use_dropout_stream(config.dropout_stream):
        epochs, best_epoch = fit(model, data, config, log)
    test = evaluate(model, *data.test, batch_size=config.eval_batch_size)
    seconds = time.perf_counter() - start
    if rank == 0:
        log(
            f"test (best epoch {best_epoch})  HR@10 {test['HR@10']:.4f}  NDCG@10 {test['NDCG@10']:.4f}  "
            f"MRR@10 {test['MRR@10']:.4f}  |  seen excluded: NDCG@10 {test['NDCG@10 (seen excluded)']:.4f}  "
            f"({seconds:.0f} s)"
        )
    return RunResult(config, epochs, best_epoch, test, seconds)


def compare(config: TrainConfig, log: Callable[[str], None] = print) -> dict[str, RunResult]:
    """Train with both backends from the same seed and print accuracy and speed side by side."""
    results = {}
    for backend in ("fastrec", "torch"):
        results[backend] = run(dataclasses.replace(config, backend=backend), log)
    fast, plain = results["fastrec"], results["torch"]

    def epoch_s(r: RunResult) -> float:
        return float(np.median([e.seconds for e in r.epochs]))

    log(f"{'':28s}{'fastrec':>12s}{'torch':>12s}")
    for name in ("HR@10", "NDCG@10", "MRR@10", "NDCG@10 (seen excluded)"):
        log(f"{'test ' + name:28s}{fast.test[name]:12.4f}{plain.test[name]:12.4f}")
    log(f"{'median epoch s':28s}{epoch_s(fast):12.2f}{epoch_s(plain):12.2f}")
    log(
        f"{'samples/s (median epoch)':28s}{np.median([e.samples_per_s for e in fast.epochs]):12.0f}"
        f"{np.median([e.samples_per_s for e in plain.epochs]):12.0f}"
    )
    log(f"epoch time fastrec / torch: {epoch_s(fast) / epoch_s(plain):.2f}x")
    return results
