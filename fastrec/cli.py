"""The ``fastrec`` command: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(_args: argparse.Namespace) -> int:
    import torch

    import fastrec
    from fastrec import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"fastrec   {fastrec.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} ({torch.get_num_threads()} CPU threads)")
    print(f"triton    {triton_version}")
    print(f"device    {device}; CPU {platform.machine()} {torch.backends.cpu.get_cpu_capability()}")
    forced = backends.forced()
    print(f"forced    {forced or 'none (CUDA -> triton, CPU -> cpp, else torch)'}")
    print("backends")
    for name, reason in backends.available().items():
        print(f"  {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fastrec import bench

    return bench.main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and available backends").set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmark table: fastrec vs torch baselines (ratios)")
    bench.add_argument(
        "--family", action="append", choices=["attention", "rnn", "caser"], help="only this family (repeatable)"
    )
    bench.add_argument("--full", action="store_true", help="the full CPU shape grid (slower)")
    bench.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row (median)")
    bench.add_argument("--min-round-s", type=float, default=0.05, help="seconds per round per side")
    bench.add_argument("--json", help="write every figure as JSON to this path")
    bench.add_argument("--markdown", help="write the table as Markdown to this path")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
