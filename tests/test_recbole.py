"""RecBole 1.2.1 models patched by ``fastrec.integrations.recbole`` against the same models
unpatched: outputs, loss and every parameter gradient (dropout on, torch's masks), full-sort and
point scores, state_dict both ways, and RecBole's own Trainer (fit with early stopping, then
evaluate with load_best_model) on a small generated data set.

Bounds (whole models): relative error within 2e-5, or twice the fp32 unpatched model's own
error against its float64 copy, whichever is larger.

RecBole's trainer and data code need packages that clash with the main environment (numpy < 2),
so ``dev.sh`` builds ``.venv-recbole`` layered over ``.venv``. Run from the main environment,
this file runs itself there in a subprocess (one test); run there, it runs the cases.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_DEPS = ("recbole", "pandas", "scipy", "sklearn", "yaml", "colorlog", "texttable", "tensorboard")
HAVE_RECBOLE = all(importlib.util.find_spec(m) is not None for m in _DEPS)
if HAVE_RECBOLE:
    import numpy as np

    HAVE_RECBOLE = int(np.__version__.split(".")[0]) < 2  # RecBole 1.2.1 sets np.float_ aliases
RECBOLE_PY = Path(os.environ.get("FASTREC_RECBOLE_VENV", ROOT / ".venv-recbole")) / "bin" / "python"


@pytest.mark.skipif(HAVE_RECBOLE, reason="runs the cases directly in this environment")
def test_in_recbole_environment():
    if not RECBOLE_PY.exists():
        pytest.skip(f"RecBole's environment {RECBOLE_PY.parent.parent} is absent (./dev.sh test builds it)")
    cmd = [str(RECBOLE_PY), "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    last = run.stdout.strip().splitlines()[-1]
    assert " passed" in last and "failed" not in last, run.stdout[-2000:]


needs_recbole = pytest.mark.skipif(
    not HAVE_RECBOLE, reason="needs RecBole's dependencies: test_in_recbole_environment runs these in .venv-recbole"
)

if HAVE_RECBOLE:
    import logging

    import recbole.trainer
    import recbole.utils
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    import fastrec
    from fastrec.integrations import recbole as fr

    logging.getLogger().setLevel(logging.WARNING)

MODELS = {
    "SASRec": {"n_layers": 2, "n_heads": 2, "hidden_size": 16, "inner_size": 32, "attn_dropout_prob": 0.3},
    "BERT4Rec": {"n_layers": 2, "n_heads": 2, "hidden_size": 16, "inner_size": 32, "attn_dropout_prob": 0.3},
    "Caser": {"embedding_size": 16, "nh": 3, "nv": 2, "reg_weight": 1e-4},
    "GRU4Rec": {"embedding_size": 16, "hidden_size": 24},
    "NARM": {"embedding_size": 16, "hidden_size": 24},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small interaction file: 60 users, 40 items, 6-20 interactions each."""
    root = tmp_path_factory.mktemp("recbole")
    (root / "tiny").mkdir()
    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, 61):
        for t in range(int(rng.integers(6, 21))):
            lines.append(f"{u}\t{int(rng.integers(1, 41))}\t{int(rng.integers(1, 6))}\t{1000 * u + t}")
    (root / "tiny" / "tiny.inter").write_text("\n".join(lines) + "\n")
    return root


