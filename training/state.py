"""Folding the live state into training data, and erasure through every version on disk.

``recsvc-train fit --state URL`` reads the state store once, at one sequence S
(:func:`read_state`), and folds it into the inputs (:meth:`FoldedState.fold`):

* every event up to S joins the logs, counted as the live overlay counts it
  (``recsvc.model.overlay.apply``): a type in the trainer's event weights adds the
  event's own weight if it has one, else the type's; a held event makes the pair
  held and ``close`` ends that; any other type changes nothing;
* customer and product updates apply over the users and items tables;
* every row of a forgotten customer is dropped, from the bank's logs too.

The bundle records S, so servers overlay only what came after it: an event is in
the model or in the overlay, never both, never neither. Once the bundle is
published, :func:`complete_erasure` deletes every other version that still holds a
forgotten customer and completes the receipts of erasures up to S.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsvc.errors import BundleError, DataError
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import Bundle, list_versions
from recsvc.model.manifest import FILES
from recsvc.model.overlay import CLOSE_EVENT, Overlay, contact_history
from recsvc.model.ranking import Recommender
from recsvc.model.rules import MAX_LEVEL, MIN_LEVEL
from recsvc.settings import SETTINGS
from recsvc.state import Changes, CustomerState, ProductState, StateStore, StoredEvent
from training.data import DataConfig, DropReport, Inputs
from training.publish import erase_versions

__all__ = [
    "Erasure",
    "FoldedState",
    "complete_erasure",
    "live_overlay",
    "pseudonymizer_from_env",
    "read_state",
]

log = logging.getLogger(__name__)

_PSEUDONYM_KEY = SETTINGS["pseudonym_key"]


@dataclass(frozen=True)
class FoldedState:
    """The live state at one sequence, as training folds it in."""

    changes: Changes
    """Everything up to the sequence (``StateStore.snapshot``)."""
    forgotten: frozenset[str]
    """Pseudonyms of every forgotten customer."""
    pseudonymize: Callable[[str], str]

    @property
    def sequence(self) -> int:
        return self.changes.sequence

    def forgotten_among(self, *columns: pa.ChunkedArray) -> pa.Array:
        """The distinct ids in ``columns`` of forgotten customers (one HMAC per id)."""
        if not self.forgotten:
            return pa.array([], pa.string())
        ids = pc.unique(pa.chunked_array([c for col in columns for c in col.chunks], pa.string()))
        p, forgotten = self.pseudonymize, self.forgotten
        return pa.array([u for u in ids.to_pylist() if p(u) in forgotten], pa.string())

    def fold(self, inputs: Inputs, config: DataConfig, report: DropReport) -> Inputs:
        """``inputs`` with this state folded in; what was folded and dropped goes to ``report``."""
        logs, users, changes = inputs.interactions, inputs.users, self.changes
        live_ids = [e.user_id for e in changes.events] + [c.user_id for c in changes.customers]
        # The store deletes a forgotten customer's own data; the live ids are checked
        # too for an erasure that landed between the snapshot and the tombstones' read.
        gone = self.forgotten_among(
            logs["user_id"],
            *([users["user_id"]] if users is not None else []),
            pa.chunked_array([pa.array(live_ids, pa.string())]),
        )
        if len(gone):
            logs = logs.filter(pc.invert(pc.is_in(logs["user_id"], value_set=gone)))
            report.forgotten_customers = len(gone)
            report.forgotten_rows = inputs.interactions.num_rows - logs.num_rows
            if users is not None:
                users = users.filter(pc.invert(pc.is_in(users["user_id"], value_set=gone)))
        erased = set(gone.to_pylist())
        events = [e for e in changes.events if e.user_id not in erased]
        customers = [c for c in changes.customers if c.user_id not in erased]
        report.state_events = len(events)
        return Inputs(
            interactions=logs,
            items=_with_products(inputs.items, changes.products, report),
            users=_with_customers(users, customers),
            live_events=_events_table(events, config),
        )


def read_state(store: StateStore, pseudonymize: Callable[[str], str]) -> FoldedState:
    """The store's state at its current sequence, read once."""
    sequence = store.sequence()
    changes = store.snapshot(sequence)
    # Read after the snapshot: every erasure it reflects is among them, and maybe later ones.
    forgotten = store.forgotten() | frozenset(changes.erased)
    log.info(
        "read the live state",
        extra={
            "sequence": sequence,
            "events": len(changes.events),
            "customers": len(changes.customers),
            "products": len(changes.products),
            "forgotten": len(forgotten),
        },
    )
    return FoldedState(changes, forgotten, pseudonymize)


