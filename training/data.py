"""Reading and checking training data against the Parquet contract.

interactions: user_id, item_id, [event], [weight], [ts]
items (optional): item_id, [category], [risk_level 1..5], [active], other metadata
users (optional): user_id, [risk_tolerance 1..5], [marketing_consent], other columns

Errors name the input and the column; rows we drop are counted, never silently lost.
The live state store's events and updates can be folded in (``training.state``).
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import scipy.sparse as sp

from recsvc.errors import DataError
from recsvc.model.overlay import CLOSE_EVENT
from recsvc.model.vocab import Vocabulary

if TYPE_CHECKING:
    from training.state import FoldedState

__all__ = [
    "DEFAULT_EVENT_WEIGHTS",
    "DEFAULT_HELD_EVENTS",
    "NON_INTERACTION_EVENTS",
    "DataConfig",
    "DropReport",
    "Inputs",
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
NON_INTERACTION_EVENTS = frozenset({CLOSE_EVENT, "decline", "contacted"})
"""Events that record no interest in the product: no strength, unless given a weight.

``close`` ends a holding; ``decline`` and ``contacted`` are campaign outcomes. An
event in ``DataConfig.event_weights`` counts all the same, as live events do.
"""


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
    state_events: int = 0
    """Events folded in from the live state."""
    unknown_products: int = 0
    """Live product updates for products the catalogue lacks, ignored."""
    forgotten_customers: int = 0
    """Erased customers found in the inputs: every row of theirs is dropped."""
    forgotten_rows: int = 0
    """Interaction rows of erased customers dropped from the logs."""
    missing_customers: int = 0
    """Customers of the interactions the users table lacks: kept, with the unknown
    customer's defaults (risk tolerance 1, no marketing consent)."""

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


@dataclass(frozen=True)
class Inputs:
    """The inputs as read and checked, before ids become rows: what a fold may change."""

    interactions: pa.Table
    """The logs: ``user_id`` and ``item_id`` (strings, never null), [event], [weight], [ts]."""
    items: pa.Table | None
    users: pa.Table | None
    live_events: pa.Table | None = None
    """Events from the live state, in the logs' schema with every weight set."""


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


_EXAMPLES = 5
"""Rows an error names by id (the operator's own data, on their terminal; never logged)."""


def _check_level(
    table: pa.Table, what: str, path: object, column: str, id_col: str
) -> pa.ChunkedArray | None:
    """The 1..5 ``column`` as int8; out of range, the error counts the rows and names a few."""
    if column not in table.column_names:
        return None
    col = table.column(column)
    if not pa.types.is_integer(col.type):
        raise _mistyped(what, path, column, col.type, "integer")
    lo, hi = pc.min(col).as_py(), pc.max(col).as_py()
    if lo is not None and (lo < 1 or hi > 5):
        bad = table.filter(pc.or_(pc.less(col, 1), pc.greater(col, 5)))
        shown = ", ".join(
            f"{i} ({v})"
            for i, v in zip(
                bad.column(id_col).slice(0, _EXAMPLES).to_pylist(),
                bad.column(column).slice(0, _EXAMPLES).to_pylist(),
                strict=True,
            )
        )
        more = ", ..." if bad.num_rows > _EXAMPLES else ""
        raise DataError(
            f"{what} {path}: column {column!r} holds values outside 1..5 in "
            f"{bad.num_rows:,} of {table.num_rows:,} rows ({id_col}: {shown}{more})"
        )
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
    level = _check_level(table, what, path, level_col, id_col)
    if level is not None:
        table = table.set_column(table.schema.get_field_index(level_col), level_col, level)
    _check_bool(table, what, path, bool_col)
    return table


def _flags(names: list[str], idx: np.ndarray, flagged: set[str]) -> np.ndarray:
    """Per row, whether its event (``names[idx]``; -1 for none) is one of ``flagged``."""
    return np.array([name in flagged for name in names] + [False])[idx]


