"""pytest-benchmark suite for conv (the fused conv rows): the cases of ``fastrec bench``.

    pytest benchmarks/bench_conv.py --benchmark-enable --benchmark-group-by=param:case

Each case is benchmarked once per side (``fastrec`` and each baseline); compare within a
group. ``fastrec bench`` is the interleaved, ratio-first version of the same figures; with
the project's default ``--benchmark-disable`` this file runs every function once, as a check
that the benchmark still runs.
"""

import pytest

from fastrec.bench.cases import conv
from fastrec.bench.suite import suite_device, suite_params, suite_run

DEVICE, DTYPE = suite_device()
CASES = conv.cases(DEVICE, DTYPE, full=False)


@pytest.mark.parametrize("case, side", suite_params(CASES))
def test_conv(benchmark, case, side):
    suite_run(benchmark, case, side)
