"""Catalogue scoring (fastrec.functional.topk_scores / target_ranks, fastrec.metrics.full_ranks,
recommend() and full-ranking evaluation in item tiles).

References: the dense score matrix ``h @ W.T`` in float64, sorted with ``torch.sort(descending=True,
stable=True)`` (the contract's order: equal scores by lower index) for the top-k, and counted
``>=`` the target's score for the ranks (``fastrec.metrics.target_ranks``, the rule used before).
Integer-valued inputs make every score exact in any summation order, so those tests compare
values and indices exactly and have many ties; random inputs compare values within the fp32
bound (relative 1e-5) and indices exactly where no two scores are closer than the bound.
Every backend (cpp, triton in the interpreter, torch) runs each case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastrec
from fastrec import functional as F
from fastrec import metrics, routing
from fastrec.ops import scoring as scoring_ops

BACKENDS = ["cpp", "triton", "torch"]


def integer_inputs(B: int, V: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (B, d), generator=g).to(dtype)
    W = torch.randint(-2, 3, (V, d), generator=g).to(dtype)
    return h, W


def dense_topk(h, W, k, exclude_rows=None):
    scores = h.double() @ W.double().t()
    if exclude_rows is not None:
        for b, row in enumerate(exclude_rows):
            row = [i for i in row if i >= 0]
            scores[b, row] = float("-inf")
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def dense_ranks(h, W, target, exclude_rows=None):
    scores = h.double() @ W.double().t()
    ranks = []
    for b in range(h.shape[0]):
        s, t = scores[b], int(target[b])
        keep = torch.ones_like(s, dtype=torch.bool)
        if exclude_rows is not None:
            keep[[i for i in exclude_rows[b] if i >= 0]] = False
        keep[t] = True
        ranks.append(int(((s >= s[t]) & keep).sum()))
    return torch.tensor(ranks)


def shapes(backend):
    """(B, V, d): tiles and chunks of both native backends (cpp: 512-item tiles, 64-row blocks)."""
    if backend == "triton":
        return [(1, 70, 20), (5, 200, 8), (17, 130, 33)]
    return [(1, 1, 3), (1, 1500, 64), (3, 700, 17), (70, 1100, 25)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_integer_scores_exact_with_ties(backend):
    for B, V, d in shapes(backend):
        h, W = integer_inputs(B, V, d, seed=V)
        for k in sorted({1, min(7, V), V}):
            with fastrec.use_backend(backend):
                values, items = F.topk_scores(h, W, k)
            ref_values, ref_items = dense_topk(h, W, k)
            assert values.dtype == h.dtype and items.dtype == torch.long and items.shape == (B, k)
            assert torch.equal(values.double(), ref_values), (B, V, d, k)
            assert torch.equal(items, ref_items), (B, V, d, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_random_scores_match_fp64(backend):
    B, V, d = (4, 150, 24) if backend == "triton" else (9, 2000, 64)
    h, W = torch.randn(B, d) * 5, torch.randn(V, d)
    with fastrec.use_backend(backend):
        values, items = F.topk_scores(h, W, 10)
    ref_values, ref_items = dense_topk(h, W, 10)
    assert (values.double() - ref_values).norm() / ref_values.norm() <= 1e-5
    gaps = (ref_values[:, :-1] - ref_values[:, 1:]).abs().min()
    assert gaps > 1e-3  # no near-ties in this draw, so the order is determined
    assert torch.equal(items, ref_items)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_exclusions_every_form_and_more_k_than_items_left(backend):
    B, V, d = 3, 90, 16
    h, W = integer_inputs(B, V, d, seed=3)
    rows = [[5, 2, 5, 89], [], list(range(0, 90, 2))]  # a repeat, an empty row, half the catalogue
    padded = torch.full((B, 45), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    k = 60  # row 2 has only 45 items left: the rest are excluded ones at -inf, lower index first
    ref_values, ref_items = dense_topk(h, W, k, rows)
    with fastrec.use_backend(backend):
        for exclude in (rows, [np.array(r, dtype=np.int32) for r in rows], [torch.tensor(r) for r in rows], padded):
            values, items = F.topk_scores(h, W, k, exclude=exclude)
            assert torch.equal(values.double(), ref_values)
            assert torch.equal(items, ref_items)
    assert torch.isinf(ref_values[2, 45:]).all() and torch.equal(ref_items[2, 45:], torch.arange(0, 30, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_nan_ranks_first_as_torch_sort(backend):
    h, W = integer_inputs(2, 40, 8, seed=1)
    W[7, 0] = float("nan")
    with fastrec.use_backend(backend):
        values, items = F.topk_scores(h, W, 3)
    ref_values, ref_items = torch.sort(h @ W.t(), dim=1, descending=True, stable=True)
    assert torch.isnan(values[:, 0]).all() and (items[:, 0] == 7).all()
    assert torch.equal(items, ref_items[:, :3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_integer_scores_exact(backend):
    for B, V, d in shapes(backend):
        h, W = integer_inputs(B, V, d, seed=B + V)
        g = torch.Generator().manual_seed(V)
        target = torch.randint(0, V, (B,), generator=g)
        rows = [torch.randint(-1, V, (int(b) % 5,), generator=g).tolist() + [int(target[b])] for b in range(B)]
        with fastrec.use_backend(backend):
            plain = F.target_ranks(h, W, target)
            excluded = F.target_ranks(h, W, target, exclude=rows)
        assert torch.equal(plain, dense_ranks(h, W, target)), (B, V, d)
        assert torch.equal(excluded, dense_ranks(h, W, target, rows)), (B, V, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_count_copies_of_the_target_against_it(backend):
    """Random (inexact) scores: rows of W equal to the target's row score exactly as the target
    does, so the backend must compute the target's score as it computes every other."""
    for B, V, d in [(3, 100, 20)] if backend == "triton" else [(5, 1300, 64), (12, 1300, 50)]:  # cpp: both paths
        h, W = torch.randn(B, d), torch.randn(V, d)
        target = torch.arange(B) * 7 + 3
        for b in range(B):
            W[600 % V + b * 11 : 600 % V + b * 11 + 3] = W[target[b]]  # three copies of each target
        with fastrec.use_backend(backend):
            ranks = F.target_ranks(h, W, target)
        scores = h.double() @ W.double().t()
        strictly = (scores > scores[torch.arange(B), target].unsqueeze(1)).sum(dim=1)
        assert torch.equal(ranks, strictly + 1 + 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_nan_rows_are_zero(backend):
    h, W = integer_inputs(3, 50, 8, seed=2)
    h[1, 0] = float("nan")
    with fastrec.use_backend(backend):
        ranks = F.target_ranks(h, W, torch.tensor([1, 2, 3]))
    assert ranks[1] == 0 and (ranks[[0, 2]] > 0).all()


def test_cpp_results_do_not_depend_on_threads():
    h, W = torch.randn(3, 64), torch.randn(5000, 64)
    target = torch.tensor([1, 4000, 4999])
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with fastrec.use_backend("cpp"):
                out.append((*F.topk_scores(h, W, 20, exclude=[[0], [], [1, 2]]), F.target_ranks(h, W, target)))
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0], other, strict=True))


