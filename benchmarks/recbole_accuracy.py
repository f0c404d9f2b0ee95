"""Same-seed RecBole 1.2.1 training, unpatched and patched by ``fastrec.integrations.recbole``:
the validation NDCG@10 after each epoch, to full precision, and each epoch's training time.

RecBole's own ``Trainer.fit`` on ml-100k (the copy its wheel ships), its default config except
``train_batch_size=512``, one seed, evaluation after every epoch. Dropout masks come from torch's
generator on both sides (fastrec's default dropout stream on the CPU), so the two runs draw the
same masks and the metrics agree up to floating-point rounding. Autograd's anomaly mode, which
RecBole 1.2.1 turns on when its sequential models are imported, is turned off for both sides:
it only checks for NaNs (35-45% of a step's CPU time), so the training times recorded here are not
the ones ``benchmarks/recbole_speed.py`` compares.

Runs in RecBole's environment (``./dev.sh test`` builds it); ``--out`` adds an ``accuracy`` entry
to a results file (other entries are kept):

    .venv-recbole/bin/python benchmarks/recbole_accuracy.py --out benchmarks/results/2026-12-07-cpu-recbole.json
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import os
import tempfile
import time

import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer
from recbole.utils import get_model, init_seed

from fastrec.integrations import recbole as fr


def _run(name: str, patched: bool, epochs: int, seed: int, workdir: str) -> dict:
    config = Config(
        model=name,
        dataset="ml-100k",
        config_dict={
            "data_path": str(importlib.resources.files("recbole") / "dataset_example"),
            "train_neg_sample_args": None,
            "train_batch_size": 512,
            "epochs": epochs,
            "eval_step": 1,
            "seed": seed,
            "device": "cpu",
            "use_gpu": False,
            "show_progress": False,
            "checkpoint_dir": os.path.join(workdir, "saved"),
            "state": "WARNING",
        },
    )
    init_seed(config["seed"], config["reproducibility"])
    train, valid, _ = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(name)(config, train._dataset)
    torch.autograd.set_detect_anomaly(False)  # on since get_model imported RecBole's models
    if patched:
        fr.apply(model)
    trainer = Trainer(config, model)
    ndcg, train_s = [], []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train_epoch(*args, **kwargs):
        start = time.perf_counter()
        out = train_epoch(*args, **kwargs)
        train_s.append(time.perf_counter() - start)
        return out

    def recording_valid_epoch(*args, **kwargs):
        score, result = valid_epoch(*args, **kwargs)
        ndcg.append(float(result["ndcg@10"]))
        return score, result

    trainer._train_epoch, trainer._valid_epoch = timed_train_epoch, recording_valid_epoch
    trainer.fit(train, valid, saved=False, show_progress=False)
    return {"valid_ndcg@10": ndcg, "train_epoch_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["GRU4Rec", "SASRec"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = os.path.abspath(args.out) if args.out else None
    workdir = tempfile.mkdtemp(prefix="recbole-accuracy-")
    os.chdir(workdir)  # RecBole writes log/ and log_tensorboard/ here
    logging.disable(logging.INFO)
    rows = []
    for name in args.models:
        row = {"model": name}
        for side in ("unpatched", "patched"):
            row[side] = _run(name, side == "patched", args.epochs, args.seed, workdir)
            print(name, side, row[side], flush=True)
        pairs = zip(row["unpatched"]["valid_ndcg@10"], row["patched"]["valid_ndcg@10"], strict=True)
        row["max_abs_diff"] = max(abs(a - b) for a, b in pairs)
        row["same_to_4_digits"] = all(
            f"{a:.4f}" == f"{b:.4f}"
            for a, b in zip(row["unpatched"]["valid_ndcg@10"], row["patched"]["valid_ndcg@10"], strict=True)
        )
        rows.append(row)
    entry = {
        "what": f"RecBole Trainer.fit, ml-100k, train_batch_size=512, {args.epochs} epochs, seed {args.seed}: "
        "validation NDCG@10 after each epoch, unpatched and patched",
        "command": "benchmarks/recbole_accuracy.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "torch_threads": torch.get_num_threads(),
        "anomaly_detection": False,
        "rows": rows,
    }
    if out:
        result = {}
        if os.path.exists(out):
            with open(out) as f:
                result = json.load(f)
        result["accuracy"] = entry
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
