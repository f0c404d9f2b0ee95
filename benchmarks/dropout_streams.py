"""Are fastrec's own dropout masks and torch's alike for a whole model? A Monte Carlo check.

Same trained-for-a-while weights, same ml-100k batch, the model in training mode; its output
(the (B, dim) sequence representation) and loss drawn ``--draws`` times under each dropout
stream (``fastrec.use_dropout_stream``): fastrec's fused Philox stream, and torch's own masks;
then torch's masks again from another seed, as the control of what two alike samples look like.
Per output element: z = difference of the two means over its standard error (mean z^2 is 1 for
alike streams and independent elements; elements share masks, so the control gives the scale),
and the ratio of the two variances (median over the elements); and the mean loss of each stream
with its standard error. A stream that dropped at another rate, scaled otherwise, reused masks
across calls or skipped a dropout would move the means or the variances.

Usage: python benchmarks/dropout_streams.py [--models caser,gru4rec,sasrec] [--draws 2000]
       [--warm-steps 100] [--batch 128] [--threads 1]
       [--json benchmarks/results/dropout-streams-ml100k.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import fastrec
from fastrec import train
from fastrec.models import MODELS, ModelInput


def draw(model, batch, stream: str, seed: int, draws: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and variance of the model's output per element, and the losses, over ``draws`` passes."""
    total = total_sq = 0.0
    losses = []
    torch.manual_seed(seed)
    with fastrec.use_dropout_stream(stream):
        for _ in range(draws):
            out = model(batch).detach().double()  # autograd on, as in training
            total = total + out
            total_sq = total_sq + out * out
            losses.append(model.loss(batch).item())
    mean = total / draws
    return mean, total_sq / draws - mean * mean, torch.tensor(losses, dtype=torch.float64)


def compare(a, b, draws: int) -> dict:
    """z statistics of two samples from ``draw``; elements that never vary (ReLU zeros) left out."""
    (mean_a, var_a, loss_a), (mean_b, var_b, loss_b) = a, b
    varying = (var_a > 0) & (var_b > 0)
    z = (mean_a - mean_b)[varying] / ((var_a + var_b)[varying] / draws).sqrt()
    loss_se = ((loss_a.var() + loss_b.var()) / draws).sqrt()
    return {
        "elements": int(varying.sum()),
        "mean_z2": float((z * z).mean()),
        "max_abs_z": float(z.abs().max()),
        "median_var_ratio": float((var_a[varying] / var_b[varying]).median()),
        "loss_diff": float(loss_a.mean() - loss_b.mean()),
        "loss_z": float((loss_a.mean() - loss_b.mean()) / loss_se),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="caser,gru4rec,sasrec")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--warm-steps", type=int, default=100, help="Adam steps before drawing")
    parser.add_argument("--batch", type=int, default=128, help="rows of the first training batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/dropout-streams-ml100k.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        start = time.perf_counter()
        config = train.TrainConfig(model=name, backend="fastrec", progress=False)
        data = train.load_data(config, MODELS[name].padding_side)
        model = train.build_model(config, data.n_items, data.n_users).train()
        optimizer, schedule = train.make_optimizer(model, config, len(data.train))
        batches = (ModelInput(b.items, b.lengths, b.user, b.target) for b in data.train)
        first = next(batches)
        for batch in itertools.islice(itertools.chain([first], batches), args.warm_steps):
            optimizer.zero_grad()
            model.loss(batch).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
        rows = slice(0, args.batch)
        user = first.user[rows] if first.user is not None else None
        batch = ModelInput(first.items[rows], first.lengths[rows], user, first.target[rows])
        own = draw(model, batch, "fastrec", 7, args.draws)
        torch_masks = draw(model, batch, "torch", 7, args.draws)
        control = draw(model, batch, "torch", 8, args.draws)
        result = {
            "model": name,
            "draws": args.draws,
            "warm_steps": args.warm_steps,
            "batch": args.batch,
            "own_vs_torch": compare(own, torch_masks, args.draws),
            "torch_vs_torch": compare(control, torch_masks, args.draws),
            "loss_mean": {"own": float(own[2].mean()), "torch": float(torch_masks[2].mean())},
            "seconds": time.perf_counter() - start,
        }
        results.append(result)
        for label in ("own_vs_torch", "torch_vs_torch"):
            c = result[label]
            print(
                f"{name:8s} {label:15s} mean z^2 {c['mean_z2']:.3f}  max |z| {c['max_abs_z']:.2f}  "
                f"median var ratio {c['median_var_ratio']:.4f}  loss diff {c['loss_diff']:+.6f} "
                f"(z {c['loss_z']:+.2f})  [{c['elements']} elements]",
                flush=True,
            )
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