def _build(model_name, data_dir, tmp_path, **extra):
    config_dict = {
        "data_path": str(data_dir),
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
        "train_neg_sample_args": None,
        "train_batch_size": 64,
        "eval_batch_size": 64,
        "MAX_ITEM_LIST_LENGTH": 8,
        "seed": 7,
        "device": "cpu",
        "use_gpu": False,
        "show_progress": False,
        "checkpoint_dir": str(tmp_path / "saved"),
        "log_wandb": False,
        "state": "WARNING",
        **MODELS[model_name],
        **extra,
    }
    config = Config(model=model_name, dataset="tiny", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], config["reproducibility"])
    model = recbole.utils.get_model(model_name)(config, train._dataset)  # looked up now: enable() swaps it
    return config, model, train, valid, test


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _loss_and_grads(model, batch, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model.calculate_loss(batch)
    loss.backward()
    after = torch.rand(1)  # the generator state after the step: dropout drew the same
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, after


@needs_recbole
@pytest.mark.parametrize("model_name", list(MODELS))
def test_same_model(model_name, data_dir, tmp_path):
    _, model, train, _, test = _build(model_name, data_dir, tmp_path)
    ref = copy.deepcopy(model)
    report = fr.apply(model)
    assert report.replaced, str(report)
    assert ("anomaly detection" in str(report)) is torch.is_anomaly_enabled()  # RecBole's import turns it on
    assert list(model.state_dict()) == list(ref.state_dict())
    assert all(p is q for p, q in zip(model.parameters(), model.parameters(), strict=True))

    # bound: the fp32 unpatched model's own error against float64 (eval mode), at least 2e-5
    batch = next(iter(train))
    ref64 = copy.deepcopy(ref).double().eval()
    ref.eval()
    model.eval()
    item_seq = batch[ref.ITEM_SEQ]
    with torch.no_grad():
        own = _rel(_seq_output(ref, batch), _seq_output(ref64, batch))
        bound = max(2e-5, 2 * own)
        assert _rel(_seq_output(model, batch), _seq_output(ref, batch)) <= bound

    # training step, dropout on: loss and every gradient
    ref.train()
    model.train()
    loss_r, grads_r, after_r = _loss_and_grads(ref, batch, 11)
    loss_p, grads_p, after_p = _loss_and_grads(model, batch, 11)
    assert after_p == after_r, "dropout drew a different number of values from torch's generator"
    assert _rel(loss_p, loss_r) <= bound, (loss_p, loss_r)
    assert grads_p.keys() == grads_r.keys()
    # each gradient relative to its norm, floored at 1e-3 of the largest one (the key bias's
    # gradient is zero in exact arithmetic: both sides hold rounding noise there)
    floor = 1e-3 * max(g.double().norm().item() for g in grads_r.values())
    for name, g in grads_r.items():
        err = (grads_p[name].double() - g.double()).norm().item()
        assert err <= 10 * bound * max(g.double().norm().item(), floor), name

    # full-sort and point scores in eval mode, on test batches
    ref.eval()
    model.eval()
    interaction = next(iter(test))[0]
    with torch.no_grad():
        assert _rel(model.full_sort_predict(interaction), ref.full_sort_predict(interaction)) <= bound
        if model_name != "BERT4Rec":  # BERT4Rec's predict indexes with the full-sort batch's layout too
            interaction.update(type(interaction)({ref.ITEM_ID: torch.randint(1, ref.n_items, (len(interaction),))}))
            assert _rel(model.predict(interaction), ref.predict(interaction)) <= bound
    del item_seq

    # checkpoints load both ways
    ref.load_state_dict(model.state_dict())
    model.load_state_dict(ref.state_dict())
    fr.unapply(model)
    assert type(model) is type(ref)
    assert all(type(a) is type(b) for a, b in zip(model.modules(), ref.modules(), strict=True))


def _seq_output(model, batch):
    if model.__class__.__name__.endswith("BERT4Rec"):
        return model.forward(batch[model.ITEM_SEQ])
    if model.__class__.__name__.endswith("Caser"):
        return model.forward(batch[model.USER_ID], batch[model.ITEM_SEQ])
    return model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])


@needs_recbole
@pytest.mark.parametrize("bidirectional", [False, True])
def test_attention_mask_routes(bidirectional, data_dir, tmp_path):
    """The tagged mask reaches the fused causal/padding path; rows with no allowed key (an empty
    sequence, left padding under the causal mask) take the additive path and stay exact."""
    name = "BERT4Rec" if bidirectional else "SASRec"
    _, model, *_ = _build(name, data_dir, tmp_path)
    ref = copy.deepcopy(model).eval()
    fr.apply(model)
    model.eval()
    seqs = torch.tensor([[3, 5, 7, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    mask = model.get_attention_mask(seqs, bidirectional=bidirectional)
    assert torch.equal(mask, ref.get_attention_mask(seqs, bidirectional=bidirectional))
    pad, causal = mask._fastrec_structure
    assert torch.equal(pad, seqs == 0) and causal is not bidirectional
    hard = torch.cat([seqs, torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 9, 8, 0, 0, 0, 0]])])
    assert not hasattr(model.get_attention_mask(hard, bidirectional=bidirectional), "_fastrec_structure")
    lens = (hard != 0).sum(1).clamp_min(1)
    with torch.no_grad():
        for s, n in ((seqs, lens[:3]), (hard, lens)):
            args = (s,) if bidirectional else (s, n)
            out, want = model(*args), ref(*args)
            assert torch.isfinite(out).all()
            assert _rel(out, want) <= 2e-5


@needs_recbole
def test_enable_builds_patched_models(data_dir, tmp_path):
    fr.enable()
    try:
        _, model, *_ = _build("SASRec", data_dir, tmp_path)
        assert type(model).__name__ == "FastrecSASRec"
        assert isinstance(model.trm_encoder.layer[0].multi_head_attention, fr.MultiHeadAttention)
    finally:
        fr.disable()
    _, plain, *_ = _build("SASRec", data_dir, tmp_path)
    assert type(plain).__name__ == "SASRec"
    assert list(plain.state_dict()) == list(model.state_dict())


