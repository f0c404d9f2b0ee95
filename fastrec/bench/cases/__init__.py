"""The benchmark cases of every op, one module an op; ``CASES`` maps each ``fastrec bench
--family`` to the functions that build its rows for a device and dtype; the families in
``OPT_IN`` run only when named."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastrec.bench.cases import attention, caser, catalogue, conv, dropout, encoder, rnn
from fastrec.bench.harness import Case

CaseBuilder = Callable[[torch.device, torch.dtype, bool], list[Case]]

CASES: dict[str, tuple[CaseBuilder, ...]] = {
    "attention": (attention.cases,),
    "encoder": (encoder.cases,),
    "rnn": (rnn.cases,),
    "conv": (conv.cases,),
    "caser": (caser.cases,),
    "dropout": (dropout.cases,),
    "catalogue": (catalogue.cases,),
}
OPT_IN = ("catalogue",)  # families that run only when named (``--family``): minutes each on a CPU


def family_cases(family: str, device: torch.device, dtype: torch.dtype, full: bool) -> list[Case]:
    """Every row of ``family`` for ``device`` and ``dtype`` (``full``: the larger shape grid)."""
    return [case for build in CASES[family] for case in build(device, dtype, full)]
