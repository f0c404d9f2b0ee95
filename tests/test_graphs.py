"""fastrec.graphs: fixed-shape training steps and their CUDA-graph capture.

References: the padded step against the same model's step on the unpadded batch (loss within
fp32 rounding of the other summation order, every parameter after an SGD step likewise); the
captured step against the eager step from the same state and seed (cuda-marked: the parameters
after several steps, and fresh dropout masks per replay).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastrec import graphs
from fastrec.data import Batch
from fastrec.models import MODELS

N_ITEMS, N_USERS, L = 30, 12, 6


def _model(name: str, backend: str = "fastrec", dropout: float = 0.0, device="cpu"):
    torch.manual_seed(0)
    if name == "caser":
        model = MODELS[name](N_ITEMS, N_USERS, max_len=L, dim=16, backend=backend, dropout=dropout)
    else:
        model = MODELS[name](N_ITEMS, max_len=L, dim=16, backend=backend, dropout=dropout)
    return model.to(device).train()


def _batch(rows: int, side: str, device="cpu") -> Batch:
    lengths = torch.randint(1, L + 1, (rows,))
    items = torch.zeros(rows, L, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids = torch.randint(1, N_ITEMS + 1, (n,))
        if side == "right":
            items[i, :n] = ids
        else:
            items[i, L - n :] = ids
    target = torch.randint(1, N_ITEMS + 1, (rows,))
    user = torch.randint(0, N_USERS + 1, (rows,))
    return Batch(items, lengths, target, user).to(device)


def test_pad_batch_repeats_row_0_with_target_0():
    b = _batch(3, "right")
    items, lengths, target, user = graphs.pad_batch(b.items, b.lengths, b.target, b.user, 5)
    assert (
        items.shape == (5, L) and torch.equal(items[:3], b.items) and torch.equal(items[3:], b.items[:1].expand(2, L))
    )
    assert torch.equal(lengths, torch.cat([b.lengths, b.lengths[:1], b.lengths[:1]]))
    assert torch.equal(target, torch.cat([b.target, torch.zeros(2, dtype=torch.long)]))
    assert torch.equal(user[3:], b.user[:1].expand(2))
    same = graphs.pad_batch(b.items, b.lengths, b.target, b.user, 3)
    assert all(x is y for x, y in zip(same, (b.items, b.lengths, b.target, b.user), strict=True))
    with pytest.raises(ValueError, match="more than the step's 2"):
        graphs.pad_batch(b.items, b.lengths, b.target, b.user, 2)
    with pytest.raises(ValueError, match="at least one row"):
        graphs.pad_batch(b.items[:0], b.lengths[:0], b.target[:0], b.user[:0], 2)


@pytest.mark.parametrize("loss_kind", ["ce", "bce"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_rows_count_in_neither_loss_nor_gradient(name, loss_kind):
    """A 5-row batch run as an 8-row fixed-shape step: the same loss and the same SGD update as
    the 5 rows alone (bce draws its negatives from torch's RNG: the same seed on both sides, and
    the padded rows draw after the real ones)."""
    batch = _batch(5, MODELS[name].padding_side)
    plain = _model(name)
    padded = copy.deepcopy(plain)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.5)
    step = graphs.capture_train_step(
        padded, torch.optim.SGD(padded.parameters(), lr=0.5), batch, loss_kind=loss_kind, rows=8, graph=False
    )
    assert step.rows == 8 and step.graph is None
    torch.manual_seed(1)
    inputs = graphs.StepInputs(batch.items, batch.lengths, batch.target, batch.user, torch.ones(()))
    want = graphs.train_step(plain, sgd, inputs, loss_kind)
    torch.manual_seed(1)
    got = step(batch.items, batch.lengths, batch.target, batch.user)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for (key, p), q in zip(plain.named_parameters(), padded.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=key)


def test_a_step_at_weight_0_adds_nothing():
    batch = _batch(4, "right")
    model = _model("gru4rec")
    before = copy.deepcopy(model.state_dict())
    step = graphs.capture_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, graph=False)
    loss = step(batch.items, batch.lengths, batch.target, batch.user, weight=0.0)
    assert loss.item() == 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert step(batch.items, batch.lengths, batch.target, batch.user).item() > 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_each_call_copies_its_batch_into_the_static_inputs():
    first, second = _batch(4, "right"), _batch(3, "right")
    model = _model("sasrec")
    step = graphs.capture_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), first, graph=False)
    static = step.inputs
    step(second.items, second.lengths, second.target, second.user, weight=0.25)
    assert step.inputs is static
    assert torch.equal(static.items[:3], second.items) and torch.equal(static.items[3], second.items[0])
    assert static.target.tolist() == [*second.target.tolist(), 0]
    assert static.weight.item() == 0.25


def test_capture_validates_its_arguments():
    batch = _batch(4, "right")
    model = _model("gru4rec")
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="optimizer must be capturable"):
        graphs.capture_train_step(model, adam, batch)
    with pytest.raises(ValueError, match="graph=True needs the model on a CUDA device"):
        graphs.capture_train_step(model, _FakeCapturable(model.parameters()), batch)
    with pytest.raises(ValueError, match="loss_kind must be one of"):
        graphs.capture_train_step(model, adam, batch, loss_kind="mse", graph=False)
    with pytest.raises(ValueError, match="rows must be an int >= the example batch's 4 rows"):
        graphs.capture_train_step(model, adam, batch, rows=3, graph=False)
    with pytest.raises(TypeError, match="model must be a fastrec.models.SequentialRecommender"):
        graphs.capture_train_step(torch.nn.Linear(2, 2), adam, batch, graph=False)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        graphs.capture_train_step(model, object(), batch, graph=False)
    with pytest.raises(ValueError, match="example_batch must have items"):
        graphs.capture_train_step(model, adam, Batch(batch.items[:0], *([batch.lengths[:0]] * 3)), graph=False)
    step = graphs.capture_train_step(model, adam, batch, graph=False)
    with pytest.raises(ValueError, match=r"items must be \(B, 6\)"):
        step(batch.items[:, :4], batch.lengths, batch.target, batch.user)
    with pytest.raises(ValueError, match=r"target must be \(4,\)"):
        step(batch.items, batch.lengths, batch.target[:2], batch.user)


class _FakeCapturable(torch.optim.SGD):
    def __init__(self, params) -> None:
        super().__init__(params, lr=0.1)
        for group in self.param_groups:
            group["capturable"] = True


def _eager_and_captured(name: str, dropout: float, steps: int = 4):
    """(eager losses, eager model, captured losses, captured model): the same weights, seed and
    batches, capturable Adam on both sides."""
    batches = [_batch(8 if i < steps - 1 else 5, MODELS[name].padding_side, "cuda") for i in range(steps)]
    results = []
    for graph in (False, True):
        model = _model(name, dropout=dropout, device="cuda")
        adam = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), capturable=True)
        torch.manual_seed(3)
        step = graphs.capture_train_step(model, adam, batches[0], rows=8, graph=graph)
        losses = [step(b.items, b.lengths, b.target, b.user) for b in batches]
        results += [torch.stack(losses), model]
    return results


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_captured_steps_train_like_eager_steps(name):
    eager_losses, eager, captured_losses, captured = _eager_and_captured(name, dropout=0.0)
    torch.testing.assert_close(captured_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (key, p), q in zip(eager.named_parameters(), captured.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_cuda_replays_draw_the_dropout_masks_eager_steps_draw(name):
    """With dropout, each replay draws new masks (the losses of one batch replayed differ) and the
    same ones an eager step draws from the same generator state (the losses match)."""
    eager_losses, _, captured_losses, _ = _eager_and_captured(name, dropout=0.3)
    torch.testing.assert_close(captured_losses, eager_losses, rtol=1e-5, atol=1e-6)
    model = _model(name, dropout=0.3, device="cuda")
    batch = _batch(8, MODELS[name].padding_side, "cuda")
    # lr 0: the weights stay, so only the masks change between two replays of one batch
    adam = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.0, device="cuda"), capturable=True)
    step = graphs.capture_train_step(model, adam, batch)
    a, b = (step(batch.items, batch.lengths, batch.target, batch.user) for _ in range(2))
    assert not torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_steps_do_not_synchronise_the_host(name):
    """Eager fixed-shape steps and graph replays under torch.cuda.set_sync_debug_mode("error"):
    any host synchronisation inside a step raises."""
    batch = _batch(8, MODELS[name].padding_side, "cuda")
    for graph in (False, True):
        model = _model(name, dropout=0.2, device="cuda")
        adam = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
        step = graphs.capture_train_step(model, adam, batch, graph=graph)
        step(batch.items, batch.lengths, batch.target, batch.user)  # first calls may cache (masks, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step(batch.items, batch.lengths, batch.target, batch.user)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- recommend at batch 1
def _histories():
    """Short, max_len-long and longer-than-max_len histories (repeats included)."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(1, N_ITEMS + 1, (n,), generator=gen).tolist() for n in (1, 3, L, 2 * L + 1)]


