"""``fastrec bench``'s harness on tiny cases: timing, the record of what ran on each side (from
``fastrec.stats()``), forced rows that must run their kernel, routed rows, and the writers."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import fastrec
from fastrec import backends
from fastrec.bench import cli, harness
from fastrec.bench.cases import rnn

CPU = torch.device("cpu")
needs_cpp = pytest.mark.skipif(backends.available()["cpp"] is not None, reason="fastrec._C not built")


def _dropout_case(device: torch.device = CPU, stream: str = "fastrec", inplace: bool = False) -> harness.Case:
    """fastrec.nn.Dropout in ``stream`` against torch's on a (4, 8) input, forward only."""
    ours = fastrec.nn.Dropout(0.5, inplace=inplace)
    theirs = torch.nn.Dropout(0.5)
    x = torch.randn(4, 8, device=device)

    def run_ours() -> torch.Tensor:
        with backends.use_dropout_stream(stream):
            return ours(x.clone() if inplace else x)

    fns = {"fastrec": run_ours, "torch.nn.Dropout": lambda: theirs(x)}
    return harness.Case("dropout", "Dropout", "4x8", "float32", "forward", fns, bytes=2 * x.numel() * 4)


def _measure(case: harness.Case, device: torch.device = CPU) -> harness.Row:
    return harness.measure(case, device, rounds=2, min_round_s=0.0, ceilings={})


@needs_cpp
def test_harness_times_a_case_and_records_what_ran_on_each_side():
    row = _measure(_dropout_case())
    assert set(row.ms) == {"fastrec", "torch.nn.Dropout"} and all(math.isfinite(v) and v > 0 for v in row.ms.values())
    assert row.speedup["torch.nn.Dropout"] == pytest.approx(row.ms["torch.nn.Dropout"] / row.ms["fastrec"])
    assert row.paths == {"fastrec": "cpp dropout", "torch.nn.Dropout": "torch"}
    assert row.routed is None and row.forced is None and row.error is None


def test_time_interleaved_counts_only_the_timed_calls():
    calls = []

    def fn():
        calls.append(1)
        backends.count("probe", "cpp")

    counts = {}
    harness.time_interleaved({"fastrec": fn}, CPU, rounds=3, min_round_s=0.0, counts=counts)
    assert len(calls) == 2 + 3  # warm-up and sizing, then one call a round
    assert counts["fastrec"] == {("probe", "cpp", ""): 3}


def test_routed_row_is_labelled_routed_torch_vs_torch():
    row = _measure(_dropout_case(inplace=True))  # inplace=True runs torch's forward, counted with the reason
    assert row.routed == "all" and row.paths["fastrec"] == "torch Dropout (inplace=True)"
    report = {"environment": harness.environment(CPU), "ceilings": {}, "results": [asdict(row)]}
    table = harness.markdown(report)
    assert "routed: " in table and "(torch vs torch)" in table and "routed: torch Dropout (inplace=True)" in table


def _routed_unless_forced() -> harness.Case:
    """A fastrec side that takes torch's op unless a backend is forced (counted as the ops do)."""
    x = torch.randn(4, 8)

    def ours():
        if backends.forced() is None:
            backends.count("probe", "torch", "torch is faster here")
            return F.relu(x)
        backends.count("probe", backends.forced())
        return x.clamp(min=0)

    return harness.Case("probe", "relu", "4x8", "float32", "forward", {"fastrec": ours, "F.relu": lambda: F.relu(x)})


@needs_cpp
def test_a_routed_row_is_followed_by_the_row_with_the_kernel_forced():
    rows = list(harness.measured_rows([_routed_unless_forced()], CPU, 1, 0.0, {}))
    assert [(r.name, r.routed, r.forced, r.paths["fastrec"]) for r in rows] == [
        ("relu", "all", None, "torch probe (torch is faster here)"),
        ("relu, cpp forced", None, "cpp", "cpp probe"),
    ]
    case = _routed_unless_forced()
    case.force_when_routed = False
    assert len(list(harness.measured_rows([case], CPU, 1, 0.0, {}))) == 1


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_forced_row_runs_the_forced_backend(backend):
    case = rnn._padded_cases(CPU, torch.float32, batch=2, steps=3, hidden=4)[3]  # LSTM, forward + backward
    assert case.name == "LSTM" and case.mode == "forward+backward"
    row = _measure(case.forced_onto(backend))
    assert row.name == f"LSTM, {backend} forced" and row.forced == backend and row.error is None, row.error
    assert row.paths["fastrec"] == f"{backend} rnn" and row.routed is None


