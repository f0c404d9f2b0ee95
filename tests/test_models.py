"""fastrec.models: SASRec, GRU4Rec and Caser with fastrec modules against the same models built
from plain torch modules.

References (docs/testing.md): the torch-backend model in float64 (``ref``) and in float32 (``pt``),
loaded with the fastrec model's initial weights. Forward and every parameter gradient under a
random upstream gradient: relative error within MODEL_FP32_BOUND (2e-5, the model-level fp32
bound measured in tests/test_nn_attention.py) or twice fp32 torch's own error, whichever is
larger. Convergence: 30 Adam steps on the same batches; the loss curve, final parameters and
top-k scores agree within the same two-reference bound. Dropout is 0 in the comparisons
(fastrec's dropout draws its own masks), except under ``use_dropout_stream("torch")``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastrec
from fastrec import routing
from fastrec.data import pad
from fastrec.models import MODELS, Caser, GRU4Rec, ModelInput, SASRec
from fastrec.models.base import SequentialRecommender
from fastrec.models.caser import CaserConvLoop

N_ITEMS, N_USERS = 40, 12
MODEL_FP32_BOUND = 2e-5


def build(name: str, backend: str, seed: int = 0, **overrides):
    """A small instance of model ``name``; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if name == "sasrec":
        kwargs = dict(max_len=9, dim=16, n_blocks=2, n_heads=2, dropout=0.0)
        return SASRec(N_ITEMS, **{**kwargs, **overrides}, backend=backend)
    if name == "gru4rec":
        kwargs = dict(dim=16, hidden=24, dropout=0.0, max_len=9)
        return GRU4Rec(N_ITEMS, **{**kwargs, **overrides}, backend=backend)
    kwargs = dict(max_len=5, dim=16, n_h=4, n_v=2, dropout=0.0)
    return Caser(N_ITEMS, N_USERS, **{**kwargs, **overrides}, backend=backend)


def random_batch(model, batch: int = 6, generator: torch.Generator | None = None) -> ModelInput:
    """Histories of random lengths 1..max_len + 3, laid out as the model wants, with targets
    that follow from the last item (so that there is something to learn)."""
    lengths = torch.randint(1, model.max_len + 4, (batch,), generator=generator)
    histories = [torch.randint(1, N_ITEMS + 1, (int(n),), generator=generator) for n in lengths]
    users = torch.randint(0, N_USERS + 1, (batch,), generator=generator)
    target = torch.stack([h[-1] * 7 % N_ITEMS + 1 for h in histories])
    return model.make_input(histories, users, full_length=True)._replace(target=target)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_two_reference(fast, pt, ref, what: str) -> None:
    err_pt = rel_err(pt, ref)
    err = rel_err(fast, ref)
    bound = max(MODEL_FP32_BOUND, 2 * err_pt)
    assert err <= bound, f"{what}: fastrec rel err {err:.2e} > bound {bound:.2e} (fp32 torch at {err_pt:.2e})"


def three_models(name: str):
    fast = build(name, "fastrec")
    pt = build(name, "torch")
    ref = build(name, "torch").double()
    ref.load_state_dict(fast.state_dict())
    return fast, pt, ref


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_gives_same_initial_weights_in_both_backends(name):
    fast, plain = build(name, "fastrec", seed=3), build(name, "torch", seed=3)
    assert list(fast.state_dict()) == list(plain.state_dict())
    for key, value in fast.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key
    other = build(name, "fastrec", seed=4)
    assert not torch.equal(other.item_embedding.weight, fast.item_embedding.weight)


def test_backends_use_fastrec_modules_or_torch_modules():
    assert isinstance(build("sasrec", "fastrec").blocks[0], fastrec.nn.TransformerEncoderLayer)
    assert type(build("sasrec", "torch").blocks[0]) is torch.nn.TransformerEncoderLayer
    assert isinstance(build("gru4rec", "fastrec").gru, fastrec.nn.GRU)
    assert type(build("gru4rec", "torch").gru) is torch.nn.GRU
    # Caser's switch point: the fused block once fastrec.nn has it, the per-height loop until then
    assert type(build("caser", "fastrec").conv) is getattr(fastrec.nn, "CaserConv", CaserConvLoop)
    assert type(build("caser", "torch").conv) is CaserConvLoop


