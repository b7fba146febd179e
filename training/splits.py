"""Train/test splits of an interaction log, written as Parquet so they can be replayed.

A split assigns whole (user, item) pairs, never single events, so no pair is in both
parts. The train part keeps every column of its rows (events, weights, times), and is
what the trainer reads; the test part is the relevant (user_id, item_id) pairs.

Specs, as ``recsvc-eval --split`` takes them:

- ``stratified[:FRACTION]``: per user, a random FRACTION (default 0.25) of their pairs
  goes to test, rounding as Microsoft Recommenders' ``python_stratified_split``
  (a user keeps ``round((1 - FRACTION) * n)`` pairs for training, halves to even: 2
  pairs keep 2, 6 keep 4, 10 keep 8);
- ``time[:CUTOFF]``: events before CUTOFF (ISO date-time, UTC if naive, or a fraction
  of events in (0, 1) such as 0.8) train, later pairs not already in train are tested;
- ``last[:N]``: per user, the N pairs begun last (by first event) are tested, for users
  keeping at least one pair to train on;
- ``replay:DIR``: the split saved in DIR by an earlier run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsvc.errors import DataError
from training.data import read_parquet

__all__ = [
    "SPLIT_KINDS",
    "Split",
    "SplitSpec",
    "make_split",
    "read_split",
    "split_interactions",
    "stratified_holdout",
    "write_split",
]

SPLIT_KINDS = ("stratified", "time", "last", "replay")
_TRAIN, _TEST, _META = "train.parquet", "test.parquet", "split.json"


@dataclass(frozen=True)
class SplitSpec:
    """A parsed ``--split`` value.

    Example:
        >>> SplitSpec.parse("stratified:0.25")
        SplitSpec(kind='stratified', value='0.25')
    """

    kind: str
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        kind, _, value = text.partition(":")
        if kind not in SPLIT_KINDS:
            raise DataError(f"split {text!r}: kind must be one of {', '.join(SPLIT_KINDS)}")
        if kind == "replay" and not value:
            raise DataError("split 'replay': give the folder, as replay:DIR")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" if self.value else self.kind


@dataclass
class Split:
    """The two parts of a split and how they were made."""

    train: pa.Table  # interaction rows, every input column kept
    test: pa.Table  # relevant pairs: user_id, item_id (strings, unique)
    meta: dict[str, Any] = field(default_factory=dict)


def _fraction(text: str, default: float, what: str) -> float:
    try:
        value = float(text) if text else default
    except ValueError as exc:
        raise DataError(f"split {what}: {text!r} is not a number") from exc
    if not 0.0 < value < 1.0:
        raise DataError(f"split {what}: fraction must be between 0 and 1, got {value}")
    return value


def _string_ids(table: pa.Table, column: str) -> pa.ChunkedArray:
    if column not in table.column_names:
        raise DataError(f"interactions: column {column!r} is missing")
    col = table.column(column)
    if not (
        pa.types.is_integer(col.type)
        or pa.types.is_string(col.type)
        or pa.types.is_large_string(col.type)
        or pa.types.is_dictionary(col.type)
    ):
        raise DataError(f"interactions: column {column!r} has type {col.type}, expected string")
    return col.cast(pa.string())


def _codes(col: pa.ChunkedArray) -> np.ndarray:
    encoded = col.combine_chunks().dictionary_encode()
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def _seconds(table: pa.Table) -> np.ndarray:
    """Event times in seconds (rows with a null time are dropped before)."""
    if "ts" not in table.column_names:
        raise DataError("interactions: column 'ts' is missing (the split needs event times)")
    ts = table.column("ts")
    if not pa.types.is_timestamp(ts.type):
        raise DataError(f"interactions: column 'ts' has type {ts.type}, expected timestamp")
    secs = ts.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.asarray(secs, dtype=np.float64)


def _pairs(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: its pair number, and per pair: its user code (pairs numbered by key)."""
    users = _codes(table.column("user_id"))
    items = _codes(table.column("item_id"))
    keys = users * (int(items.max(initial=0)) + 1) + items
    unique, row_pair = np.unique(keys, return_inverse=True)
    pair_user = unique // (int(items.max(initial=0)) + 1)
    return row_pair, pair_user, unique