def pseudonymizer_from_env(environ: Mapping[str, str]) -> Pseudonymizer:
    """The servers' keyed pseudonyms, from ``RECSVC_PSEUDONYM_KEY``.

    Raises:
        ValueError: the variable is unset. Erasures are recorded by pseudonym only,
            so under any other key no forgotten customer would be recognized.
    """
    key = _PSEUDONYM_KEY.resolve(None, environ)
    if key is None:
        raise ValueError(
            f"--state needs {_PSEUDONYM_KEY.variable}: the key the servers pseudonymize "
            "customer ids with (erasures are recorded under it)"
        )
    return Pseudonymizer(key)


def live_overlay(bundle: Bundle, store: StateStore, pseudonymize: Callable[[str], str]) -> Overlay:
    """``bundle`` with every change the store holds after the bundle's state sequence, and
    the contact history before it (``contact_history``: the policies count it by time)."""
    base = bundle.manifest.state_sequence
    changes = store.changes_since(base)
    return Recommender(bundle).overlay(pseudonymize, changes, contact_history(store, base))


def _events_table(events: Sequence[StoredEvent], config: DataConfig) -> pa.Table:
    """The live events that count, as interaction rows with every weight set.

    Of the types the trainer does not weigh only ``close`` is kept, with no weight:
    the logs' rules make it no interaction, as the overlay does.
    """
    weights = config.event_weights
    kept = [e for e in events if e.type in weights or e.type == CLOSE_EVENT]
    weight: list[float | None] = []
    for e in kept:
        w = (e.weight if e.weight is not None else weights[e.type]) if e.type in weights else None
        if w is not None and w < 0:
            raise DataError(f"live state: event {e.event_id!r} has a negative weight ({w})")
        weight.append(w)
    return pa.table(
        {
            "user_id": pa.array([e.user_id for e in kept], pa.string()),
            "item_id": pa.array([e.item_id for e in kept], pa.string()),
            "event": pa.array([e.type for e in kept], pa.string()),
            "weight": pa.array(weight, pa.float64()),
            "ts": pa.array([e.time for e in kept], pa.timestamp("us", tz="UTC")),
        }
    )


def _level(value: int | None) -> int | None:
    """A risk level or tolerance within 1..5, as the bundle's readers clamp them."""
    return None if value is None else min(max(int(value), MIN_LEVEL), MAX_LEVEL)


def _rows(table: pa.Table, column: str, ids: list[str]) -> np.ndarray:
    """The row of each of ``ids`` in ``table[column]``; -1 where absent."""
    found = pc.index_in(pa.array(ids, pa.string()), value_set=table[column])
    return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _with_customers(users: pa.Table | None, customers: Sequence[CustomerState]) -> pa.Table | None:
    """``users`` with each customer's live profile over it, customers it lacks appended.

    A field the state never set keeps the table's value. A column the table lacks is
    added, null elsewhere, which means what its absence did (tolerance 1, no consent).
    Without a users table the state's customers make one: consent is then known for
    them alone, so nobody else is ever targeted.
    """
    if not customers:
        return users
    if users is None:
        users = pa.table({"user_id": pa.array([], pa.string())})
    ids = [c.user_id for c in customers]
    rows = _rows(users, "user_id", ids)
    new = [i for i, row in zip(ids, rows.tolist(), strict=True) if row < 0]
    if new:
        # Every other column of the new rows is null.
        users = pa.concat_tables(
            [users, pa.table({"user_id": pa.array(new, pa.string())})], promote_options="default"
        )
        rows = _rows(users, "user_id", ids)
    users = _overwrite(
        users, "risk_tolerance", pa.int8(), rows, [_level(c.risk_tolerance) for c in customers]
    )
    return _overwrite(
        users, "marketing_consent", pa.bool_(), rows, [c.marketing_consent for c in customers]
    )