def test_float64_and_16_bit_inputs():
    h, W = integer_inputs(2, 300, 16, dtype=torch.float64)
    with fastrec.use_backend("cpp"):
        values, items = F.topk_scores(h, W, 5)
    ref_values, ref_items = dense_topk(h, W, 5)
    assert values.dtype == torch.float64 and torch.equal(values, ref_values) and torch.equal(items, ref_items)
    fastrec.stats(reset=True)
    values, items = F.topk_scores(h.bfloat16(), W.bfloat16(), 5)  # small integers: exact in bf16
    assert torch.equal(items, ref_items)
    assert any(op == "scoring" and backend == "torch" for op, backend, _ in fastrec.stats())


def test_small_catalogues_route_to_the_dense_path():
    h, W = torch.randn(2, 8), torch.randn(routing.SCORING_DENSE_BELOW - 1, 8)
    fastrec.stats(reset=True)
    values, items = F.topk_scores(h, W, 4)
    ref = (h @ W.t()).topk(4)
    assert torch.equal(values, ref.values) and torch.equal(items, ref.indices)
    assert fastrec.stats() == {("scoring", "torch", routing.SCORING_SMALL_CPU.reason): 1}
    tiled = ("scoring", "cpp" if scoring_ops.HAVE_CPP else "torch", "")
    rows = torch.randn(routing.SCORING_SERVING_ROWS, 8)
    F.target_ranks(rows, torch.randn(routing.SCORING_DENSE_BELOW, 8), torch.arange(routing.SCORING_SERVING_ROWS))
    assert fastrec.stats()[tiled] == 1
    F.topk_scores(h[:1], torch.randn(routing.SCORING_SERVING_DENSE_BELOW - 1, 8), 3)  # serving: dense below 100k
    assert fastrec.stats()[("scoring", "torch", routing.SCORING_SMALL_CPU.reason)] == 2
    F.topk_scores(h[:1], torch.randn(routing.SCORING_SERVING_DENSE_BELOW, 8), 3)
    assert fastrec.stats()[tiled] == 2
    assert any(r["name"] == "scoring-small-cpu" and r["applies"] for r in routing.routes("cpu"))


