"""Routes: where fastrec could run its kernel but runs torch's own op, because torch's is faster.

Each rule is data (``Rule``: the op, the device, the condition, the reason in a few words, and the
measurement it rests on: a command anyone can run and the results file it wrote under
``benchmarks/results/``) and a predicate below, which the op's call site asks once per call. A
predicate returns the reason to count in ``fastrec.stats()`` when its route applies, else None.
Routes apply only when no backend is forced (``use_backend`` / ``FASTREC_BACKEND``), so tests can
run each kernel on purpose; what a kernel cannot do at all (a dtype, an option) is not a route but
the op's own ``_unfused_reason``. ``routes(device)`` lists the rules for a device (``fastrec info
--routes`` prints it).

The conv op's CUDA route is a per-card table (``fastrec/conv_dispatch.json``: a path per shape
class, written on the card by ``fastrec bench --family conv --write-dispatch``); its lookup is
``fastrec.ops.conv.conv_path``, next to the table's format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastrec import backends

__all__ = [
    "Measurement",
    "Rule",
    "RULES",
    "routes",
    "rnn",
    "rnn_lengths",
    "rnn_cell",
    "dropout",
    "conv",
    "scoring",
    "linear_cross_entropy",
]


@dataclass(frozen=True)
class Measurement:
    """What a rule rests on: ``command`` wrote ``results`` (a path in the repository), whose
    ``figures`` (fastrec's kernel against torch's op, ratio > 1: fastrec faster) decided it."""

    command: str
    results: str
    figures: str


@dataclass(frozen=True)
class Rule:
    """One "torch's op runs here" rule. ``reason`` is also what ``fastrec.stats()`` records for a
    routed call, unless the predicate names a more precise one. ``measurement`` None: the route is
    kept without a measurement on record (``reason`` says why)."""

    name: str
    op: str
    device: str
    condition: str
    reason: str
    measurement: Measurement | None
    per_card: bool = False


# Two runs that measured several rules, as (command, results); each rule adds its figures.
_H200_BENCH = (
    "GPU_RUN_STEPS=bench benchmarks/gpu_run.sh (fastrec bench --rounds 5 --min-round-s 0.02), on an H200",
    "benchmarks/results/gpu-2026-11-28d-h200/bench.json",
)
_CPU_ROUTES = (
    "python benchmarks/routes_cpu.py --json benchmarks/results/2026-12-06-cpu-routes.json",
    "benchmarks/results/2026-12-06-cpu-routes.json",
)

# The ops that several rules route.
_RNN_MODULES = "fastrec.nn.RNN / GRU / LSTM"
_CONV = "conv (fastrec.nn.Conv1d / Conv2d, functional.conv*)"

RNN_LSTM_CPU = Rule(
    name="rnn-lstm-cpu",
    op="fastrec.nn.LSTM",
    device="cpu",
    condition="padded (not packed) input",
    reason="LSTM on CPU (torch's oneDNN LSTM is as fast)",
    measurement=Measurement(
        *_CPU_ROUTES, "B=128 T=50 64/64 padded, 1 thread: fused 0.95x forward, 0.79x forward+backward of oneDNN's"
    ),
)
RNN_PACKED_CUDA = Rule(
    name="rnn-packed-cuda",
    op=_RNN_MODULES,
    device="cuda",
    condition="PackedSequence input (the Triton recurrence steps the packed rows natively; not yet measured "
    "against cuDNN's packed RNN)",
    reason="PackedSequence on CUDA (cuDNN's packed RNN until a card measures the Triton packed layout against it)",
    measurement=None,
)
RNN_FP32_CUDA = Rule(
    name="rnn-fp32-cuda",
    op=_RNN_MODULES,
    device="cuda",
    condition="padded float32 / float64 input (also GRU4Rec's GRU with device lengths: cuDNN and a gather)",
    reason="cuDNN is faster there; the Triton recurrence wins in 16-bit",
    measurement=Measurement(
        *_H200_BENCH,
        "B=128 T=50 64/64 padded fp32: 0.14x-0.39x forward, 0.58x-0.73x forward+backward "
        "(bf16: 2.55x-3.55x / 1.56x-1.78x)",
    ),
)
RNN_CELL_CUDA = Rule(
    name="rnn-cell-cuda",
    op="rnn_cell (fastrec.nn.RNNCell / GRUCell / LSTMCell)",
    device="cuda",
    condition="every call",
    reason="CUDA cell step: torch's fused cell launches faster than the Triton cell (H200, 0.59x-0.78x)",
    measurement=Measurement(*_H200_BENCH, "GRUCell B=1/64/512 hidden 100: 0.59x-0.78x (host-bound steps)"),
)
DROPOUT_CUDA = Rule(
    name="dropout-cuda",
    op="dropout (fastrec.nn.Dropout, functional.dropout)",
    device="cuda",
    condition="no seed given",
    reason="CUDA: torch's dropout kernel launches faster than the Triton kernel (H200, 0.24x-0.38x)",
    measurement=Measurement(
        *_H200_BENCH, "B=512 L=50 d=64 p=0.2/0.5: 0.24x-0.28x forward, 0.31x-0.38x forward+backward"
    ),
)
CONV_PLAIN_CPU = Rule(
    name="conv-plain-cpu",
    op=_CONV,
    device="cpu",
    condition='act="none" and no pool (no epilogue to fuse)',
    reason="plain convolution on CPU (no epilogue to fuse: oneDNN's convolution is as fast)",
    measurement=Measurement(
        *_CPU_ROUTES,
        "1 thread, forward / forward+backward: conv2d B=64 32->64 3x3 0.86x / 0.95x, conv1d B=512 64->64 k=3 "
        "0.97x / 0.95x",
    ),
)
CONV_NARROW_CPU = Rule(
    name="conv-narrow-cpu",
    op=_CONV,
    device="cpu",
    condition="conv output narrower than 16 columns (full-width kernels, as Caser's)",
    reason="conv output narrower than 16 on CPU (full-width kernels: oneDNN's convolution is as fast)",
    measurement=Measurement(
        *_CPU_ROUTES,
        "Caser's 3x64 / 5x64 filters + relu + max over time, 1 thread: 0.49x / 0.97x forward, but 1.23x / "
        "1.15x forward+backward (the kernel wins training steps there: to re-measure on a quiet machine)",
    ),
)
CONV_TABLE_CUDA = Rule(
    name="conv-table-cuda",
    op=_CONV,
    device="cuda",
    condition="the card's entry in fastrec/conv_dispatch.json for the call's shape class is torch or cudnn",
    reason="host-bound at recommender sizes: torch's unfused ops (or cuDNN + the Triton epilogue) timed faster",
    measurement=Measurement(
        "fastrec bench --family conv --write-dispatch fastrec/conv_dispatch.json, on the card",
        "benchmarks/results/gpu-2026-11-28e-h200/conv_dispatch.json",
        "H200, forward+backward per shape class: torch 0.21-0.69 ms, fused Triton 0.56-2.58 ms, "
        "cuDNN + Triton epilogue 0.57-0.99 ms: all 20 classes to torch (run6-dispatch.log)",
    ),
    per_card=True,
)
# Catalogues below SCORING_DENSE_BELOW items score densely on the CPU, and so do calls of fewer
# than SCORING_SERVING_ROWS rows (serving) below SCORING_SERVING_DENSE_BELOW items.
SCORING_DENSE_BELOW = 20_000
SCORING_SERVING_ROWS = 8
SCORING_SERVING_DENSE_BELOW = 100_000
SCORING_SMALL_CPU = Rule(
    name="scoring-small-cpu",
    op="scoring (functional.topk_scores / target_ranks, recommend(), full-ranking evaluation)",
    device="cpu",
    condition=f"fewer than {SCORING_DENSE_BELOW:,} items, or fewer than {SCORING_SERVING_ROWS} rows and "
    f"{SCORING_SERVING_DENSE_BELOW:,} items",
    reason="small catalogue on CPU (h @ W.T and topk on the whole score matrix are as fast)",
    measurement=Measurement(
        "python benchmarks/bench_scoring.py --items 1682 5000 20000 50000 100000 1000000 --cases topk --rounds 11 "
        "--no-memory (loaded machine)",
        "benchmarks/results/2026-12-07-cpu-scoring.json",
        "top-10 of one row, tiled (cpp) against topk(h @ W.T): 0.49x at 1,682 items, 0.62x at 5k, 0.61x at 20k, "
        "0.87x at 50k, 1.71x at 100k, 1.29x-2.09x at 1M",
    ),
)
_LCE_RESULTS = "benchmarks/results/2026-12-07-cpu-linear-cross-entropy.json"
# Catalogues below this many items run the dense F.cross_entropy(F.linear(h, W)) on the CPU.
LCE_DENSE_MAX_ITEMS_CPU = 512
LCE_SMALL_CPU = Rule(
    name="linear-cross-entropy-small-cpu",
    op="linear_cross_entropy (functional.linear_cross_entropy, fastrec.nn.LinearCrossEntropyLoss)",
    device="cpu",
    condition=f"fewer than {LCE_DENSE_MAX_ITEMS_CPU} items (ML-100K's 1,682 run fused: 2.1x faster)",
    reason="small catalogue on CPU (torch's dense linear + cross_entropy is as fast there)",
    measurement=Measurement(
        "python benchmarks/bench_linear_cross_entropy.py --json " + _LCE_RESULTS,
        _LCE_RESULTS,
        "512 rows, d=64, fp32 forward+backward, fused against dense, 2 threads on a loaded machine: 256 items "
        "0.99x, 1,682 items 2.09x, 4,096 1.29x, 16,384 1.53x",
    ),
)
RULES: tuple[Rule, ...] = (
    RNN_LSTM_CPU,
    RNN_PACKED_CUDA,
    RNN_FP32_CUDA,
    RNN_CELL_CUDA,
    DROPOUT_CUDA,
    CONV_PLAIN_CPU,
    CONV_NARROW_CPU,
    CONV_TABLE_CUDA,
    SCORING_SMALL_CPU,
    LCE_SMALL_CPU,
)

# What fastrec.stats() records for the conv table's two routes.
CONV_TABLE_CUDNN = "cudnn convolution + triton epilogue (dispatch table)"
CONV_TABLE_TORCH = "torch's convolution and epilogue ops (dispatch table)"
# Per dtype, so that the hot path formats nothing.
_RNN_FP32_CUDA_STATS = {dtype: f"{dtype} on CUDA ({RNN_FP32_CUDA.reason})" for dtype in (torch.float32, torch.float64)}


# --------------------------------------------------------------------------- predicates (per call)
def rnn(mode: str, data: Tensor, packed: bool) -> str | None:
    """The route of one ``fastrec.nn.RNN/GRU/LSTM`` call (``mode``: the module's, e.g. "LSTM";
    ``data``: the input, or a PackedSequence's data), or None."""
    device = data.device.type
    if device == "cuda" and backends.forced() is None:
        return RNN_PACKED_CUDA.reason if packed else _RNN_FP32_CUDA_STATS.get(data.dtype)
    if device == "cpu" and mode == "LSTM" and not packed and backends.forced() is None:
        return RNN_LSTM_CPU.reason
    return None


def rnn_lengths(data: Tensor) -> str | None:
    """The route of a padded CUDA recurrence whose caller can run it either way (GRU4Rec's fastrec
    backend): cuDNN's padded RNN and a gather of each row's last output, or the Triton recurrence
    with device ``lengths`` (its final state is that output; no host sync). ``rnn-fp32-cuda`` on
    the dtype the recurrence runs in: autocast's when it is on (16-bit: Triton), else ``data``'s."""
    if data.device.type != "cuda" or backends.forced() is not None:
        return None
    return _RNN_FP32_CUDA_STATS.get(backends.autocast_dtype("cuda") or data.dtype)


def rnn_cell(x: Tensor) -> str | None:
    """The route of one cell step on ``x``, or None."""
    return RNN_CELL_CUDA.reason if x.is_cuda and backends.forced() is None else None


def dropout(x: Tensor) -> str | None:
    """The route of one dropout call without a seed, or None (seeded calls are never routed: the
    caller asked for fastrec's masks)."""
    return DROPOUT_CUDA.reason if x.is_cuda and backends.forced() is None else None


def conv(x: Tensor, act: str, pool, conv_width: int) -> str | None:
    """The CPU route of one conv call (``conv_width``: the conv output's width, before the pool),
    or None. The CUDA route is the per-card table (``fastrec.ops.conv.conv_path``)."""
    if x.device.type == "cpu" and backends.forced() is None:
        if act == "none" and tuple(pool) == (1, 1):
            return CONV_PLAIN_CPU.reason
        if conv_width < 16:
            return CONV_NARROW_CPU.reason
    return None


def scoring(h: Tensor, W: Tensor) -> str | None:
    """The route of one top-k or target-rank call of ``h`` (B, d) against ``W`` (V, d), or None."""
    if h.device.type == "cpu" and backends.forced() is None:
        items = W.shape[0]
        if items < SCORING_DENSE_BELOW or (h.shape[0] < SCORING_SERVING_ROWS and items < SCORING_SERVING_DENSE_BELOW):
            return SCORING_SMALL_CPU.reason
    return None


def linear_cross_entropy(h: Tensor, W: Tensor) -> str | None:
    """The route of one ``linear_cross_entropy`` call on h and the weight W ``(V, d)``, or None."""
    if h.device.type == "cpu" and W.shape[0] < LCE_DENSE_MAX_ITEMS_CPU and backends.forced() is None:
        return LCE_SMALL_CPU.reason
    return None


# --------------------------------------------------------------------------- the table
def _card(device: torch.device) -> str | None:
    """The name of CUDA ``device`` (its index, else the current one), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return backends.card_name(device.index if device.index is not None else torch.cuda.current_device())


def _table_detail(card: str | None) -> tuple[bool, str]:
    """Whether the conv table routes any shape class on ``card``, and how many to each path."""
    from fastrec.ops import conv as conv_ops

    table = conv_ops.dispatch_table()
    if card is None:
        return False, f"cards in the table: {', '.join(sorted(table)) or 'none'}"
    classes = table.get(card)
    if not classes:
        return False, f"{card}: not in the table (every shape class runs the fused Triton conv)"
    counts = {path: sum(1 for p in classes.values() if p == path) for path in conv_ops.CONV_PATHS}
    routed = counts["torch"] + counts["cudnn"]
    detail = ", ".join(f"{n} to {path}" for path, n in counts.items())
    return routed > 0, f"{card}: {len(classes)} shape classes measured: {detail}"


def routes(device: str | torch.device, card: str | None = None) -> list[dict[str, object]]:
    """Every rule as a dict for ``device``: the rule's fields, its measurement's (``command``,
    ``results``, ``figures``; None when unmeasured) and ``applies`` (whether the rule can route a
    call on this device when no backend is forced; per-card rules: on ``card``, by default the
    device's card, named in ``card_detail``)."""
    device = torch.device(device)
    device_type = device.type
    if card is None and device_type == "cuda":
        card = _card(device)
    rows = []
    for rule in RULES:
        applies, detail = rule.device == device_type, None
        if rule.per_card:
            on_card, detail = _table_detail(card if device_type == "cuda" else None)
            applies = applies and on_card
        m = rule.measurement
        rows.append(
            {
                "name": rule.name,
                "op": rule.op,
                "device": rule.device,
                "applies": applies,
                "condition": rule.condition,
                "reason": rule.reason,
                "command": m.command if m else None,
                "results": m.results if m else None,
                "figures": m.figures if m else None,
                "card_detail": detail,
            }
        )
    return rows
