"""CDNOW purchase prediction: the calibration/hold-out split (lifetimes' weekly semantics) on a
hand-made file, the real file's naive-rate RMSE (1.842) and BG/NBD (1.463), checked
against a per-customer recount with Python's own calendar, the three behaviour models, and their
experiment (benchmarks/behavior.py, run by ``fastrec train --model behavior-*``)."""

from __future__ import annotations

import copy
import datetime as dt
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

import fastrec
import fastrec.nn as fnn
from fastrec import cli
from fastrec.data import DataError, load_cdnow
from fastrec.data.cdnow import _hyp2f1, bgnbd_expected, fit_bgnbd, mae, rmse
from fastrec.models.behavior import BehaviorAttention, BehaviorCNN, BehaviorRNN

experiment = cli.behavior_experiment()  # benchmarks/behavior.py: training, cross-fitting, the table

HAS_LIFETIMES = importlib.util.find_spec("lifetimes") is not None
needs_lifetimes = pytest.mark.skipif(not HAS_LIFETIMES, reason="lifetimes wheel not installed (./dev.sh installs it)")

HEADER = " customer_id  date number_of_cds  dollar_value\n"
# Weeks run Monday-Sunday; week 0 = 1996-12-30..1997-01-05; 1997-09-30 (calibration end) is in week 39.
SMALL = (
    HEADER
    + " 00001 19970101  1   11.77\n"  # week 0
    + " 00001 19970102  2   20.00\n"  # week 0 again
    + " 00001 19970210  1   10.00\n"  # week 6
    + " 00002 19970305  1    5.00\n"  # week 9, customer 2's only calibration purchase
    + " 00001 19970930  1    1.00\n"  # week 39, last calibration day
    + " 00001 19971001  1    1.00\n"  # hold-out, week 39
    + " 00001 19971002  1    1.00\n"  # hold-out, same week: counted once
    + " 00001 19980105  1    1.00\n"  # hold-out, another week
    + " 00003 19971005  1    1.00\n"  # no calibration purchase: not a customer of the split
    + " 00002 19980701  1    1.00\n"  # after the observation end: ignored
)


def test_small_file_split_by_hand(tmp_path):
    path = tmp_path / "cdnow.txt"
    path.write_text(SMALL)
    data = load_cdnow(str(path))
    assert data.customer_ids.tolist() == [1, 2] and data.n_weeks == 40 and data.duration_holdout == 39
    assert str(data.week_starts[0]) == "1996-12-30" and str(data.week_starts[-1]) == "1997-09-29"
    assert data.frequency_cal.tolist() == [2, 0]
    assert data.recency_cal.tolist() == [39, 0] and data.T_cal.tolist() == [39, 30]
    assert data.frequency_holdout.tolist() == [2, 0]
    assert data.transactions[0, 0] == 2 and data.cds[0, 0] == 3 and data.spend[0, 0] == pytest.approx(31.77)
    assert data.transactions[0].sum() == 4 and data.transactions[1, 9] == 1 and data.transactions[1].sum() == 1
    assert data.naive_rate().tolist() == [2.0, 0.0]
    features = data.features()
    assert features.shape == (2, 40, 4)
    assert features[0, :, 2].nonzero()[0].tolist() == [6, 39]  # repeat weeks after the first
    assert features[1, :, 3].nonzero()[0].tolist() == list(range(9, 40))  # started from week 9


def test_bad_date_and_missing_column_name_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(HEADER + " 00001 19970101 1 1.0\n 00002 19971301 1 1.0\n")
    with pytest.raises(DataError, match=r"bad\.txt: line 3: column 'date': expected yyyymmdd, got 19971301"):
        load_cdnow(str(bad))
    bad.write_text(" customer_id  date number_of_cds\n 00001 19970101 1\n")
    with pytest.raises(DataError, match=r"line 1: missing column 'dollar_value'"):
        load_cdnow(str(bad))


def test_hypergeometric_series_matches_closed_forms():
    z = np.array([0.0, 0.1, 0.5, 0.9])
    assert np.allclose(_hyp2f1(np.ones(4), np.ones(4), np.full(4, 2.0), z)[1:], -np.log1p(-z[1:]) / z[1:])
    # 2F1(a, b; b; z) = (1 - z)^-a
    assert np.allclose(_hyp2f1(np.full(4, 2.5), np.full(4, 3.0), np.full(4, 3.0), z), (1 - z) ** -2.5)


@pytest.fixture(scope="module")
def cdnow():
    return load_cdnow()


@needs_lifetimes
def test_real_file_reproduces_the_naive_rate_rmse(cdnow):
    assert cdnow.customer_ids.shape[0] == 23_570 and cdnow.n_weeks == 40
    assert round(rmse(cdnow.naive_rate(), cdnow.frequency_holdout), 3) == 1.842
    assert mae(cdnow.naive_rate(), cdnow.frequency_holdout) == pytest.approx(0.9389, abs=1e-4)