def test_forced_triton_row_runs_the_triton_kernel():
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if device.type == "cpu" and not backends.interpreter_enabled():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    if backends.available()["triton"] is not None:
        pytest.skip(backends.available()["triton"])
    row = _measure(_dropout_case(device, stream="auto").forced_onto("triton"), device)
    assert row.error is None, row.error
    assert row.paths["fastrec"] == "triton dropout" and row.name == "Dropout, triton forced"


@needs_cpp
def test_forced_row_whose_kernel_did_not_run_fails():
    # Under the default stream the CPU draws torch's masks, which forcing cpp does not change.
    row = _measure(_dropout_case(stream="auto").forced_onto("cpp"))
    assert row.error == "cpp forced, but ran: cpp dropout (torch dropout stream)"
    report = {"environment": {}, "ceilings": {}, "results": [asdict(row)]}
    assert harness.failed(report)
    assert "| FAILED: cpp forced, but ran: cpp dropout" in harness.markdown(_with_env(report))


def test_forced_row_that_raises_fails_with_the_error():
    def ours():
        backends.select(CPU, "an option the kernels do not cover")

    case = harness.Case("probe", "p", "s", "float32", "forward", {"fastrec": ours, "torch": lambda: None})
    row = _measure(case.forced_onto("cpp"))
    assert row.error.startswith("cpp forced, but the call failed: RuntimeError")
    assert all(math.isnan(v) for v in row.ms.values())


def _with_env(report: dict) -> dict:
    return {**report, "environment": harness.environment(CPU)}


@needs_cpp
def test_cli_writes_the_paths_to_json_and_markdown(monkeypatch, tmp_path, capsys):
    routed = _dropout_case(inplace=True)
    routed.force_when_routed = False  # the kernels do not cover inplace=True: no forced row after it
    monkeypatch.setattr(cli, "family_cases", lambda *_: [_dropout_case(), routed])
    args = argparse.Namespace(
        family=["dropout"],
        full=False,
        rounds=1,
        min_round_s=0.0,
        json=str(tmp_path / "bench.json"),
        markdown=str(tmp_path / "bench.md"),
        write_dispatch=None,
        write_configs=None,
    )
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["paths"]["fastrec"], r["routed"], r["forced"]) for r in rows] == [
        ("cpp dropout", None, None),
        ("torch Dropout (inplace=True)", "all", None),
    ]
    table = (tmp_path / "bench.md").read_text()
    assert "| fastrec ran |" in table and "| cpp dropout |" in table and "(torch vs torch)" in table
    assert "[cpp dropout]" in capsys.readouterr().out  # the progress line names the path too


@needs_cpp
def test_cli_exits_1_when_a_forced_kernel_did_not_run(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "family_cases", lambda *_: [_dropout_case(stream="auto").forced_onto("cpp")])
    args = argparse.Namespace(
        family=["dropout"], full=False, rounds=1, min_round_s=0.0, json=None, markdown=None, write_dispatch=None
    )
    assert cli.main(args) == 1