def _events(
    table: pa.Table, path: object, config: DataConfig, report: DropReport, timed: bool
) -> _Events:
    """Each row's ids, strength (before decay) and kind of event; its time if ``timed``.

    Times matter to decay and to ordering a pair's held and close events: a table
    with close events is always timed. Where times do not matter, a ``ts`` column
    is not read (nor checked) at all.
    """
    n = table.num_rows
    held = close = np.zeros(n, dtype=bool)
    interaction = np.ones(n, dtype=bool)
    codes = _event_codes(table, path)
    if codes is not None:
        _refuse_unknown_events(*codes, config, path)
        names, idx = codes
        held = _flags(names, idx, set(config.held_events))
        close = _flags(names, idx, {CLOSE_EVENT})
        interaction = ~_flags(names, idx, set(NON_INTERACTION_EVENTS - set(config.event_weights)))
    if "weight" in table.column_names:
        weight = _weight_column(table, path)
    elif codes is not None:
        weight = _event_weights(*codes, config, report)
    else:
        weight = np.ones(n)
    if np.any(weight < 0) or not np.all(np.isfinite(weight)):
        raise DataError(f"interactions {path}: column 'weight' holds negative or non-finite values")
    timed = timed or bool(close.any())
    return _Events(
        table.column("user_id"),
        table.column("item_id"),
        weight,
        interaction,
        held,
        close,
        _seconds(table, path) if timed else None,
    )


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


def _known(names: list[str], config: DataConfig) -> list[bool]:
    """Whether each event name means something: it has a weight, or records no interest."""
    return [name in config.event_weights or name in NON_INTERACTION_EVENTS for name in names]


def _refuse_unknown_events(
    names: list[str], idx: np.ndarray, config: DataConfig, path: object
) -> None:
    """Refuse an ``event`` column in which no row names a known event.

    Such a column is another vocabulary (``PURCHASE``, ``txn``), not a few stray
    rows: every row would count 1 and none would be held, so the model learns nothing
    the events meant. A null event is not a known one.
    """
    if len(idx) == 0 or np.array([*_known(names, config), False])[idx].any():
        return
    shown = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
    known = ", ".join(sorted(set(config.event_weights) | NON_INTERACTION_EVENTS))
    raise DataError(
        f"interactions {path}: column 'event' names no known event in any of its "
        f"{len(idx):,} rows ({shown or 'only nulls'}; known: {known}): name yours in "
        "--event-weights (and --held-events), or drop the column"
    )


def _event_weights(
    names: list[str], idx: np.ndarray, config: DataConfig, report: DropReport
) -> np.ndarray:
    """Each row's strength by its event; an unknown or null event counts 1 (and is counted)."""
    lut = np.array([config.event_weights.get(name, 1.0) for name in names] + [1.0])
    report.unknown_events += int((~np.array([*_known(names, config), True]))[idx].sum())
    return np.asarray(lut[idx])


_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


def _seconds(table: pa.Table, path: object) -> np.ndarray | None:
    """Each row's time in seconds since the epoch, NaN where null; None without a ``ts``."""
    if "ts" not in table.column_names:
        return None
    ts = table.column("ts")
    if not pa.types.is_timestamp(ts.type):
        raise _mistyped("interactions", path, "ts", ts.type, "timestamp")
    ticks = ts.cast(pa.int64())
    secs = np.asarray(ticks.fill_null(0).to_numpy(), dtype=np.float64) / _PER_SECOND[ts.type.unit]
    secs[~np.asarray(pc.is_valid(ticks).to_numpy(zero_copy_only=False), dtype=bool)] = np.nan
    return secs


def _decay(seconds: np.ndarray, half_life_days: float) -> np.ndarray:
    """Each row's decay factor by its age relative to the newest event."""
    if np.isnan(seconds).all():
        return np.ones(len(seconds))
    newest = np.nanmax(seconds)
    # An event without a time is taken as current: decay never inflates strength.
    age_days = (newest - np.where(np.isnan(seconds), newest, seconds)) / 86400.0
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
    """Event rows with both ids present: the ids, strength and kind of each, and its time."""

    users: pa.ChunkedArray
    items: pa.ChunkedArray
    weight: np.ndarray
    interaction: np.ndarray
    """Counts toward the pair's strength (``NON_INTERACTION_EVENTS`` do not)."""
    held: np.ndarray
    """A held event: the customer holds the product from then on."""
    close: np.ndarray
    """A close event: the customer no longer holds the product."""
    seconds: np.ndarray | None
    """Time since the epoch, NaN where unknown; None where no row has one."""

    def __add__(self, other: _Events) -> _Events:
        """These rows, then ``other``'s."""
        if self.seconds is None and other.seconds is None:
            seconds = None
        else:
            seconds = np.concatenate([_times(self), _times(other)])
        return _Events(
            pa.chunked_array(self.users.chunks + other.users.chunks, pa.string()),
            pa.chunked_array(self.items.chunks + other.items.chunks, pa.string()),
            np.concatenate([self.weight, other.weight]),
            np.concatenate([self.interaction, other.interaction]),
            np.concatenate([self.held, other.held]),
            np.concatenate([self.close, other.close]),
            seconds,
        )


