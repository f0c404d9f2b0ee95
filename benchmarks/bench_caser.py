"""pytest-benchmark suite for the Caser block: the same cases as ``fastrec bench --family caser``.

    pytest benchmarks/bench_caser.py --benchmark-enable --benchmark-group-by=param:case

Each case times ``fastrec.nn.CaserConv`` (every filter height in one launch) and RecBole's loop
over the heights (nn.Conv2d + ReLU + max_pool1d per height, then the vertical conv) with the
same weights; compare within a group. With the project's default ``--benchmark-disable`` this
file runs every function once, as a check that the benchmark still runs.
"""

import pytest

from fastrec import bench

DEVICE, DTYPE = bench.suite_device()
CASES = bench.caser_cases(DEVICE, DTYPE, full=False)


@pytest.mark.parametrize("case, side", bench.suite_params(CASES))
def test_caser(benchmark, case, side):
    bench.suite_run(benchmark, case, side)