def test_full_ranks_equal_metrics_target_ranks():
    """The model convention: row 0 of the table is padding, items 1..n, seen items excluded."""
    B, n_items, d = 6, 400, 16
    hidden, table = torch.randn(B, d), torch.randn(n_items + 1, d)
    table[5] = table[9]  # an exact tie
    target = torch.tensor([9, 5, 1, 400, 77, 9])
    seen = [np.array([1, 2, 9]), np.array([]), np.array([400, 3]), np.array([0, 7]), np.array([77]), np.array([5])]
    scores = hidden @ table.t()
    scores[:, 0] = float("-inf")
    for backend in ("cpp", "torch"):
        with fastrec.use_backend(backend):
            plain, excluded = metrics.full_ranks(hidden, table, target, exclude=seen)
            _, excluded_padded = metrics.full_ranks(hidden, table, target, exclude=torch.tensor([[1, 2, 9], [0, 0, 0],
                                                    [400, 3, 0], [7, 0, 0], [77, 0, 0], [5, 0, 0]]))  # fmt: skip
        assert torch.equal(plain, metrics.target_ranks(scores, target))
        assert torch.equal(excluded, metrics.target_ranks(scores, target, exclude=seen))
        assert torch.equal(excluded_padded, excluded)
    hidden[2, 0] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN"), fastrec.use_backend("cpp"):
        metrics.full_ranks(hidden, table, target)