def _times(events: _Events) -> np.ndarray:
    return events.seconds if events.seconds is not None else np.full(len(events.weight), np.nan)


def _read_interactions(path: str | Path, report: DropReport) -> pa.Table:
    """Read the interactions with ids as strings; rows with a null id are dropped and counted."""
    table = read_parquet(path, "interactions", ["user_id", "item_id", "event", "weight", "ts"])
    report.rows_read = table.num_rows
    u_col = _id_column(table, "interactions", path, "user_id")
    i_col = _id_column(table, "interactions", path, "item_id")
    table = table.set_column(table.schema.get_field_index("user_id"), "user_id", u_col)
    table = table.set_column(table.schema.get_field_index("item_id"), "item_id", i_col)
    _check_ts_type(table, path)
    valid = pc.and_(pc.is_valid(u_col), pc.is_valid(i_col))
    report.null_ids = table.num_rows - pc.sum(valid.cast(pa.int64())).as_py()
    return table.filter(valid) if report.null_ids else table


def _check_ts_type(table: pa.Table, path: object) -> None:
    """A ``ts`` column must hold timestamps, whether or not this fit reads the times.

    Times are only read where they matter (decay, close events), but a column of
    text or numbers is a broken export either way: refused at once, not on the day
    ``--half-life-days`` is first given.
    """
    if "ts" in table.column_names and not pa.types.is_timestamp(table.schema.field("ts").type):
        raise _mistyped("interactions", path, "ts", table.schema.field("ts").type, "timestamp")


def _item_vocabulary(table: pa.Table | None, item_ids: pa.ChunkedArray) -> Vocabulary:
    """The catalogue's items in its order; without a catalogue, the items events name, sorted."""
    if table is not None:
        return Vocabulary(table.column("item_id").combine_chunks())
    return Vocabulary(pc.unique(item_ids).sort())


def _user_vocabulary(
    table: pa.Table | None, user_ids: pa.ChunkedArray, report: DropReport
) -> Vocabulary:
    """The customer table's users in its order, then the users only events name, sorted.

    Those the table lacks are counted (``report.missing_customers``) and warned of
    by count only: customer ids never reach a log.
    """
    interaction_users = pc.unique(user_ids)
    if table is None:
        return Vocabulary(interaction_users.sort())
    known = table.column("user_id").combine_chunks()
    extra = pc.filter(interaction_users, pc.invert(pc.is_in(interaction_users, known)))
    report.missing_customers = len(extra)
    if len(extra):  # often ids of another form: 42 (read as "42") against "C00000042"
        log.warning(
            "%d of %d customers in the interactions are missing from the users table (%d "
            "rows): they are kept, with risk tolerance 1 and no marketing consent; ids must "
            "match exactly (integers are read as text)",
            len(extra),
            len(interaction_users),
            len(known),
            extra={"missing": len(extra), "users_table": len(known)},
        )
    return Vocabulary(pa.concat_arrays([known, extra.sort()]))


def _pair_keys(
    events: _Events, users: Vocabulary, items: Vocabulary, path: object, report: DropReport
) -> tuple[np.ndarray, np.ndarray]:
    """Each event's pair as ``user row * len(items) + item row``, and which events to keep.

    Events naming an item outside the catalogue are dropped and counted.
    """
    item_rows = items.indices_arrow(events.items)
    user_rows = users.indices_arrow(events.users)
    keep = item_rows >= 0
    report.unknown_items = int((~keep).sum())
    if not (keep & events.interaction).any():
        raise DataError(f"interactions {path}: no interaction names a known item")
    return user_rows * len(items) + item_rows, keep


