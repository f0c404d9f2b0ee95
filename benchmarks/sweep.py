"""Hyperparameter sweep on the validation split: each named configuration trains on several
seeds under the accuracy protocol (``train.PROTOCOL``: 12 epochs at most, patience 3, ml-100k
leave-one-out) and is ranked by its mean best validation NDCG@10; test figures are recorded but
play no part in the ranking. Use seeds other than the ones the accuracy table reports, so that the choice is
made on runs the reported figures do not include.

Every finished run is appended to the JSON file at once (re-read first), so sweeps in several
processes can share one file and a rerun skips what is there.

Usage: python benchmarks/sweep.py --model caser --seeds 3000,3001,3002 --json F
       --config base= --config lr2e-3=lr=2e-3 --config wide=n_h=16,n_v=8 ...
A configuration is NAME=KEY=VALUE,KEY=VALUE,...; ``lr``, ``lr_schedule``, ``dropout``,
``patience``, ``epochs`` and ``batch_size`` set the training config, any other key is a model
option (Caser: n_h, n_v, reg_weight, dim).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fastrec import train

TRAIN_KEYS = {"lr": float, "lr_schedule": str, "dropout": float, "patience": int, "epochs": int, "batch_size": int}


def parse_config(text: str) -> tuple[str, dict, dict]:
    """``NAME=k=v,k=v`` -> (name, training settings, model options)."""
    name, _, body = text.partition("=")
    if not name:
        raise ValueError(f"--config needs NAME=..., got {text!r}")
    settings, options = {}, {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key in TRAIN_KEYS:
            settings[key] = TRAIN_KEYS[key](value)
        else:
            options[key] = int(value) if value.isdigit() else float(value)
    return name, settings, options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="caser")
    parser.add_argument("--backend", default="fastrec")
    parser.add_argument("--seeds", default="3000,3001,3002")
    parser.add_argument("--config", action="append", required=True, help="NAME=key=value,...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    for text in args.config:
        name, settings, options = parse_config(text)
        for seed in (int(s) for s in args.seeds.split(",")):
            key = (name, args.backend, seed)
            if key in {(r["config"], r["backend"], r["seed"]) for r in load(path)}:
                continue
            config = train.TrainConfig(
                model=args.model,
                backend=args.backend,
                seed=seed,
                progress=False,
                model_options=options,
                **{**train.PROTOCOL, **settings},
            )
            result = train.run(config, log=lambda line: print(line, flush=True))
            best = result.epochs[result.best_epoch - 1].valid
            runs = load(path)
            runs.append(
                {
                    "config": name,
                    "settings": settings,
                    "lr": config.lr,
                    "lr_schedule": config.lr_schedule,
                    "options": options,
                    "model": args.model,
                    "backend": args.backend,
                    "seed": seed,
                    "best_epoch": result.best_epoch,
                    "epochs": len(result.epochs),
                    "valid": best,
                    "test": result.test,
                }
            )
            path.write_text(json.dumps(runs, indent=1))
    print(summary(load(path)))


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def summary(runs: list[dict]) -> str:
    """One line per configuration and backend, best mean validation NDCG@10 first."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["backend"]), []).append(run)
    lines = [
        "| config | backend | seeds | valid NDCG@10 mean ± std | test NDCG@10 mean ± std | best epochs |",
        "|---|---|---|---|---|---|",
    ]

    def stats(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4f} ± {std:.4f}"

    def valid_mean(group: tuple) -> float:
        return statistics.mean(r["valid"]["NDCG@10"] for r in group[1])

    for (name, backend), rows in sorted(groups.items(), key=valid_mean, reverse=True):
        lines.append(
            f"| {name} | {backend} | {len(rows)} | {stats([r['valid']['NDCG@10'] for r in rows])} | "
            f"{stats([r['test']['NDCG@10'] for r in rows])} | {','.join(str(r['best_epoch']) for r in rows)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