def test_recommend_on_a_large_catalogue_equals_the_dense_path():
    from fastrec.models import GRU4Rec

    torch.manual_seed(0)
    n_items = routing.SCORING_SERVING_DENSE_BELOW + 5  # three rows: tiled from here on
    model = GRU4Rec(n_items, max_len=5, dim=8, hidden=8, backend="fastrec")
    histories = [[1, 2, 3], [n_items, 17], [4]]
    fastrec.stats(reset=True)
    items, scores = model.recommend(histories, k=10)
    assert ("scoring", "cpp" if scoring_ops.HAVE_CPP else "torch", "") in fastrec.stats()
    twin = GRU4Rec(n_items, max_len=5, dim=8, hidden=8, backend="torch")
    twin.load_state_dict(model.state_dict())
    fastrec.stats(reset=True)
    twin_items, twin_scores = twin.recommend(histories, k=10)
    assert {key[:2] for key in fastrec.stats() if key[0] == "scoring"} == {("scoring", "torch")}  # the torch twin
    assert torch.allclose(twin_scores, scores, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        hidden = model(model.make_input(histories)).double()
    dense = hidden @ model.item_embedding.weight.detach().double().t()
    dense[:, 0] = float("-inf")
    for b, seen in enumerate(histories):
        dense[b, seen] = float("-inf")
    ref_scores, ref_items = torch.sort(dense, dim=1, descending=True, stable=True)
    bound = 1e-5 * ref_scores[:, :10].abs().max()
    assert (scores.double() - ref_scores[:, :10]).abs().max() <= bound
    # Items in the reference's order wherever the reference's scores are more than the bound apart.
    assert ((dense.gather(1, items) - ref_scores[:, :10]).abs() <= bound).all()
    apart = (ref_scores[:, :10] - ref_scores[:, 1:11]).abs() > 2 * bound
    assert torch.equal(items[:, :1][apart[:, :1]], ref_items[:, :1][apart[:, :1]])


def test_evaluation_equals_dense_metrics():
    from fastrec.models import SASRec
    from fastrec.train import evaluate

    torch.manual_seed(1)
    n_items = 300
    model = SASRec(n_items, max_len=6, dim=8, n_blocks=1, n_heads=1, backend="torch")
    g = np.random.default_rng(0)
    histories = [g.integers(1, n_items + 1, size=int(g.integers(1, 9))) for _ in range(40)]
    targets, users = g.integers(1, n_items + 1, size=40), np.arange(40)
    with fastrec.use_backend("cpp"):
        result = evaluate(model, histories, targets, users, batch_size=16)
    model.eval()
    with torch.no_grad():
        scores = model.scores(model.make_input(histories, full_length=True))
    target = torch.as_tensor(targets)
    expect = metrics.metrics_from_ranks(metrics.target_ranks(scores, target), (5, 10, 20))
    expect_seen = metrics.metrics_from_ranks(metrics.target_ranks(scores, target, exclude=histories), (5, 10, 20))
    for name, value in expect.items():
        assert result[name] == pytest.approx(value, abs=1e-12)
        assert result[f"{name} (seen excluded)"] == pytest.approx(expect_seen[name], abs=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda h, W: F.topk_scores(h, W, 0), "k must be an int in 1..50"),
        (lambda h, W: F.topk_scores(h, W, 51), "k must be an int in 1..50"),
        (lambda h, W: F.topk_scores(h[0], W, 3), r"h must be a floating \(B, d\)"),
        (lambda h, W: F.topk_scores(h, W[:, :3], 3), r"W must be \(V, d\) = \(V, 4\)"),
        (lambda h, W: F.topk_scores(h, W.double(), 3), "W must match h's dtype"),
        (lambda h, W: F.topk_scores(h, W, 3, exclude=[[1]]), r"exclude must hold one 1-D int sequence per row \(2\)"),
        (lambda h, W: F.topk_scores(h, W, 3, exclude=[[1], [50]]), r"exclude ids must lie in 0..49"),
        (lambda h, W: F.topk_scores(h, W, 3, exclude=[[1.5], []]), r"exclude\[0\] must be a 1-D int"),
        (lambda h, W: F.topk_scores(h, W, 3, exclude=torch.zeros(3, 2, dtype=torch.long)), "exclude must be an int"),
        (lambda h, W: F.target_ranks(h, W, torch.tensor([0, 50])), r"target items must lie in 0..49"),
        (lambda h, W: F.target_ranks(h, W, torch.tensor([0.0, 1.0])), r"target must be int \(B,\)"),
    ],
)
def test_bad_arguments_name_the_argument(call, message):
    h, W = torch.randn(2, 4), torch.randn(50, 4)
    with pytest.raises(ValueError, match=message):
        call(h, W)
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        F.topk_scores(h, W.numpy(), 3)


def test_registered_ops_pass_opcheck():
    if not scoring_ops.HAVE_CPP:
        pytest.skip("fastrec._C has no scoring ops")
    h, W = torch.randn(3, 8), torch.randn(40, 8)
    offsets, ids = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 5, 39])
    torch.library.opcheck(torch.ops.fastrec.scoring_topk_cpp, (h, W, 4, offsets, ids))
    torch.library.opcheck(torch.ops.fastrec.scoring_ranks_cpp, (h, W, torch.tensor([0, 1, 2]), offsets, ids))
