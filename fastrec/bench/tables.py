"""The tuning tables ``fastrec bench`` writes on a CUDA card: the conv dispatch table
(``--family conv --write-dispatch PATH``: cuDNN, torch or the fused Triton path per shape class)
and the Triton attention block configs (``--family attention --write-configs PATH``). Each
writer keeps the other cards' entries of the table and checks the table with the parser the
package reads it with."""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

import fastrec
from fastrec import backends
from fastrec.bench.harness import (
    dtype_name,
    environment,
    input_copies,
    padding_mask,
    rotating,
    time_interleaved,
    training_step,
)
from fastrec.ops import conv as conv_ops

# --------------------------------------------------------------------------- conv dispatch table
DISPATCH_MARGIN = 0.03  # cuDNN takes a class only when its summed time is at least 3% lower
# (batch, C_in, C_out, (KH, KW), (H, W), groups, padding, act, pool): recommender convolutions
# (image-style CNN stages, 1x1 channel mixes, a depthwise 3x3, text-CNN / Caser-style 1-D
# convolutions with max over time at k=3 and k=5, Caser's vertical conv), each with its usual
# epilogue. Every shape the bench's conv rows run has a shape here of its class and kernel size
# (tests/test_conv_dispatch.py), so that a class's path is decided by shapes it stands for.
DISPATCH_SHAPES = (
    (64, 3, 32, (3, 3), (32, 32), 1, (1, 1), "relu", (2, 2)),
    (64, 32, 64, (3, 3), (32, 32), 1, (1, 1), "relu", (2, 2)),
    (256, 32, 64, (3, 3), (16, 16), 1, (1, 1), "relu", (2, 2)),
    (64, 64, 128, (3, 3), (16, 16), 1, (1, 1), "relu", (1, 1)),
    (64, 64, 64, (1, 1), (32, 32), 1, (0, 0), "none", (1, 1)),
    (64, 64, 64, (3, 3), (32, 32), 64, (1, 1), "relu", (1, 1)),
    (512, 64, 64, (1, 3), (1, 50), 1, (0, 0), "relu", (1, 48)),
    (512, 64, 64, (1, 5), (1, 50), 1, (0, 0), "relu", (1, 46)),
    (512, 64, 100, (1, 5), (1, 50), 1, (0, 0), "relu", (1, 46)),
    (512, 1, 16, (3, 64), (10, 64), 1, (0, 0), "relu", (8, 1)),
    (512, 1, 4, (10, 1), (10, 64), 1, (0, 0), "none", (1, 1)),
)


