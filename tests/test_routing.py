"""fastrec.routing: every rule is documented and measured, routes apply only unforced, the table
loader names the file it rejects, and ``fastrec info --routes`` lists every rule.

CUDA routes cannot run here: their predicates are checked with stand-ins that carry a CUDA
device (the predicates read only ``device``, ``is_cuda`` and ``dtype``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastrec import backends, cli, routing
from fastrec import nn as fnn
from fastrec._tables import package_table, read_table
from fastrec.ops import conv as conv_ops
from fastrec.ops import rnn as rnn_ops

REPO = Path(__file__).resolve().parent.parent
UNMEASURED = {"rnn-packed-cuda"}  # kept without a measurement on record; see the rule's reason


def cuda_like(dtype: torch.dtype = torch.float32) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cuda"), is_cuda=True, dtype=dtype)


def test_every_rule_has_a_reason_and_a_measurement_in_the_repository():
    names = [rule.name for rule in routing.RULES]
    assert len(names) == len(set(names))
    for rule in routing.RULES:
        assert rule.op and rule.condition and rule.reason and rule.device in ("cpu", "cuda")
        if rule.name in UNMEASURED:
            assert rule.measurement is None
            continue
        m = rule.measurement
        assert m is not None, rule.name
        assert m.command and m.figures, rule.name
        assert m.results.startswith("benchmarks/results/"), rule.name
        assert (REPO / m.results).is_file(), f"{rule.name}: {m.results} is not in the repository"


def test_routes_list_every_rule_with_where_it_applies(monkeypatch):
    cpu = routing.routes("cpu")
    assert [row["name"] for row in cpu] == [rule.name for rule in routing.RULES]
    assert {row["name"] for row in cpu if row["applies"]} == {r.name for r in routing.RULES if r.device == "cpu"}
    cuda = {row["name"]: row for row in routing.routes("cuda", card="NVIDIA H200")}
    cuda_rules = {r.name for r in routing.RULES if r.device == "cuda"}
    assert {name for name, row in cuda.items() if row["applies"]} == cuda_rules
    assert "NVIDIA H200" in cuda["conv-table-cuda"]["card_detail"]
    other = {row["name"]: row for row in routing.routes("cuda", card="Some Other GPU")}
    assert not other["conv-table-cuda"]["applies"]  # an unlisted card runs the fused conv everywhere
    assert other["dropout-cuda"]["applies"]


def test_info_routes_prints_every_rule(capsys):
    assert cli.main(["info", "--routes"]) == 0
    out = capsys.readouterr().out
    for rule in routing.RULES:
        assert rule.name in out and rule.reason in out
        if rule.measurement is not None:
            assert rule.measurement.results in out


def test_cuda_predicates_route_unforced_and_bypass_when_forced():
    assert routing.rnn("GRU", cuda_like(torch.float32), packed=False) == (
        "torch.float32 on CUDA (cuDNN is faster there; the Triton recurrence wins in 16-bit)"
    )
    assert routing.rnn("LSTM", cuda_like(torch.float64), packed=False).startswith("torch.float64 on CUDA")
    assert routing.rnn("GRU", cuda_like(torch.bfloat16), packed=False) is None  # the Triton recurrence wins
    assert routing.rnn("GRU", cuda_like(torch.bfloat16), packed=True) == routing.RNN_PACKED_CUDA.reason
    assert routing.rnn_cell(cuda_like()) == rnn_ops.CELL_CUDA_ROUTE
    assert routing.dropout(cuda_like()) == routing.DROPOUT_CUDA.reason
    for name in backends.BACKENDS:
        with backends.use_backend(name):
            assert routing.rnn("GRU", cuda_like(), packed=False) is None
            assert routing.rnn("GRU", cuda_like(), packed=True) is None
            assert routing.rnn_cell(cuda_like()) is None
            assert routing.dropout(cuda_like()) is None


def test_cpu_predicates_route_unforced_and_bypass_when_forced():
    x = torch.randn(2, 3, 4)
    assert routing.rnn("LSTM", x, packed=False) == routing.RNN_LSTM_CPU.reason
    assert routing.rnn("LSTM", x, packed=True) is None  # packed input skips finished rows: fused
    assert routing.rnn("GRU", x, packed=False) is None
    assert routing.rnn_cell(x) is None and routing.dropout(x) is None
    assert routing.conv(x, "none", (1, 1), 32) == routing.CONV_PLAIN_CPU.reason
    assert routing.conv(x, "relu", (1, 1), 8) == routing.CONV_NARROW_CPU.reason
    assert routing.conv(x, "relu", (2, 2), 32) is None
    for name in backends.BACKENDS:
        with backends.use_backend(name):
            assert routing.rnn("LSTM", x, packed=False) is None
            assert routing.conv(x, "none", (1, 1), 8) is None


def test_routed_reasons_are_not_built_per_call():
    x = torch.randn(2, 3, 4)
    assert routing.rnn("LSTM", x, False) is routing.rnn("LSTM", x, False)
    assert routing.rnn("GRU", cuda_like(), False) is routing.rnn("GRU", cuda_like(), False)


@pytest.mark.skipif(not rnn_ops.HAVE_CPP, reason="needs the C++ extension")
def test_forcing_runs_the_kernel_where_a_route_would_run_torch():
    x = torch.randn(3, 7, 5)
    lstm = fnn.LSTM(5, 6, batch_first=True)
    backends.stats(reset=True)
    lstm(x)
    assert backends.stats(reset=True) == {("LSTM", "torch", routing.RNN_LSTM_CPU.reason): 1}
    with backends.use_backend("cpp"):
        lstm(x)
    assert backends.stats(reset=True) == {("rnn", "cpp", ""): 1}
    conv = fnn.Conv1d(5, 4, 3)
    conv(x.transpose(1, 2))
    assert backends.stats(reset=True) == {("conv", "torch", routing.CONV_PLAIN_CPU.reason): 1}
    with backends.use_backend("cpp"):
        conv(x.transpose(1, 2))
    assert backends.stats(reset=True) == {("conv", "cpp", ""): 1}


def test_table_loader_names_the_file_it_rejects(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_table(bad_json, conv_ops.parse_dispatch)
    not_object = tmp_path / "list.json"
    not_object.write_text("[]")
    with pytest.raises(ValueError, match="list.json: must hold a JSON object"):
        read_table(not_object, conv_ops.parse_dispatch)
    wrong = tmp_path / "conv_dispatch.json"
    wrong.write_text(json.dumps({"version": 2, "default": "triton", "cards": {}}))
    with pytest.raises(ValueError, match=f"{wrong}: version must be 1"):
        read_table(wrong, conv_ops.parse_dispatch)


def test_package_tables_load_once_through_the_shared_loader():
    table = package_table("conv_dispatch.json", conv_ops.parse_dispatch)
    assert table is package_table("conv_dispatch.json", conv_ops.parse_dispatch)
    assert conv_ops.dispatch_table() is table
    assert "NVIDIA H200" in table