def _rank_within_user(pair_user: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each pair's 1-based rank among its user's pairs by ``order_key``, and the user's count."""
    order = np.lexsort((order_key, pair_user))
    counts = np.bincount(pair_user)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - starts[pair_user[order]] + 1
    return rank, counts[pair_user]


def stratified_holdout(
    pair_user: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Which pairs to hold out: per user a random ``fraction``, keeping ``round((1-f) n)``.

    The rounding is Microsoft Recommenders' ``python_stratified_split`` (a pair trains
    when its rank is at most ``round(0.75 * n)``, numpy rounding halves to even), so a
    user with one pair keeps it and a split here holds out what theirs holds out.

    Args:
        pair_user: the user (any integer code) of each pair.
        fraction: share of each user's pairs to hold out, in (0, 1).
        rng: the randomness (one draw per pair).
    """
    rank, count = _rank_within_user(pair_user, rng.random(len(pair_user)))
    # Computed as theirs is, (1 - f) * n in floating point then np.round (half to even):
    # 0.75 * n is exact, so its halves (n = 2, 6, 10, ...) are true halves.
    keep = np.round((1.0 - fraction) * count)
    return rank > keep


def _test_pairs_last(
    pair_user: np.ndarray, row_pair: np.ndarray, secs: np.ndarray, n: int
) -> np.ndarray:
    first = np.full(len(pair_user), np.inf)
    np.minimum.at(first, row_pair, secs)
    # Ties (same second) break by pair number, which is deterministic.
    rank, count = _rank_within_user(pair_user, first)
    return (rank > count - n) & (count > n)


def _cutoff(text: str, secs: np.ndarray) -> float:
    try:
        q = float(text) if text else 0.8
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError as exc:
            raise DataError(
                f"split time: {text!r} is neither an ISO date-time nor a fraction"
            ) from exc
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    if not 0.0 < q < 1.0:
        raise DataError(f"split time: fraction must be between 0 and 1, got {q}")
    return float(np.quantile(secs, q, method="higher"))


def _pair_table(table: pa.Table, rows: np.ndarray) -> pa.Table:
    pairs = table.select(["user_id", "item_id"]).take(pa.array(rows))
    unique = pairs.group_by(["user_id", "item_id"], use_threads=False).aggregate([])
    return unique.sort_by([("user_id", "ascending"), ("item_id", "ascending")])


def split_interactions(table: pa.Table, spec: SplitSpec, seed: int = 0) -> Split:
    """Split interaction rows as ``spec`` says; deterministic for a seed.

    Rows with a null id are dropped (and counted); so are, for ``time`` and ``last``,
    rows without a time.

    Raises:
        DataError: a bad spec, or a column the split needs is missing or mistyped.
    """
    if spec.kind == "replay":
        raise DataError("split replay: use read_split(DIR)")
    for column in ("user_id", "item_id"):
        ids = _string_ids(table, column)
        table = table.set_column(table.schema.get_field_index(column), column, ids)
    valid = pc.and_(pc.is_valid(table.column("user_id")), pc.is_valid(table.column("item_id")))
    null_ids = table.num_rows - int(pc.sum(valid.cast(pa.int64())).as_py() or 0)
    table = table.filter(valid) if null_ids else table
    if table.num_rows == 0:
        raise DataError("interactions: no rows with both ids to split")
    meta: dict[str, Any] = {"spec": str(spec), "seed": seed, "rows_read": table.num_rows + null_ids}
    meta["null_ids_dropped"] = null_ids
    if spec.kind in ("time", "last"):
        timed = pc.is_valid(table.column("ts")) if "ts" in table.column_names else None
        if timed is not None:
            meta["null_ts_dropped"] = table.num_rows - int(pc.sum(timed.cast(pa.int64())).as_py())
            table = table.filter(timed)
        if table.num_rows == 0:
            raise DataError("interactions: column 'ts' holds no times")
    rng = np.random.default_rng(seed)
    row_pair, pair_user, _ = _pairs(table)
    if spec.kind == "stratified":
        fraction = _fraction(spec.value, 0.25, "stratified")
        meta["test_fraction"] = fraction
        test_pair = stratified_holdout(pair_user, fraction, rng)
        train_rows = np.flatnonzero(~test_pair[row_pair])
        test_rows = np.flatnonzero(test_pair[row_pair])
    elif spec.kind == "last":
        try:
            n = int(spec.value) if spec.value else 1
        except ValueError as exc:
            raise DataError(f"split last: {spec.value!r} is not a whole number") from exc
        if n < 1:
            raise DataError(f"split last: N must be at least 1, got {n}")
        meta["last_n"] = n
        test_pair = _test_pairs_last(pair_user, row_pair, _seconds(table), n)
        train_rows = np.flatnonzero(~test_pair[row_pair])
        test_rows = np.flatnonzero(test_pair[row_pair])
    else:  # time
        secs = _seconds(table)
        cutoff = _cutoff(spec.value, secs)
        meta["cutoff"] = datetime.fromtimestamp(cutoff, timezone.utc).isoformat()
        before = secs < cutoff
        in_train = np.zeros(len(pair_user), dtype=bool)
        in_train[row_pair[before]] = True
        train_rows = np.flatnonzero(before)
        # A pair begun before the cutoff is history, not a new relevant item.
        test_rows = np.flatnonzero(~before & ~in_train[row_pair])
    train = table.take(pa.array(train_rows))
    test = _pair_table(table, test_rows)
    if train.num_rows == 0:
        raise DataError(f"split {spec}: the train part is empty")
    meta.update(
        train_rows=train.num_rows,
        test_pairs=test.num_rows,
        test_users=int(pc.count_distinct(test.column("user_id")).as_py()) if test.num_rows else 0,
    )
    return Split(train, test, meta)


def make_split(interactions: str | Path, spec: SplitSpec, seed: int = 0) -> Split:
    """Read ``interactions`` and split it, or replay a saved split."""
    if spec.kind == "replay":
        return read_split(Path(spec.value))
    split = split_interactions(read_parquet(interactions, "interactions"), spec, seed)
    split.meta["interactions"] = str(interactions)
    return split


def write_split(split: Split, folder: Path) -> dict[str, Path]:
    """Write ``train.parquet``, ``test.parquet`` and ``split.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / _TRAIN, "test": folder / _TEST, "meta": folder / _META}
    pq.write_table(split.train, paths["train"])
    pq.write_table(split.test, paths["test"])
    paths["meta"].write_text(json.dumps(split.meta, indent=2, sort_keys=True), encoding="utf-8")
    return paths


def read_split(folder: Path) -> Split:
    """A split written by :func:`write_split`."""
    for name in (_TRAIN, _TEST, _META):
        if not (folder / name).is_file():
            raise DataError(f"split replay:{folder}: no {name}")
    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"split replay:{folder}: {_META} is not valid JSON") from exc
    train = pq.read_table(folder / _TRAIN)
    test = pq.read_table(folder / _TEST)
    for column in ("user_id", "item_id"):
        if column not in test.column_names:
            raise DataError(f"split replay:{folder}: {_TEST} has no column {column!r}")
    meta["replayed_from"] = str(folder)
    return Split(train, test, meta)