def dispatch_class(shape: tuple, dtype: torch.dtype) -> str:
    """The dispatch table's shape class of one DISPATCH_SHAPES entry in ``dtype``."""
    batch, c_in, c_out, kernel, size, groups, padding, _, _ = shape
    w_shape = (c_out, c_in // groups, *kernel)
    out = conv_ops.conv_output_size((batch, c_in, *size), w_shape, (1, 1), padding, (1, 1))
    return conv_ops.shape_class(c_in, c_out, tuple(kernel), tuple(out), groups, dtype)


def _dispatch_case(device, dtype, batch, c_in, c_out, kernel, size, groups, padding, act, pool):
    """(shape class, description, {path: step} for each of conv_ops.CONV_PATHS): forward + every
    gradient of fastrec.functional.conv2d on the triton backend, forced onto each path."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(c_out, c_in // groups, *kernel, generator=gen) / (c_in // groups * kernel[0] * kernel[1]) ** 0.5
    w = w.to(device, dtype).requires_grad_()
    b = torch.randn(c_out, generator=gen).to(device, dtype).requires_grad_()
    out = conv_ops.conv_output_size((batch, c_in, *size), w.shape, (1, 1), padding, (1, 1))

    def make():
        x = torch.randn(batch, c_in, *size, generator=gen).to(device, dtype).requires_grad_()
        grad = torch.randn(batch, c_out, out[0] // pool[0], out[1] // pool[1], generator=gen).to(device, dtype)
        return (x,), grad

    inputs = rotating(make, input_copies(device))

    def forced(path):
        def forward(x):
            with backends.use_backend("triton"), conv_ops.use_conv_path(path):
                return fastrec.functional.conv2d(x, w, b, padding=padding, groups=groups, act=act, pool=pool)

        return training_step(forward, inputs, (w, b))

    key = dispatch_class((batch, c_in, c_out, kernel, size, groups, padding, act, pool), dtype)
    desc = f"B={batch} {c_in}->{c_out} {kernel[0]}x{kernel[1]} {size[0]}x{size[1]} g={groups} {act} pool {pool}"
    return key, desc, {path: forced(path) for path in conv_ops.CONV_PATHS}


def time_dispatch(device: torch.device, dtypes, rounds: int, min_round_s: float, progress=None) -> list[dict]:
    """Interleaved medians (ms) of the paths, forward + backward, per DISPATCH_SHAPES x dtype."""
    rows = []
    for dtype in dtypes:
        for shape in DISPATCH_SHAPES:
            key, desc, fns = _dispatch_case(device, dtype, *shape)
            ms = time_interleaved(fns, device, rounds, min_round_s)
            row = {"class": key, "shape": desc, "spec": json.loads(json.dumps(shape)), "dtype": dtype_name(dtype)}
            row.update({f"{k}_ms": v for k, v in ms.items()})
            rows.append(row)
            if progress:
                progress(row)
    return rows


def select_dispatch(rows: list[dict], margin: float = DISPATCH_MARGIN) -> dict[str, dict]:
    """Per shape class: each path's times summed over its measured shapes, the path (the fastest
    one where its sum is below (1 - margin) x the fused Triton path's, otherwise "triton") and
    the DISPATCH_SHAPES entries it was timed at (``shapes``, where the rows carry ``spec``)."""
    sums: dict[str, dict[str, float]] = {}
    shapes: dict[str, list] = {}
    for row in rows:
        if "spec" in row:
            shapes.setdefault(row["class"], []).append(row["spec"])
        total = sums.setdefault(row["class"], {})
        for path in conv_ops.CONV_PATHS:
            if f"{path}_ms" in row:
                total[path] = total.get(path, 0.0) + row[f"{path}_ms"]
    classes = {}
    for key, times in sorted(sums.items()):
        best = min(times, key=times.__getitem__)
        path = best if times[best] < times["triton"] * (1 - margin) else "triton"
        classes[key] = {"path": path, **{f"{p}_ms": round(t, 4) for p, t in times.items()}}
        if key in shapes:
            classes[key]["shapes"] = shapes[key]
    return classes


def write_dispatch(path: str | Path, card: str, classes: dict[str, dict], env: dict) -> dict:
    """Write ``classes`` as ``card``'s entry of the table at ``path`` (other cards kept), in the
    format fastrec.ops.conv.parse_dispatch reads; returns the whole table."""
    empty = {"version": conv_ops.DISPATCH_VERSION, "default": conv_ops.DEFAULT_PATH, "cards": {}}
    return _write_card_entry(path, card, "classes", classes, env, empty, conv_ops.parse_dispatch)


def _write_card_entry(path: str | Path, card: str, field: str, entries: dict, env: dict, empty: dict, parse) -> dict:
    """Set ``cards[card]`` of the JSON table at ``path`` (``empty`` if there is none; other cards
    kept) to ``entries`` under ``field`` with the date and versions of ``env``; ``parse`` checks
    the table before and after. Returns the whole table."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else empty
    parse(table, str(path))
    table.pop("note", None)
    table["cards"][card] = {
        "measured": env["date"],
        "torch": env["torch"],
        "triton": env["triton"],
        "commit": env["commit"],
        field: entries,
    }
    parse(table, str(path))
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table


def _table_writer_unusable(args, device: torch.device, flag: str, family: str, what: str) -> bool:
    """Say why (and return True) when a ``--write-*`` table writer cannot run with these arguments."""
    if device.type != "cuda":
        print(f"{flag} times {what}: it needs a CUDA device", file=sys.stderr)
        return True
    if args.family and family not in args.family:
        print(f"{flag} belongs to --family {family}", file=sys.stderr)
        return True
    return False


def dispatch_main(args, device: torch.device, dtypes: list[torch.dtype]) -> int:
    """``fastrec bench --family conv --write-dispatch PATH``: time the paths, write the table."""
    if _table_writer_unusable(args, device, "--write-dispatch", "conv", "cuDNN against the Triton kernels"):
        return 2

    def progress(row: dict) -> None:
        times = "  ".join(f"{path} {row[f'{path}_ms']:.4f} ms" for path in conv_ops.CONV_PATHS)
        print(f"{row['class']:28s} {row['shape']:55s} {times}", flush=True)

    rows = time_dispatch(device, dtypes, args.rounds, args.min_round_s, progress)
    card = torch.cuda.get_device_name(device)
    write_dispatch(args.write_dispatch, card, select_dispatch(rows), environment(device))
    print(f"wrote {card}'s conv dispatch table to {args.write_dispatch}")
    return 0


# --------------------------------------------------------------------------- attention configs
# The tuner times each Triton attention kernel's candidate block configs on the bench's flag set
# (causal + right key padding, no dropout) and large-batch shapes, one kernel at a time (the
# backward's dK/dV pass with the default dQ pass, then the dQ pass with the chosen dK/dV pass),
# and keeps a candidate only if its median over TUNE_ROUNDS interleaved rounds beats the default
# config's by TUNE_MARGIN.
TUNE_SHAPES = ((1024, 2, 200), (1024, 2, 50))  # (B, H, L); times are summed over them
TUNE_HEAD_DIMS = (32, 64)  # one per BLOCK_D bucket that recommender head dims (17-64) fall in
TUNE_MARGIN = 0.05  # the H200 run saw one config's time move ~20% between two sweeps of 1 round
TUNE_ROUNDS = 5
_BF16_CANDIDATES = {
    "forward": ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)),
    "dkdv": ((32, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 2)),
    "dq": ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 16, 4, 3), (128, 128, 8, 3)),
}
# (dtype class, BLOCK_D) -> kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the candidates
# that compile without spills for sm_90 (triton 3.6 and 3.9) with every flag the tuned table
# serves (causal, key padding, lengths) and with none; fp32 tiles need 8 warps, and at BLOCK_D=64
# few fit at all.
_TUNE_CANDIDATES = {
    ("16", 32): _BF16_CANDIDATES,
    ("16", 64): _BF16_CANDIDATES,
    ("32", 32): {
        "forward": ((64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 3)),
        "dkdv": ((32, 128, 8, 3), (16, 64, 4, 3), (32, 64, 8, 3), (16, 128, 8, 3)),
        "dq": ((128, 32, 8, 3), (64, 16, 4, 3), (64, 32, 8, 3), (64, 64, 8, 3)),
    },
    ("32", 64): {"forward": ((64, 32, 8, 2),), "dkdv": (), "dq": ((64, 16, 4, 3), (64, 32, 8, 3))},
}


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def tune_attention(device: torch.device, dtypes, progress=None) -> tuple[dict[str, dict], list[dict]]:
    """``(configs, rows)``: the table entries ({tuned_key: config and times}) that beat the default,
    and every candidate's measurement (``error`` for one that did not compile or run)."""
    from fastrec.kernels import attention as K

    configs: dict[str, dict] = {}
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for head_dim in TUNE_HEAD_DIMS:
            cases = []
            for batch, heads, length in TUNE_SHAPES:
                q, k, v, grad = (
                    torch.randn(batch, heads, length, head_dim, generator=gen).to(device, dtype) for _ in range(4)
                )
                kpm = padding_mask(batch, length, 0.3, False, device, gen)
                masks = (kpm, None, None, None, True, head_dim**-0.5, 0.0)
                out, lse = K.attention_forward(q, k, v, *masks)
                cases.append((q, k, v, grad, masks, out, lse, K.attention_backward(grad, q, k, v, out, lse, *masks)))

            def forward(cfg):
                return [functools.partial(K.attention_forward, *c[:3], *c[4], config=cfg) for c in cases]

            def backward(configs):  # configs: dkdv_config and dq_config
                return [
                    functools.partial(K.attention_backward, c[3], *c[:3], c[5], c[6], *c[4], **configs) for c in cases
                ]

            chosen: dict[str, K.BlockConfig] = {}
            for kernel in K.TUNED_KERNELS:
                key = K.tuned_key(kernel, dtype, K.block_d_for(head_dim))
                default = K.block_config(kernel, dtype, head_dim, interpreter=False)
                # the dK/dV pass is timed beside the default dQ pass, the dQ pass beside the chosen dK/dV
                fixed = dict(dq_config=K.block_config("dq", dtype, head_dim, False), dkdv_config=chosen.get("dkdv"))
                own = _TUNE_CANDIDATES["16" if dtype.itemsize == 2 else "32", K.block_d_for(head_dim)][kernel]
                candidates = [default] + [K.BlockConfig(*c) for c in own]
                runnable: dict[K.BlockConfig, list] = {}
                kernel_rows: dict[K.BlockConfig, dict] = {}
                for cfg in dict.fromkeys(candidates):  # default first, no repeats
                    row = {"key": key, "dtype": dtype_name(dtype), "head_dim": head_dim, **asdict(cfg)}
                    kernel_rows[cfg] = row
                    try:  # compile, run and check each candidate before any timing
                        fns = forward(cfg) if kernel == "forward" else backward({**fixed, f"{kernel}_config": cfg})
                        _check_tuned(kernel, [fn() for fn in fns], cases)
                        runnable[cfg] = fns
                    except Exception as error:  # a candidate that does not compile, fit or agree
                        row["error"] = f"{type(error).__name__}: {error}"[:300]
                # Rounds over all candidates, the order reversed every other round, so that drift
                # (clocks, the compile pauses before) falls on every candidate alike; medians.
                order = list(runnable)
                for round_index in range(TUNE_ROUNDS):
                    for cfg in order if round_index % 2 == 0 else order[::-1]:
                        kernel_rows[cfg].setdefault("rounds_ms", []).append(sum(_median_ms(f) for f in runnable[cfg]))
                for cfg, row in kernel_rows.items():
                    if cfg in runnable:
                        row["ms"] = statistics.median(row["rounds_ms"])
                    rows.append(row)
                    if progress:
                        progress(row)
                timed = {cfg: kernel_rows[cfg]["ms"] for cfg in runnable}
                best = min(timed, key=timed.get, default=default)
                default_ms = timed.get(default, math.inf)
                chosen[kernel] = best if timed.get(best, math.inf) < default_ms * (1 - TUNE_MARGIN) else default
                if chosen[kernel] != default:
                    configs[key] = {**asdict(best), "ms": round(timed[best], 5), "default_ms": round(default_ms, 5)}
    return configs, rows


