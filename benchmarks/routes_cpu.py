"""The measurements behind the CPU routes of ``fastrec.routing``: each route's two sides timed.

    python benchmarks/routes_cpu.py --json benchmarks/results/<date>-cpu-routes.json

For each CPU rule, fastrec's C++ kernel (forced with ``use_backend("cpp")``, which bypasses the
routes) against the torch op the route runs, forward and forward+backward, fp32, interleaved
medians (``fastrec.bench.harness.time_interleaved``) at 1 and 2 threads. Ratio = torch ms / fastrec ms:
above 1, the kernel is faster and the route should go.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastrec import backends
from fastrec import functional as FF
from fastrec import nn as fnn
from fastrec.bench import harness as bench


def _forward_backward(forward: Callable, inputs: tuple, grad: torch.Tensor) -> Callable[[], object]:
    def step() -> None:
        forward(*inputs).backward(grad)

    return step


def _lstm_case() -> tuple[str, str, Callable, Callable, tuple]:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(64, 64, batch_first=True)
    ours = fnn.LSTM(64, 64, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(128, 50, 64, requires_grad=True)
    return "rnn-lstm-cpu", "LSTM B=128 T=50 64/64 padded", lambda x: ours(x)[0], lambda x: ref(x)[0], (x,)


def _conv_cases() -> list[tuple[str, str, Callable, Callable, tuple]]:
    torch.manual_seed(0)
    cases = []
    x2 = torch.randn(64, 32, 32, 32, requires_grad=True)
    w2 = torch.randn(64, 32, 3, 3, requires_grad=True)
    b2 = torch.randn(64, requires_grad=True)
    cases.append(
        (
            "conv-plain-cpu",
            "conv2d B=64 32->64 3x3 pad 1 32x32, no act, no pool",
            lambda x, w, b: FF.conv2d(x, w, b, padding=1),
            lambda x, w, b: F.conv2d(x, w, b, padding=1),
            (x2, w2, b2),
        )
    )
    x1 = torch.randn(512, 64, 50, requires_grad=True)
    w1 = torch.randn(64, 64, 3, requires_grad=True)
    b1 = torch.randn(64, requires_grad=True)
    cases.append(
        (
            "conv-plain-cpu",
            "conv1d B=512 d=64 L=50 k=3, no act, no pool",
            lambda x, w, b: FF.conv1d(x, w, b),
            lambda x, w, b: F.conv1d(x, w, b),
            (x1, w1, b1),
        )
    )
    # Caser's horizontal filters: a (h, d) kernel over (B, 1, L, d), output width 1, max over time.
    for length, height in ((10, 3), (50, 5)):
        xc = torch.randn(512, 1, length, 64, requires_grad=True)
        wc = torch.randn(16, 1, height, 64, requires_grad=True)
        bc = torch.randn(16, requires_grad=True)
        pool = (length - height + 1, 1)
        cases.append(
            (
                "conv-narrow-cpu",
                f"Caser conv2d B=512 1->16 {height}x64 over {length}x64, relu, max over time",
                lambda x, w, b, pool=pool: FF.conv2d(x, w, b, act="relu", pool=pool),
                lambda x, w, b, pool=pool: F.max_pool2d(F.relu(F.conv2d(x, w, b)), pool),
                (xc, wc, bc),
            )
        )
    return cases


def measure(threads: int, rounds: int, min_round_s: float) -> list[dict[str, object]]:
    """Every case at ``threads`` threads: one row per (case, mode)."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    rows = []
    for rule, shape, ours, ref, inputs in [_lstm_case(), *_conv_cases()]:

        def fastrec_side(*args, ours=ours):
            with backends.use_backend("cpp"):
                return ours(*args)

        grad = torch.randn_like(ref(*inputs))
        for mode in ("forward", "forward+backward"):
            if mode == "forward":
                fns = {
                    "fastrec": lambda f=fastrec_side, a=inputs: f(*a),
                    "torch": lambda f=ref, a=inputs: f(*a),
                }
            else:
                fns = {
                    "fastrec": _forward_backward(fastrec_side, inputs, grad),
                    "torch": _forward_backward(ref, inputs, grad),
                }
            with torch.set_grad_enabled(mode != "forward"):
                ms = bench.time_interleaved(fns, cpu, rounds, min_round_s)
            ratio = ms["torch"] / ms["fastrec"]
            row = {
                "rule": rule,
                "shape": shape,
                "mode": mode,
                "threads": threads,
                **{f"{k}_ms": v for k, v in ms.items()},
            }
            rows.append({**row, "ratio": ratio})
            print(f"{rule:16s} {shape:62s} {mode:17s} {threads} thr  {ratio:5.2f}x  "
                  f"fastrec {ms['fastrec']:8.3f} ms  torch {ms['torch']:8.3f} ms", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows and the machine here")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-round-s", type=float, default=0.05)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [row for t in args.threads for row in measure(t, args.rounds, args.min_round_s)]
    if args.json:
        env = bench.environment(torch.device("cpu"))
        env.update(python=platform.python_version(), load_average=[load_before, os.getloadavg()])
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
