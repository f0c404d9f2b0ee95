"""fastrec.train and ``fastrec train`` on the synthetic log (fastrec.data.synthetic: skewed
popularity, sessions with a learnable successor order), small enough for seconds per run."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fastrec import cli, train
from fastrec.data import DataError
from fastrec.models import MODELS

SMALL = dict(data="synthetic", batch_size=128, max_len=10, progress=False, seed=5)


def config(**overrides) -> train.TrainConfig:
    return train.TrainConfig(**{"model": "gru4rec", "epochs": 2, **SMALL, **overrides})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_run_learns_and_reports_valid_and_test_metrics(name):
    lines = []
    result = train.run(config(model=name, epochs=3, lr=5e-3, max_len=5 if name == "caser" else 10), log=lines.append)
    assert [e.epoch for e in result.epochs] == [1, 2, 3]
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert all(e.samples_per_s > 0 for e in result.epochs)
    # the synthetic log has a learnable order: far better than a random ranking of 60 items
    assert result.test["NDCG@10"] > 0.15, result.test
    assert result.test["NDCG@10 (seen excluded)"] >= result.test["NDCG@10"] - 0.05
    assert set(result.test) >= {f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (5, 10, 20)}
    assert lines[-1].startswith(f"test (best epoch {result.best_epoch})")
    assert sum(line.startswith("epoch") for line in lines) == 3


def test_early_stopping_after_patience_epochs_without_better_ndcg():
    result = train.run(config(epochs=10, lr=0.0, patience=2), log=lambda _: None)
    assert [e.epoch for e in result.epochs] == [1, 2, 3]  # no learning: epochs 2 and 3 are no better
    assert result.best_epoch == 1


def test_cosine_schedule_decays_per_step_to_zero_over_the_epoch_cap():
    """lr_schedule="cosine": lr * (1 + cos(pi * step / total)) / 2 with total = epochs x batches,
    stepped after every batch, so half the rate after one of two epochs and 0 after the last;
    the constant schedule keeps the rate."""
    cosine = train.run(config(epochs=2, lr_schedule="cosine"), log=lambda _: None)
    assert [e.lr for e in cosine.epochs] == pytest.approx([5e-4, 0.0], abs=1e-12)
    constant = train.run(config(epochs=2), log=lambda _: None)
    assert [e.lr for e in constant.epochs] == [1e-3, 1e-3]


def test_time_limit_cuts_the_epoch_and_stops_training():
    lines = []
    result = train.run(config(epochs=5, time_limit_s=1e-6), log=lines.append)
    assert [e.epoch for e in result.epochs] == [1]
    assert result.epochs[0].loss > 0
    assert "epoch cut short, training stops" in lines[1]
    assert lines[-1].startswith("test (best epoch 1)")


def test_best_epoch_weights_are_restored_for_the_test_line():
    cfg = config(epochs=3)
    data = train.load_data(cfg, MODELS[cfg.model].padding_side)
    model = train.build_model(cfg, data.n_items, data.n_users)
    epochs, best = train.fit(model, data, cfg, log=lambda _: None)
    again = train.evaluate(model, *data.valid)
    assert again["NDCG@10"] == pytest.approx(max(e.valid["NDCG@10"] for e in epochs), abs=1e-12)
    assert epochs[best - 1].valid["NDCG@10"] == again["NDCG@10"]


@pytest.mark.parametrize("name, schedule", [("sasrec", "constant"), ("caser", "constant"), ("caser", "cosine")])
def test_checkpoint_resume_continues_exactly(tmp_path, name, schedule):
    """A two-epoch run killed while logging epoch 2 (its checkpoint still holds epoch 1), then
    resumed: the same weights and metrics as two epochs in one go (optimizer and learning-rate
    schedule state, batch order and dropout RNG restored)."""
    path = str(tmp_path / "ckpt.pt")
    cfg = config(model=name, epochs=2, max_len=5, lr_schedule=schedule)

    def fresh(c):
        data = train.load_data(c, MODELS[c.model].padding_side)
        return data, train.build_model(c, data.n_items, data.n_users)

    data, straight = fresh(cfg)
    straight_epochs, _ = train.fit(straight, data, cfg, log=lambda _: None)

    class Killed(Exception):
        pass

    def kill_at_epoch_2(line: str) -> None:
        if line.startswith("epoch   2"):
            raise Killed

    interrupted = dataclasses.replace(cfg, checkpoint=path)
    data, resumed = fresh(interrupted)
    with pytest.raises(Killed):
        train.fit(resumed, data, interrupted, log=kill_at_epoch_2)
    second = dataclasses.replace(cfg, checkpoint=path, resume=True)
    data, resumed = fresh(second)
    lines = []
    resumed_epochs, _ = train.fit(resumed, data, second, log=lines.append)
    assert lines[0].startswith("resumed from") and "after epoch 1" in lines[0]
    assert [e.epoch for e in resumed_epochs] == [1, 2]
    assert resumed_epochs[1].loss == straight_epochs[1].loss
    assert resumed_epochs[1].valid == straight_epochs[1].valid
    assert resumed_epochs[1].lr == straight_epochs[1].lr
    if schedule == "cosine":
        with pytest.raises(ValueError, match="lr_schedule='constant', but .* was trained with 'cosine'"):
            train.fit(resumed, data, dataclasses.replace(second, lr_schedule="constant"), log=lambda _: None)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def _one_epoch_checkpoint(tmp_path, **overrides) -> tuple[train.TrainConfig, train.Data]:
    """A one-epoch run of config(**overrides) that wrote its checkpoint; (its config, its data)."""
    cfg = config(epochs=1, checkpoint=str(tmp_path / "ckpt.pt"), **overrides)
    data = train.load_data(cfg, MODELS[cfg.model].padding_side)
    train.fit(train.build_model(cfg, data.n_items, data.n_users), data, cfg, log=lambda _: None)
    return cfg, data


def _resume(cfg: train.TrainConfig, **changes):
    """fit() resuming from cfg.checkpoint with the config changed by ``changes``."""
    cfg = dataclasses.replace(cfg, resume=True, epochs=2, **changes)
    data = train.load_data(cfg, MODELS[cfg.model].padding_side)
    lines = []
    return train.fit(train.build_model(cfg, data.n_items, data.n_users), data, cfg, log=lines.append), lines


class _RunsCode:
    """Unpickled, it creates the directory it names: proof that loading ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return os.makedirs, (self.path,)