def test_16bit_rnn_rows_also_time_torchs_fp32_module_on_fp32_inputs(monkeypatch):
    flattened = []
    original = torch.nn.RNNBase.flatten_parameters

    def spy(module):
        flattened.append(module)
        return original(module)

    monkeypatch.setattr(torch.nn.RNNBase, "flatten_parameters", spy)
    gen = torch.Generator().manual_seed(0)
    cases = rnn._padded_cases(CPU, torch.bfloat16, batch=2, steps=3, hidden=4)
    cases += rnn._packed_cases(CPU, torch.bfloat16, "GRU", 3, 4, 4, gen)
    for case in cases:
        kind = case.name
        assert f"nn.{kind}" in case.fns and f"nn.{kind} fp32" in case.fns, case.fns
    gru = cases[1]  # padded GRU, forward + backward
    seen = {}

    def record(name, fn):
        def run():
            out = fn()
            seen[name] = out[0].dtype
            return out

        return run

    gru.fns = {name: record(name, fn) for name, fn in gru.fns.items()}
    row = _measure(gru)
    assert seen == {"fastrec": torch.bfloat16, "nn.GRU": torch.bfloat16, "nn.GRU fp32": torch.float32,
                    "GRUCell loop": torch.bfloat16}  # fmt: skip
    assert row.fastest in row.speedup and row.speedup[row.fastest] == min(row.speedup.values())
    assert row.paths["nn.GRU fp32"] == "torch" and row.error is None
    # every module a row times, fastrec's deep copy included (deepcopy does not flatten), had its
    # weights flattened when the case was built, and timing flattens nothing
    assert len({id(m) for m in flattened}) == 3 * len(cases) // 2  # fastrec, nn.X, nn.X fp32 per kind
    before = len(flattened)
    _measure(cases[0])
    assert len(flattened) == before
    assert "fastest baseline" in harness.ratios(asdict(row))


def test_fp32_rows_have_no_fp32_twin():
    case = rnn._padded_cases(CPU, torch.float32, batch=2, steps=3, hidden=4)[0]
    assert set(case.fns) == {"fastrec", "nn.GRU", "GRUCell loop"}


def test_longest_kernels_sums_repeated_names_and_keeps_the_top():
    events = [("cudnn::gru_persist_fwd", 5.0), ("triton_attn", 2.0), ("copy", 0.5), ("triton_attn", 4.0), ("x", 0)]
    assert harness.longest_kernels(events, top=2) == ["triton_attn", "cudnn::gru_persist_fwd"]
    assert harness.longest_kernels([("k" * 80, 1.0)]) == ["k" * 60]
    assert harness.profiled_kernels(lambda: None, CPU) == []


@pytest.mark.slow
def test_catalogue_family_is_opt_in_and_its_rows_time_every_side(monkeypatch, tmp_path):
    """``--family catalogue`` (minutes at 10^6 items) is left out of the default run; its rows,
    at small sizes here, time the fused loss / top-k / SASRec step against torch's dense paths
    (the SASRec row without its dense side above the size where it fits)."""
    from fastrec.bench import cases as bench_cases
    from fastrec.bench.cases import catalogue

    assert "catalogue" in bench_cases.CASES and "catalogue" in bench_cases.OPT_IN
    seen = []
    monkeypatch.setattr(cli, "family_cases", lambda family, *_: seen.append(family) or [])
    args = argparse.Namespace(
        family=None,
        full=False,
        rounds=1,
        min_round_s=0.0,
        json=str(tmp_path / "bench.json"),
        markdown=None,
        write_dispatch=None,
        write_configs=None,
    )
    cli.main(args)
    assert seen and "catalogue" not in seen
    monkeypatch.setattr(catalogue, "LOSS_ITEMS", (2_000,))
    monkeypatch.setattr(catalogue, "TOPK_USERS", (3,))
    monkeypatch.setattr(catalogue, "TOPK_ITEMS", 3_000)
    monkeypatch.setattr(catalogue, "SASREC_ITEMS", (600, 700))
    monkeypatch.setattr(catalogue, "SASREC_DENSE_MAX", 600)
    rows = catalogue.cases(CPU, torch.float32, False)
    names = ["linear_cross_entropy", "topk_scores", "SASRec training step", "SASRec training step"]
    assert [c.name for c in rows] == names
    assert len(rows[-2].fns) == 2 and list(rows[-1].fns) == ["fastrec"]
    for case in rows[:3]:
        row = _measure(case)
        assert row.error is None and len(row.ms) == 2 and all(v > 0 for v in row.ms.values()), row
