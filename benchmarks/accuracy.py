"""The accuracy protocol on MovieLens-100K: each model, each backend, several seeds, with
``fastrec train``'s defaults (RecBole's defaults, train batch 512, full ranking, leave-one-out, no
time limit) and the protocol's schedule (``train.PROTOCOL``: at most 12 epochs, early stop after 3
epochs without a better validation NDCG@10), set here whatever the models' default epoch caps.
Prints and writes the mean and seed-to-seed standard deviation of test NDCG@10 per model and
backend next to RecBole 1.2.1's figure on the same split (measured on this machine, seed 2020).

Every finished run is appended to the JSON file at once (re-read first, so two sweeps over other
backends or models can share it), so an interrupted sweep keeps its runs and a rerun skips them;
give a sweep with another --epochs / --patience / --dropout-stream its own --json.
``--dropout-stream torch`` gives the fastrec backend torch's own dropout masks
(``fastrec.use_dropout_stream``): both backends then train on the same masks, a paired run.
``--positions all`` trains every position of a window on its next item (SASRec's paper);
``--batch-size`` and ``--lr`` set the training batch (512 by default) and the learning rate
(the model's by default). Runs with other settings are told apart in the file and the table.

Usage: python benchmarks/accuracy.py [--models caser,gru4rec,sasrec] [--backends fastrec,torch]
       [--seeds 2020,2021,2022] [--epochs N] [--patience N] [--dropout-stream fastrec|torch]
       [--positions last|all] [--batch-size N] [--lr LR] [--threads T] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
from pathlib import Path

import torch

from fastrec import train
from fastrec.backends import DROPOUT_STREAMS
from fastrec.models import MODELS

RECBOLE_NDCG10 = {"gru4rec": 0.0551, "sasrec": 0.0549, "caser": 0.0599}
BACKENDS = ("fastrec", "torch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="caser,gru4rec,sasrec")
    parser.add_argument("--seeds", default="2020,2021,2022")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=train.PROTOCOL["epochs"], help="epoch cap (default: %(default)s)")
    parser.add_argument(
        "--patience",
        type=int,
        default=train.PROTOCOL["patience"],
        help="early-stopping patience (default: %(default)s)",
    )
    parser.add_argument("--dropout-stream", default="auto", choices=DROPOUT_STREAMS, help="fastrec.use_dropout_stream")
    parser.add_argument("--positions", default="last", choices=train.POSITIONS, help="fastrec train --positions")
    parser.add_argument("--batch-size", type=int, default=train.TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's)")
    parser.add_argument("--json", default="benchmarks/results/accuracy-ml100k.json")
    parser.add_argument("--markdown", default="benchmarks/results/accuracy-ml100k.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.json)
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for backend in args.backends.split(","):
                config = train.TrainConfig(
                    model=model,
                    backend=backend,
                    seed=seed,
                    epochs=args.epochs,
                    patience=args.patience,
                    progress=False,
                    dropout_stream=args.dropout_stream,
                    positions=args.positions,
                    batch_size=args.batch_size,
                    lr=args.lr,
                )
                done = {(r["model"], r["backend"], r["seed"], setting(r)) for r in load(path)}
                if (model, backend, seed, (config.positions, config.batch_size, config.lr)) in done:
                    continue
                result = train.run(config, log=lambda line: print(line, flush=True))
                runs = load(path)  # another sweep may have written to the file meanwhile
                runs.append(
                    {
                        "model": model,
                        "backend": backend,
                        "seed": seed,
                        "epochs_cap": config.epochs,
                        "patience": config.patience,
                        "dropout_stream": config.dropout_stream,
                        "lr": config.lr,
                        "lr_schedule": config.lr_schedule,
                        "positions": config.positions,
                        "batch_size": config.batch_size,
                        "model_options": model_defaults(model),
                        "best_epoch": result.best_epoch,
                        "epochs": len(result.epochs),
                        "median_epoch_s": statistics.median(e.seconds for e in result.epochs),
                        "seconds": result.seconds,
                        "valid": result.epochs[result.best_epoch - 1].valid,
                        "test": result.test,
                    }
                )
                path.write_text(json.dumps(runs, indent=1))
    table = summary(load(path))
    print(table)
    Path(args.markdown).write_text(table + "\n")


def model_defaults(model: str) -> dict:
    """The constructor defaults a run used for the options ``fastrec train --option`` can set."""
    params = inspect.signature(MODELS[model].__init__).parameters
    return {name: params[name].default for name in sorted(train.model_option_names(model))}


def setting(run: dict) -> tuple[str, int, float]:
    """A run's (positions, batch size, learning rate); runs written before these were recorded
    count as last-position runs at batch 512 and the model's learning rate."""
    lr = run.get("lr", train.MODEL_DEFAULTS[run["model"]]["lr"])
    return run.get("positions", "last"), run.get("batch_size", 512), lr


def label(run: dict) -> str:
    """The model's name, with the settings where the run differs from ``fastrec train``'s defaults."""
    positions, batch_size, lr = setting(run)
    model = run["model"]
    return (
        model
        + (", all positions" if positions == "all" else "")
        + (f", batch {batch_size}" if batch_size != train.TrainConfig.batch_size else "")
        + (f", lr {lr:g}" if lr != train.MODEL_DEFAULTS[model]["lr"] else "")
    )


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def summary(runs: list[dict]) -> str:
    head = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
        "MovieLens-100K, leave-one-out, full ranking (seen items not excluded), test NDCG@10\n\n"
        "| model | backend | seeds | NDCG@10 mean | std | seen excluded mean | RecBole 1.2.1 | median epoch s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name in dict.fromkeys(label(r) for r in runs):
        for backend in BACKENDS:
            rows = [r for r in runs if label(r) == name and r["backend"] == backend]
            if not rows:
                continue
            ndcg = [r["test"]["NDCG@10"] for r in rows]
            excluded = [r["test"]["NDCG@10 (seen excluded)"] for r in rows]
            std = statistics.stdev(ndcg) if len(ndcg) > 1 else float("nan")
            epoch_s = statistics.median(r["median_epoch_s"] for r in rows)
            recbole = RECBOLE_NDCG10[rows[0]["model"]]
            lines.append(
                f"| {name} | {backend} | {','.join(str(r['seed']) for r in rows)} | {statistics.mean(ndcg):.4f} | "
                f"{std:.4f} | {statistics.mean(excluded):.4f} | {recbole:.4f} | {epoch_s:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