def test_checkpoint_holds_only_tensors_and_plain_types_and_code_in_one_is_refused(tmp_path):
    cfg, _ = _one_epoch_checkpoint(tmp_path, lr_schedule="cosine")
    state = torch.load(cfg.checkpoint, weights_only=True)
    assert state["epoch"] == 1 and state["config"]["seed"] == cfg.seed
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _RunsCode(str(marker))}, cfg.checkpoint)
    with pytest.raises(train.CheckpointError, match=f"{cfg.checkpoint}: .*not only tensors and plain types"):
        _resume(cfg)
    assert not marker.exists()


def test_resume_from_a_missing_checkpoint_is_an_error_naming_it(tmp_path):
    path = str(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match=f"resume: checkpoint {path!r} does not exist"):
        _resume(config(checkpoint=path))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not a dict"])
def test_corrupt_checkpoint_is_an_error_naming_it(tmp_path, damage):
    cfg, _ = _one_epoch_checkpoint(tmp_path)
    path = Path(cfg.checkpoint)
    whole = path.read_bytes()
    if damage == "not a dict":
        torch.save([1, 2], path)
    else:
        path.write_bytes(
            {"garbage": b"not a checkpoint\n" * 10, "truncated": whole[: len(whole) // 2], "empty": b""}[damage]
        )
    with pytest.raises(train.CheckpointError, match=f"{cfg.checkpoint}: "):
        _resume(cfg)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"seed": 6}, "seed=6, but .* was trained with 5"),
        ({"data": "ml-100k"}, "data='ml-100k', but .* was trained with 'synthetic'"),
        ({"model": "sasrec"}, "model='sasrec', but .* was trained with 'gru4rec'"),
        ({"model_options": {"hidden": 16}}, "model_options=.*'hidden': 16.*, but .* was trained with {}"),
        ({"max_len": 8}, "max_len=8, but .* was trained with 10"),
        ({"dropout": 0.0}, "dropout=0.0, but .* was trained with None"),
    ],
)
def test_resume_with_another_model_options_data_or_seed_names_the_difference(tmp_path, changes, named):
    cfg, data = _one_epoch_checkpoint(tmp_path)
    changed = dataclasses.replace(cfg, resume=True, epochs=2, **changes)
    model = train.build_model(changed, data.n_items, data.n_users)  # fit trains on the data it is given
    with pytest.raises(train.CheckpointError, match=named):
        train.fit(model, data, changed, log=lambda _: None)
    (epochs, _), lines = _resume(cfg)  # unchanged, it resumes
    assert [e.epoch for e in epochs] == [1, 2] and lines[0].startswith("resumed from")


