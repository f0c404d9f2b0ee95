"""Linear cross-entropy at catalogue sizes: fastrec's fused op against torch's two paths.

    python benchmarks/bench_linear_cross_entropy.py --json benchmarks/results/2026-12-07-cpu-linear-cross-entropy.json

One training step of the loss alone (forward + backward into h and W), fp32, d=64:
``dense`` is ``F.cross_entropy(h @ W.T, target)`` (the logits materialised), ``chunked`` is
torch's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` (row chunks),
``fused`` is ``fastrec.functional.linear_cross_entropy`` on the forced cpp backend (CPU) or
triton (CUDA), ``routed`` the same call unforced (what a user gets: torch's dense path below the
routing threshold). Reported per path: the peak memory above the inputs as process RSS growth
over one step (gradients included; the peak reset to the current RSS just before it, Linux's
clear_refs), each path in a fresh subprocess; and the median step time, the paths timed in one
process, interleaved rep by rep (ratios hold on a loaded machine). A path whose one step exceeds
``--timeout``, or would by its time at a smaller catalogue scaled by the item count, is skipped;
the dense path is not run at 6,400 x 1M (its logits are 26 GB, 75 GB with their gradient).

``--sasrec``: one SASRec all-positions training step (forward + backward, B=128, L=50, d=64, the
full-catalogue ``ce`` loss) instead: ``sasrec-fused`` (the fastrec model, its loss on the fused
op), ``sasrec-dense`` (the torch backend's model with the loss forced onto torch's dense
``F.cross_entropy(F.linear(...))``), at 100k items (both) and 1M items (fused only: the dense
logits would be 26 GB); the same memory and interleaved timing.

The arithmetic floor (``floor`` in the rows of 100k items and more): any exact method that keeps
no logits computes each logit twice (the log-sum-exp must be complete before any gradient term
exists), so its GEMM work is four ``rows x items x d`` products: the logits, their recomputation,
``dh`` and ``dW``. ``floor_s`` is that work at the machine's best GEMM rate, four 2048^3 fp32
``torch.mm`` into one output, timed interleaved with the paths (so load slows it alike), exp and
memory traffic free; ``dense_over_floor`` is the largest speed-up over the dense path such a method can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

DIM = 64
PATHS = ("dense", "chunked", "fused", "routed")
# (rows, items, paths): the bars' shapes and a sweep of small catalogues for the routing rule.
CASES = [
    (512, 256, ("dense", "fused")),
    (512, 1_682, PATHS),
    (512, 4_096, ("dense", "fused")),
    (512, 8_192, ("dense", "fused")),
    (512, 16_384, ("dense", "fused")),
    (512, 100_000, ("dense", "chunked", "fused", "floor")),
    (512, 1_000_000, ("dense", "chunked", "fused", "floor")),
    (6_400, 1_000_000, ("fused", "floor")),
]


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); return it in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


SASREC_CASES = [(100_000, ("sasrec-fused", "sasrec-dense", "floor")), (1_000_000, ("sasrec-fused", "floor"))]
SASREC_BATCH, SASREC_LEN = 128, 50


def _sasrec_inputs(path: str, items: int, device: str) -> tuple:
    """(model, batch): SASRec on ``items`` items (the fastrec or the torch backend) and a batch of
    full-length random histories with every position's next item as target."""
    from fastrec.models import MODELS
    from fastrec.models.base import ModelInput

    torch.manual_seed(0)
    backend = "torch" if path == "sasrec-dense" else "fastrec"
    model = MODELS["sasrec"](items, backend=backend, max_len=SASREC_LEN, dim=DIM).to(device).train()
    seqs = torch.randint(1, items + 1, (SASREC_BATCH, SASREC_LEN + 1), device=device)
    lengths = torch.full((SASREC_BATCH,), SASREC_LEN, device=device)
    return model, ModelInput(seqs[:, :-1], lengths, None, seqs[:, 1:])


def _sasrec_step(path: str, model: torch.nn.Module, batch) -> None:
    import contextlib

    import fastrec

    model.zero_grad(set_to_none=True)
    with fastrec.use_backend("torch") if path == "sasrec-dense" else contextlib.nullcontext():
        loss = model.loss(batch, "ce")
    loss.backward()


