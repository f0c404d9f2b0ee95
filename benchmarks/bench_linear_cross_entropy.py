"""Linear cross-entropy at catalogue sizes: fastrec's fused op against torch's two paths.

    python benchmarks/bench_linear_cross_entropy.py --json benchmarks/results/2026-12-07-cpu-linear-cross-entropy.json

One training step of the loss alone (forward + backward into h and W), fp32, d=64, each path in
its own subprocess, one at a time: ``dense`` is ``F.cross_entropy(h @ W.T, target)`` (the
logits materialised), ``chunked`` is torch's ``F.linear_cross_entropy(..., options=
LinearCrossEntropyOptions())`` (row chunks), ``fused`` is ``fastrec.functional.linear_cross_entropy``
on the forced cpp backend (CPU) or triton (CUDA), ``routed`` the same call unforced (what a user
gets: torch's dense path below the routing threshold). Reported per path: the median of
``--reps`` timed steps after one untimed step, and the peak memory above the inputs as process
RSS growth over that first step (gradients included; after a tiny warm-up step, so that
library start-up is not counted). Paths that cannot fit (the dense logits at
6,400 x 1M are 26 GB, 75 GB with their gradient) or would take minutes are skipped, as listed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

DIM = 64
PATHS = ("dense", "chunked", "fused", "routed")
# (rows, items, paths): the bars' shapes, then the routing sweep at ML-100K's 1,682 items and up.
CASES = [
    (512, 1_682, PATHS),
    (512, 4_096, ("dense", "fused")),
    (512, 8_192, ("dense", "fused")),
    (512, 16_384, ("dense", "fused")),
    (512, 100_000, ("dense", "chunked", "fused")),
    (512, 1_000_000, ("dense", "chunked", "fused")),
    (6_400, 1_000_000, ("fused",)),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _step(path: str, h: torch.Tensor, W: torch.Tensor, target: torch.Tensor) -> None:
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


def measure(path: str, rows: int, items: int, reps: int, device: str = "cpu") -> dict:
    """Time ``reps`` steps of ``path`` after one untimed step, and the RSS growth of that step."""
    torch.manual_seed(0)
    warm = torch.randn(64, DIM, device=device, requires_grad=True)
    warm_w = torch.randn(300, DIM, device=device, requires_grad=True)
    _step(path, warm, warm_w, torch.randint(0, 300, (64,), device=device))
    h = torch.randn(rows, DIM, device=device, requires_grad=True)
    W = (torch.randn(items, DIM, device=device) * 0.1).requires_grad_()
    target = torch.randint(0, items, (rows,), device=device)
    base = _peak_rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    _step(path, h, W, target)
    grown = _peak_rss_mb() - base
    out = {"path": path, "rows": rows, "items": items, "dim": DIM, "rss_growth_mb": round(grown, 1)}
    if device == "cuda":
        out["cuda_peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base_cuda) / 2**20, 1)
    times = []
    for _ in range(reps):
        h.grad = W.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _step(path, h, W, target)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["times_s"] = [round(t, 4) for t in times]
    out["median_s"] = round(statistics.median(times), 4)
    return out


def _run_worker(path: str, rows: int, items: int, reps: int, timeout: float, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, str(rows), str(items), str(reps), "--device", device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"path": path, "rows": rows, "items": items, "skipped": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"path": path, "rows": rows, "items": items, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per path and shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "ROWS", "ITEMS", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        path, rows, items, reps = args.worker
        print(json.dumps(measure(path, int(rows), int(items), int(reps), args.device)))
        return
    results = []
    for rows, items, paths in CASES:
        by_path = {}
        for path in paths:
            reps = 1 if (path, items) in (("chunked", 1_000_000), ("dense", 1_000_000)) else args.reps
            reps = 3 * reps if items < 100_000 else reps  # short steps: more of them on a loaded machine
            r = _run_worker(path, rows, items, reps, args.timeout, args.device)
            by_path[path] = r
            results.append(r)
            print(json.dumps(r), flush=True)
        fused = by_path.get("fused", {}).get("median_s")
        for other in ("dense", "chunked"):
            t = by_path.get(other, {}).get("median_s")
            if fused and t:
                print(f"  {rows} x {items}: fused {t / fused:.2f}x faster than {other}", flush=True)
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
    for path in ("dense", "fused"):
        r = measure(path, 8, 300, 1)
        assert r["median_s"] > 0 and r["rows"] == 8


if __name__ == "__main__":
    main()
