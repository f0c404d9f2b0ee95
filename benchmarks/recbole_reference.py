"""RecBole 1.2.1's own figure for a model on ml-100k under the accuracy protocol (RecBole's
defaults, train batch 512, at most 12 epochs, early stop after 3 epochs without a better
validation NDCG@10, full ranking; Caser at MAX_ITEM_LIST_LENGTH 10), one seed per call, one
torch thread. Appends the test and best-validation metrics to a JSON-lines file.

RecBole needs packages fastrec does not, so this runs in an environment of its own:

    python -m venv .venv-recbole
    .venv-recbole/bin/pip install torch==2.13.0 numpy scipy "pandas<2.2" pyyaml colorlog==4.7.2 \\
        colorama==0.4.4 tqdm tabulate texttable psutil scikit-learn thop plotly tensorboard
    .venv-recbole/bin/pip install --no-deps recbole==1.2.1
    .venv-recbole/bin/python benchmarks/recbole_reference.py Caser 2020 [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import tempfile
import time

import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_logger, init_seed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=["Caser", "GRU4Rec", "SASRec"])
    parser.add_argument("seed", type=int)
    parser.add_argument("--out", default="benchmarks/results/recbole-ml100k.jsonl")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.chdir(tempfile.mkdtemp(prefix="recbole-"))  # RecBole writes log/ and log_tensorboard/ here
    torch.set_num_threads(1)
    # RecBole 1.2.1 reloads its own best checkpoint with torch.load's pre-2.6 default.
    load = torch.load
    torch.load = lambda *a, **k: load(*a, **{**k, "weights_only": False})
    config_dict = {
        "data_path": str(importlib.resources.files("recbole") / "dataset_example"),
        "train_neg_sample_args": None,
        "train_batch_size": 512,
        "epochs": 12,
        "stopping_step": 3,
        "valid_metric": "NDCG@10",
        "metrics": ["Hit", "NDCG", "MRR"],
        "topk": [10],
        "seed": args.seed,
        "device": "cpu",
        "use_gpu": False,
        "show_progress": False,
        "checkpoint_dir": "saved",
    }
    if args.model == "Caser":
        config_dict["MAX_ITEM_LIST_LENGTH"] = 10
    start = time.time()
    config = Config(model=args.model, dataset="ml-100k", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    _, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
    result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    row = {
        "model": args.model,
        "seed": args.seed,
        "seconds": time.time() - start,
        "test": {k: float(v) for k, v in result.items()},
        "best_valid": {k: float(v) for k, v in best_valid.items()},
    }
    print(json.dumps(row))
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
