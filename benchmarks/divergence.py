"""How far two training runs on ml-100k drift apart, step by step: the fastrec backend against
the torch backend with torch's own dropout masks (``fastrec.use_dropout_stream("torch")``), so
that the only difference left is floating-point rounding in the fused kernels; and, as the
control (``--control``), the torch backend against itself with every initial weight moved by
one part in 1e7. Same seed, weights, batches and masks otherwise; Adam at ``fastrec train``'s
learning rate and schedule (``train.make_optimizer``). Prints and writes the largest relative
parameter difference (over parameter tensors) and the relative loss difference every ``--every``
steps.

Usage: python benchmarks/divergence.py --model caser [--steps 760] [--every 40] [--control]
       [--threads 1] [--json benchmarks/results/divergence-ml100k.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fastrec
from fastrec import train
from fastrec.models import MODELS, ModelInput


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="caser", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=760, help="training steps (190 per epoch at batch 512)")
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--control", action="store_true", help="torch against torch perturbed by 1e-7")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/divergence-ml100k.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pair = ("torch", "torch") if args.control else ("fastrec", "torch")
    configs = [train.TrainConfig(model=args.model, backend=b, progress=False) for b in pair]
    data = train.load_data(configs[0], MODELS[args.model].padding_side)
    models = [train.build_model(c, data.n_items, data.n_users) for c in configs]
    if args.control:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in models[0].parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=generator))
    optimizers, schedules = zip(*(train.make_optimizer(m, configs[0], len(data.train)) for m in models), strict=True)
    rows = []
    step = 0
    while step < args.steps:
        for batch in data.train:
            batch = ModelInput(batch.items, batch.lengths, batch.user, batch.target)
            losses = []
            for model, optimizer, schedule in zip(models, optimizers, schedules, strict=True):
                model.train()
                with fastrec.use_dropout_stream("torch"):
                    torch.manual_seed(1000 + step)  # the same masks for both
                    loss = model.loss(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                losses.append(loss.item())
            if step % args.every == 0 or step == args.steps - 1:
                params = zip(models[0].parameters(), models[1].parameters(), strict=True)
                drift = max(((p - q).norm() / q.norm()).item() for p, q in params)
                rows.append({"step": step, "param_rel_diff": drift, "loss_rel_diff": abs(losses[0] / losses[1] - 1)})
                print(f"step {step:4d}  max param rel diff {drift:.2e}  loss rel diff {rows[-1]['loss_rel_diff']:.2e}")
            step += 1
            if step == args.steps:
                break
    path = Path(args.json)
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [
        r for r in runs if (r["model"], r["pair"]) != (args.model, "/".join(pair) + ("+1e-7" if args.control else ""))
    ]
    runs.append({"model": args.model, "pair": "/".join(pair) + ("+1e-7" if args.control else ""), "rows": rows})
    path.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