@pytest.mark.parametrize("kind", ["ce", "sampled-softmax"])
def test_torch_backend_loss_runs_torch_ops_and_fastrec_backend_the_fused_loss(kind):
    """The fused cross-entropy is the fastrec backend's; the torch twin computes its loss with
    torch's ops only (F.linear + F.cross_entropy), so the backends compare kernel for kernel."""
    forced_torch = ("linear_cross_entropy", "torch", "")  # run by the torch reference, no route
    for backend in ("torch", "fastrec"):
        torch.manual_seed(0)  # a catalogue above the small-catalogue route
        model = SASRec(routing.LCE_DENSE_MAX_ITEMS_CPU + 8, max_len=9, dim=16, n_blocks=1, n_heads=2, backend=backend)
        fastrec.stats(reset=True)
        model.loss(random_batch(model), kind=kind, n_negatives=3).backward()
        ran = {key for key in fastrec.stats() if key[0] == "linear_cross_entropy"}
        if backend == "torch":
            assert ran == {forced_torch}, fastrec.stats()
        else:  # the fused op, or its route for a small table (sampled softmax's candidates)
            assert ran and forced_torch not in ran, fastrec.stats()
            assert kind != "ce" or ("linear_cross_entropy", "cpp", "") in ran, fastrec.stats()


