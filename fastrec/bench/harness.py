"""The timing harness of ``fastrec bench``: cases, rows, timing, the record of what ran, output.

Every row times fastrec and its baselines in the same process, interleaved round by round, and
reports the median per call. On CUDA the inputs rotate through several copies so that the L2
cache flatters no side, and each figure also gets its fraction of the card's measured memory
bandwidth and bf16 matmul rate.

Each row also records what ran on each side during the timed calls, from ``fastrec.stats()``:
which backend's kernel (``triton``, ``cpp``) or which route to torch's own op. A row whose
fastrec side ran torch's op is shown as routed (its ratio is torch against torch); after it the
same row runs with the device's kernel forced (where the case allows), and a forced row whose
kernel did not run every counted call fails. On CUDA each side's longest GPU kernels in one
profiled call are recorded too (which implementation torch's side ran: cuDNN, SDPA's kernels),
and every row names its fastest baseline, the ratio a user choosing between them should read.
"""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import fastrec
from fastrec import backends

FASTREC = "fastrec"  # the side of every case that runs fastrec


def force_backend(backend: str) -> contextlib.AbstractContextManager:
    """How a case forces ``backend`` onto its fastrec side unless it says otherwise."""
    return backends.use_backend(backend)


@dataclass
class Case:
    """One benchmark row: ``fns['fastrec']`` against every other entry of ``fns``.

    ``forced``: the backend this row forces onto its fastrec side (its name says so).
    ``force``: how to force a backend for this case (some ops also need a path chosen).
    ``force_when_routed``: whether a run adds this row with the device's kernel forced when its
    fastrec side routes to torch's op (off where another row already times the kernel, or where
    the kernels cannot run the call).
    """

    family: str
    name: str
    shape: str
    dtype: str
    mode: str  # "forward" or "forward+backward"
    fns: dict[str, Callable[[], object]]
    flops: float = 0.0  # useful floating-point work per call (for the achieved rate)
    bytes: float = 0.0  # minimum memory traffic per call (for the achieved bandwidth)
    forced: str | None = None
    force: Callable[[str], contextlib.AbstractContextManager] = force_backend
    force_when_routed: bool = True

    def forced_onto(self, backend: str) -> Case:
        """This case with its fastrec side run inside ``self.force(backend)``, named so."""
        run, force = self.fns[FASTREC], self.force

        def forced_run() -> object:
            with force(backend):
                return run()

        fns = {**self.fns, FASTREC: forced_run}
        return replace(self, name=f"{self.name}, {backend} forced", fns=fns, forced=backend, force_when_routed=False)


@dataclass
class Row:
    """One measured case: times per side, ratios, and what ran on each side."""

    family: str
    name: str
    shape: str
    dtype: str
    mode: str
    ms: dict[str, float]
    speedup: dict[str, float] = field(default_factory=dict)  # baseline ms / fastrec ms
    tflops: float | None = None
    bandwidth_fraction: float | None = None
    flops_fraction: float | None = None
    paths: dict[str, str] = field(default_factory=dict)  # side -> what ran in its timed calls
    kernels: dict[str, list[str]] = field(default_factory=dict)  # side -> its longest GPU kernels (CUDA)
    fastest: str | None = None  # the baseline with the lowest time: the ratio a user should read
    routed: str | None = None  # the fastrec side ran torch's op: "all" its calls, "partly", or None
    forced: str | None = None
    error: str | None = None


# --------------------------------------------------------------------------- inputs and calls
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def input_copies(device: torch.device) -> int:
    """How many input sets a case rotates through: enough to defeat the L2 cache on CUDA."""
    return 4 if device.type == "cuda" else 1


def rotating(make: Callable[[], tuple], copies: int) -> Callable[[], tuple]:
    """Cycles through ``copies`` input sets made by ``make`` (L2-cache rotation on GPU)."""
    pool = [make() for _ in range(copies)]
    state = {"next": 0}

    def draw() -> tuple:
        index = state["next"]
        state["next"] = (index + 1) % copies
        return pool[index]

    return draw


