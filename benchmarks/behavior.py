"""Purchase prediction from behaviour on CDNOW: the three models of ``fastrec.models.behavior``
(CNN, RNN, causal self-attention) against the naive average rate and BG/NBD.

Each model predicts the number of repeat-purchase weeks in the 39 hold-out weeks from a
customer's weekly calibration sequence. The head outputs a log-rate; the prediction is its
exponential, trained with the Poisson loss (``loss="poisson"``, the default: the target is a
count) or with MSE on the prediction (``loss="mse"``).

Protocol (:func:`cross_fit`): the customers are split into ``folds`` groups; each group is
predicted by a model trained on the other groups' calibration sequences and hold-out counts
(a tenth of those held out for early stopping), so every customer's prediction comes from a
model that never saw that customer's hold-out, and RMSE/MAE cover all 23,570 customers, like the
naive and BG/NBD references (those two use only the calibration data of each customer itself).

Run: ``python benchmarks/behavior.py --model cnn|rnn|attention|all``, or from a checkout
``fastrec train --model behavior-cnn|behavior-rnn|behavior-attention``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

from fastrec.data.cdnow import CDNOW, bgnbd_expected, fit_bgnbd, load_cdnow, mae, rmse
from fastrec.models.behavior import KINDS, build

MAX_WEEKS = 40


def _loss(log_rate: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "poisson":
        return nn.functional.poisson_nll_loss(log_rate, target, log_input=True, full=False)
    return nn.functional.mse_loss(log_rate.exp(), target)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 4096) -> np.ndarray:
    """Predicted hold-out purchase weeks, capped at ``MAX_WEEKS`` (the hold-out spans at most 40 weeks)."""
    model.eval()
    cap = math.log(MAX_WEEKS)
    out = [model(x[i : i + batch_size]).clamp(max=cap).exp() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).cpu().double().numpy()


def fit(
    kind: str,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 20,
    batch_size: int = 512,
    lr: float = 3e-3,
    loss: str = "poisson",
    patience: int = 4,
    seed: int = 0,
) -> nn.Module:
    """Trains one regressor on ``x (n, weeks, features)`` -> ``y (n,)`` with Adam; keeps the weights of
    the epoch with the best MSE on a held-out tenth (early stopping after ``patience`` epochs)."""
    if loss not in ("poisson", "mse"):
        raise ValueError(f"loss must be 'poisson' or 'mse', got {loss!r}")
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = generator.permutation(x.shape[0])
    n_valid = max(1, x.shape[0] // 10)
    valid, train = order[:n_valid], order[n_valid:]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).float()
    model = build(kind, x.shape[2], x.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, stale = math.inf, None, 0
    for _ in range(epochs):
        model.train()
        shuffled = torch.from_numpy(train[generator.permutation(train.shape[0])])
        for start in range(0, train.shape[0], batch_size):
            rows = shuffled[start : start + batch_size]
            optimizer.zero_grad()
            _loss(model(xt[rows]), yt[rows], loss).backward()
            optimizer.step()
        score = rmse(predict(model, xt[valid]), y[valid])
        if score < best:
            best, best_state, stale = score, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    return model


def cross_fit(kind: str, data: CDNOW, folds: int = 5, seed: int = 0, **options) -> np.ndarray:
    """Out-of-fold predictions of ``frequency_holdout`` for every customer (module docstring)."""
    x = data.features()
    y = data.frequency_holdout.astype(np.float32)
    fold = np.random.default_rng(seed).permutation(x.shape[0]) % folds
    prediction = np.zeros(x.shape[0])
    for f in range(folds):
        model = fit(kind, x[fold != f], y[fold != f], seed=seed + f, **options)
        prediction[fold == f] = predict(model, torch.from_numpy(x[fold == f]))
    return prediction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/behavior.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all", choices=[*KINDS, "all"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--loss", default="poisson", choices=["poisson", "mse"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a shared, loaded CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_cdnow()
    y = data.frequency_holdout
    weeks = f"{data.n_weeks} calibration weeks, hold-out {data.duration_holdout:.0f} weeks"
    print(
        f"CDNOW: {y.shape[0]} customers, {weeks}; {args.folds}-fold cross-fitting, {args.loss} loss, seed {args.seed}"
    )
    print(f"{'model':22s} {'RMSE':>7s} {'MAE':>7s} {'seconds':>8s}")
    naive = data.naive_rate()
    print(f"{'naive average rate':22s} {rmse(naive, y):7.3f} {mae(naive, y):7.3f}")
    start = time.perf_counter()
    bgnbd = bgnbd_expected(fit_bgnbd(data), data)
    seconds = time.perf_counter() - start
    print(f"{'BG/NBD':22s} {rmse(bgnbd, y):7.3f} {mae(bgnbd, y):7.3f} {seconds:8.1f}")
    for kind in KINDS if args.model == "all" else (args.model,):
        start = time.perf_counter()
        prediction = cross_fit(kind, data, args.folds, args.seed, epochs=args.epochs, loss=args.loss)
        seconds = time.perf_counter() - start
        print(f"{'behavior-' + kind:22s} {rmse(prediction, y):7.3f} {mae(prediction, y):7.3f} {seconds:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