def test_checkpoint_in_a_missing_directory_fails_before_training(tmp_path):
    path = str(tmp_path / "no-such-dir" / "ckpt.pt")
    lines = []
    with pytest.raises(FileNotFoundError, match=f"checkpoint {path!r}: directory .*no-such-dir' does not exist"):
        train.run(config(checkpoint=path), log=lines.append)
    assert not any(line.startswith("epoch") for line in lines)


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_bce_loss_and_bf16_autocast_train(name):
    result = train.run(config(model=name, loss="bce", n_negatives=4, amp="bf16", epochs=1), log=lambda _: None)
    assert torch.isfinite(torch.tensor(result.epochs[0].loss))


def test_torch_dropout_stream_trains_both_backends_on_the_same_masks():
    """--dropout-stream torch: the fastrec backend's epoch losses follow the torch backend's
    (the same masks; only fp32 rounding differs), with dropout active."""
    runs = [
        train.run(config(model="sasrec", backend=b, dropout_stream="torch", max_len=10), log=lambda _: None)
        for b in ("fastrec", "torch")
    ]
    fast, plain = ([e.loss for e in r.epochs] for r in runs)
    assert fast == pytest.approx(plain, rel=1e-6)  # fastrec's own masks: 4e-4 apart in epoch 1


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="model must be one of"):
        train.TrainConfig(model="bert4rec")
    with pytest.raises(ValueError, match="amp must be None or 'bf16'"):
        train.TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train.TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="dropout_stream must be one of"):
        train.TrainConfig(dropout_stream="philox")
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="time_limit_s must be positive or None"):
        train.TrainConfig(time_limit_s=0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint="):
        train.TrainConfig(resume=True)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        train.TrainConfig(lr=-1e-3)
    caser = train.TrainConfig(model="caser")
    assert (caser.max_len, caser.lr, caser.lr_schedule, caser.epochs) == (10, 3e-3, "cosine", 12)
    sasrec = train.TrainConfig(model="sasrec")
    assert (sasrec.max_len, sasrec.lr, sasrec.lr_schedule, sasrec.epochs) == (50, 1e-3, "constant", 5)
    assert train.TrainConfig(model="gru4rec").epochs == 12
    chosen = train.TrainConfig(model="caser", max_len=5, lr=1e-3, lr_schedule="constant", epochs=3)
    assert (chosen.max_len, chosen.lr, chosen.lr_schedule, chosen.epochs) == (5, 1e-3, "constant", 3)
    with pytest.raises(ValueError, match=r"model_options: caser takes .*'n_h'.*, not \['heads'\]"):
        train.TrainConfig(model="caser", model_options={"heads": 2})
    with pytest.raises(ValueError, match="model_options: sasrec takes"):
        train.TrainConfig(model="sasrec", model_options={"max_len": 20})  # the config's own field


def test_cli_option_reaches_the_model(monkeypatch, capsys):
    built = {}
    real = train.build_model

    def spy(config, n_items, n_users):
        built["model"] = real(config, n_items, n_users)
        return built["model"]

    monkeypatch.setattr(train, "build_model", spy)
    args = ["train", "--model", "caser", "--data", "synthetic", "--epochs", "1", "--no-progress", "--max-len", "4"]
    assert cli.main([*args, "--option", "n_h=3", "--option", "n_v=2", "--option", "reg_weight=0"]) == 0
    model = built["model"]
    assert model.reg_weight == 0.0
    assert model.conv.conv_v.out_channels == 2 and model.conv.conv_h[0].out_channels == 3
    assert cli.main(["train", "--model", "sasrec", "--data", "synthetic", "--epochs", "1", "--no-progress",
                     "--max-len", "4", "--option", "padding_side=left"]) == 0  # fmt: skip
    assert built["model"].padding_side == "left"
    with pytest.raises(SystemExit, match="--option takes KEY=VALUE"):
        cli.main([*args, "--option", "n_h"])
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--option", "heads=2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrec train: error: model_options: caser takes") and err.count("\n") == 1
    assert "Traceback" not in err
    with pytest.raises(ValueError, match="model_options: caser takes"):  # --debug: the exception itself
        cli.main([*args, "--option", "heads=2", "--debug"])
    with pytest.raises(SystemExit, match="behavior-\\* models take theirs"):
        cli.main(["train", "--model", "behavior-cnn", "--option", "hidden=8"])


def test_cli_train_smoke(capsys):
    args = ["train", "--model", "gru4rec", "--data", "synthetic", "--epochs", "1", "--no-progress", "--max-len", "8"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "gru4rec (fastrec backend) on synthetic" in out
    assert "epoch   1  loss" in out and "samples/s" in out
    assert "test (best epoch 1)  HR@10" in out


def test_cli_train_compare_prints_both_backends(capsys):
    args = ["train", "--model", "caser", "--data", "synthetic", "--epochs", "1", "--no-progress", "--max-len", "4"]
    assert cli.main([*args, "--compare"]) == 0
    out = capsys.readouterr().out
    assert "caser (fastrec backend)" in out and "caser (torch backend)" in out
    assert "test NDCG@10" in out and "epoch time fastrec / torch" in out


def test_cli_learning_rate_flags_and_model_defaults(monkeypatch):
    """--lr / --lr-schedule reach the config; left out, the model's defaults apply."""
    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    args = ["train", "--model", "caser", "--data", "synthetic", "--no-progress"]
    assert cli.main(args) == 0
    assert cli.main([*args, "--lr", "2e-3", "--lr-schedule", "constant"]) == 0
    assert cli.main(["train", "--model", "gru4rec", "--data", "synthetic", "--lr-schedule", "cosine"]) == 0
    assert [(c.lr, c.lr_schedule) for c in seen] == [(3e-3, "cosine"), (2e-3, "constant"), (1e-3, "cosine")]
    with pytest.raises(SystemExit):
        cli.main([*args, "--lr-schedule", "step"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cli_defaults_are_train_configs(monkeypatch, name):
    """`fastrec train --model M` runs exactly TrainConfig(model=M): the CLI reads its defaults
    from TrainConfig (and the per-model ones from MODEL_DEFAULTS), it repeats none of them."""
    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    assert cli.main(["train", "--model", name]) == 0
    assert seen == [train.TrainConfig(model=name)]
    assert seen[0].epochs == train.MODEL_DEFAULTS[name]["epochs"] and seen[0].patience == 3


def test_no_time_limit_unless_given(monkeypatch):
    assert train.TrainConfig().time_limit_s is None
    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    args = ["train", "--model", "gru4rec", "--data", "synthetic"]
    for extra in ([], ["--time-limit", "30"], ["--time-limit", "0"]):
        assert cli.main([*args, *extra]) == 0
    assert [c.time_limit_s for c in seen] == [None, 30.0, None]
    monkeypatch.undo()
    lines = []
    result = train.run(config(epochs=3), log=lines.append)
    assert [e.epoch for e in result.epochs] == [1, 2, 3]
    assert not any("time limit" in line for line in lines)


def _script(name: str):
    """benchmarks/<name>.py as a module."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, argv",
    [
        ("accuracy", ["--models", "sasrec", "--seeds", "1", "--backends", "fastrec"]),
        ("sweep", ["--model", "sasrec", "--seeds", "1", "--config", "base="]),
    ],
)
def test_accuracy_scripts_run_the_protocol_whatever_the_default_epochs(monkeypatch, tmp_path, name, argv):
    """benchmarks/accuracy.py and sweep.py train SASRec for at most 12 epochs with patience 3
    (train.PROTOCOL), not `fastrec train`'s shorter default run."""

    class Ran(Exception):
        pass

    def run(config, log=print):
        raise Ran(config)

    monkeypatch.setattr(train, "run", run)
    threads = torch.get_num_threads()
    outputs = ["--json", str(tmp_path / "runs.json")] + (
        ["--markdown", str(tmp_path / "runs.md")] * (name == "accuracy")
    )
    monkeypatch.setattr(sys, "argv", [name, *argv, *outputs])
    with pytest.raises(Ran) as ran:
        _script(name).main()
    torch.set_num_threads(threads)
    (config,) = ran.value.args
    assert (config.model, config.epochs, config.patience, config.time_limit_s) == ("sasrec", 12, 3, None)
    assert train.PROTOCOL == {"epochs": 12, "patience": 3}


def test_accuracy_script_passes_positions_batch_size_and_lr_and_labels_runs_by_them(monkeypatch, tmp_path):
    """--positions / --batch-size / --lr reach the run's config; runs recorded before those were
    stored count as last-position, batch 512, the model's lr, and the table tells settings apart."""

    class Ran(Exception):
        pass

    def run(config, log=print):
        raise Ran(config)

    monkeypatch.setattr(train, "run", run)
    argv = ["--models", "sasrec", "--seeds", "1", "--backends", "fastrec", "--positions", "all"]
    argv += [
        "--batch-size",
        "32",
        "--lr",
        "3e-3",
        "--json",
        str(tmp_path / "r.json"),
        "--markdown",
        str(tmp_path / "r.md"),
    ]
    monkeypatch.setattr(sys, "argv", ["accuracy", *argv])
    threads = torch.get_num_threads()
    module = _script("accuracy")
    with pytest.raises(Ran) as ran:
        module.main()
    torch.set_num_threads(threads)
    (config,) = ran.value.args
    assert (config.positions, config.batch_size, config.lr, config.epochs) == ("all", 32, 3e-3, 12)
    old = {"model": "sasrec", "backend": "fastrec", "seed": 1}
    new = {**old, "positions": "all", "batch_size": 32, "lr": 1e-3}
    assert module.setting(old) == ("last", 512, 1e-3)
    assert (module.label(old), module.label(new)) == ("sasrec", "sasrec, all positions, batch 32")
    rows = [
        {**r, "test": {"NDCG@10": 0.05, "NDCG@10 (seen excluded)": 0.09}, "median_epoch_s": 1.0} for r in (old, new)
    ]
    table = module.summary(rows)
    assert "| sasrec | fastrec | 1 |" in table and "| sasrec, all positions, batch 32 | fastrec | 1 |" in table


def test_data_in_which_no_user_has_three_items_is_an_error_before_training(tmp_path):
    path = tmp_path / "short.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{t}\n" for u in range(20) for t, i in enumerate((u % 7, u % 5 + 7))
    ))  # fmt: skip
    lines = []
    with pytest.raises(DataError, match=f"{path}: no user has 3 or more items.*no validation or test users"):
        train.run(config(data=str(path)), log=lines.append)
    assert lines == []


def _event_log(tmp_path) -> str:
    """A RetailRocket-style events.csv: 30 visitors with 6 purchases each, between views."""
    rows = ["timestamp,visitorid,event,itemid"]
    for user in range(30):
        for step in range(6):
            time = 100 * user + 2 * step
            rows.append(f"{time},{user},view,{999 - step}")
            rows.append(f"{time + 1},{user},transaction,{(user + step) % 12}")
    path = tmp_path / "events.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_cli_trains_on_a_csv_event_log_with_columns_and_events(tmp_path, capsys):
    path = _event_log(tmp_path)
    args = ["train", "--model", "gru4rec", "--data", path, "--epochs", "1", "--no-progress", "--max-len", "4"]
    columns = ["--columns", "user=visitorid,item=itemid,time=timestamp,event=event"]
    assert cli.main([*args, *columns, "--events", "transaction"]) == 0
    out = capsys.readouterr().out
    assert f"gru4rec (fastrec backend) on {path}: 30 users, 12 items" in out and "test (best epoch 1)" in out
    assert cli.main([*args, *columns]) == 0  # views too: 6 more items
    assert f"on {path}: 30 users, 18 items" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(args)
    assert f"fastrec train: error: --data {path}: a CSV event log needs --columns user=COL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--columns", "user=visitorid,item=itemid"])
    assert exited.value.code == 2
    assert "fastrec train: error: --columns needs user=, item= and time=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--columns", "user=visitorid,item=itemid,time=timestamp,colour=red"])
    assert "--columns takes user, item, time, event, rating" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args, "--columns", "user=visitorid,item=itemid,time=timestamp", "--events", "transaction"])
    assert "--events needs the event column in --columns" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*args[:4], "synthetic", *args[5:], *columns])
    assert "--columns maps the columns of a CSV log given as --data FILE" in capsys.readouterr().err