@needs_recbole
@pytest.mark.parametrize("model_name", ["SASRec", "GRU4Rec", "Caser"])
def test_trainer(model_name, data_dir, tmp_path, monkeypatch):
    """RecBole's Trainer, patched and unpatched from the same seed: fit (1 epoch, early stopping
    armed) then evaluate(load_best_model=True) give the same validation and test metrics."""
    monkeypatch.chdir(tmp_path)  # the Trainer writes log_tensorboard/ into the working directory
    load = torch.load  # RecBole 1.2.1 reloads its checkpoint (with its config) with the pre-2.6 default
    monkeypatch.setattr(torch, "load", lambda *a, **k: load(*a, **{**k, "weights_only": False}))
    results = []
    for patched in (False, True):
        config, model, train, valid, test = _build(
            model_name, data_dir, tmp_path / str(patched), epochs=1, stopping_step=1, eval_step=1
        )
        if patched:
            fr.apply(model)
        init_seed(config["seed"], config["reproducibility"])
        trainer = Trainer(config, model)
        _, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
        test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
        results.append((best_valid, test_result))
    (valid_r, test_r), (valid_p, test_p) = results
    for key in valid_r:
        assert valid_p[key] == pytest.approx(valid_r[key], abs=1e-4), key
    for key in test_r:
        assert test_p[key] == pytest.approx(test_r[key], abs=1e-4), key
    assert fastrec.stats()  # fastrec's ops ran


@needs_recbole
@pytest.mark.parametrize("loss_type", ["CE", "BPR"])
def test_bert4rec_loss(loss_type, data_dir, tmp_path):
    """BERT4Rec's loss on the real masked positions only (CE; BPR stays RecBole's): the same loss
    and gradients as RecBole's over every slot, on batches with padding slots and real ones."""
    _, model, train, *_ = _build("BERT4Rec", data_dir, tmp_path, MAX_ITEM_LIST_LENGTH=20, loss_type=loss_type)
    ref = copy.deepcopy(model)
    report = fr.apply(model)
    assert ("loss on the real masked positions" in str(report)) is (loss_type == "CE")
    for batch in itertools.islice(train, 2):
        masked_index = batch[model.MASK_INDEX]
        assert (masked_index == 0).any() and (masked_index > 0).any(), masked_index
        loss_r, grads_r, after_r = _loss_and_grads(ref, batch, 5)
        loss_p, grads_p, after_p = _loss_and_grads(model, batch, 5)
        assert after_p == after_r
        assert _rel(loss_p, loss_r) <= 2e-5, (loss_p, loss_r)
        assert grads_p.keys() == grads_r.keys()
        floor = 1e-3 * max(g.double().norm().item() for g in grads_r.values())
        for name, g in grads_r.items():
            err = (grads_p[name].double() - g.double()).norm().item()
            assert err <= 2e-4 * max(g.double().norm().item(), floor), name


@needs_recbole
def test_run_recbole_enabled(data_dir, tmp_path, monkeypatch):
    """``enable()`` through ``recbole.quick_start.run_recbole``. RecBole 1.2.1 imports ray at the top
    of its quick_start module (used only by its hyper-parameter search) and thop / psutil inside
    its FLOPs count and environment table: those three are stubbed, the run is RecBole's."""
    monkeypatch.chdir(tmp_path)
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: load(*a, **{**k, "weights_only": False}))
    if importlib.util.find_spec("ray") is None:
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(tune=None))
    import recbole.quick_start.quick_start as qs

    monkeypatch.setattr(qs, "get_flops", lambda *a, **k: 0)
    monkeypatch.setattr(qs, "get_environment", lambda config: types.SimpleNamespace(draw=str))
    built = []
    fr.enable()
    try:
        monkeypatch.setattr(recbole.trainer.Trainer, "fit", _recording_fit(built))
        result = qs.run_recbole(
            model="SASRec",
            dataset="tiny",
            config_dict={
                "data_path": str(data_dir),
                "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
                "train_neg_sample_args": None,
                "MAX_ITEM_LIST_LENGTH": 8,
                "epochs": 1,
                "device": "cpu",
                "use_gpu": False,
                "show_progress": False,
                "checkpoint_dir": str(tmp_path / "saved"),
                "state": "WARNING",
                **MODELS["SASRec"],
            },
        )
    finally:
        fr.disable()
    assert [type(m).__name__ for m in built] == ["FastrecSASRec"]
    assert isinstance(built[0].trm_encoder.layer[0].multi_head_attention, fr.MultiHeadAttention)
    assert "ndcg@10" in result["test_result"]
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert recbole.utils.get_model("SASRec") is SASRec and qs.get_model("SASRec") is SASRec
    (saved,) = (tmp_path / "saved").glob("*.pth")  # the checkpoint names RecBole's class, not fastrec's
    assert torch.load(saved, weights_only=False)["config"].model_class is SASRec


def _recording_fit(built):
    fit = recbole.trainer.Trainer.fit

    def recording_fit(self, *args, **kwargs):
        built.append(self.model)
        return fit(self, *args, **kwargs)

    return recording_fit