FLOOR_N = 2048  # the square GEMM whose rate is the machine's best
FLOOR_CALLS = 4  # GEMMs per timed floor step: the output is reused, so the rate is the steady one


def _gemm_operands(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(FLOOR_N, FLOOR_N, device=device, generator=gen) for _ in range(3))


def _step(path: str, h, W, target=None) -> None:
    if path == "floor":
        device = str((h if isinstance(h, torch.Tensor) else next(h.parameters())).device)  # h: a model for SASRec
        a, b, out = _FLOOR_OPERANDS.setdefault(device, _gemm_operands(device))
        for _ in range(FLOOR_CALLS):
            torch.mm(a, b, out=out)
        return
    if path.startswith("sasrec"):
        _sasrec_step(path, h, W)
        return

    import torch.nn.functional as F

    import fastrec
    from fastrec import functional as FF

    if path == "dense":
        loss = F.cross_entropy(h @ W.T, target)
    elif path == "chunked":
        loss = F.linear_cross_entropy(h, W, target, options=torch.nn.LinearCrossEntropyOptions())
    elif path == "fused":
        with fastrec.use_backend("triton" if h.is_cuda else "cpp"):
            loss = FF.linear_cross_entropy(h, W, target)
    else:
        loss = FF.linear_cross_entropy(h, W, target)
    loss.backward()


_FLOOR_OPERANDS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _floor(row: dict) -> None:
    """Adds ``floor_s`` and the ratios to it (module docstring) to a timed row."""
    gemm_s = row["paths"]["floor"]["median_s"]
    rate = FLOOR_CALLS * 2 * FLOOR_N**3 / gemm_s
    row["gemm_gflops"] = round(rate / 1e9, 1)
    row["floor_s"] = round(4 * 2 * row["rows"] * row["items"] * row["dim"] / rate, 6)
    prefix = "sasrec-" if "sasrec-fused" in row["paths"] else ""
    for path in ("dense", "fused"):
        median = row["paths"].get(prefix + path, {}).get("median_s")
        if median:
            row[f"{path}_over_floor"] = round(median / row["floor_s"], 2)


def _inputs(rows: int, items: int, device: str, path: str = "") -> tuple:
    if path.startswith("sasrec"):
        return (*_sasrec_inputs(path, items, device), None)
    torch.manual_seed(0)
    h = torch.randn(rows, DIM, device=device, requires_grad=True)
    W = (torch.randn(items, DIM, device=device) * 0.1).requires_grad_()
    return h, W, torch.randint(0, items, (rows,), device=device)