def test_cli_csv_columns_by_index_for_a_file_without_header(tmp_path, capsys):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("".join(f"{u},{(u + s) % 9},0,buy,{10 * u + s}\n" for u in range(25) for s in range(5)))
    args = ["train", "--model", "caser", "--data", str(path), "--epochs", "1", "--no-progress", "--max-len", "3"]
    assert cli.main([*args, "--columns", "user=0,item=1,time=4,event=3", "--events", "buy,cart"]) == 0
    assert "25 users, 9 items" in capsys.readouterr().out


def test_cli_user_errors_are_one_line_messages_with_exit_status_2(tmp_path, monkeypatch, capsys):
    """A DataError, a CheckpointError and a bad option value: ``fastrec train: error: ...`` on
    stderr, exit status 2, no traceback; FASTREC_DEBUG=1 re-raises the exception."""
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\ttimestamp:float\n1\t2\n")
    ckpt = tmp_path / "state.pt"
    ckpt.write_bytes(b"not a checkpoint")
    base = ["train", "--model", "gru4rec", "--epochs", "1", "--no-progress", "--max-len", "4"]
    cases = {
        "missing column 'item_id'": [*base, "--data", str(bad)],
        f"{ckpt}: ": [*base, "--data", "synthetic", "--checkpoint", str(ckpt), "--resume"],
        "lr must be >= 0": [*base, "--data", "synthetic", "--lr", "-1"],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2, message
        err = capsys.readouterr().err
        assert err.startswith("fastrec train: error: ") and message in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    monkeypatch.setenv("FASTREC_DEBUG", "1")
    with pytest.raises(DataError, match="missing column 'item_id'"):
        cli.main(cases["missing column 'item_id'"])
    with pytest.raises(train.CheckpointError):
        cli.main(cases[f"{ckpt}: "])


def test_cli_device_cuda_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--model", "gru4rec", "--data", "synthetic", "--device", "cuda", "--epochs", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "fastrec train: error: --device cuda: no CUDA device is available" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- losses and positions
@pytest.mark.parametrize(
    ("name", "loss", "positions"),
    [("sasrec", "ce", "all"), ("gru4rec", "ce", "all"), ("sasrec", "sampled-softmax", "last"),
     ("gru4rec", "gbce", "all"), ("sasrec", "gbce", "last")],
)  # fmt: skip
def test_losses_and_all_positions_learn(name, loss, positions):
    lines = []
    batch_size = 16 if positions == "all" else 128  # all positions: one example per sequence window
    cfg = config(model=name, loss=loss, positions=positions, n_negatives=8, epochs=3, lr=5e-3, batch_size=batch_size)
    result = train.run(cfg, log=lines.append)
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert result.test["NDCG@10"] > 0.15, result.test  # far better than a random ranking of 60 items
    assert (f"loss {loss}" in lines[0]) == (loss != "ce")
    assert ("all positions" in lines[0]) == (positions == "all")


def test_all_positions_batches_hold_per_position_targets():
    """positions='all': (B, L) targets aligned with the items, 0 exactly at padding, each the
    item after the input at its column; every training item after a sequence's first is a target once."""
    cfg = config(model="sasrec", positions="all")
    data = train.load_data(cfg, "right")
    batch = next(iter(data.train))
    assert batch.target.shape == batch.items.shape
    assert torch.equal(batch.target > 0, batch.items > 0)
    n_targets = int((data.train.targets > 0).sum())
    last = train.load_data(config(model="sasrec"), "right")
    assert n_targets == last.train.n_examples  # the same (history, next item) pairs, counted by target


def test_resume_with_another_loss_or_positions_is_refused(tmp_path):
    cfg, data = _one_epoch_checkpoint(tmp_path)
    for changes, named in (
        ({"loss": "gbce"}, "loss='gbce', but .* was trained with 'ce'"),
        ({"n_negatives": 5}, "n_negatives=5, but .* was trained with 1"),
        ({"positions": "all"}, "positions='all', but .* was trained with 'last'"),
    ):
        changed = dataclasses.replace(cfg, resume=True, epochs=2, **changes)
        with pytest.raises(train.CheckpointError, match=named):
            train.fit(train.build_model(changed, data.n_items, data.n_users), data, changed, log=lambda _: None)


def test_config_rejects_bad_loss_and_positions():
    with pytest.raises(ValueError, match="loss must be one of"):
        train.TrainConfig(loss="softmax")
    with pytest.raises(ValueError, match="positions must be one of"):
        train.TrainConfig(positions="first")
    with pytest.raises(ValueError, match="caser has not"):
        train.TrainConfig(model="caser", positions="all")
    for changes in ({"loss": "gbce"}, {"loss": "sampled-softmax"}, {"positions": "all"}):
        with pytest.raises(ValueError, match="cuda_graphs=True needs fixed shapes"):
            train.TrainConfig(device="cuda", cuda_graphs=True, **changes)


def test_cli_loss_positions_and_negatives_reach_the_config(monkeypatch):
    seen = []
    monkeypatch.setattr(train, "run", lambda config: seen.append(config))
    args = ["train", "--model", "sasrec", "--data", "synthetic", "--no-progress"]
    assert cli.main([*args, "--loss", "sampled-softmax", "--positions", "all", "--negatives", "64"]) == 0
    assert (seen[-1].loss, seen[-1].positions, seen[-1].n_negatives) == ("sampled-softmax", "all", 64)
    assert cli.main(args) == 0
    assert (seen[-1].loss, seen[-1].positions, seen[-1].n_negatives) == ("ce", "last", 1)
    with pytest.raises(SystemExit):
        cli.main([*args, "--positions", "middle"])


_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


def test_training_steps_read_the_loss_only_every_log_every_steps(monkeypatch):
    """Every read of a tensor's value back to the host made by fastrec/train.py (item, float,
    bool, format, cpu, ...) is recorded with the number of optimizer steps taken so far: the
    steps read nothing, so reads happen only after every ``log_every``-th step and at the end of
    an epoch (the epoch's loss, then the evaluation)."""
    cfg = config(epochs=2, log_every=3, progress=True)
    data = train.load_data(cfg, MODELS[cfg.model].padding_side)
    steps_per_epoch = len(data.train)
    assert steps_per_epoch > 2 * cfg.log_every
    steps, reads = [0], []
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == train.__file__:
                reads.append((steps[0], _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    make_optimizer = train.make_optimizer

    def counting_optimizer(*args, **kwargs):
        optimizer, schedule = make_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
        return optimizer, schedule

    monkeypatch.setattr(train, "make_optimizer", counting_optimizer)
    epochs, _ = train.fit(train.build_model(cfg, data.n_items, data.n_users), data, cfg, log=lambda _: None)
    assert steps[0] == 2 * steps_per_epoch
    at = sorted({step for step, _ in reads})
    epoch_ends = {steps_per_epoch, 2 * steps_per_epoch}
    logged = {s for s in range(1, 2 * steps_per_epoch + 1) if (s - 1) % steps_per_epoch % cfg.log_every == 2}
    assert set(at) <= epoch_ends | logged, (at, reads)
    assert logged <= set(at) and epoch_ends <= set(at)  # the progress bar reads every log_every steps
    assert epochs[1].loss > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_trains_as_a_plain_training_loop(name):
    """fit() against the textbook loop written here (zero_grad, mean loss, backward, Adam step,
    the epoch loss summed on the host): bitwise the same weights and epoch losses."""
    cfg = config(model=name, epochs=2, max_len=5, lr_schedule="constant")
    data = train.load_data(cfg, MODELS[name].padding_side)
    model = train.build_model(cfg, data.n_items, data.n_users)
    epochs, _ = train.fit(model, data, cfg, log=lambda _: None)
    data = train.load_data(cfg, MODELS[name].padding_side)
    plain = train.build_model(cfg, data.n_items, data.n_users)
    adam = torch.optim.Adam(plain.parameters(), lr=cfg.lr)
    losses, states = [], []
    for _ in range(cfg.epochs):
        plain.train()
        total, count = 0.0, 0
        for batch in data.train:
            adam.zero_grad()
            loss = plain.loss(batch)
            loss.backward()
            adam.step()
            total += loss.item() * len(batch)
            count += len(batch)
        losses.append(total / count)
        states.append(copy.deepcopy(plain.state_dict()))
        train.evaluate(plain, *data.valid)
    assert [e.loss for e in epochs] == losses
    best = max(range(len(epochs)), key=lambda i: (epochs[i].valid["NDCG@10"], -i))
    for key, value in model.state_dict().items():
        assert torch.equal(value, states[best][key]), key


def test_cli_log_every_and_cuda_graphs_options(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(train, "run", lambda c, log=print: seen.setdefault("config", c))
    assert cli.main(["train", "--model", "gru4rec", "--data", "synthetic", "--log-every", "7"]) == 0
    assert seen["config"].log_every == 7 and seen["config"].cuda_graphs is False
    assert train.TrainConfig().log_every == 50
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--model", "gru4rec", "--data", "synthetic", "--cuda-graphs"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "fastrec train: error: --cuda-graphs: no CUDA device is available" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda', got 'cpu'"):
        config(cuda_graphs=True)
    with pytest.raises(ValueError, match="log_every must be a positive int, got 0"):
        config(log_every=0)


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_fit_steps_do_not_synchronise_the_host(name, cuda_graphs):
    """fit() on CUDA with torch.cuda.set_sync_debug_mode("error") on from the second batch to
    the end of the epoch's steps (the first step captures the graph, which synchronises): any
    host synchronisation in a step raises (log_every is past the epoch, so the progress bar
    reads nothing)."""
    cfg = config(model=name, epochs=1, max_len=5, device="cuda", cuda_graphs=cuda_graphs, log_every=10**6)
    data = train.load_data(cfg, MODELS[name].padding_side)
    batches = data.train

    class StrictAfterFirstBatch:
        def __len__(self) -> int:
            return len(batches)

        def __iter__(self):
            for i, batch in enumerate(batches):
                if i == 1:
                    torch.cuda.set_sync_debug_mode("error")
                yield batch
            torch.cuda.set_sync_debug_mode("default")

    data.train = StrictAfterFirstBatch()
    assert len(batches) > 2
    try:
        epochs, _ = train.fit(train.build_model(cfg, data.n_items, data.n_users), data, cfg, log=lambda _: None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert epochs[0].loss > 0
