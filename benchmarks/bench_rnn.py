"""pytest-benchmark suite for the recurrent family: the same cases as ``fastrec bench`` (fastrec.bench).

    pytest benchmarks/bench_rnn.py --benchmark-enable --benchmark-group-by=param:case

Each case is benchmarked once per side (``fastrec`` and each baseline: torch's GRU / LSTM / RNN,
the Python loop of nn.GRUCell, nn.GRUCell); compare within a group. ``fastrec bench --family
rnn`` is the interleaved, ratio-first version of the same figures; with the project's default
``--benchmark-disable`` this file runs every function once, as a check that the benchmark
still runs.
"""

import pytest
import torch

from fastrec import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = bench.rnn_cases(DEVICE, DTYPE, full=False)
PARAMS = [
    pytest.param(case, side, id=f"{case.name}|{case.shape}|{case.mode}|{side}") for case in CASES for side in case.fns
]


@pytest.mark.parametrize("case, side", PARAMS)
def test_rnn(benchmark, case, side):
    benchmark.group = f"{case.name} {case.shape} {case.mode}"
    fn = case.fns[side]
    if DEVICE.type == "cuda":
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)
