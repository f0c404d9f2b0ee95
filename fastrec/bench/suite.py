"""The glue of the pytest-benchmark suites ``benchmarks/bench_<op>.py``: the same cases as
``fastrec bench``, one pytest-benchmark test per case and side."""

from __future__ import annotations

import torch

from fastrec.bench.harness import Case


def suite_device() -> tuple[torch.device, torch.dtype]:
    """The device and dtype the suites run on: CUDA bf16, else CPU fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def suite_params(cases: list[Case]) -> list:
    """One pytest param per (case, side), ids naming the case and the side."""
    import pytest

    return [
        pytest.param(case, side, id=f"{case.name}|{case.shape}|{case.mode}|{side}")
        for case in cases
        for side in case.fns
    ]


def suite_run(benchmark, case: Case, side: str) -> None:
    """Times one side of one case with pytest-benchmark, grouped by case (synchronised on CUDA)."""
    benchmark.group = f"{case.name} {case.shape} {case.mode}"
    fn = case.fns[side]
    if torch.cuda.is_available():
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)