def _with_products(
    items: pa.Table | None, products: Sequence[ProductState], report: DropReport
) -> pa.Table | None:
    """``items`` with each product's live state over it; products it lacks are counted.

    Without an ``active`` column every product was active: one is added, true but
    where an update says otherwise. Without a ``risk_level`` column suitability is
    off, and risk updates are ignored, as the overlay ignores them.
    """
    if not products:
        return items
    if items is None:
        report.unknown_products = len(products)
        return None
    rows = _rows(items, "item_id", [p.item_id for p in products])
    report.unknown_products = int((rows < 0).sum())
    known = [(row, p) for row, p in zip(rows.tolist(), products, strict=True) if row >= 0]
    at = np.array([row for row, _ in known], dtype=np.int64)
    items = _overwrite(items, "active", pa.bool_(), at, [p.active for _, p in known], True)
    if "risk_level" in items.column_names:
        risk = [_level(p.risk_level) for _, p in known]
        items = _overwrite(items, "risk_level", pa.int8(), at, risk)
    return items


def _overwrite(
    table: pa.Table,
    column: str,
    kind: pa.DataType,
    rows: np.ndarray,
    values: Sequence[object],
    absent: object = None,
) -> pa.Table:
    """``table`` with ``column[rows[i]] = values[i]`` wherever ``values[i]`` is not None.

    A missing column is added (of type ``kind``), ``absent`` in every other row.
    """
    given = [(row, v) for row, v in zip(rows.tolist(), values, strict=True) if v is not None]
    if not given:
        return table
    if column in table.column_names:
        at = table.column_names.index(column)
        kind = table.schema.field(column).type
        current = table[column].to_pylist()
    else:
        at, current = -1, [absent] * table.num_rows
    for row, v in given:
        current[row] = v
    array = pa.array(current, kind)
    return table.set_column(at, column, array) if at >= 0 else table.append_column(column, array)


@dataclass(frozen=True)
class Erasure:
    """What :func:`complete_erasure` did."""

    versions_deleted: tuple[str, ...]
    receipts_completed: int


def _versions_holding(models: Path, state: FoldedState, spare: str) -> list[str]:
    """Versions under ``models`` but ``spare`` whose users table holds a forgotten customer."""
    versions = [v for v in list_versions(models) if v != spare]
    if not state.forgotten or not versions:
        return []
    ids = {}
    for v in versions:
        try:
            ids[v] = pq.read_table(models / v / FILES.users, columns=["user_id"])["user_id"]
        except (pa.ArrowInvalid, OSError) as exc:
            raise BundleError(
                f"{v}: {FILES.users} cannot be read, so whether it holds a forgotten "
                f"customer cannot be told ({exc}); delete or repair it"
            ) from exc
    # One HMAC per customer across all versions, which mostly hold the same ones.
    gone = state.forgotten_among(*[col.cast(pa.string()) for col in ids.values()])
    return [v for v, col in ids.items() if pc.any(pc.is_in(col, value_set=gone)).as_py()]


def complete_erasure(
    store: StateStore,
    models: Path,
    published: str,
    state: FoldedState,
    now: datetime | None = None,
) -> Erasure:
    """After ``published`` (built from ``state``) is LATEST: erase the older copies.

    Deletes every other version under ``models`` that still holds a forgotten
    customer, whatever the keep-N rule would keep, then marks complete the receipts
    of erasures up to ``state.sequence``; a later erasure's receipt stays incomplete
    until a bundle built after it is published.
    """
    doomed = _versions_holding(models, state, published)
    erase_versions(models, doomed)
    completed = store.complete_receipts(now or datetime.now(timezone.utc), {}, upto=state.sequence)
    erasure = Erasure(tuple(doomed), completed)
    log.info(
        "erased older versions",
        extra={"versions_deleted": list(doomed), "receipts_completed": completed},
    )
    return erasure
