"""Catalogue scoring on the CPU: top-k and full-ranking evaluation in item tiles against the dense
score matrix.

    python benchmarks/bench_scoring.py --json benchmarks/results/2026-12-07-cpu-scoring.json

Cases (d = 64, fp32):
- ``topk``: top-10 of one row (``recommend()`` at batch 1) over the catalogue:
  ``functional.topk_scores`` (tiled, cpp) against ``torch.topk(h @ W.T)``; times are medians of
  ``--rounds`` interleaved rounds in one process.
- ``eval``: full-ranking HR/NDCG/MRR@10 of ``--users`` users, ranks with and without each user's
  ``--seen`` earlier items, as ``fastrec train``'s evaluation computes them: ``metrics.full_ranks``
  (tiled) against ``metrics.target_ranks`` on ``h @ W.T`` (twice, as before). Time: median of
  rounds; memory: peak RSS growth of a fresh subprocess per side (``--memory``), the inputs
  already allocated.
- each case at the ML-100K catalogue (1,682 items) too, where the dense path is what runs by
  default (``fastrec.routing``: the tiled one is forced here to measure the rule).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import fastrec
from fastrec import functional as F
from fastrec import metrics

D = 64


def inputs(users: int, n_items: int, seen: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(users, D, generator=g)
    table = torch.randn(n_items + 1, D, generator=g).mul_(0.1)  # in place: no temporary in the peak RSS
    target = torch.randint(1, n_items + 1, (users,), generator=g)
    rng = np.random.default_rng(seed)
    histories = [rng.integers(1, n_items + 1, size=seen) for _ in range(users)]
    return hidden, table, target, histories


def topk_tiled(hidden, table, k=10):
    with fastrec.use_backend("cpp"):
        return F.topk_scores(hidden, table[1:], k)


def topk_dense(hidden, table, k=10):
    return (hidden @ table[1:].t()).topk(k)


def eval_tiled(hidden, table, target, histories):
    with fastrec.use_backend("cpp"):
        ranks, excluded = metrics.full_ranks(hidden, table, target, exclude=histories)
    return metrics.metrics_from_ranks(ranks, (10,)), metrics.metrics_from_ranks(excluded, (10,))


def eval_dense(hidden, table, target, histories):
    scores = hidden @ table.t()
    scores[:, 0] = float("-inf")
    ranks = metrics.target_ranks(scores, target)
    excluded = metrics.target_ranks(scores, target, exclude=histories)
    return metrics.metrics_from_ranks(ranks, (10,)), metrics.metrics_from_ranks(excluded, (10,))


SIDES = {"topk": (topk_tiled, topk_dense), "eval": (eval_tiled, eval_dense)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(case: str, side: int, users: int, n_items: int, seen: int) -> None:
    """Run one side once in this (fresh) process; print its peak RSS growth in bytes."""
    hidden, table, target, histories = inputs(users, n_items, seen)
    fn = SIDES[case][side]
    args = (hidden, table) if case == "topk" else (hidden, table, target, histories)
    before = _rss_bytes()
    fn(*args)
    peak = _peak_rss_bytes()
    print(json.dumps({"extra_bytes": max(0, peak - before)}))


def measure_memory(case: str, side: int, users: int, n_items: int, seen: int) -> int:
    cmd = [sys.executable, __file__, "--child", case, str(side), str(users), str(n_items), str(seen)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["extra_bytes"]


def time_pair(fns, args, rounds: int) -> list[float]:
    """Median seconds of each function, the functions interleaved round by round (the caller has
    run each once already: the warm-up)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(*args)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(args) -> dict:
    rows = []
    for n_items in args.items:
        for case in args.cases:
            users = 1 if case == "topk" else args.users
            hidden, table, target, histories = inputs(users, n_items, args.seen)
            call_args = (hidden, table) if case == "topk" else (hidden, table, target, histories)
            tiled, dense = SIDES[case]
            if case == "topk":
                a, b = tiled(*call_args), dense(*call_args)
                same = bool(torch.equal(a[1], b.indices))
            else:
                a, b = tiled(*call_args), dense(*call_args)
                same = a == b
            rounds = args.rounds if case == "topk" else args.eval_rounds
            t_tiled, t_dense = time_pair((tiled, dense), call_args, rounds)
            row = {
                "case": case,
                "n_items": n_items,
                "rows": users,
                "d": D,
                "seen": args.seen if case == "eval" else 0,
                "tiled_s": t_tiled,
                "dense_s": t_dense,
                "speedup": t_dense / t_tiled,
                "same_result": same,
                "rounds": rounds,
            }
            if args.memory:
                row["tiled_extra_MB"] = measure_memory(case, 0, users, n_items, args.seen) / 2**20
                row["dense_extra_MB"] = measure_memory(case, 1, users, n_items, args.seen) / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "note": "tiled = fastrec (cpp backend forced); dense = h @ W.T with torch.topk / metrics.target_ranks",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        case, side, users, n_items, seen = argv[1], int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
        memory_child(case, side, users, n_items, seen)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1682, 1_000_000])
    parser.add_argument("--cases", nargs="+", default=["topk", "eval"], choices=sorted(SIDES))
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seen", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eval-rounds", type=int, default=3, help="rounds of the eval case (seconds each at 1M items)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
