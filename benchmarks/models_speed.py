"""Model-level speed on this CPU, fastrec backend against torch backend (same weights), interleaved:

- training: one optimizer step (CE loss, forward + backward + Adam) on real ml-100k training
  batches of 512 (RecBole's prefix examples, the model's max_len), median over rounds; an epoch is
  that many steps, so the step ratio is the epoch-time ratio;
- serving: ``recommend(history, k=10)`` at batch 1 for ml-100k users' full histories.

``--dropout-stream torch`` times the fastrec backend with torch's own dropout masks
(``fastrec.use_dropout_stream``), the paired-run setting of benchmarks/accuracy.py.

Usage: python benchmarks/models_speed.py [--rounds N] [--models sasrec,gru4rec,caser] [--threads T]
       [--dropout-stream fastrec|torch]
"""

from __future__ import annotations

import argparse
import itertools
import platform

import numpy as np
import torch

from fastrec import backends, train
from fastrec.bench.harness import time_interleaved
from fastrec.models import MODELS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="sasrec,gru4rec,caser")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=None, help="override every model's max_len")
    parser.add_argument("--dropout-stream", default="auto", choices=backends.DROPOUT_STREAMS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"dropout stream {args.dropout_stream}"
    )
    for name in args.models.split(","):
        config = train.TrainConfig(model=name, max_len=args.max_len, progress=False)
        data = train.load_data(config, MODELS[name].padding_side)
        batches = list(itertools.islice(iter(data.train), 4))
        models = {
            b: train.build_model(train.TrainConfig(**{**config.__dict__, "backend": b}), data.n_items, data.n_users)
            for b in ("fastrec", "torch")
        }
        steps = {}
        for backend, model in models.items():
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            cycle = itertools.cycle(batches)

            def step(model=model, optimizer=optimizer, cycle=cycle):
                optimizer.zero_grad()
                model.loss(next(cycle)).backward()
                optimizer.step()

            steps[backend] = step
        with backends.use_dropout_stream(args.dropout_stream):
            train_ms = time_interleaved(steps, device, rounds=args.rounds, min_round_s=0.0)
        n_steps = len(data.train)
        rng = np.random.default_rng(0)
        users = rng.choice(len(data.test[0]), size=64, replace=False)
        serve = {}
        for backend, model in models.items():
            model.eval()
            order = itertools.cycle(users)

            def rec(model=model, order=order):
                u = next(order)
                model.recommend([data.test[0][u]], k=10, users=[int(data.test[2][u])])

            serve[backend] = rec
        serve_ms = time_interleaved(serve, device, rounds=args.rounds * 3, min_round_s=0.1)
        print(
            f"{name:8s} max_len {config.max_len:3d}  train step B=512: fastrec {train_ms['fastrec']:8.1f} ms  "
            f"torch {train_ms['torch']:8.1f} ms  ratio fastrec/torch {train_ms['fastrec'] / train_ms['torch']:.2f}x  "
            f"(epoch = {n_steps} steps: ~{n_steps * train_ms['fastrec'] / 1e3:.0f} s vs "
            f"~{n_steps * train_ms['torch'] / 1e3:.0f} s)"
        )
        print(
            f"{name:8s} recommend batch 1: fastrec {serve_ms['fastrec']:.3f} ms  torch {serve_ms['torch']:.3f} ms  "
            f"speedup {serve_ms['torch'] / serve_ms['fastrec']:.2f}x"
        )


if __name__ == "__main__":
    main()
