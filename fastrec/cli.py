"""The ``fastrec`` command: ``info``, ``bench`` and ``train``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

from fastrec.backends import DROPOUT_STREAMS


def _info(args: argparse.Namespace) -> int:
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
    if args.routes:
        _print_routes("cuda" if torch.cuda.is_available() else "cpu", forced)
    return 0


def _print_routes(device: str, forced: str | None) -> None:
    """The routing table for ``device``: each rule, whether it applies here, why, and its measurement."""
    from fastrec import routing

    note = f"none apply now: backend {forced!r} is forced" if forced else "they apply unless a backend is forced"
    print(f"routes    where torch's op runs instead of fastrec's kernel, on {device} ({note})")
    for row in routing.routes(device):
        status = "applies" if row["applies"] else f"not on {device}" if row["device"] != device else "not on this card"
        print(f"  {row['name']}  [{row['device']}, {status}]  {row['op']}")
        print(f"      when      {row['condition']}")
        if row["card_detail"]:
            print(f"      card      {row['card_detail']}")
        print(f"      why       {row['reason']}")
        if row["results"] is None:
            print("      measured  not on record")
        else:
            print(f"      measured  {row['figures']}")
            print(f"      command   {row['command']}")
            print(f"      results   {row['results']}")


def _bench(args: argparse.Namespace) -> int:
    from fastrec.bench.cli import main

    return main(args)


BEHAVIOR_MODELS = ("behavior-cnn", "behavior-rnn", "behavior-attention")
BEHAVIOR_EXPERIMENT = Path(__file__).resolve().parent.parent / "benchmarks" / "behavior.py"


def behavior_experiment() -> ModuleType:
    """The CDNOW purchase-prediction experiment, ``benchmarks/behavior.py`` of the checkout this
    fastrec runs from: a script of the repository, not part of the installed package."""
    name = "fastrec_behavior_experiment"
    if name in sys.modules:
        return sys.modules[name]
    if not BEHAVIOR_EXPERIMENT.is_file():
        raise SystemExit(
            "fastrec train: the behavior-* models run the CDNOW experiment benchmarks/behavior.py of "
            f"fastrec's repository, which is not at {BEHAVIOR_EXPERIMENT}; run it from a checkout"
        )
    spec = importlib.util.spec_from_file_location(name, BEHAVIOR_EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _model_options(items: list[str]) -> dict[str, int | float | str]:
    """``--option KEY=VALUE`` pairs as model constructor arguments: numbers where VALUE reads as
    one (int before float), else the string."""
    options: dict[str, int | float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (sep and key and value):
            raise SystemExit(f"fastrec train: --option takes KEY=VALUE (e.g. n_h=8), got {item!r}")
        for kind in (int, float, str):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                continue
    return options


CSV_COLUMNS = ("user", "item", "time", "event", "rating")


def _data_options(args: argparse.Namespace) -> dict[str, str | int | list[str]]:
    """``--columns`` and ``--events`` as fastrec.data.load_csv's column mapping and event filter
    (a column as its header name, or as its 0-based index in a file without a header)."""
    error = args.parser.error
    base = Path(args.data).name
    named = (
        args.data in ("ml-100k", "synthetic")
        or args.data.startswith("synthetic:")
        or base.endswith(".inter")
        or base in ("u.data", "ratings.dat")
    )
    if args.columns is None:
        if args.events is not None:
            error("--events needs --columns with the event column (event=COL)")
        if not named and base != "ratings.csv" and Path(args.data).is_file():
            error(f"--data {args.data}: a CSV event log needs --columns user=COL,item=COL,time=COL")
        return {}
    if named:
        error(f"--columns maps the columns of a CSV log given as --data FILE; {args.data} names its own columns")
    options: dict[str, str | int | list[str]] = {}
    for pair in args.columns.split(","):
        key, sep, column = (part.strip() for part in pair.partition("="))
        if not (sep and key and column):
            error(f"--columns takes KEY=COLUMN pairs separated by commas (user=visitorid,...), got {pair!r}")
        if key not in CSV_COLUMNS:
            error(f"--columns takes {', '.join(CSV_COLUMNS)}, not {key!r}")
        options[key] = int(column) if column.isdigit() else column
    missing = [key for key in CSV_COLUMNS[:3] if key not in options]
    if missing:
        error(
            "--columns needs user=, item= and time= (header names, or 0-based indices for a file without a "
            f"header); missing {', '.join(missing)}"
        )
    if args.events is not None:
        if "event" not in options:
            error("--events needs the event column in --columns (event=COL)")
        options["events"] = [name.strip() for name in args.events.split(",") if name.strip()]
    return options


def _train(args: argparse.Namespace) -> int:
    import torch

    from fastrec import train

    if args.model in BEHAVIOR_MODELS:  # purchase prediction on CDNOW
        if args.option:
            raise SystemExit(
                "fastrec train: --option sets sasrec / gru4rec / caser arguments; the behavior-* models take "
                "theirs from python benchmarks/behavior.py"
            )
        experiment = behavior_experiment()
        return experiment.main(["--model", args.model.removeprefix("behavior-"), "--seed", str(args.seed)])
    if args.device == "cuda" and not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        args.parser.error(
            f"--device cuda: no CUDA device is available (torch {torch.__version__}, {built}); use --device cpu"
        )
    if args.cuda_graphs and not torch.cuda.is_available():
        args.parser.error("--cuda-graphs: no CUDA device is available (CUDA graphs replay on a GPU only)")
    if args.cuda_graphs and args.device != "cuda":
        args.parser.error("--cuda-graphs needs --device cuda")
    try:
        return _run_training(args, train)
    except ValueError as error:  # DataError, CheckpointError and bad options are ValueErrors
        if args.debug or os.environ.get("FASTREC_DEBUG") == "1":
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{args.parser.prog}: error: {message}", file=sys.stderr)  # as argparse's own errors
        raise SystemExit(2) from None


def _run_training(args: argparse.Namespace, train: ModuleType) -> int:
    """``fastrec train`` after the CLI's own checks: the config, then training."""
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    config = train.TrainConfig(
        **{name: value for name, value in vars(args).items() if name in fields},  # the options named as the fields
        data_options=_data_options(args),
        n_negatives=args.negatives,
        time_limit_s=args.time_limit or None,
        progress=not args.no_progress,
        model_options=_model_options(args.option),
    )
    if args.compare:
        train.compare(config)
    else:
        train.run(config)
    return 0