@needs_lifetimes
def test_real_file_matches_a_recount_with_python_calendar_weeks(cdnow):
    """Recount 40 customers from the raw lines with ``date.isocalendar()`` (ISO weeks are Monday-Sunday)."""
    with open(cdnow.source) as f:
        rows = [line.split() for line in f.read().splitlines()[1:] if line.strip()]
    chosen = set(np.random.default_rng(0).choice(cdnow.customer_ids, 40, replace=False).tolist())
    cal_end, obs_end = dt.date(1997, 9, 30), dt.date(1998, 6, 30)
    week = lambda d: d.isocalendar()[:2]
    per: dict[int, tuple[set, set]] = {c: (set(), set()) for c in chosen}
    for cid, stamp, _, _ in rows:
        cid = int(cid)
        if cid in chosen:
            d = dt.date(int(stamp[:4]), int(stamp[4:6]), int(stamp[6:]))
            if d <= cal_end:
                per[cid][0].add(week(d))
            elif d <= obs_end:
                per[cid][1].add(week(d))
    index = {c: i for i, c in enumerate(cdnow.customer_ids.tolist())}
    for cid, (cal, hold) in per.items():
        i = index[cid]
        assert cdnow.frequency_cal[i] == len(cal) - 1 and cdnow.frequency_holdout[i] == len(hold)


@needs_lifetimes
def test_bgnbd_fit_reproduces_lifetimes_rmse(cdnow):
    params = fit_bgnbd(cdnow)
    expected = bgnbd_expected(params, cdnow)
    assert round(rmse(expected, cdnow.frequency_holdout), 3) == 1.463


@pytest.mark.parametrize("model_class", [BehaviorCNN, BehaviorRNN, BehaviorAttention])
def test_behavior_models_shapes_and_gradients(model_class):
    model = model_class(4)
    x = torch.randn(5, 40, 4)
    out = model(x)
    assert out.shape == (5,)
    grads = torch.autograd.grad(out, list(model.parameters()), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_behavior_models_are_built_from_fastrec_modules():
    assert isinstance(BehaviorRNN().gru, fnn.GRU)
    assert all(isinstance(m, fnn.MultiheadAttention) for m in BehaviorAttention().attn)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared, loaded 2-core CPU two threads make these small models ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_lifetimes
@pytest.mark.parametrize("kind", ["cnn", "rnn", "attention"])
def test_behavior_model_learns_beyond_the_mean(cdnow, kind, one_thread):
    """Trained on 3,000 customers for 3 epochs, each model beats predicting the training mean on
    2,000 other customers (the full comparison with the naive rate is `python benchmarks/behavior.py`)."""
    order = np.random.default_rng(1).permutation(cdnow.customer_ids.shape[0])
    train, test = order[:3000], order[3000:5000]
    x, y = cdnow.features(), cdnow.frequency_holdout
    model = experiment.fit(kind, x[train], y[train].astype(np.float32), epochs=3, batch_size=128, seed=0)
    prediction = experiment.predict(model, torch.from_numpy(x[test]))
    assert math.isfinite(rmse(prediction, y[test]))
    assert rmse(prediction, y[test]) < 0.95 * rmse(np.full(test.shape[0], y[train].mean()), y[test])


@pytest.mark.parametrize("kind", ["cnn", "rnn", "attention"])
def test_fastrec_train_runs_the_experiment(monkeypatch, kind):
    """`fastrec train --model behavior-KIND` runs benchmarks/behavior.py's main for that model."""
    seen = []
    monkeypatch.setattr(experiment, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["train", "--model", f"behavior-{kind}", "--seed", "7"]) == 0
    assert seen == [["--model", kind, "--seed", "7"]]


def test_experiment_outside_a_checkout_says_where_it_lives(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "fastrec_behavior_experiment")
    monkeypatch.setattr(cli, "BEHAVIOR_EXPERIMENT", tmp_path / "benchmarks" / "behavior.py")
    with pytest.raises(SystemExit, match="benchmarks/behavior.py of fastrec's repository"):
        cli.main(["train", "--model", "behavior-cnn"])


@pytest.mark.parametrize("model_class", [BehaviorRNN, BehaviorAttention])
def test_behavior_models_match_their_plain_torch_twins(model_class):
    """The same weights with fastrec's modules swapped back to torch's (fp32 relative bound 1e-5)."""
    model = model_class(4).double()
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, fnn.GRU):
            module.__class__ = torch.nn.GRU
        elif isinstance(module, fnn.MultiheadAttention):
            module.__class__ = torch.nn.MultiheadAttention
    assert not any(isinstance(m, (fnn.GRU, fnn.MultiheadAttention)) for m in twin.modules())
    x = torch.randn(6, 40, 4, dtype=torch.float64)
    upstream = torch.randn(6, dtype=torch.float64)
    fastrec.stats(reset=True)
    out = model(x)
    assert all(backend == "cpp" for _, backend, _ in fastrec.stats()), fastrec.stats()  # the fused path ran
    ref = twin(x)
    grads = torch.autograd.grad(out, list(model.parameters()), upstream)
    ref_grads = torch.autograd.grad(ref, list(twin.parameters()), upstream)
    assert (out - ref).norm() / ref.norm() < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).norm() / r.norm().clamp(min=1e-12) < 1e-5
