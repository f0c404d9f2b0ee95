"""Sampled softmax (log-Q correction) and gBCE against plain-torch formulations written here, in
fp64, row by row: the loss, every gradient, gradcheck, the RNG stream and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastrec.functional as FF
from fastrec.ops import sampled_softmax as ops


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_negatives(sampler, n, V, frequency, seed):
    """The negatives the contract says are drawn: torch's own calls on a generator seeded alike."""
    g = _generator(seed)
    if sampler == "uniform":
        return torch.randint(0, V, (n,), generator=g), torch.full((V,), 1.0 / V, dtype=torch.float64)
    q = frequency.double() / frequency.double().sum()
    return torch.multinomial(q, n, replacement=True, generator=g), q


def _reference_sampled_softmax(h, W, target, negatives, q, ignore_index, reduction):
    """Row by row: candidates = distinct (valid targets + negatives), logit - log(count among the
    targets + n q), cross-entropy at the target."""
    valid_targets = [int(t) for t in target if int(t) != ignore_index]
    pool = sorted(set(valid_targets) | {int(c) for c in negatives})
    n = len(negatives)
    losses = []
    for r in range(h.shape[0]):
        t = int(target[r])
        if t == ignore_index:
            losses.append(None)
            continue
        logits = []
        for c in pool:
            expected = valid_targets.count(c) + (0.0 if q is None else n * float(q[c]))
            logits.append(torch.dot(h[r], W[c]) - math.log(expected))
        logits = torch.stack(logits)
        losses.append(torch.logsumexp(logits, 0) - logits[pool.index(t)])
    kept = [x for x in losses if x is not None]
    if reduction == "none":
        return torch.stack([h.new_zeros(()) if x is None else x for x in losses])
    total = torch.stack(kept).sum()
    return total if reduction == "sum" else total / len(kept)


def _reference_gbce(h, W, target, negatives, t, ignore_index, reduction):
    """-log(sigmoid(s+)^beta) - sum log(1 - sigmoid(s_j)) over negatives != target, per row."""
    V, n = W.shape[0], len(negatives)
    alpha = n / (V - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    losses = []
    for r in range(h.shape[0]):
        tr = int(target[r])
        if tr == ignore_index:
            losses.append(h.new_zeros(()))
            continue
        value = -beta * torch.log(torch.sigmoid(torch.dot(h[r], W[tr])))
        for c in negatives.tolist():
            if c != tr:
                value = value - torch.log(1 - torch.sigmoid(torch.dot(h[r], W[c])))
        losses.append(value)
    per_row = torch.stack(losses)
    n_valid = int((target != ignore_index).sum())
    return {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / n_valid}[reduction]


def _inputs(R=6, V=9, d=4, seed=0, ignore=()):
    g = _generator(seed)
    h = torch.randn(R, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (R,), generator=g)
    for r in ignore:
        target[r] = -100
    return h, W, target


@pytest.mark.parametrize("sampler", ["uniform", "popularity", "in-batch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sampled_softmax_matches_reference(sampler, reduction):
    V, n = 9, 5
    h, W, target = _inputs(V=V, ignore=(2,))
    target[4] = target[0]  # a target twice: its expected count is 2 + n q
    frequency = torch.arange(1, V + 1, dtype=torch.float32) if sampler == "popularity" else None
    count = 0 if sampler == "in-batch" else n
    loss = FF.sampled_softmax_loss(
        h, W, target, count, sampler=sampler, frequency=frequency, reduction=reduction, generator=_generator(7)
    )
    if sampler == "in-batch":
        negatives, q = torch.empty(0, dtype=torch.long), None
    else:
        negatives, q = _reference_negatives(sampler, n, V, frequency, 7)
    ref = _reference_sampled_softmax(h, W, target, negatives, q, -100, reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(loss, (h, W), grad_out)
    ref_grads = torch.autograd.grad(ref, (h, W), grad_out)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[0][2].abs().sum() == 0, "an ignored row passes no gradient"


def test_sampled_softmax_accidental_hits_are_not_negatives():
    """Negatives made only of row targets: every candidate is a target, none is a second copy."""
    h, W, target = _inputs(R=3, V=5)
    target = torch.tensor([1, 3, 3])
    negatives = torch.tensor([3, 3, 1])
    loss = ops.sampled_softmax(h, W, target, negatives, torch.full((5,), 0.2, dtype=torch.float64), -100, "none")
    logits = h @ W[[1, 3]].t() - torch.log(torch.tensor([1 + 3 * 0.2, 2 + 3 * 0.2], dtype=torch.float64))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 1, 1]), reduction="none"))


