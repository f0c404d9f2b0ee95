"""Interaction-log loaders: MovieLens, RecBole atomic ``.inter`` files, generic CSV event logs.

Every loader returns :class:`Interactions` with users remapped to ``0..n_users-1`` and items to
``1..n_items`` (0 is the padding item), both in the order of the sorted original ids, so a
re-run gives the same ids. Rows keep the file's order (after filtering); the split sorts each
user's rows by time. Bad files raise :class:`DataError` naming the file, the line and the column.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import math
import os
from dataclasses import dataclass

import numpy as np

RECBOLE_HINT = "pip install --no-deps recbole==1.2.1  (fastrec reads recbole/dataset_example/ml-100k/ml-100k.inter)"


INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


class DataError(ValueError):
    """A data file that cannot be read as an interaction log (the message names file, line, column)."""


@dataclass
class Interactions:
    """An implicit-feedback log with remapped ids.

    ``item_ids[i]`` is the original id of item ``i`` (``item_ids[0] = -1``, the padding item);
    ``user_ids[u]`` the original id of user ``u``.
    """

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    n_users: int
    n_items: int
    item_ids: np.ndarray
    user_ids: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def __repr__(self) -> str:
        return f"Interactions({len(self)} rows, {self.n_users} users, {self.n_items} items, source={self.source!r})"


def _read_text(path: str) -> str:
    """The file as UTF-8 text without a leading byte-order mark; a byte that is not UTF-8 is a
    DataError naming its line and column."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}: byte 0x{data[error.start]:02x} at column {column} is not UTF-8 "
            "(save the file as UTF-8)"
        ) from None


@dataclass
class _Table:
    """Parsed text columns plus where each row came from (1-based file line numbers)."""

    path: str
    columns: dict[str, list[str]]
    lines: np.ndarray


