"""RecBole 1.2.1's Trainer on ml-100k (the copy its wheel ships), each model patched by
``fastrec.integrations.recbole.apply`` against the same model unpatched: training time and
full-sort evaluation time as ratios patched / unpatched.

RecBole's default config except ``train_batch_size=512``. Both models of a pair run in one
process, interleaved (unpatched, patched, then the other order next round) for ``--rounds``
rounds; each round times ``--steps`` training steps of ``Trainer._train_epoch`` on the real
training loader cut to that many batches (data loading included) and one full-sort evaluation
of the test set (``Trainer.evaluate``). The ratio of each round is taken, the median reported.

Runs in RecBole's environment (``./dev.sh test`` builds it):

    .venv-recbole/bin/python benchmarks/recbole_speed.py --out benchmarks/results/2026-12-07-cpu-recbole.json

An existing ``--out`` file keeps its ``accuracy`` entry (``benchmarks/recbole_accuracy.py``) and
the rows of the models not timed in this run (``--models Caser --steps 2`` re-times one row).
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer
from recbole.utils import get_model, init_seed

import fastrec
from fastrec.integrations import recbole as fr

MODELS = ["SASRec", "BERT4Rec", "Caser", "GRU4Rec", "NARM"]


def _setup(name: str, workdir: str):
    config = Config(
        model=name,
        dataset="ml-100k",
        config_dict={
            "data_path": str(importlib.resources.files("recbole") / "dataset_example"),
            "train_neg_sample_args": None,
            "train_batch_size": 512,
            "seed": 2020,
            "device": "cpu",
            "use_gpu": False,
            "show_progress": False,
            "checkpoint_dir": os.path.join(workdir, "saved"),
            "state": "WARNING",
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    train, _, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    plain = get_model(name)(config, train._dataset)
    fast = copy.deepcopy(plain)
    report = fr.apply(fast)
    return config, train, test, Trainer(config, plain), Trainer(config, fast), report


def _train_time(trainer: Trainer, train, steps: int) -> float:
    start = time.perf_counter()
    trainer._train_epoch(itertools.islice(train, steps), 0)
    return time.perf_counter() - start


def _eval_time(trainer: Trainer, test) -> float:
    start = time.perf_counter()
    trainer.evaluate(test, load_best_model=False, show_progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--steps", type=int, default=8, help="training steps timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = os.path.abspath(args.out) if args.out else None
    workdir = tempfile.mkdtemp(prefix="recbole-speed-")
    os.chdir(workdir)  # RecBole writes log/ and log_tensorboard/ here
    logging.disable(logging.INFO)
    command = "benchmarks/recbole_speed.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out")
    rows = []
    for name in args.models:
        load_before = os.getloadavg()[0]
        config, train, test, plain, fast, report = _setup(name, workdir)
        _train_time(plain, train, 2), _train_time(fast, train, 2)  # warm-up
        times = {"train": ([], []), "eval": ([], [])}
        for r in range(args.rounds):
            order = (plain, fast) if r % 2 == 0 else (fast, plain)
            for trainer in order:
                side = 0 if trainer is plain else 1
                times["train"][side].append(_train_time(trainer, train, args.steps))
                times["eval"][side].append(_eval_time(trainer, test))
        row = {
            "model": name,
            "max_len": config["MAX_ITEM_LIST_LENGTH"],
            "steps_per_epoch": len(train),
            "command": command,
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after its rounds
        }
        for kind, (t_plain, t_fast) in times.items():
            ratios = [f / p for p, f in zip(t_plain, t_fast, strict=True)]
            row[kind] = {
                "ratio_median": statistics.median(ratios),
                "ratios": ratios,
                "unpatched_s_median": statistics.median(t_plain),
                "patched_s_median": statistics.median(t_fast),
            }
        row["report"] = str(report)
        rows.append(row)
        print(
            f"{name:9s} train {row['train']['ratio_median']:.2f}x "
            f"({row['train']['unpatched_s_median'] / args.steps * 1e3:.0f} -> "
            f"{row['train']['patched_s_median'] / args.steps * 1e3:.0f} ms/step)  "
            f"full-sort eval {row['eval']['ratio_median']:.2f}x "
            f"({row['eval']['unpatched_s_median']:.2f} -> {row['eval']['patched_s_median']:.2f} s)",
            flush=True,
        )
    result = {}
    if out and os.path.exists(out):  # keep the accuracy entry and the rows of models not timed now
        with open(out) as f:
            result = json.load(f)
        result.pop("command", None)  # each row has its own
        timed = {row["model"] for row in rows}
        rows += [row for row in result.get("rows", []) if row["model"] not in timed and "command" in row]
        rows.sort(key=lambda row: MODELS.index(row["model"]))
    result |= {
        "what": "RecBole 1.2.1 Trainer on ml-100k, patched / unpatched, medians of per-round ratios "
        "(each row: its command and the 1-minute load average before and after it)",
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "fastrec": fastrec.__version__},
        "rows": rows,
    }
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