def test_uniform_correction_with_distinct_targets():
    """Distinct targets, uniform negatives: a target's column is corrected by -log(1 + n / V), a
    column drawn only as a negative by -log(n / V); then it is plain CE over the candidate table."""
    h, W, target = _inputs(R=4, V=50)
    target = torch.tensor([3, 7, 11, 20])
    loss = FF.sampled_softmax_loss(h, W, target, 6, generator=_generator(1))
    negatives, _ = _reference_negatives("uniform", 6, 50, None, 1)
    assert not set(negatives.tolist()) & set(target.tolist()), "this seed's negatives miss the targets"
    candidates = sorted(set(target.tolist()) | set(negatives.tolist()))
    bias = torch.tensor([-math.log((c in target.tolist()) + 6 / 50) for c in candidates], dtype=torch.float64)
    column = torch.tensor([candidates.index(int(t)) for t in target])
    torch.testing.assert_close(loss, F.cross_entropy(h @ W[candidates].t() + bias, column))


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gbce_matches_reference(sampler, reduction):
    V, n, t = 9, 6, 0.6
    h, W, target = _inputs(V=V, ignore=(1,))
    frequency = torch.arange(V, 0, -1).float() if sampler == "popularity" else None
    loss = FF.gbce_loss(
        h, W, target, n, t=t, sampler=sampler, frequency=frequency, reduction=reduction, generator=_generator(3)
    )
    negatives, _ = _reference_negatives(sampler, n, V, frequency, 3)
    assert set(negatives.tolist()) & set(target.tolist()), "this seed should exercise an accidental hit"
    ref = _reference_gbce(h, W, target, negatives, t, -100, reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(ref)
    for got, want in zip(
        torch.autograd.grad(loss, (h, W), grad_out), torch.autograd.grad(ref, (h, W), grad_out), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gbce_beta_is_the_papers():
    assert ops.gbce_beta(4, 101, 0.0) == pytest.approx(1.0)  # t = 0: BCE
    assert ops.gbce_beta(4, 101, 1.0) == pytest.approx(0.04)  # t = 1: the sampling rate
    assert ops.gbce_beta(256, 3417, 0.75) == pytest.approx(0.25 + 0.75 * 256 / 3416)


def test_gbce_t0_is_sum_bce():
    h, W, target = _inputs()
    loss = FF.gbce_loss(h, W, target, 4, t=0.0, generator=_generator(5))
    negatives, _ = _reference_negatives("uniform", 4, 9, None, 5)
    pos = F.binary_cross_entropy_with_logits(
        (h * W[target]).sum(-1), torch.ones(6, dtype=torch.float64), reduction="none"
    )
    neg = F.binary_cross_entropy_with_logits(
        h @ W[negatives].t(), torch.zeros(6, 4, dtype=torch.float64), reduction="none"
    )
    neg = neg.masked_fill(negatives.unsqueeze(0) == target.unsqueeze(1), 0.0)
    torch.testing.assert_close(loss, (pos + neg.sum(1)).mean())


@pytest.mark.parametrize("which", ["sampled-uniform", "sampled-popularity", "sampled-in-batch", "gbce"])
def test_gradcheck(which):
    h, W, target = _inputs(R=3, V=6, d=3, ignore=(1,))
    freq = torch.tensor([1.0, 2, 0, 4, 5, 1])

    def fn(h, W):
        g = _generator(11)
        if which == "gbce":
            return FF.gbce_loss(h, W, target, 3, generator=g)
        sampler = which.removeprefix("sampled-")
        n = 0 if sampler == "in-batch" else 3
        frequency = freq if sampler == "popularity" else None
        return FF.sampled_softmax_loss(h, W, target, n, sampler=sampler, frequency=frequency, generator=g)

    assert torch.autograd.gradcheck(fn, (h, W))


def test_rng_stream_is_torchs_and_seedable():
    h, W, target = _inputs(V=30)
    losses = [FF.sampled_softmax_loss(h, W, target, 5, generator=_generator(s)) for s in (1, 1, 2)]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]
    torch.manual_seed(4)
    expect = torch.randint(0, 30, (5,))
    torch.manual_seed(4)
    drawn, _ = ops.draw_negatives(5, 30, "uniform")
    assert torch.equal(drawn, expect), "no generator: the default one, as torch.randint draws"
    torch.manual_seed(4)
    a = FF.gbce_loss(h, W, target, 5)
    torch.manual_seed(4)
    assert a == FF.gbce_loss(h, W, target, 5), "the default generator, reseeded, repeats the loss"


def test_float32_close_to_float64():
    h, W, target = _inputs(R=16, V=40, d=8)
    for fn in (FF.sampled_softmax_loss, FF.gbce_loss):
        ref = fn(h, W, target, 7, generator=_generator(2))
        got = fn(h.float(), W.float(), target, 7, generator=_generator(2))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "zipf"}, "sampler must be one of"),
        ({"sampler": "popularity"}, "frequency must be"),
        ({"sampler": "in-batch"}, "n_negatives must be 0"),
        ({"frequency": torch.ones(9)}, "frequency is for sampler='popularity'"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"n_negatives": 0}, "n_negatives must be >= 1"),
        ({"target": torch.zeros(6, dtype=torch.int32)}, "target must be"),
        ({"W": torch.randn(9, 5, dtype=torch.float64)}, "same d"),
        ({"W": torch.randn(9, 4)}, "share a float dtype"),
        ({"h": "x"}, "h must be a torch.Tensor"),
    ],
)
def test_bad_arguments(kwargs, match):
    h, W, target = _inputs()
    args = {"h": h, "W": W, "target": target, "n_negatives": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        FF.sampled_softmax_loss(args.pop("h"), args.pop("W"), args.pop("target"), args.pop("n_negatives"), **args)


def test_gbce_bad_arguments():
    h, W, target = _inputs()
    with pytest.raises(ValueError, match="t must be"):
        FF.gbce_loss(h, W, target, 3, t=1.5)
    with pytest.raises(ValueError, match="'in-batch'"):
        FF.gbce_loss(h, W, target, 0, sampler="in-batch")