def _merge_pairs(
    keys: np.ndarray,
    keep: np.ndarray,
    events: _Events,
    n_users: int,
    n_items: int,
    report: DropReport,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The users x items matrix of summed strengths, and whether each pair is held.

    Only the events to ``keep`` count, and of those only interactions make a pair.
    """
    counted = keep & events.interaction
    interacting = keys[counted]
    pairs, inverse = np.unique(interacting, return_inverse=True)
    report.duplicates_merged = int(len(interacting) - len(pairs))
    weight = events.weight[counted]
    strength = np.bincount(inverse, weights=weight, minlength=len(pairs)).astype(np.float32)
    rows = pairs // n_items
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_users))])
    matrix = sp.csr_matrix(
        (strength, (pairs % n_items).astype(np.int32), indptr.astype(np.int64)),
        shape=(n_users, n_items),
    )
    return matrix, _pair_held(pairs, keys, keep, events)


def _pair_held(
    pairs: np.ndarray, keys: np.ndarray, keep: np.ndarray, events: _Events
) -> np.ndarray:
    """Whether each pair is held: its latest held or close event decides.

    Latest by time, then by position (the logs in order, then the live state in
    sequence order); an event without a time counts as older than any with one.
    """
    marks = np.flatnonzero((events.held | events.close) & keep)
    held = np.zeros(len(pairs), dtype=bool)
    if len(marks) == 0:
        return held
    when = np.zeros(len(marks)) if events.seconds is None else events.seconds[marks]
    when = np.where(np.isnan(when), -np.inf, when)
    ordered = marks[np.lexsort((marks, when, keys[marks]))]
    ordered_keys = keys[ordered]
    latest = ordered[np.append(ordered_keys[1:] != ordered_keys[:-1], True)]
    at = np.minimum(np.searchsorted(pairs, keys[latest]), len(pairs) - 1)  # pairs: never empty
    found = pairs[at] == keys[latest]  # a held or close event on no interaction: no pair
    held[at[found]] = events.held[latest[found]]
    return held


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
    state: FoldedState | None = None,
) -> TrainingData:
    """Read and check the three inputs, fold in the live state; build the strength matrix.

    Args:
        state: The live state up to one sequence (``training.state.read_state``): its
            events join the logs, its updates apply over the tables, and every row of
            a forgotten customer is dropped. The data records its sequence.

    Raises:
        DataError: a missing or mistyped column, an unreadable or empty input.
    """
    report = DropReport()
    config = config or DataConfig()
    log_table = _read_interactions(interactions, report)
    item_table: pa.Table | None = None
    if items is not None:
        item_table = _read_table(items, "items", "item_id", "risk_level", "active")
    user_table: pa.Table | None = None
    if users is not None:
        user_table = _read_table(users, "users", "user_id", "risk_tolerance", "marketing_consent")
    inputs = Inputs(log_table, item_table, user_table)
    if state is not None:
        inputs = state.fold(inputs, config, report)
    # Live events come with times: the logs' are needed to order them against those.
    timed = bool(config.half_life_days) or inputs.live_events is not None
    events = _events(inputs.interactions, interactions, config, report, timed)
    if inputs.live_events is not None:
        events += _events(inputs.live_events, "(live state)", config, report, timed)
    if config.half_life_days and events.seconds is not None:
        events = replace(
            events, weight=events.weight * _decay(events.seconds, config.half_life_days)
        )
    item_vocab = _item_vocabulary(inputs.items, events.items)
    user_vocab = _user_vocabulary(inputs.users, events.users, report)
    keys, keep = _pair_keys(events, user_vocab, item_vocab, interactions, report)
    matrix, pair_held = _merge_pairs(keys, keep, events, len(user_vocab), len(item_vocab), report)
    data = TrainingData(
        users=user_vocab,
        items=item_vocab,
        user_items=matrix,
        held=pair_held,
        item_table=_aligned_item_table(item_vocab, inputs.items),
        user_table=_aligned_user_table(user_vocab, inputs.users),
        report=report,
        has_risk_levels=_has_risk_levels(inputs.items),
        has_active=inputs.items is not None and "active" in inputs.items.column_names,
        has_users_table=inputs.users is not None,
        config=config,
        state_sequence=state.sequence if state is not None else 0,
    )
    log.info("loaded training data", extra={"report": report.as_dict()})
    return data