def _read_table(
    path: str, sep: str | None, wanted: dict[str, str | int], header: bool, text: str | None = None
) -> _Table:
    """Reads the ``wanted`` columns (key -> column name or 0-based index) of a delimited text file."""
    if text is None:
        text = _read_text(path)
    raw = text.splitlines()
    start = 0
    index: dict[str, int] = {}
    if header:
        while start < len(raw) and not raw[start].strip():
            start += 1
        if start == len(raw):
            raise DataError(f"{path}: empty file (expected a header line)")
        names = [n.strip() for n in (raw[start].split(sep) if sep else raw[start].split())]
        start += 1
    for key, col in wanted.items():
        if isinstance(col, int):
            index[key] = col
        elif not header:
            raise DataError(f"{path}: column {col!r} given by name but the file has no header; give its index")
        elif col in names:
            index[key] = names.index(col)
        else:
            raise DataError(f"{path}: line {start}: missing column {col!r} for {key}; header has {names}")
    need = max(index.values()) + 1
    columns: dict[str, list[str]] = {key: [] for key in index}
    lines = []
    for number, line in enumerate(raw[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split(sep) if sep else line.split()
        if len(fields) < need:
            missing = [k for k, i in index.items() if i >= len(fields)]
            raise DataError(
                f"{path}: line {number}: {len(fields)} fields, no column {index[missing[0]]} ({missing[0]}); "
                f"expected at least {need}"
            )
        for key, i in index.items():
            columns[key].append(fields[i].strip())
        lines.append(number)
    if not lines:
        raise DataError(f"{path}: no data rows")
    return _Table(path, columns, np.asarray(lines, dtype=np.int64))


def _numeric(table: _Table, key: str, integer: bool) -> np.ndarray:
    """Converts one column to int64 ids or float64 values, or names the first bad line and column."""
    values = table.columns[key]
    try:
        out = np.asarray(values, dtype=np.int64 if integer else np.float64)
        if integer or np.all(np.isfinite(out)):
            return out
    except (ValueError, OverflowError):
        pass
    kind = "an integer id" if integer else "a finite number"
    for row, value in enumerate(values):
        if not _parses(value, integer):
            raise DataError(f"{table.path}: line {table.lines[row]}: column {key!r}: expected {kind}, got {value!r}")
        if integer and not INT64_MIN <= int(value) <= INT64_MAX:
            raise DataError(
                f"{table.path}: line {table.lines[row]}: column {key!r}: id {value} does not fit in 64 bits"
            )
    raise AssertionError(f"{table.path}: column {key!r} failed to convert but every value parsed")


def _parses(value: str, integer: bool) -> bool:
    try:
        return int(value) is not None if integer else math.isfinite(float(value))
    except (ValueError, OverflowError):
        return False


def _times(table: _Table, key: str) -> np.ndarray:
    """Numeric timestamps as they are; ISO dates/datetimes (``2019-10-01 00:00:00 UTC``) as Unix seconds."""
    values = table.columns[key]
    try:
        times = np.asarray(values, dtype=np.float64)
    except ValueError:
        times = np.empty(len(values), dtype=np.float64)
        epoch = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
        for row, value in enumerate(values):
            text = value.removesuffix(" UTC").replace(" ", "T")
            try:
                stamp = _dt.datetime.fromisoformat(text)
            except ValueError:
                raise DataError(
                    f"{table.path}: line {table.lines[row]}: column {key!r}: expected a number or an ISO date, "
                    f"got {value!r}"
                ) from None
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=_dt.timezone.utc)
            times[row] = (stamp - epoch).total_seconds()
    if not np.all(np.isfinite(times)):
        row = int(np.flatnonzero(~np.isfinite(times))[0])
        raise DataError(
            f"{table.path}: line {table.lines[row]}: column {key!r}: expected a finite time, got {values[row]!r}"
        )
    if np.all(times == np.floor(times)):
        return times.astype(np.int64)
    return times


def kcore(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the rows left after repeatedly dropping users and items with fewer than ``k`` rows."""
    keep = np.ones(user.shape[0], dtype=bool)
    while True:
        u, i = user[keep], item[keep]
        _, uinv, ucount = np.unique(u, return_inverse=True, return_counts=True)
        _, iinv, icount = np.unique(i, return_inverse=True, return_counts=True)
        ok = (ucount[uinv] >= k) & (icount[iinv] >= k)
        if ok.all():
            return keep
        keep[np.flatnonzero(keep)[~ok]] = False


def _build(
    source: str,
    user: np.ndarray,
    item: np.ndarray,
    time: np.ndarray,
    rating: np.ndarray | None,
    min_rating: float | None,
    kcore_k: int | None,
) -> Interactions:
    keep = np.ones(user.shape[0], dtype=bool)
    if min_rating is not None:
        if rating is None:
            raise ValueError(f"min_rating={min_rating} given but {source} has no rating column")
        keep &= rating >= min_rating
    if kcore_k is not None:
        if kcore_k < 1:
            raise ValueError(f"kcore must be >= 1, got {kcore_k}")
        sub = kcore(user[keep], item[keep], kcore_k)
        keep[np.flatnonzero(keep)[~sub]] = False
    if not keep.any():
        raise DataError(f"{source}: no interactions left after filtering (min_rating={min_rating}, kcore={kcore_k})")
    user, item, time = user[keep], item[keep], time[keep]
    user_ids, user_index = np.unique(user, return_inverse=True)
    item_ids, item_index = np.unique(item, return_inverse=True)
    return Interactions(
        user=user_index.astype(np.int64),
        item=item_index.astype(np.int64) + 1,
        time=time,
        n_users=int(user_ids.shape[0]),
        n_items=int(item_ids.shape[0]),
        item_ids=np.concatenate([np.array([-1], dtype=np.int64), item_ids.astype(np.int64)]),
        user_ids=user_ids.astype(np.int64),
        source=source,
    )


def load_movielens(path: str, min_rating: float | None = None, kcore: int | None = None) -> Interactions:
    """MovieLens ``u.data`` (tab-separated) or ``ratings.dat`` (``::``-separated): user, item, rating, time."""
    with open(path, "rb") as f:
        text = f.read().removeprefix(b"\xef\xbb\xbf").decode("latin-1")
    first = next((line for line in text.splitlines() if line.strip()), "")
    sep = "::" if "::" in first else ("\t" if "\t" in first else ",")
    header = sep == "," and not first.split(",")[0].strip().isdigit()  # ratings.csv of ml-latest
    wanted: dict[str, str | int] = (
        {"user": "userId", "item": "movieId", "rating": "rating", "time": "timestamp"}
        if header
        else {"user": 0, "item": 1, "rating": 2, "time": 3}
    )
    table = _read_table(path, sep, wanted, header=header, text=text)
    return _build(
        path,
        _numeric(table, "user", True),
        _numeric(table, "item", True),
        _times(table, "time"),
        _numeric(table, "rating", False),
        min_rating,
        kcore,
    )


def load_recbole_inter(
    path: str, min_rating: float | None = None, kcore: int | None = None, text: str | None = None
) -> Interactions:
    """A RecBole atomic ``.inter`` file: tab-separated, typed header ``user_id:token item_id:token ...``.

    Needs ``user_id`` and ``item_id``; uses ``timestamp`` (else the row order) and ``rating`` if present.
    """
    if text is None:
        text = _read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    fields = [field.strip().split(":")[0] for field in first.split("\t")]
    wanted: dict[str, str | int] = {"user": "user_id", "item": "item_id"}
    for key in ("user", "item"):
        if f"{key}_id" not in fields:
            raise DataError(f"{path}: line 1: missing column '{key}_id'; header has {fields}")
    if "timestamp" in fields:
        wanted["time"] = fields.index("timestamp")
    if "rating" in fields:
        wanted["rating"] = fields.index("rating")
    wanted["user"], wanted["item"] = fields.index("user_id"), fields.index("item_id")
    table = _read_table(path, "\t", wanted, header=True, text=text)
    time = _times(table, "time") if "time" in wanted else np.arange(len(table.lines), dtype=np.int64)
    rating = _numeric(table, "rating", False) if "rating" in wanted else None
    return _build(
        path,
        _numeric(table, "user", True),
        _numeric(table, "item", True),
        time,
        rating,
        min_rating,
        kcore,
    )


def load_csv(
    path: str,
    user: str | int,
    item: str | int,
    time: str | int,
    event: str | int | None = None,
    events: list[str] | tuple[str, ...] | str | None = None,
    sep: str = ",",
    header: bool | None = None,
    rating: str | int | None = None,
    min_rating: float | None = None,
    kcore: int | None = None,
) -> Interactions:
    """A delimited event log with a column mapping (names, or 0-based indices for files without a header).

    ``events`` keeps only rows whose ``event`` column is one of them (e.g. ``"transaction"``).
    Examples: RetailRocket ``events.csv``: ``user="visitorid", item="itemid", time="timestamp",
    event="event"``; Taobao ``UserBehavior.csv`` (no header): ``user=0, item=1, time=4, event=3,
    events=["buy"]``; REES46: ``user="user_id", item="product_id", time="event_time",
    event="event_type"``. ``header=None`` means: a header exists iff columns are given by name.
    """
    if event is None and events is not None:
        raise ValueError("events given without an event column: pass event=<column>")
    spec: dict[str, str | int] = {"user": user, "item": item, "time": time}
    if event is not None:
        spec["event"] = event
    if rating is not None:
        spec["rating"] = rating
    if header is None:
        header = any(isinstance(col, str) for col in spec.values())
    table = _read_table(path, sep, spec, header=header)
    keep = np.ones(len(table.lines), dtype=bool)
    if events is not None:
        wanted = {events} if isinstance(events, str) else set(events)
        keep = np.fromiter((value in wanted for value in table.columns["event"]), dtype=bool, count=len(keep))
        if not keep.any():
            seen = sorted(set(table.columns["event"]))[:10]
            raise DataError(f"{path}: no rows with event in {sorted(wanted)} (column {event!r} has {seen})")
        table = _Table(
            path,
            {key: [v for v, k in zip(col, keep, strict=True) if k] for key, col in table.columns.items()},
            table.lines[keep],
        )
    return _build(
        path,
        _numeric(table, "user", True),
        _numeric(table, "item", True),
        _times(table, "time"),
        _numeric(table, "rating", False) if rating is not None else None,
        min_rating,
        kcore,
    )


def package_file(package: str, *parts: str, hint: str) -> str:
    """Path of a data file shipped inside an installed package, found without importing the package
    (lifetimes' ``__init__`` needs pandas, which fastrec does not use)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{'/'.join((package, *parts))} comes from the {package} wheel, not installed: {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{package} is installed but has no {path}: {hint}")
    return path


def ml100k_path() -> str:
    """The MovieLens-100K ``.inter`` file inside the recbole wheel (never copied into fastrec)."""
    return package_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter", hint=RECBOLE_HINT)


def load(name_or_path: str = "ml-100k", **options) -> Interactions:
    """``"ml-100k"`` (the recbole wheel's copy), or a path: ``.inter`` -> RecBole, ``u.data``/``ratings.dat``
    -> MovieLens, anything else -> :func:`load_csv` (pass its column mapping as options)."""
    if name_or_path == "ml-100k":
        return load_recbole_inter(ml100k_path(), **options)
    base = os.path.basename(name_or_path)
    if base.endswith(".inter"):
        return load_recbole_inter(name_or_path, **options)
    if base in ("u.data", "ratings.dat") or (base == "ratings.csv" and "user" not in options):
        return load_movielens(name_or_path, **options)
    if not os.path.exists(name_or_path):
        raise FileNotFoundError(f"no data set named {name_or_path!r} and no such file (known name: 'ml-100k')")
    if "user" not in options or "item" not in options or "time" not in options:
        raise ValueError(f"{name_or_path}: a CSV log needs the column mapping user=, item=, time= (got {options})")
    return load_csv(name_or_path, **options)