def padding_mask(
    batch: int, length: int, fraction: float, left: bool, device: torch.device, gen: torch.Generator
) -> torch.Tensor:
    """Bool (batch, length), True = padding; each row padded by up to ``2 * fraction`` of L."""
    pad = (torch.rand(batch, generator=gen) * 2 * fraction * length).long().clamp(max=length - 1)
    positions = torch.arange(length)
    mask = positions[None, :] < pad[:, None] if left else positions[None, :] >= (length - pad)[:, None]
    return mask.to(device)


def forward_only(forward: Callable, inputs: Callable[[], tuple]) -> Callable[[], object]:
    def run() -> object:
        tensors, _ = inputs()
        with torch.no_grad():
            return forward(*tensors)

    return run


def training_step(forward: Callable, inputs: Callable[[], tuple], params: tuple = ()) -> Callable[[], object]:
    """Forward, then the gradients of every input and parameter for a random upstream grad."""

    def run() -> object:
        tensors, grad = inputs()
        out = forward(*tensors)
        return torch.autograd.grad(out, (*tensors, *params), grad)

    return run


def pair(
    family: str,
    name: str,
    shape: str,
    dtype: torch.dtype,
    forwards: dict[str, Callable],
    inputs: Callable[[], tuple],
    flops: float,
    io: float,
    params: dict[str, tuple] | None = None,
    inference: dict[str, Callable] | None = None,
    side_inputs: dict[str, Callable[[], tuple]] | None = None,
    **options,
) -> list[Case]:
    """A forward row (``inference`` functions if given, under no_grad) and a forward+backward
    row for the same inputs; ``side_inputs`` gives a side its own inputs (another dtype, e.g.
    an fp32 baseline of a bf16 row); ``options`` are Case fields."""
    params, side_inputs = params or {}, side_inputs or {}
    fwd = {k: forward_only(f, side_inputs.get(k, inputs)) for k, f in (inference or forwards).items()}
    train = {k: training_step(f, side_inputs.get(k, inputs), params.get(k, ())) for k, f in forwards.items()}
    dtype_text = dtype_name(dtype)
    return [
        Case(family, name, shape, dtype_text, "forward", fwd, flops, io, **options),
        Case(family, name, shape, dtype_text, "forward+backward", train, flops * 3.5, io * 2.5, **options),
    ]