def _timed(path: str, h, W, target) -> float:
    if path != "floor" and not path.startswith("sasrec"):
        h.grad = W.grad = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    _step(path, h, W, target)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory(path: str, rows: int, items: int, device: str = "cpu") -> dict:
    """Peak memory above the inputs of one step of ``path`` (run in a fresh process), after a tiny
    warm-up step so that library start-up is not counted."""
    _step(path, *_inputs(64, 600, device, path))
    h, W, target = _inputs(rows, items, device, path)
    base = _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    seconds = _timed(path, h, W, target)
    out = {"path": path, "rows": rows, "items": items, "rss_growth_mb": round(_status_mb("VmHWM") - base, 1)}
    out["first_step_s"] = round(seconds, 4)
    if device == "cuda":
        out["cuda_peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    return out


def timing(paths: list[str], rows: int, items: int, reps: int, device: str = "cpu") -> dict[str, dict]:
    """Median step time of each path, in this process, the paths interleaved rep by rep (so that
    a loaded machine slows them alike), after one untimed step each."""
    h, W, target = _inputs(rows, items, device, next(p for p in paths if p != "floor"))
    times: dict[str, list[float]] = {path: [] for path in paths}
    for path in paths:
        _timed(path, h, W, target)
    for _ in range(reps):
        for path in paths:
            times[path].append(_timed(path, h, W, target))
    return {
        path: {"times_s": [round(t, 4) for t in ts], "median_s": round(statistics.median(ts), 4)}
        for path, ts in times.items()
    }


def _memory_in_subprocess(path: str, rows: int, items: int, timeout: float, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, str(rows), str(items), "--device", device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"path": path, "rows": rows, "items": items, "skipped": f"one step over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"path": path, "rows": rows, "items": items, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per path (3x for small catalogues)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for one step of a path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sasrec", action="store_true", help="the SASRec training step (module docstring)")
    parser.add_argument("--only", help="comma-separated ROWSxITEMS cases to run (default: all), e.g. 512x1000000")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "ROWS", "ITEMS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        path, rows, items = args.worker
        print(json.dumps(memory(path, int(rows), int(items), args.device)))
        return
    results = []
    seen: dict[tuple[str, int], tuple[int, float]] = {}  # (path, rows) -> (items, one step's s)
    cases = [(SASREC_BATCH * SASREC_LEN, i, p) for i, p in SASREC_CASES] if args.sasrec else CASES
    if args.only:
        wanted = {tuple(int(n) for n in case.split("x")) for case in args.only.split(",")}
        cases = [case for case in cases if case[:2] in wanted]
    for rows, items, paths in cases:
        row = {"rows": rows, "items": items, "dim": DIM, "paths": {}}
        for path in paths:
            if path == "floor":
                row["paths"][path] = {"path": path, "first_step_s": 0.0}
                continue
            if (path, rows) in seen:
                fewer, seconds = seen[(path, rows)]
                predicted = seconds * items / fewer
                if predicted > args.timeout:
                    row["paths"][path] = {"skipped": f"one step predicted {predicted:.0f} s from {fewer} items"}
                    continue
            row["paths"][path] = _memory_in_subprocess(path, rows, items, args.timeout, args.device)
            if "first_step_s" in row["paths"][path]:
                seen[(path, rows)] = (items, row["paths"][path]["first_step_s"])
        # Timed in one process: the paths whose single step fit the time limit, with fewer reps
        # for the slow ones.
        timed = [p for p in paths if "first_step_s" in row["paths"][p]]
        if timed == ["floor"] or not timed:
            results.append(row)
            continue
        slowest = max((row["paths"][p]["first_step_s"] for p in timed), default=0.0)
        reps = args.reps * 3 if items < 100_000 else args.reps
        reps = max(1, min(reps, int(6 * args.timeout / max(slowest * len(timed), 1e-9))))
        for path, t in timing(timed, rows, items, reps, args.device).items():
            row["paths"][path].update(t)
        prefix = "sasrec-" if args.sasrec else ""
        fused = row["paths"].get(prefix + "fused", {}).get("median_s")
        row["speedup"] = {
            other: round(row["paths"][prefix + other]["median_s"] / fused, 2)
            for other in ("dense", "chunked")
            if fused and "median_s" in row["paths"].get(prefix + other, {})
        }
        if "floor" in timed:
            _floor(row)
        dense_mb = row["paths"].get(prefix + "dense", {}).get("rss_growth_mb")
        if dense_mb and "rss_growth_mb" in row["paths"].get(prefix + "fused", {}):
            row["fused_memory_vs_dense"] = round(row["paths"][prefix + "fused"]["rss_growth_mb"] / dense_mb, 3)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        meta = {
            "command": "python benchmarks/bench_linear_cross_entropy.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


def test_bench_runs_tiny():
    """The measurement runs (tiny shape, in process): the script stays runnable."""
    assert memory("fused", 8, 300)["first_step_s"] > 0
    times = timing(["dense", "fused"], 8, 300, 1)
    assert times["dense"]["median_s"] > 0 and times["fused"]["median_s"] > 0
    assert memory("sasrec-fused", 0, 700)["first_step_s"] > 0
    assert timing(["sasrec-fused", "sasrec-dense"], 0, 700, 1)["sasrec-dense"]["median_s"] > 0
    row = {"rows": 8, "items": 300, "dim": DIM, "paths": timing(["dense", "fused", "floor"], 8, 300, 1)}
    _floor(row)
    assert row["floor_s"] > 0 and row["dense_over_floor"] > 0


if __name__ == "__main__":
    main()
