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


def parse_card_table(
    table: dict, source: str, required: dict[str, object], rows: str, parse_row: Callable[[str, str, object], T]
) -> dict[str, dict[str, T]]:
    """``{card: {key: parse_row(where, key, row)}}`` of a per-card table ``{<required top-level
    values>, "cards": {card: {..., rows: {key: row}}}}``. ValueError naming ``source`` and the
    place: a required value that differs, a ``cards`` or ``rows`` that is not an object;
    ``parse_row`` raises its own, naming ``where`` (``"<source>: cards[<card>].<rows>[<key>]"``)."""
    for name, value in required.items():
        if table.get(name) != value:
            raise ValueError(f"{source}: {name} must be {value!r}, got {table.get(name)!r}")
    cards = table.get("cards")
    if not isinstance(cards, dict):
        raise ValueError(f"{source}: cards must be an object, got {type(cards).__name__}")
    parsed = {}
    for card, entry in cards.items():
        card_rows = entry.get(rows) if isinstance(entry, dict) else None
        if not isinstance(card_rows, dict):
            raise ValueError(f"{source}: cards[{card!r}].{rows} must be an object, got {card_rows!r}")
        where = f"{source}: cards[{card!r}].{rows}"
        parsed[card] = {key: parse_row(f"{where}[{key!r}]", key, row) for key, row in card_rows.items()}
    return parsed