# --------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    min_round_s: float,
    counts: dict[str, Counter] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each function, alternating them round by round.

    With ``counts``, each function's ``fastrec.stats()`` entries over its timed calls are added
    to ``counts[name]`` (read between a function's calls and the clock, never inside them).
    """
    calls: dict[str, int] = {}
    for name, fn in fns.items():  # warm up (and compile/tune), then size a round
        fn()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - start, 1e-6)
        calls[name] = max(1, min(1000, int(min_round_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            before = backends.stats() if counts is not None else {}
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3 / calls[name])
            if counts is not None:
                counts.setdefault(name, Counter()).update(Counter(backends.stats()) - Counter(before))
    return {name: statistics.median(s) for name, s in samples.items()}


# --------------------------------------------------------------------------- what ran
def path_label(counts: Counter) -> str:
    """What ran, from ``fastrec.stats()`` entries: ``"cpp rnn"``, ``"torch LSTM (reason)"``, ...;
    ``"torch"`` when no fastrec op was counted (torch's own ops)."""
    if not counts:
        return "torch"
    return "; ".join(
        f"{backend} {op}" + (f" ({reason})" if reason else "") for (op, backend, reason), _ in counts.most_common()
    )


def routed(counts: Counter, forced: str | None) -> str | None:
    """Whether a fastrec side ran torch's op: ``"all"`` (no fastrec op counted, or every call
    counted on ``torch``), ``"partly"``, or None; None too where the row forces fastrec's torch
    backend."""
    on_torch = [backend == "torch" for _, backend, _ in counts]
    if forced == "torch" or (counts and not any(on_torch)):
        return None
    return "all" if all(on_torch) else "partly"


def forced_mismatch(counts: Counter, backend: str) -> str | None:
    """What ran instead of ``backend``'s kernels, or None when they ran every counted call
    (counted on ``backend`` with no fallback reason)."""
    if not counts:
        return "no fastrec op ran"
    others = Counter({key: n for key, n in counts.items() if key[1] != backend or key[2]})
    return path_label(others) if others else None


def kernel_backend(device: torch.device) -> str | None:
    """The backend whose kernels serve ``device`` (``triton`` on CUDA, ``cpp`` on the CPU), or
    None when it cannot run here."""
    name = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    return name if name is not None and backends.available()[name] is None else None


def longest_kernels(events: Iterable[tuple[str, float]], top: int = 3) -> list[str]:
    """The names of the ``top`` kernels with the most GPU time from ``(name, time)`` pairs (one
    profiled call), each name cut to 60 characters: which implementation a side ran (cuDNN's
    persistent RNN, SDPA's efficient or math kernels, a Triton kernel)."""
    totals: Counter = Counter()
    for name, spent in events:
        if spent > 0:
            totals[name] += spent
    return [name[:60] for name, _ in totals.most_common(top)]


def profiled_kernels(fn: Callable[[], object], device: torch.device) -> list[str]:
    """:func:`longest_kernels` of one call of ``fn`` under torch.profiler (CUDA only; [] on the
    CPU, where the op names are already in ``paths`` and the profiler costs seconds)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    return longest_kernels((e.key, e.device_time_total) for e in events if e.device_type.name == "CUDA")


def measure(case: Case, device: torch.device, rounds: int, min_round_s: float, ceilings: dict[str, float]) -> Row:
    """Time ``case`` and record what ran on each side. A forced row whose kernel did not run
    (or that raised) comes back with ``error`` set, naming what ran."""
    row = Row(case.family, case.name, case.shape, case.dtype, case.mode, {}, forced=case.forced)
    counts: dict[str, Counter] = {}
    try:
        row.ms = time_interleaved(case.fns, device, rounds, min_round_s, counts)
    except Exception as error:
        if case.forced is None:
            raise
        row.ms = {side: math.nan for side in case.fns}
        row.error = f"{case.forced} forced, but the call failed: {type(error).__name__}: {error}"
        return row
    row.paths = {side: path_label(counts.get(side, Counter())) for side in case.fns}
    ours = counts.get(FASTREC, Counter())
    row.routed = routed(ours, case.forced)
    if case.forced is not None and (ran := forced_mismatch(ours, case.forced)) is not None:
        row.error = f"{case.forced} forced, but ran: {ran}"
    row.speedup = {k: v / row.ms[FASTREC] for k, v in row.ms.items() if k != FASTREC}
    row.fastest = min(row.speedup, key=row.speedup.__getitem__, default=None)
    row.kernels = {side: kernels for side, fn in case.fns.items() if (kernels := profiled_kernels(fn, device))}
    seconds = row.ms[FASTREC] * 1e-3
    if case.flops:
        row.tflops = case.flops / seconds / 1e12
    if ceilings:
        row.bandwidth_fraction = case.bytes / seconds / ceilings["bandwidth"]
        row.flops_fraction = case.flops / seconds / ceilings["bf16_flops"]
    return row


# --------------------------------------------------------------------------- the run
def ceilings(device: torch.device) -> dict[str, float]:
    """The card's measured copy bandwidth (bytes/s, read + write) and bf16 matmul rate."""
    if device.type != "cuda":
        return {}
    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_interleaved({"copy": lambda: dst.copy_(src)}, device, 5, 0.05)["copy"]
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = time_interleaved({"mm": lambda: a @ a}, device, 5, 0.05)["mm"]
    return {"bandwidth": 2 * src.numel() * 4 / (copy_ms * 1e-3), "bf16_flops": 2 * 8192**3 / (mm_ms * 1e-3)}


def environment(device: torch.device) -> dict[str, object]:
    """The machine, versions, commit and date a report was measured with."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastrec": fastrec.__version__,
        "commit": commit,
        "backends": {k: v or "available" for k, v in backends.available().items()},
        "date": time.strftime("%Y-%m-%d"),
    }


def measured_rows(
    cases: Iterable[Case], device: torch.device, rounds: int, min_round_s: float, ceilings: dict[str, float]
) -> Iterator[Row]:
    """Each case's row; after a row whose fastrec side routed to torch's op, the same case with
    the device's kernel forced (where the case allows it)."""
    kernel = kernel_backend(device)
    for case in cases:
        row = measure(case, device, rounds, min_round_s, ceilings)
        yield row
        if row.routed and case.force_when_routed and case.forced is None and kernel is not None:
            yield measure(case.forced_onto(kernel), device, rounds, min_round_s, ceilings)


def run(
    cases: Iterable[Case],
    device: torch.device,
    rounds: int,
    min_round_s: float,
    progress: Callable[[Row], None] | None = None,
) -> dict[str, object]:
    """Measure ``cases`` (built lazily, one at a time) into a report: environment, ceilings, rows."""
    limits = ceilings(device)
    rows: list[Row] = []
    for row in measured_rows(cases, device, rounds, min_round_s, limits):
        rows.append(row)
        if progress:
            progress(row)
    return {"environment": environment(device), "ceilings": limits, "results": [asdict(r) for r in rows]}


def failed(report: dict) -> bool:
    """Whether any row failed (an error, or a time that is not finite)."""
    rows = report["results"]
    return any(r["error"] or not all(math.isfinite(v) for v in r["ms"].values()) for r in rows)


# --------------------------------------------------------------------------- output
def ratios(row: dict) -> str:
    """The speedup cell: ratios first, marked where fastrec's side ran torch's op or failed."""
    if row["error"]:
        return f"FAILED: {row['error']}"
    text = ", ".join(f"{v:.2f}x vs {k}" for k, v in row["speedup"].items())
    if len(row["speedup"]) > 1 and row.get("fastest"):
        text += f" (fastest baseline: {row['fastest']})"
    if row["routed"] is None:
        return text
    return f"routed: {text} ({'torch vs torch' if row['routed'] == 'all' else 'fastrec partly torch'})"


def ran(row: dict) -> str:
    """The 'ran' cell: fastrec's side (``routed:`` where it ran torch's op), then any baseline
    that did not run torch's own ops alone."""
    ours = row["paths"].get(FASTREC, "not run")
    cell = ours if row["routed"] is None else f"routed: {ours}"
    others = [f"{side}: {path}" for side, path in row["paths"].items() if side != FASTREC and path != "torch"]
    return "; ".join([cell, *others])


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"fastrec {env['fastrec']} @ {env['commit']} on {env['device']} ({env['cpu_threads']} threads), "
        f"torch {env['torch']}, triton {env['triton']}, {env['date']}",
        "",
        "| family | case | shape | dtype | mode | speedup (baseline / fastrec) | fastrec ms | baseline ms | util "
        "| fastrec ran |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        base = ", ".join(f"{k} {v:.3f}" for k, v in r["ms"].items() if k != FASTREC)
        util = ""
        if r["bandwidth_fraction"] is not None:
            util = f"{100 * r['bandwidth_fraction']:.0f}% BW, {100 * r['flops_fraction']:.0f}% bf16 MMA"
        elif r["tflops"] is not None:
            util = f"{r['tflops'] * 1e3:.1f} GFLOP/s"
        lines.append(
            f"| {r['family']} | {r['name']} | {r['shape']} | {r['dtype']} | {r['mode']} | {ratios(r)} | "
            f"{r['ms'][FASTREC]:.3f} | {base} | {util} | {ran(r)} |"
        )
    return "\n".join(lines)


def progress_line(row: dict) -> str:
    """One row as the run prints it when measured."""
    head = f"{row['family']:10s} {row['name']:18s} {row['shape']:40s} {row['dtype']:9s} {row['mode']:17s}"
    return f"{head} {ratios(row)}  [{ran(row)}]"
