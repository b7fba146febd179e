"""Reading and checking training data against the Parquet contract.

interactions: user_id, item_id, [event], [weight], [ts]
items (optional): item_id, [category], [risk_level 1..5], [active], other metadata
users (optional): user_id, [risk_tolerance 1..5], [marketing_consent], other columns

Errors name the input and the column; rows we drop are counted, never silently lost.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import scipy.sparse as sp

from recsvc.errors import DataError
from recsvc.model.vocab import Vocabulary

__all__ = [
    "DEFAULT_EVENT_WEIGHTS",
    "DEFAULT_HELD_EVENTS",
    "DataConfig",
    "DropReport",
    "TrainingData",
    "load_training_data",
    "read_parquet",
]

log = logging.getLogger(__name__)

DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = {
    "view": 1.0,
    "click": 2.0,
    "apply": 4.0,
    "purchase": 8.0,
    "hold": 8.0,
}
DEFAULT_HELD_EVENTS = frozenset({"purchase", "hold"})


@dataclass(frozen=True)
class DataConfig:
    """How raw events become pair strengths.

    Example:
        >>> DataConfig(half_life_days=90, held_events=frozenset({"purchase"}))
    """

    event_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    """Strength of one event of each kind, used when there is no ``weight`` column."""
    held_events: frozenset[str] = DEFAULT_HELD_EVENTS
    """Events that mean the customer holds the product."""
    half_life_days: float | None = None
    """Exponential time decay of event strength, relative to the newest event."""


@dataclass
class DropReport:
    """What was read and what was dropped or merged, by reason."""

    rows_read: int = 0
    null_ids: int = 0
    unknown_items: int = 0
    unknown_events: int = 0
    duplicates_merged: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class TrainingData:
    """The user x item strength matrix with aligned id tables, ready to fit."""

    users: Vocabulary
    items: Vocabulary
    user_items: sp.csr_matrix  # float32 strengths, users x items
    held: np.ndarray  # bool, aligned with user_items.data
    item_table: pa.Table  # one row per item, in vocabulary order
    user_table: pa.Table  # one row per user, in vocabulary order
    report: DropReport
    has_risk_levels: bool
    has_active: bool
    has_users_table: bool
    config: DataConfig = field(default_factory=lambda: DataConfig())
    """How events became strengths (recorded in the bundle for live events)."""
    state_sequence: int = 0
    """The live state sequence folded in (0: none)."""

    def fingerprint(self) -> str:
        """sha256 of the matrix and the ids: equal data, equal fingerprint."""
        h = hashlib.sha256()
        for arr in (self.user_items.indptr, self.user_items.indices, self.user_items.data):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(self.held.tobytes())
        for vocab in (self.users, self.items):
            h.update("\x00".join(vocab.ids).encode())
        return h.hexdigest()


def _expand(path: str | Path) -> str | list[str]:
    """A local glob becomes its file list; files, folders and URIs pass through."""
    text = str(path)
    if "://" not in text and any(c in text for c in "*?["):
        files = sorted(glob.glob(text))
        if not files:
            raise DataError(f"{text}: the pattern matches no file")
        return files
    return text


def read_parquet(path: str | Path, what: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, folder or glob; errors name ``what`` and ``path``."""
    try:
        dataset = ds.dataset(_expand(path), format="parquet")
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{what} {path}: cannot be read as Parquet ({exc})") from exc
    if columns is not None:
        columns = [c for c in columns if c in dataset.schema.names]
    try:
        table = dataset.to_table(columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{what} {path}: cannot be read as Parquet ({exc})") from exc
    if table.num_rows == 0:
        raise DataError(f"{what} {path}: no rows")
    return table


def _require(table: pa.Table, what: str, path: object, column: str) -> None:
    if column not in table.column_names:
        raise DataError(f"{what} {path}: column {column!r} is missing")


def _mistyped(
    what: str, path: object, column: str, actual: pa.DataType, expected: str
) -> DataError:
    """The error for a column of another type than the contract's."""
    return DataError(f"{what} {path}: column {column!r} has type {actual}, expected {expected}")


def _id_column(table: pa.Table, what: str, path: object, column: str) -> pa.ChunkedArray:
    _require(table, what, path, column)
    col = table.column(column)
    if pa.types.is_integer(col.type) or pa.types.is_dictionary(col.type):
        return col.cast(pa.string())
    if pa.types.is_large_string(col.type) or pa.types.is_string(col.type):
        return col.cast(pa.string())
    raise _mistyped(what, path, column, col.type, "string")


def _check_level(table: pa.Table, what: str, path: object, column: str) -> pa.ChunkedArray | None:
    if column not in table.column_names:
        return None
    col = table.column(column)
    if not pa.types.is_integer(col.type):
        raise _mistyped(what, path, column, col.type, "integer")
    lo, hi = pc.min(col).as_py(), pc.max(col).as_py()
    if lo is not None and (lo < 1 or hi > 5):
        raise DataError(f"{what} {path}: column {column!r} holds values outside 1..5")
    return col.cast(pa.int8())


def _check_bool(table: pa.Table, what: str, path: object, column: str) -> None:
    if column in table.column_names and not pa.types.is_boolean(table.column(column).type):
        raise _mistyped(what, path, column, table.column(column).type, "bool")


def _read_table(
    path: str | Path, what: str, id_col: str, level_col: str, bool_col: str
) -> pa.Table:
    """A catalogue or customer table: unique non-null ids, a 1..5 level, a bool flag."""
    table = read_parquet(path, what)
    ids = _id_column(table, what, path, id_col)
    if pc.count(ids, mode="only_null").as_py():
        raise DataError(f"{what} {path}: column {id_col!r} has null ids")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        raise DataError(f"{what} {path}: column {id_col!r} has duplicate ids")
    table = table.set_column(table.schema.get_field_index(id_col), id_col, ids)
    level = _check_level(table, what, path, level_col)
    if level is not None:
        table = table.set_column(table.schema.get_field_index(level_col), level_col, level)
    _check_bool(table, what, path, bool_col)
    return table


def _row_strength(
    table: pa.Table, path: object, config: DataConfig, report: DropReport
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row strength and held flag."""
    events = _event_codes(table, path)
    held = np.zeros(table.num_rows, dtype=bool)
    if events is not None:
        names, idx = events
        held = np.array([name in config.held_events for name in names] + [False])[idx]
    if "weight" in table.column_names:
        weight = _weight_column(table, path)
    elif events is not None:
        weight = _event_weights(*events, config, report)
    else:
        weight = np.ones(table.num_rows)
    if config.half_life_days and "ts" in table.column_names:
        weight = weight * _decay(table, path, config.half_life_days)
    if np.any(weight < 0) or not np.all(np.isfinite(weight)):
        raise DataError(f"interactions {path}: column 'weight' holds negative or non-finite values")
    return weight, held


def _event_codes(table: pa.Table, path: object) -> tuple[list[str], np.ndarray] | None:
    """The event names, and each row's position among them (-1 for a null event)."""
    if "event" not in table.column_names:
        return None
    event = table.column("event")
    if not (pa.types.is_string(event.type) or pa.types.is_large_string(event.type)):
        raise _mistyped("interactions", path, "event", event.type, "string")
    codes = event.combine_chunks().dictionary_encode()
    return codes.dictionary.to_pylist(), codes.indices.fill_null(-1).to_numpy(zero_copy_only=False)


def _weight_column(table: pa.Table, path: object) -> np.ndarray:
    """The ``weight`` column as floats, a null weight counting 1."""
    wcol = table.column("weight")
    if not (pa.types.is_floating(wcol.type) or pa.types.is_integer(wcol.type)):
        raise _mistyped("interactions", path, "weight", wcol.type, "float")
    return np.asarray(wcol.cast(pa.float64()).fill_null(1.0).to_numpy())


def _event_weights(
    names: list[str], idx: np.ndarray, config: DataConfig, report: DropReport
) -> np.ndarray:
    """Each row's strength by its event; an unknown or null event counts 1 (and is counted)."""
    known = [name in config.event_weights for name in names]
    lut = np.array([config.event_weights.get(name, 1.0) for name in names] + [1.0])
    report.unknown_events = int((~np.array([*known, True]))[idx].sum())
    return np.asarray(lut[idx])


def _decay(table: pa.Table, path: object, half_life_days: float) -> np.ndarray:
    """Each row's decay factor by its age relative to the newest event."""
    ts = table.column("ts")
    if not pa.types.is_timestamp(ts.type):
        raise _mistyped("interactions", path, "ts", ts.type, "timestamp")
    secs = ts.cast(pa.timestamp("s")).cast(pa.int64())
    newest = pc.max(secs).as_py()
    # An event without a time is taken as current: decay never inflates strength.
    age_days = (newest - secs.fill_null(newest).to_numpy()) / 86400.0
    return np.asarray(np.power(0.5, age_days / half_life_days))


def _aligned_user_table(users: Vocabulary, table: pa.Table | None) -> pa.Table:
    ids = users.arrow()
    if table is None:
        return pa.table({"user_id": ids})
    # users.ids = table ids first, then interaction-only users; pad those with nulls.
    extra = len(users) - table.num_rows
    if extra == 0:
        return table
    pad = {
        name: pa.nulls(extra, type=table.schema.field(name).type)
        for name in table.column_names
        if name != "user_id"
    }
    pad["user_id"] = ids.slice(table.num_rows)
    return pa.concat_tables([table, pa.table(pad).select(table.column_names)])


@dataclass(frozen=True)
class _Events:
    """The interaction rows with both ids present: the ids, strength and held flag of each."""

    users: pa.ChunkedArray
    items: pa.ChunkedArray
    weight: np.ndarray
    held: np.ndarray


def _read_events(path: str | Path, config: DataConfig, report: DropReport) -> _Events:
    """Read the interactions; rows with a null id are dropped and counted."""
    table = read_parquet(path, "interactions", ["user_id", "item_id", "event", "weight", "ts"])
    report.rows_read = table.num_rows
    u_col = _id_column(table, "interactions", path, "user_id")
    i_col = _id_column(table, "interactions", path, "item_id")
    valid = pc.and_(pc.is_valid(u_col), pc.is_valid(i_col))
    report.null_ids = table.num_rows - pc.sum(valid.cast(pa.int64())).as_py()
    if report.null_ids:
        table, u_col, i_col = table.filter(valid), u_col.filter(valid), i_col.filter(valid)
    weight, held = _row_strength(table, path, config, report)
    return _Events(u_col, i_col, weight, held)


def _item_vocabulary(table: pa.Table | None, item_ids: pa.ChunkedArray) -> Vocabulary:
    """The catalogue's items in its order; without a catalogue, the items events name, sorted."""
    if table is not None:
        return Vocabulary(table.column("item_id").combine_chunks())
    return Vocabulary(pc.unique(item_ids).sort())


def _user_vocabulary(table: pa.Table | None, user_ids: pa.ChunkedArray) -> Vocabulary:
    """The customer table's users in its order, then the users only events name, sorted."""
    interaction_users = pc.unique(user_ids)
    if table is None:
        return Vocabulary(interaction_users.sort())
    known = table.column("user_id").combine_chunks()
    extra = pc.filter(interaction_users, pc.invert(pc.is_in(interaction_users, known)))
    if len(extra):  # often ids of another form: 42 (read as "42") against "C00000042"
        log.warning(
            "customers in the interactions are missing from the users table: they get risk "
            "tolerance 1 and no marketing consent; ids must match exactly (integers are read "
            "as text)",
            extra={"missing": len(extra), "users_table": len(known)},
        )
    return Vocabulary(pa.concat_arrays([known, extra.sort()]))


def _pair_keys(
    events: _Events, users: Vocabulary, items: Vocabulary, path: object, report: DropReport
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each event's pair as ``user row * len(items) + item row``, its weight and held flag.

    Events naming an item outside the catalogue are dropped and counted.
    """
    item_rows = items.indices_arrow(events.items)
    user_rows = users.indices_arrow(events.users)
    keep = item_rows >= 0
    report.unknown_items = int((~keep).sum())
    if not keep.any():
        raise DataError(f"interactions {path}: no interaction names a known item")
    keys = user_rows[keep] * len(items) + item_rows[keep]
    return keys, events.weight[keep], events.held[keep]


def _merge_pairs(
    keys: np.ndarray,
    weight: np.ndarray,
    held: np.ndarray,
    n_users: int,
    n_items: int,
    report: DropReport,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The users x items matrix of summed strengths, and whether each pair is held."""
    pairs, inverse = np.unique(keys, return_inverse=True)
    report.duplicates_merged = int(len(keys) - len(pairs))
    strength = np.bincount(inverse, weights=weight, minlength=len(pairs)).astype(np.float32)
    pair_held = np.bincount(inverse, weights=held, minlength=len(pairs)) > 0
    rows = pairs // n_items
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_users))])
    matrix = sp.csr_matrix(
        (strength, (pairs % n_items).astype(np.int32), indptr.astype(np.int64)),
        shape=(n_users, n_items),
    )
    return matrix, pair_held