def _recommend_cases():
    for name in sorted(MODELS):
        yield name, {}
    yield "sasrec", {"padding_side": "left"}


def _rec_model(name: str, backend: str, device: str, **kwargs):
    model = _model(name, backend=backend, device=device, dropout=0.5)  # in train mode: serving must not drop
    if kwargs.get("padding_side"):
        model.padding_side = kwargs["padding_side"]
    return model


def _assert_recommend_matches(name, backend, device, graph, padding_side=None):
    model = _rec_model(name, backend, device, padding_side=padding_side)
    for exclude_seen in (True, False):
        rec = graphs.capture_recommend(model, 5, exclude_seen=exclude_seen, max_history=2 * L + 1, graph=graph)
        for i, history in enumerate(_histories()):
            user = 1 + i if model.uses_users else None
            got_items, got_scores = rec(history, user)
            items, scores = model.recommend([history], 5, exclude_seen, None if user is None else [user])
            assert got_items.shape == (5,) and got_scores.shape == (5,)
            assert torch.equal(got_items.cpu(), items[0].cpu()), (exclude_seen, history)
            torch.testing.assert_close(got_scores.cpu(), scores[0].cpu(), rtol=1e-5, atol=1e-5)
            if exclude_seen:
                assert not set(got_items.tolist()) & set(history)
    assert model.training, "capture and calls leave the model's mode as it was"