@pytest.mark.parametrize("kind", ["ce", "bce", "sampled-softmax", "gbce"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_and_every_gradient_match_torch(name, kind):
    fast, pt, ref = three_models(name)
    batch = random_batch(fast)
    results = []
    for model in (fast, pt, ref):
        torch.manual_seed(7)  # the same negatives for bce
        loss = model.loss(batch, kind=kind, n_negatives=3)
        hidden = model(batch)
        upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1), dtype=hidden.dtype)
        params = [p for _, p in model.named_parameters()]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        grads_up = torch.autograd.grad(hidden, params, grad_outputs=upstream, allow_unused=True)
        results.append((loss, hidden, grads, grads_up))
    names = [n for n, _ in fast.named_parameters()]
    (f_loss, f_h, f_g, f_gu), (p_loss, p_h, p_g, p_gu), (r_loss, r_h, r_g, r_gu) = results
    assert_two_reference(f_loss, p_loss, r_loss, "loss")
    assert_two_reference(f_h, p_h, r_h, "representation")
    for i, param_name in enumerate(names):
        assert_two_reference(f_g[i], p_g[i], r_g[i], f"loss grad of {param_name}")
        if r_gu[i] is None:  # e.g. the item table's unused rows reach hidden only via gathered ids
            assert f_gu[i] is None or not f_gu[i].any()
            continue
        assert_two_reference(f_gu[i], p_gu[i], r_gu[i], f"grad of {param_name} under a random upstream")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_with_dropout_matches_torch_under_the_torch_stream(name):
    """With dropout on, ``use_dropout_stream("torch")`` gives the fastrec model torch's masks
    (embedding, attention, feed-forward and residual dropout, in torch's order), so loss and
    every gradient match the torch model's in training mode; fastrec's own stream differs."""
    models = [build(name, backend, dropout=0.3) for backend in ("fastrec", "torch", "torch")]
    models[2] = models[2].double()
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    batch = random_batch(models[0])
    results = []
    for i, model in enumerate(models):
        with fastrec.use_dropout_stream("torch" if i == 0 else "fastrec"):
            torch.manual_seed(5)
            loss = model.loss(batch)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (f_loss, f_g), (p_loss, p_g), (r_loss, r_g) = results
    assert_two_reference(f_loss, p_loss, r_loss, "loss")
    for i, (param_name, _) in enumerate(models[0].named_parameters()):
        assert_two_reference(f_g[i], p_g[i], r_g[i], f"loss grad of {param_name}")
    torch.manual_seed(5)
    assert rel_err(models[0].loss(batch), f_loss) == 0, "the default stream on the CPU is torch's"
    with fastrec.use_dropout_stream("fastrec"):
        torch.manual_seed(5)
        own = models[0].loss(batch)
    assert rel_err(own, p_loss) > 10 * MODEL_FP32_BOUND, "fastrec's own stream should draw other masks"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convergence_30_steps_matches_torch(name):
    """docs/testing.md's convergence check: same seed, weights and batches; loss curve, final
    parameters and top-k scores agree within the two-reference fp32 bound."""
    fast, pt, ref = three_models(name)
    for model in (fast, pt, ref):  # Caser's L2 term under Adam at lr 3e-2 swamps 30 toy steps
        model.reg_weight = 0.0
    generator = torch.Generator().manual_seed(11)
    batches = [random_batch(fast, batch=16, generator=generator) for _ in range(30)]
    curves, finals = [], []
    for model in (fast, pt, ref):
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-2 if name == "caser" else 1e-2)
        curve = []
        for batch in batches:
            optimizer.zero_grad()
            loss = model.loss(batch)
            loss.backward()
            optimizer.step()
            curve.append(loss.detach())
        curves.append(torch.stack(curve))
        finals.append(model)
    assert curves[0][-5:].mean() < curves[0][0] * 0.95, f"fastrec model did not learn: {curves[0].tolist()}"
    assert_two_reference(*curves, "loss curve")
    for param_name, _ in fast.named_parameters():
        tensors = [dict(m.named_parameters())[param_name] for m in finals]
        assert_two_reference(*tensors, f"final {param_name}")
    histories = [b.items[0][b.items[0] > 0] for b in batches[:4]]
    users = [int(b.user[0]) for b in batches[:4]]
    tops = [m.recommend(histories, k=5, exclude_seen=False, users=users) for m in finals]
    assert_two_reference(tops[0][1], tops[1][1], tops[2][1], "top-5 scores")
    assert torch.equal(tops[0][0], tops[2][0]), "top-5 items differ from the float64 reference"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recommend_excludes_seen_items_and_matches_scores(name):
    model = build(name, "fastrec")
    histories = [np.array([3, 5, 7, 5]), np.array([1]), np.arange(1, 16)]
    users = [0, 4, 11]
    items, scores = model.recommend(histories, k=10, users=users)
    assert items.shape == scores.shape == (3, 10)
    for row, history in zip(items.tolist(), histories, strict=True):
        assert not set(row) & set(history.tolist())
        assert 0 not in row
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    full = model.scores(model.make_input(histories, users)).detach()
    for b, history in enumerate(histories):
        full[b, torch.as_tensor(history)] = float("-inf")
    expected_scores, _ = full.topk(10, dim=1)
    # recommend runs the lean inference path (serve) on the fastrec backend: fp32 rounding only
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.gather(1, items), scores, rtol=1e-5, atol=1e-5)
    # without exclusion, a seen item may come back; the scores are the model's full ranking
    items_all, scores_all = model.recommend(histories, k=N_ITEMS, exclude_seen=False, users=users)
    assert sorted(items_all[0].tolist()) == list(range(1, N_ITEMS + 1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recommend_batch_of_one_equals_row_of_a_batch(name):
    model = build(name, "fastrec")
    histories = [np.array([4, 8, 15, 16, 23, 2, 9, 30, 31, 32, 33, 1]), np.array([2, 7])]
    items, scores = model.recommend(histories, k=6, users=[3, 5])
    for b, history in enumerate(histories):
        one_items, one_scores = model.recommend([history], k=6, users=[[3, 5][b]])
        assert torch.equal(one_items[0], items[b])
        torch.testing.assert_close(one_scores[0], scores[b], rtol=1e-6, atol=1e-6)
    assert model.training, "recommend must restore the training mode"


@pytest.mark.parametrize(
    ("name", "extra"),
    [("sasrec", {"padding_side": "right"}), ("sasrec", {"padding_side": "left"}), ("gru4rec", {}), ("caser", {})],
    ids=["sasrec-right", "sasrec-left", "gru4rec", "caser"],
)
def test_inference_path_matches_forward_in_eval_mode(name, extra):
    """``serve`` (recommend's fastrec path: functional ops, last block on the returned rows only)
    computes forward's function, for ragged batches and for one history."""
    model = build(name, "fastrec", dropout=0.2, **extra).eval()
    for batch_size in (5, 1):
        batch = random_batch(model, batch=batch_size)
        with torch.no_grad():
            expected = model(batch)
            with torch.inference_mode():
                got = model.serve(batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sasrec_left_padding_computes_the_right_padded_function():
    right = build("sasrec", "fastrec", padding_side="right")
    left = build("sasrec", "fastrec", padding_side="left")
    left.load_state_dict(right.state_dict())
    histories = [torch.tensor([5, 6, 7]), torch.arange(1, 12), torch.tensor([9])]
    a = right(right.make_input(histories, full_length=True))
    b_input = left.make_input(histories, full_length=True)
    assert b_input.items[0, 0] == 0 and b_input.items[0, -1] == 7
    torch.testing.assert_close(left(b_input), a, rtol=1e-5, atol=1e-6)


def test_sasrec_triton_backend_matches_torch():
    """The SASRec forward and loss gradients through the Triton attention kernels (interpreter
    on CPU)."""
    fast, pt, ref = three_models("sasrec")
    batch = random_batch(fast, batch=3)
    with fastrec.use_backend("triton"):
        f_loss = fast.loss(batch)
        f_grads = torch.autograd.grad(f_loss, list(fast.parameters()))
    p_loss, r_loss = pt.loss(batch), ref.loss(batch)
    assert_two_reference(f_loss, p_loss, r_loss, "loss")
    p_grads = torch.autograd.grad(p_loss, list(pt.parameters()))
    r_grads = torch.autograd.grad(r_loss, list(ref.parameters()))
    for (param_name, _), f, p, r in zip(fast.named_parameters(), f_grads, p_grads, r_grads, strict=True):
        assert_two_reference(f, p, r, f"grad of {param_name}")


def test_bce_negatives_never_hit_the_target():
    model = build("gru4rec", "fastrec")
    target = torch.randint(1, N_ITEMS + 1, (4000,))
    shift = torch.randint(1, N_ITEMS, (4000, 5))
    negatives = (target.unsqueeze(1) - 1 + shift) % N_ITEMS + 1
    assert (negatives != target.unsqueeze(1)).all() and negatives.min() >= 1 and negatives.max() <= N_ITEMS
    counts = torch.bincount(negatives.flatten(), minlength=N_ITEMS + 1)[1:].double()
    assert counts.std() / counts.mean() < 0.1  # close to uniform
    assert model.loss(random_batch(model), kind="bce", n_negatives=4).isfinite()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: SASRec(10, backend="jax"), "backend must be one of"),
        (lambda: SASRec(10, dim=30, n_heads=4), "dim must be divisible by n_heads"),
        (lambda: SASRec(0), "n_items must be a positive int"),
        (lambda: GRU4Rec(10, dropout=1.5), "dropout must be a float in"),
        (lambda: SASRec(10, padding_side="middle"), "padding_side must be one of"),
        (lambda: build("gru4rec", "fastrec").recommend([[1, 2]], k=N_ITEMS + 1), "k must be at most"),
        (lambda: build("gru4rec", "fastrec").recommend([[]], k=3), "history 0 is empty"),
        (lambda: build("gru4rec", "fastrec").recommend([[1, N_ITEMS + 1]], k=3), "item ids in 1..40"),
        (lambda: build("caser", "fastrec").recommend([[1, 2]], k=3), "needs users="),
        (lambda: build("sasrec", "fastrec").loss(ModelInput(torch.ones(2, 3).long(), torch.ones(2).long())), "target"),
        (lambda: build("sasrec", "fastrec").loss(None, kind="mse"), "kind must be one of"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_recommend_rejects_non_integer_histories():
    with pytest.raises(TypeError, match="history 0 must be a 1-D sequence of int item ids"):
        build("gru4rec", "fastrec").recommend([np.array([1.5, 2.0])], k=3)


def test_caser_loss_adds_recboles_l2_term():
    """Caser's loss = the base loss + reg_weight * the sum of the (unsquared) L2 norms of the
    embeddings, every convolution weight and the dense weights, as RecBole's Caser."""
    model = build("caser", "fastrec", reg_weight=1e-2)
    batch = random_batch(model, batch=8, generator=torch.Generator().manual_seed(3))
    base = SequentialRecommender.loss(model, batch)
    weights = [model.user_embedding.weight, model.item_embedding.weight, model.fc1.weight, model.fc2.weight]
    weights += [model.conv.conv_v.weight] + [model.conv.conv_h[k].weight for k in range(model.max_len)]
    torch.testing.assert_close(model.loss(batch), base + 1e-2 * sum(w.norm() for w in weights))
    with pytest.raises(ValueError, match="reg_weight"):
        build("caser", "fastrec", reg_weight=-1.0)


# ---------------------------------------------------------------------------- all positions
def all_positions_batch(model, seed: int = 0, batch: int = 5):
    """Sequences of random lengths 1..max_len (one of them full), each position's target the next
    item, padded on the model's side (target 0 = none); and the raw (inputs, targets)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, model.max_len + 1, (batch,), generator=g)
    lengths[0] = model.max_len
    seqs = [torch.randint(1, N_ITEMS + 1, (int(n) + 1,), generator=g).numpy() for n in lengths]
    inputs, targets = [s[:-1] for s in seqs], [s[1:] for s in seqs]
    items, lengths = pad(inputs, model.max_len, side=model.padding_side)
    target, _ = pad(targets, model.max_len, side=model.padding_side)
    return ModelInput(items, lengths, None, target), inputs, targets


def prefix_reference_ce(model, inputs, targets):
    """Full-catalogue CE of every position computed from the prefix that ends there, through the
    model's last-position forward (no hidden_states)."""
    losses = []
    for seq, nxt in zip(inputs, targets, strict=True):
        for j in range(len(seq)):
            hidden = model(model.make_input([seq[: j + 1]]))
            logits = hidden @ model.item_embedding.weight[1:].t()
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([int(nxt[j]) - 1])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(
    ("name", "backend", "side"),
    [("sasrec", "fastrec", "right"), ("sasrec", "fastrec", "left"), ("sasrec", "torch", "right"),
     ("gru4rec", "fastrec", None), ("gru4rec", "torch", None)],
)  # fmt: skip
def test_all_positions_loss_is_every_prefix_predicting_its_next_item(name, backend, side):
    """The (B, L) target loss = the mean over every real position of the last-position CE of the
    prefix ending there; padded positions do not count, and every gradient agrees."""
    model = build(name, backend, **({"padding_side": side} if side else {})).eval()
    batch, inputs, targets = all_positions_batch(model)
    assert (batch.target == 0).any(), "the batch has padded positions"
    loss = model.loss(batch)
    ref = prefix_reference_ce(model, inputs, targets)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    for got, want in zip(grads, ref_grads, strict=True):
        if want is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sampled-softmax", "gbce", "bce"])
def test_all_positions_sampled_kinds_read_only_real_positions(kind):
    """The sampled losses over all positions = the functional loss over the real positions' rows."""
    model = build("sasrec", "fastrec").eval()
    batch, _, _ = all_positions_batch(model, seed=1)
    torch.manual_seed(5)
    loss = model.loss(batch, kind=kind, n_negatives=4)
    keep = batch.target > 0
    hidden = model.hidden_states(batch)[keep]
    target = batch.target[keep]
    torch.manual_seed(5)
    if kind == "sampled-softmax":
        ref = fastrec.functional.sampled_softmax_loss(hidden, model.item_embedding.weight[1:], target - 1, 4)
    elif kind == "gbce":
        ref = fastrec.functional.gbce_loss(hidden, model.item_embedding.weight[1:], target - 1, 4)
    if kind != "bce":  # bce draws its negatives per row: checked for a finite loss and gradient only
        torch.testing.assert_close(loss, ref)
    assert loss.isfinite()
    loss.backward()
    assert model.item_embedding.weight.grad.isfinite().all()


def test_all_positions_hidden_states_match_forward_at_the_last_item():
    for side in ("right", "left"):
        model = build("sasrec", "fastrec", padding_side=side).eval()
        batch, _, _ = all_positions_batch(model, seed=2)
        states = model.hidden_states(batch)
        col = batch.lengths - 1 if side == "right" else torch.full_like(batch.lengths, model.max_len - 1)
        torch.testing.assert_close(states[torch.arange(len(col)), col], model(batch))


def test_caser_has_no_all_positions_training():
    model = build("caser", "fastrec")
    batch = random_batch(model)
    with pytest.raises(ValueError, match="Caser has no per-position output"):
        model.loss(batch._replace(target=torch.ones_like(batch.items)))


def test_all_positions_target_must_match_items():
    model = build("sasrec", "fastrec")
    batch, _, _ = all_positions_batch(model)
    with pytest.raises(ValueError, match="batch.target must be"):
        model.loss(batch._replace(target=batch.target[:, :3]))
