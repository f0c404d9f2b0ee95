"""The package's data tables (JSON files beside the code, e.g. ``conv_dispatch.json``): one loader.

Kept free of heavy imports: ``fastrec.kernels`` reads its tables through it too.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Callable
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def read_table(path: str | Path | Traversable, parse: Callable[[dict, str], T]) -> T:
    """The JSON object in ``path`` as ``parse(table, source)`` returns it (``parse`` validates and
    raises ValueError naming ``source``); ValueError naming the file if it is not a JSON object."""
    source = str(path)
    try:
        table = json.loads((Path(path) if isinstance(path, str) else path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{source}: must hold a JSON object, got {type(table).__name__}")
    return parse(table, source)


@functools.cache
def package_table(name: str, parse: Callable[[dict, str], T]) -> T:
    """``read_table`` of the package's file ``fastrec/<name>``, read once per process."""
    return read_table(importlib.resources.files("fastrec") / name, parse)