@pytest.mark.parametrize("name, kwargs", list(_recommend_cases()))
@pytest.mark.parametrize("backend", ["fastrec", "torch"])
def test_uncaptured_recommender_matches_model_recommend(name, kwargs, backend):
    """graph=False runs the captured body eagerly: the same items as model.recommend (histories
    padded to max_len instead of the longest history; scores within fp32 rounding)."""
    _assert_recommend_matches(name, backend, "cpu", graph=False, **kwargs)


def test_capture_recommend_validates_its_arguments():
    model = _model("sasrec")
    with pytest.raises(ValueError, match="graph=True needs the model on a CUDA device, got cpu"):
        graphs.capture_recommend(model, 5)
    with pytest.raises(TypeError, match="model must be a fastrec.models.SequentialRecommender"):
        graphs.capture_recommend(torch.nn.Linear(2, 2), 5, graph=False)
    for k in (0, N_ITEMS + 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"k must be an int in 1..{N_ITEMS} \(n_items\)"):
            graphs.capture_recommend(model, k, graph=False)
    with pytest.raises(ValueError, match="max_history must be a positive int, got 0"):
        graphs.capture_recommend(model, 5, max_history=0, graph=False)
    rec = graphs.capture_recommend(model, 5, graph=False)
    with pytest.raises(ValueError, match=f"history has {L + 1} items, more than max_history = {L}"):
        rec(list(range(1, L + 2)))
    with pytest.raises(ValueError, match=f"history must hold item ids in 1..{N_ITEMS}, got 0..2"):
        rec([0, 2])
    with pytest.raises(ValueError, match="history must hold at least one item"):
        rec([])
    rec_all = graphs.capture_recommend(model, 5, exclude_seen=False, graph=False)
    assert rec_all(list(range(1, 3 * L)))[0].shape == (5,)  # no exclusion: any length
    with pytest.raises(ValueError, match="Caser needs user="):
        graphs.capture_recommend(_model("caser"), 5, graph=False)([1, 2])


@pytest.mark.cuda
@pytest.mark.parametrize("name, kwargs", list(_recommend_cases()))
@pytest.mark.parametrize("backend", ["fastrec", "torch"])
def test_cuda_captured_recommender_matches_model_recommend(name, kwargs, backend):
    _assert_recommend_matches(name, backend, "cuda", graph=True, **kwargs)


@pytest.mark.cuda
def test_cuda_captured_recommender_reads_updated_weights_and_does_not_synchronise():
    model = _model("sasrec", device="cuda")
    rec = graphs.capture_recommend(model, 5)
    history = _histories()[2]
    rec(history)
    with torch.no_grad():
        model.item_embedding.weight.mul_(-1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        items, _ = rec(history)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(items.cpu(), model.recommend([history], 5)[0][0].cpu())
