"""fastrec.metrics on hand-computed cases: full ranking (with and without excluded seen items),
the pessimistic tie rule, column 0 never ranked, and the sampled-negatives protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastrec.metrics import metrics_from_ranks, rank_metrics, sampled_metrics, sampled_ranks, target_ranks

# Row 0: items 1..5 score 0.1 0.9 0.5 0.3 0.7; target 4 (0.3) is beaten by items 2, 3, 5 -> rank 4.
# Row 1: target 2 (0.9) is the best -> rank 1. Column 0 (padding) scores highest and never counts.
SCORES = torch.tensor([[9.0, 0.1, 0.9, 0.5, 0.3, 0.7], [9.0, 0.2, 0.9, 0.4, 0.3, 0.1]])
TARGET = torch.tensor([4, 2])


def test_full_ranking_hand_computed():
    assert target_ranks(SCORES, TARGET).tolist() == [4, 1]
    m = rank_metrics(SCORES, TARGET, ks=(1, 3, 5))
    assert m["HR@1"] == 0.5 and m["HR@3"] == 0.5 and m["HR@5"] == 1.0
    assert m["NDCG@1"] == pytest.approx(0.5)
    assert m["NDCG@5"] == pytest.approx((1 / math.log2(5) + 1.0) / 2)
    assert m["MRR@5"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["MRR@3"] == pytest.approx(0.5)


def test_excluding_seen_items_list_and_padded_tensor_agree():
    # Row 0 has seen items 2 and 4 (4 is the target, so it stays): rank 4 -> 3.
    seen = [np.array([2, 4]), np.array([], dtype=np.int64)]
    assert target_ranks(SCORES, TARGET, exclude=seen).tolist() == [3, 1]
    padded = torch.tensor([[0, 2, 4], [0, 0, 0]])
    assert target_ranks(SCORES, TARGET, exclude=padded).tolist() == [3, 1]
    m = rank_metrics(SCORES, TARGET, ks=(3,), exclude=seen)
    assert m["NDCG@3"] == pytest.approx((0.5 + 1.0) / 2)


def test_ties_count_against_the_target():
    scores = torch.zeros(2, 11)
    target = torch.tensor([1, 10])
    assert target_ranks(scores, target).tolist() == [10, 10]
    assert rank_metrics(scores, target, ks=(5,))["HR@5"] == 0.0


def test_metrics_from_ranks_formulae():
    m = metrics_from_ranks(torch.tensor([1, 2, 11]), ks=(10,))
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["MRR@10"] == pytest.approx((1 + 0.5) / 3)


def test_sampled_with_every_other_item_equals_full_ranking():
    scores = torch.randn(8, 30)
    target = torch.randint(1, 30, (8,))
    assert torch.equal(sampled_ranks(scores, target, n_negatives=28), target_ranks(scores, target))


def test_sampled_never_draws_the_target_or_excluded_items():
    # Excluded items score highest: if one were drawn as a negative the rank would exceed 1.
    scores = torch.randn(16, 200)
    target = torch.randint(1, 200, (16,))
    scores[torch.arange(16), target] = 5.0
    seen = torch.randint(1, 200, (16, 60))
    seen = torch.where(seen == target[:, None], 0, seen)
    scores.scatter_(1, seen, 10.0)
    ranks = sampled_ranks(scores, target, n_negatives=100, seed=1, exclude=seen)
    assert ranks.tolist() == [1] * 16


def test_sampled_is_seeded_and_counts_beaten_negatives():
    scores = torch.randn(64, 500)
    target = torch.randint(1, 500, (64,))
    a = sampled_metrics(scores, target, n_negatives=100, seed=7)
    assert a == sampled_metrics(scores, target, n_negatives=100, seed=7)
    ranks = sampled_ranks(scores, target, n_negatives=100, seed=7)
    assert int(ranks.min()) >= 1 and int(ranks.max()) <= 101
    # Random scores: the target's sampled rank is uniform on 1..101, so HR@10 is near 10/101.
    big = torch.randn(4000, 300)
    hr = sampled_metrics(big, torch.randint(1, 300, (4000,)), ks=(10,), n_negatives=100, seed=0)["HR@10"]
    assert abs(hr - 10 / 101) < 0.02


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"scores must be \(batch, n_items \+ 1\)"):
        rank_metrics(torch.zeros(3), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"target must be \(batch,\) = \(2,\), got \(3,\)"):
        rank_metrics(SCORES, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"target items must lie in 1\.\.5, got 0\.\.2"):
        rank_metrics(SCORES, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="scores contain NaN"):
        rank_metrics(torch.full((1, 3), float("nan")), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"n_negatives must be in 1\.\.4"):
        sampled_metrics(SCORES, TARGET, n_negatives=5)