def _check_tuned(kernel: str, results: list, cases: list) -> None:
    """A candidate's outputs must match the default config's (same math, other tiling)."""
    for got, case in zip(results, cases, strict=True):
        want = case[5:7] if kernel == "forward" else case[7]
        for g, w in zip(got, want, strict=True):
            bound = 2e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
            finite = torch.isfinite(w)
            err = (g.float() - w.float())[finite].abs().max().item() if finite.any() else 0.0
            if not err <= bound * max(1.0, w.float()[finite].abs().max().item()):
                raise AssertionError(f"differs from the default config's result by {err:.3g}")


def write_configs(path: str | Path, card: str, configs: dict[str, dict], env: dict) -> dict:
    """Write ``configs`` as ``card``'s entry of the table at ``path`` (other cards kept), in the
    format fastrec.kernels.attention.parse_configs reads; returns the whole table."""
    from fastrec.kernels import attention as K

    empty = {"version": K.CONFIGS_VERSION, "cards": {}}
    return _write_card_entry(path, card, "configs", configs, env, empty, K.parse_configs)


def configs_main(args, device: torch.device, dtypes: list[torch.dtype]) -> int:
    """``fastrec bench --family attention --write-configs PATH``: tune, write the table."""
    if _table_writer_unusable(args, device, "--write-configs", "attention", "the Triton attention kernels"):
        return 2

    def progress(row: dict) -> None:
        tiles = f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
        result = f"{row['ms']:.4f} ms" if "ms" in row else row["error"]
        print(f"{row['key']:12s} {row['dtype']:9s} d={row['head_dim']:<3d} {tiles:18s} {result}", flush=True)

    card = torch.cuda.get_device_name(device)
    configs, rows = tune_attention(device, [d for d in (torch.bfloat16, torch.float32) if d in dtypes], progress)
    write_configs(args.write_configs, card, configs, environment(device))
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "configs": configs, "rows": rows}, indent=2))
    print(f"wrote {card}'s attention configs ({len(configs)} changed from the defaults) to {args.write_configs}")
    return 0
