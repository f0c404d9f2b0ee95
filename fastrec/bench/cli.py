"""``fastrec bench``: the benchmark table, or with ``--write-dispatch`` / ``--write-configs`` a
card's tuning table."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from fastrec.bench import harness, tables
from fastrec.bench.cases import CASES, OPT_IN, family_cases


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 when every row was measured (and every forced kernel ran), else 1 (2:
    a table writer that cannot run here)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    if getattr(args, "write_dispatch", None):
        return tables.dispatch_main(args, device, dtypes)
    if getattr(args, "write_configs", None):
        return tables.configs_main(args, device, dtypes)
    families = args.family or [family for family in CASES if family not in OPT_IN]

    def cases() -> Iterator[harness.Case]:  # built one family and dtype at a time, as they are timed
        for family in families:
            for dtype in dtypes:
                yield from family_cases(family, device, dtype, args.full)

    done: list[dict] = []
    env = harness.environment(device) if args.json else {}

    def progress(row: harness.Row) -> None:
        record = asdict(row)
        print(harness.progress_line(record), flush=True)
        if args.json:  # the rows so far, so that a run cut short keeps them
            done.append(record)
            Path(args.json).write_text(json.dumps({"environment": env, "partial": True, "results": done}, indent=2))

    report = harness.run(cases(), device, args.rounds, args.min_round_s, progress)
    table = harness.markdown(report)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 1 if harness.failed(report) else 0
