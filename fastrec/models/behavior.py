"""Purchase prediction from behaviour (the seed document's section 4): CNN, RNN and causal
self-attention regressors over a customer's weekly purchase sequence (CDNOW).

Each model reads ``(batch, weeks, features)`` from :meth:`fastrec.data.cdnow.CDNOW.features` and
predicts the number of repeat-purchase weeks in the 39 hold-out weeks. The head outputs a
log-rate; the prediction is its exponential, trained with the Poisson loss (``loss="poisson"``,
the default: the target is a count) or with MSE on the prediction (``loss="mse"``).

Protocol (:func:`cross_fit`): the customers are split into ``folds`` groups; each group is
predicted by a model trained on the other groups' calibration sequences and hold-out counts
(a tenth of those held out for early stopping), so every customer's prediction comes from a
model that never saw that customer's hold-out, and RMSE/MAE cover all 23,570 customers, like the
naive and BG/NBD references (those two use only the calibration data of each customer itself).

Run: ``python -m fastrec.models.behavior --model cnn|rnn|attention|all``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

import fastrec.nn as fnn
from fastrec.data.cdnow import CDNOW, bgnbd_expected, fit_bgnbd, load_cdnow, mae, rmse

KINDS = ("cnn", "rnn", "attention")
MAX_WEEKS = 40


class _Head(nn.Module):
    """Pooled sequence representation -> log-rate."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled).squeeze(-1)


class BehaviorCNN(nn.Module):
    """Two 1-D convolutions over the weeks (kernel 3, then dilated 3), pooled by mean, max and the
    last week, on ``fastrec.nn.Conv1d``."""

    def __init__(self, n_features: int = 4, channels: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.conv1 = fnn.Conv1d(n_features, channels, 3, padding=1)
        self.conv2 = fnn.Conv1d(channels, channels, 3, padding=2, dilation=2)
        self.head = _Head(3 * channels, hidden)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x.transpose(1, 2)))
        h = torch.relu(self.conv2(h))
        return self.head(torch.cat([h.mean(dim=2), h.amax(dim=2), h[:, :, -1]], dim=1))


class BehaviorRNN(nn.Module):
    """``fastrec.nn.GRU`` over the weeks; the last hidden state feeds the head."""

    def __init__(self, n_features: int = 4, hidden_size: int = 32, hidden: int = 32) -> None:
        super().__init__()
        self.gru = fnn.GRU(n_features, hidden_size, batch_first=True)
        self.head = _Head(hidden_size, hidden)

    def forward(self, x: Tensor) -> Tensor:
        _, h_n = self.gru(x)
        return self.head(h_n[-1])


class BehaviorAttention(nn.Module):
    """Causal self-attention blocks (``fastrec.nn.MultiheadAttention``, pre-norm, learned week
    positions); the last week's output feeds the head."""

    def __init__(
        self, n_features: int = 4, n_weeks: int = 40, dim: int = 32, n_heads: int = 2, n_blocks: int = 2
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, dim)
        self.position = nn.Embedding(n_weeks, dim)
        self.attn = nn.ModuleList(fnn.MultiheadAttention(dim, n_heads, batch_first=True) for _ in range(n_blocks))
        self.norm1 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_blocks))
        self.norm2 = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_blocks))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(n_blocks)
        )
        self.head = _Head(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        weeks = x.shape[1]
        if weeks > self.position.num_embeddings:
            raise ValueError(f"x has {weeks} weeks, the model was built for at most {self.position.num_embeddings}")
        h = self.inp(x) + self.position.weight[:weeks]
        causal = torch.ones(weeks, weeks, dtype=torch.bool, device=x.device).triu(1)
        for attn, norm1, norm2, ffn in zip(self.attn, self.norm1, self.norm2, self.ffn, strict=True):
            q = norm1(h)
            h = h + attn(q, q, q, attn_mask=causal, need_weights=False, is_causal=True)[0]
            h = h + ffn(norm2(h))
        return self.head(h[:, -1])


def build(kind: str, n_features: int, n_weeks: int) -> nn.Module:
    if kind == "cnn":
        return BehaviorCNN(n_features)
    if kind == "rnn":
        return BehaviorRNN(n_features)
    if kind == "attention":
        return BehaviorAttention(n_features, n_weeks)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


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
    parser = argparse.ArgumentParser(prog="python -m fastrec.models.behavior", description=__doc__.split("\n")[0])
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