def _aligned_item_table(items: Vocabulary, table: pa.Table | None) -> pa.Table:
    """One row per item in vocabulary order: the catalogue, or the bare ids without one."""
    return table if table is not None else pa.table({"item_id": items.arrow()})


def _has_risk_levels(table: pa.Table | None) -> bool:
    """Whether suitability applies: the catalogue has a ``risk_level`` column.

    The column decides, not its values: a risk_level column of nulls only (a broken
    upstream join, say) keeps suitability on with every product at risk 5, failing safe.
    """
    if table is None or "risk_level" not in table.column_names:
        return False
    if pc.count(table["risk_level"]).as_py() == 0:
        log.warning("every risk_level is null: all products count as risk 5")
    return True


def load_training_data(
    interactions: str | Path,
    items: str | Path | None = None,
    users: str | Path | None = None,
    config: DataConfig | None = None,
) -> TrainingData:
    """Read and check the three inputs; build the strength matrix.

    Raises:
        DataError: a missing or mistyped column, an unreadable or empty input.
    """
    report = DropReport()
    config = config or DataConfig()
    events = _read_events(interactions, config, report)
    item_table: pa.Table | None = None
    if items is not None:
        item_table = _read_table(items, "items", "item_id", "risk_level", "active")
    user_table: pa.Table | None = None
    if users is not None:
        user_table = _read_table(users, "users", "user_id", "risk_tolerance", "marketing_consent")
    item_vocab = _item_vocabulary(item_table, events.items)
    user_vocab = _user_vocabulary(user_table, events.users)
    keys, weight, held = _pair_keys(events, user_vocab, item_vocab, interactions, report)
    matrix, pair_held = _merge_pairs(keys, weight, held, len(user_vocab), len(item_vocab), report)
    data = TrainingData(
        users=user_vocab,
        items=item_vocab,
        user_items=matrix,
        held=pair_held,
        item_table=_aligned_item_table(item_vocab, item_table),
        user_table=_aligned_user_table(user_vocab, user_table),
        report=report,
        has_risk_levels=_has_risk_levels(item_table),
        has_active=item_table is not None and "active" in item_table.column_names,
        has_users_table=user_table is not None,
        config=config,
    )
    log.info("loaded training data", extra={"report": report.as_dict()})
    return data