def _add_train(sub) -> None:
    from fastrec.models import MODELS
    from fastrec.models.base import LOSSES
    from fastrec.train import LR_SCHEDULES, MODEL_DEFAULTS, POSITIONS, PROTOCOL, TrainConfig

    config = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}

    def defaults(key: str) -> str:
        """'default: sasrec 50, gru4rec 50, caser 10' from train.MODEL_DEFAULTS, the one source."""
        return "default: " + ", ".join(f"{name} {values[key]}" for name, values in MODEL_DEFAULTS.items())

    train = sub.add_parser("train", help="train and evaluate a sequential recommender (HR/NDCG@K)")
    train.add_argument(
        "--model",
        required=True,
        choices=[*sorted(MODELS), *BEHAVIOR_MODELS],
        help="a recommender on --data, or a purchase-prediction model on CDNOW (behavior-*: other options via "
        "python benchmarks/behavior.py)",
    )
    train.add_argument(
        "--data",
        default=config["data"],
        help="ml-100k (default), synthetic, synthetic:items=N,users=M (a large Zipf catalogue), or a data file path",
    )
    train.add_argument(
        "--columns",
        metavar="user=COL,item=COL,time=COL[,event=COL][,rating=COL]",
        help="--data FILE is a CSV event log with these columns: header names, or 0-based indices for a file "
        "without a header (e.g. user=visitorid,item=itemid,time=timestamp,event=event)",
    )
    train.add_argument(
        "--events",
        "--event-filter",
        metavar="NAME[,NAME...]",
        help="with --columns event=COL: keep only the rows whose event is one of these (e.g. transaction)",
    )
    train.add_argument("--backend", default=config["backend"], choices=["fastrec", "torch"])
    train.add_argument(
        "--epochs",
        type=int,
        default=config["epochs"],
        help=f"at most this many epochs ({defaults('epochs')}; the accuracy protocol: {PROTOCOL['epochs']})",
    )
    train.add_argument("--batch-size", type=int, default=config["batch_size"], help="default: %(default)s")
    train.add_argument("--lr", type=float, default=config["lr"], help=f"Adam's learning rate ({defaults('lr')})")
    train.add_argument(
        "--lr-schedule",
        default=config["lr_schedule"],
        choices=LR_SCHEDULES,
        help=f"constant, or cosine: decay --lr to 0 over --epochs, every batch ({defaults('lr_schedule')})",
    )
    train.add_argument(
        "--loss",
        default=config["loss"],
        choices=LOSSES,
        help="ce: full-catalogue softmax; sampled-softmax (log-Q corrected), gbce (gSASRec), bce: sampled negatives",
    )
    train.add_argument(
        "--negatives",
        type=int,
        default=config["n_negatives"],
        help="sampled negatives: per batch for sampled-softmax and gbce, per example for bce (default: %(default)s)",
    )
    train.add_argument(
        "--positions",
        default=config["positions"],
        choices=POSITIONS,
        help="last: every prefix predicts its next item; all: every position of a sequence does (SASRec's "
        "training; not caser) (default: %(default)s)",
    )
    train.add_argument("--max-len", type=int, default=config["max_len"], help=f"history length ({defaults('max_len')})")
    train.add_argument(
        "--patience",
        type=int,
        default=config["patience"],
        help="stop after this many epochs without a better NDCG@10 (default: %(default)s)",
    )
    train.add_argument(
        "--time-limit",
        type=float,
        default=config["time_limit_s"],
        help="stop training after this many seconds, mid-epoch if need be, then test (default: none; 0 = none)",
    )
    train.add_argument("--device", default=config["device"], choices=["cpu", "cuda"])
    train.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each training step as one CUDA graph (needs --device cuda; the last batch is padded)",
    )
    train.add_argument(
        "--log-every",
        type=int,
        default=config["log_every"],
        help="steps between reads of the running loss for the progress bar (default: %(default)s)",
    )
    train.add_argument("--amp", default=config["amp"], choices=["bf16"], help="autocast to bfloat16")
    train.add_argument("--compile", action="store_true", help="torch.compile the training step")
    train.add_argument("--compare", action="store_true", help="train both backends from the same seed, side by side")
    train.add_argument(
        "--dropout-stream",
        default=config["dropout_stream"],
        choices=DROPOUT_STREAMS,
        help="where dropout masks come from: torch's own (the masks torch draws for the same seed, so "
        "with --compare both backends see the same masks), fastrec's fused Philox stream, or auto "
        "(default): torch's on the CPU, Philox where torch's cannot be reproduced (CUDA attention)",
    )
    train.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model constructor argument, repeatable (e.g. --option n_h=8 --option n_v=4: RecBole's Caser)",
    )
    train.add_argument("--seed", type=int, default=config["seed"], help="default: %(default)s")
    train.add_argument("--checkpoint", help="save the training state here after each epoch")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--debug",
        action="store_true",
        help="raise errors with their traceback instead of a one-line message (also FASTREC_DEBUG=1)",
    )
    train.set_defaults(func=_train, parser=train)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device and available backends")
    info.add_argument(
        "--routes", action="store_true", help="also the routes to torch's ops on this device, with their measurements"
    )
    info.set_defaults(func=_info)
    bench = sub.add_parser("bench", help="benchmark table: fastrec vs torch baselines (ratios)")
    bench.add_argument(
        "--family",
        action="append",
        choices=["attention", "encoder", "rnn", "conv", "caser", "dropout", "catalogue"],
        help="only this family (repeatable; catalogue runs only when named)",
    )
    bench.add_argument("--full", action="store_true", help="the full CPU shape grid (slower)")
    bench.add_argument("--rounds", type=int, default=15, help="interleaved rounds per row (median)")
    bench.add_argument("--min-round-s", type=float, default=0.05, help="seconds per round per side")
    bench.add_argument("--json", help="write every figure as JSON to this path")
    bench.add_argument("--markdown", help="write the table as Markdown to this path")
    bench.add_argument(
        "--write-dispatch",
        metavar="PATH",
        help="CUDA, with --family conv: time cuDNN vs Triton per shape class, write the dispatch table here",
    )
    bench.add_argument(
        "--write-configs",
        metavar="PATH",
        help="CUDA, with --family attention: time the Triton attention block configs, write the table here",
    )
    bench.set_defaults(func=_bench)
    _add_train(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
