"""pytest-benchmark suite for the Caser block: the same cases as ``fastrec bench --family caser``.

    pytest benchmarks/bench_caser.py --benchmark-enable --benchmark-group-by=param:case

Each case times ``fastrec.nn.CaserConv`` (every filter height in one launch) and RecBole's loop
over the heights (nn.Conv2d + ReLU + max_pool1d per height, then the vertical conv) with the
same weights; compare within a group. With the project's default ``--benchmark-disable`` this
file runs every function once, as a check that the benchmark still runs.
"""

import pytest

from fastrec.bench.cases import caser
from fastrec.bench.suite import suite_device, suite_params, suite_run

DEVICE, DTYPE = suite_device()
CASES = caser.cases(DEVICE, DTYPE, full=False)


@pytest.mark.parametrize("case, side", suite_params(CASES))
def test_caser(benchmark, case, side):
    suite_run(benchmark, case, side)
