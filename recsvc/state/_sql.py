"""The state store's logic in SQL, once for every backend.

A backend subclasses ``SQLStore`` and supplies only its dialect: connections and
transactions (``_cursor``, ``_read``, ``_write``), its column types (``schema``),
how a time is stored and read back, how a query takes a set of keys
(``_select_in``), and waiting for a change.
Queries are written with ``?`` placeholders; ``_PLACEHOLDER`` replaces them.
Booleans are bound as Python ``bool`` (which SQLite stores as 0 or 1) and read
back through ``bool``.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, ClassVar, Protocol

import recsvc.state._prepare as _prepare
from recsvc.errors import StateError
from recsvc.state.base import (
    MAX_TEXT,
    SCHEMA_VERSION,
    Changes,
    CustomerState,
    CustomerUpdate,
    Event,
    ProductState,
    ProductUpdate,
    Receipt,
    RecordResult,
    StateStore,
    StoredEvent,
    UpdateResult,
)

__all__ = ["Cursor", "SQLStore", "schema"]

_EVENT_COLUMNS = "event_id, user_id, item_id, type, time, weight, campaign_id, channel, sequence"

_RECEIPT_COLUMNS = (
    "receipt_id, reference, subject, received_at, effective_at, sequence,"
    " events_deleted, profile_deleted, bundles_holding, complete, completed_at"
)


class Cursor(Protocol):
    """The part of a DB-API cursor the shared logic uses (sqlite3's and psycopg's)."""

    @property
    def rowcount(self) -> int:
        """Rows the last statement changed."""

    def execute(self, query: str, params: Sequence[Any] = ..., /) -> Any:
        """Run one statement."""

    def executemany(self, query: str, params: Iterable[Sequence[Any]], /) -> Any:
        """Run one statement once per parameter row."""

    def fetchone(self) -> Any:
        """The next row, or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""


def _bool(value: object) -> bool | None:
    return None if value is None else bool(value)


def _text(column: str, *, required: bool = False) -> str:
    low = 1 if required else 0
    return f"{column} TEXT NOT NULL CHECK (length({column}) BETWEEN {low} AND {MAX_TEXT})"


def schema(*, counter: str, moment: str, real: str, flag: Callable[[str], str]) -> tuple[str, ...]:
    """The statements creating the state tables, in a backend's column types.

    Args:
        counter: The type of sequence numbers (64-bit integers).
        moment: The type of times.
        real: The type of floating-point numbers.
        flag: A nullable boolean column's definition, given its name.
    """
    return (
        """CREATE TABLE state_schema (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS state_sequence (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        value {counter} NOT NULL CHECK (value >= 0))""",
        f"""CREATE TABLE IF NOT EXISTS state_events (
        {_text("event_id", required=True)} PRIMARY KEY,
        {_text("user_id", required=True)},
        {_text("item_id", required=True)},
        {_text("type")},
        time {moment} NOT NULL,
        weight {real},
        {_text("campaign_id")},
        {_text("channel")},
        sequence {counter} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS state_events_sequence ON state_events (sequence)",
        "CREATE INDEX IF NOT EXISTS state_events_user ON state_events (user_id)",
        f"""CREATE TABLE IF NOT EXISTS state_customers (
        {_text("user_id", required=True)} PRIMARY KEY,
        risk_tolerance INTEGER,
        {flag("marketing_consent")},
        sequence {counter} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS state_customers_sequence ON state_customers (sequence)",
        f"""CREATE TABLE IF NOT EXISTS state_products (
        {_text("item_id", required=True)} PRIMARY KEY,
        {flag("active")},
        risk_level INTEGER,
        sequence {counter} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS state_products_sequence ON state_products (sequence)",
        f"""CREATE TABLE IF NOT EXISTS state_tombstones (
        {_text("subject", required=True)} PRIMARY KEY,
        sequence {counter} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS state_tombstones_sequence ON state_tombstones (sequence)",
        f"""CREATE TABLE IF NOT EXISTS state_receipts (
        {_text("receipt_id", required=True)} PRIMARY KEY,
        {_text("reference")},
        {_text("subject", required=True)},
        received_at {moment} NOT NULL,
        effective_at {moment} NOT NULL,
        sequence {counter} NOT NULL,
        events_deleted INTEGER NOT NULL,
        {flag("profile_deleted")} NOT NULL,
        bundles_holding INTEGER NOT NULL DEFAULT 0,
        {flag("complete")} NOT NULL DEFAULT FALSE,
        completed_at {moment})""",
        "CREATE INDEX IF NOT EXISTS state_receipts_subject ON state_receipts (subject)",
        "CREATE INDEX IF NOT EXISTS state_receipts_incomplete ON state_receipts (sequence)"
        " WHERE NOT complete",
    )


class SQLStore(StateStore):
    """The state store over one SQL database; see the module docstring.

    Args:
        pseudonymize: Keyed pseudonyms of customer ids, for tombstones and receipts.
        poll_interval: Seconds between checks of the sequence while polling.
    """

    _NAME: ClassVar[str]
    """The backend's name, in error messages."""

    _PLACEHOLDER: ClassVar[str] = "?"
    """The driver's parameter marker, put in place of each ``?``."""

    _SCHEMA: ClassVar[tuple[str, ...]]
    """The backend's ``schema()``."""

    _HAS_SCHEMA: ClassVar[str]
    """A query with a row if the ``state_schema`` table exists, none if not."""

    def __init__(self, pseudonymize: Callable[[str], str], poll_interval: float) -> None:
        self._pseudonymize = pseudonymize
        self._poll_interval = poll_interval

    # The dialect.

    @abc.abstractmethod
    def _cursor(self) -> contextlib.AbstractContextManager[Cursor]:
        """A cursor whose each statement commits on its own."""

    @abc.abstractmethod
    def _write(self) -> contextlib.AbstractContextManager[tuple[Cursor, int]]:
        """A transaction holding the write lock, and the sequence committed before it."""

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[tuple[Cursor, int]]:
        """A read transaction (one snapshot), and the sequence it sees."""

    @abc.abstractmethod
    def _select_in(self, cur: Cursor, query: str, keys: Iterable[str]) -> list[Any]:
        """Rows of ``query``, whose one ``{}``, after a column, means "is one of ``keys``"."""

    @staticmethod
    @abc.abstractmethod
    def _store_time(moment: datetime) -> object:
        """A UTC time as the database stores it."""

    @staticmethod
    @abc.abstractmethod
    def _load_time(stored: Any) -> datetime:
        """A stored time as an aware UTC ``datetime``."""

    # Shared helpers.

    def _schema_version(self, cur: Cursor) -> int | None:
        """The schema's version (refusing any other than ours), or None if there is none."""
        cur.execute(self._HAS_SCHEMA)
        if cur.fetchone() is None:
            return None
        cur.execute("SELECT version FROM state_schema")
        row = cur.fetchone()
        if row is None:
            return None
        if row[0] != SCHEMA_VERSION:
            raise StateError(
                f"state store ({self._NAME}): schema version {row[0]}, but this code"
                f" reads version {SCHEMA_VERSION} only; refusing to open it"
            )
        return int(row[0])

    def _create_schema(self, cur: Cursor) -> None:
        """Creates the tables and their first rows, in the caller's transaction."""
        for statement in self._SCHEMA:
            cur.execute(statement)
        cur.execute(self._sql("INSERT INTO state_schema VALUES (1, ?)"), (SCHEMA_VERSION,))
        cur.execute("INSERT INTO state_sequence VALUES (1, 0)")

    def _sql(self, query: str) -> str:
        return query.replace("?", self._PLACEHOLDER)

    def _current(self, cur: Cursor, lock: str = "") -> int:
        """The committed sequence; ``lock`` is appended to the query."""
        cur.execute(f"SELECT value FROM state_sequence WHERE id = 1{lock}")
        row = cur.fetchone()
        if row is None:
            raise StateError(f"state store ({self._NAME}): the sequence row is missing")
        return int(row[0])

    def _bump(self, cur: Cursor, sequence: int) -> None:
        cur.execute(self._sql("UPDATE state_sequence SET value = ? WHERE id = 1"), (sequence,))

    def _tombstoned(self, cur: Cursor, subjects: Iterable[str]) -> set[str]:
        query = "SELECT subject FROM state_tombstones WHERE subject {}"
        return {row[0] for row in self._select_in(cur, query, set(subjects))}

    def _upsert(
        self,
        cur: Cursor,
        sequence: int,
        table: str,
        columns: Sequence[str],
        updates: Iterable[tuple[str, tuple[Any, ...]]],
    ) -> tuple[int, int]:
        """Folds updates into a table's rows; the rows that change get one new sequence.

        Args:
            cur: The write transaction's cursor.
            sequence: The sequence committed before it.
            table: The table, keyed by its first column.
            columns: The key column, then the fields, in the updates' order.
            updates: (key, fields) pairs, ``None`` keeping a field (see
                ``_prepare.merge_fields``).

        Returns:
            How many rows changed, and the sequence after the write.
        """
        updates = list(updates)
        key, *fields = columns
        query = f"SELECT {', '.join(columns)} FROM {table} WHERE {key} {{}}"
        stored = {
            row[0]: tuple(row[1:]) for row in self._select_in(cur, query, {k for k, _ in updates})
        }
        # Stored flags may read back as 0 or 1; they compare equal to False and True.
        changed = _prepare.merge_fields(stored, updates)
        if changed:
            sequence += 1
            assignments = ", ".join(f"{f} = excluded.{f}" for f in (*fields, "sequence"))
            cur.executemany(
                self._sql(
                    f"INSERT INTO {table} ({', '.join(columns)}, sequence)"
                    f" VALUES ({', '.join('?' * (len(columns) + 1))})"
                    f" ON CONFLICT ({key}) DO UPDATE SET {assignments}"
                ),
                [(k, *f, sequence) for k, f in changed.items()],
            )
            self._bump(cur, sequence)
        return len(changed), sequence

    def _receipt(self, row: Sequence[Any]) -> Receipt:
        return Receipt(
            receipt_id=row[0],
            reference=row[1],
            subject=row[2],
            received_at=self._load_time(row[3]),
            effective_at=self._load_time(row[4]),
            sequence=row[5],
            events_deleted=row[6],
            profile_deleted=bool(row[7]),
            bundles_holding=row[8],
            complete=bool(row[9]),
            completed_at=None if row[10] is None else self._load_time(row[10]),
        )

    def _in_window(
        self, cur: Cursor, table: str, columns: str, key: str, window: tuple[int, int]
    ) -> list[Any]:
        """Rows of ``table`` written in ``(after, end]``, in sequence order, then by ``key``."""
        cur.execute(
            self._sql(
                f"SELECT {columns} FROM {table}"
                f" WHERE sequence > ? AND sequence <= ? ORDER BY sequence, {key}"
            ),
            window,
        )
        return cur.fetchall()

    def _poll(self, after: int, deadline: float) -> int:
        while True:
            current = self.sequence()
            remaining = deadline - time.monotonic()
            if current > after or remaining <= 0:
                return current
            time.sleep(min(self._poll_interval, remaining))

    # The interface.

    def record_events(self, events: Iterable[Event]) -> RecordResult:
        batch = _prepare.prepare_events(events, self._pseudonymize)
        if not batch.events:
            return RecordResult(0, (), 0, self.sequence())
        with self._write() as (cur, sequence):
            forgotten = self._tombstoned(cur, batch.subjects.values())
            query = "SELECT event_id FROM state_events WHERE event_id {}"
            stored = {row[0] for row in self._select_in(cur, query, batch.ids)}
            keep, duplicates, dropped = batch.classify(forgotten, stored)
            if keep:
                sequence += 1
                cur.executemany(
                    self._sql(
                        f"INSERT INTO state_events ({_EVENT_COLUMNS})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ),
                    [
                        (
                            *(e.event_id, e.user_id, e.item_id, e.type),
                            *(self._store_time(e.time), e.weight),
                            *(e.campaign_id, e.channel, sequence),
                        )
                        for e in keep
                    ],
                )
                self._bump(cur, sequence)
        return RecordResult(len(keep), duplicates, dropped, sequence)

    def update_customers(self, updates: Iterable[CustomerUpdate]) -> UpdateResult:
        checked, subjects = _prepare.prepare_customers(updates, self._pseudonymize)
        if not checked:
            return UpdateResult(0, self.sequence())
        with self._write() as (cur, sequence):
            forgotten = self._tombstoned(cur, subjects.values())
            live = [u for u in checked if subjects[u.user_id] not in forgotten]
            changed, sequence = self._upsert(
                cur,
                sequence,
                "state_customers",
                ("user_id", "risk_tolerance", "marketing_consent"),
                ((u.user_id, (u.risk_tolerance, u.marketing_consent)) for u in live),
            )
        return UpdateResult(changed, sequence, len(checked) - len(live))

    def update_products(self, updates: Iterable[ProductUpdate]) -> UpdateResult:
        checked = _prepare.prepare_products(updates)
        if not checked:
            return UpdateResult(0, self.sequence())
        with self._write() as (cur, sequence):
            changed, sequence = self._upsert(
                cur,
                sequence,
                "state_products",
                ("item_id", "active", "risk_level"),
                ((u.item_id, (u.active, u.risk_level)) for u in checked),
            )
        return UpdateResult(changed, sequence)

    def forget(self, user_id: str, reference: str, received_at: datetime) -> Receipt:
        _prepare.check_text("user_id", user_id, required=True)
        _prepare.check_text("reference", reference, required=False)
        received = _prepare.check_time("received_at", received_at)
        subject = self._pseudonymize(user_id)
        receipt_id = _prepare.new_receipt_id()
        with self._write() as (cur, sequence):
            sequence += 1
            cur.execute(self._sql("DELETE FROM state_events WHERE user_id = ?"), (user_id,))
            events_deleted = cur.rowcount
            cur.execute(self._sql("DELETE FROM state_customers WHERE user_id = ?"), (user_id,))
            profile_deleted = cur.rowcount > 0
            cur.execute(
                self._sql(
                    "INSERT INTO state_tombstones VALUES (?, ?)"
                    " ON CONFLICT (subject) DO UPDATE SET sequence = excluded.sequence"
                ),
                (subject, sequence),
            )
            effective = datetime.now(timezone.utc)
            receipt = Receipt(
                *(receipt_id, reference, subject, received, effective, sequence),
                *(events_deleted, profile_deleted, 0, False, None),
            )
            cur.execute(
                self._sql(
                    f"INSERT INTO state_receipts ({_RECEIPT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (
                    *(receipt_id, reference, subject),
                    *(self._store_time(received), self._store_time(effective), sequence),
                    *(events_deleted, profile_deleted, 0, False, None),
                ),
            )
            self._bump(cur, sequence)
        return receipt

    def receipt(self, receipt_id: str) -> Receipt | None:
        _prepare.check_text("receipt_id", receipt_id, required=True)
        with self._cursor() as cur:
            cur.execute(
                self._sql(f"SELECT {_RECEIPT_COLUMNS} FROM state_receipts WHERE receipt_id = ?"),
                (receipt_id,),
            )
            row = cur.fetchone()
        return None if row is None else self._receipt(row)

    def complete_receipts(
        self,
        completed_at: datetime,
        bundles_holding_by_subject: Mapping[str, int] | None = None,
        *,
        upto: int | None = None,
    ) -> int:
        completed = self._store_time(_prepare.check_time("completed_at", completed_at))
        _prepare.check_after(0, upto)
        holding = None
        if bundles_holding_by_subject is not None:
            holding = {
                _prepare.check_text("subject", s, required=True): _prepare.check_count(
                    "bundles_holding", n
                )
                for s, n in bundles_holding_by_subject.items()
            }
        with self._write() as (cur, sequence):
            limit = sequence if upto is None else upto
            if holding is None:
                cur.execute(
                    self._sql(
                        "UPDATE state_receipts SET complete = TRUE, completed_at = ?"
                        " WHERE NOT complete AND sequence <= ?"
                    ),
                    (completed, limit),
                )
                return cur.rowcount
            cur.execute(
                self._sql(
                    "SELECT receipt_id, subject FROM state_receipts"
                    " WHERE NOT complete AND sequence <= ?"
                ),
                (limit,),
            )
            rows = cur.fetchall()
            cur.executemany(
                self._sql(
                    "UPDATE state_receipts SET complete = TRUE, completed_at = ?,"
                    " bundles_holding = ? WHERE receipt_id = ?"
                ),
                [(completed, holding.get(subject, 0), rid) for rid, subject in rows],
            )
            return len(rows)

    def set_bundles_holding(self, subject: str, n: int) -> int:
        _prepare.check_text("subject", subject, required=True)
        count = _prepare.check_count("n", n)
        with self._write() as (cur, _):
            cur.execute(
                self._sql("UPDATE state_receipts SET bundles_holding = ? WHERE subject = ?"),
                (count, subject),
            )
            return cur.rowcount

    def sequence(self) -> int:
        with self._cursor() as cur:
            return self._current(cur)

    def changes_since(self, after: int, upto: int | None = None) -> Changes:
        _prepare.check_after(after, upto)
        with self._read() as (cur, current):
            end = current if upto is None else min(upto, current)
            if end <= after:
                return Changes(after, (), (), (), ())
            window = (after, end)
            events = tuple(
                StoredEvent(*(e, u, i, t, self._load_time(at), w, c, ch), sequence=s)
                for e, u, i, t, at, w, c, ch, s in self._in_window(
                    cur, "state_events", _EVENT_COLUMNS, "event_id", window
                )
            )
            customers = tuple(
                CustomerState(u, r, _bool(m), s)
                for u, r, m, s in self._in_window(
                    cur,
                    "state_customers",
                    "user_id, risk_tolerance, marketing_consent, sequence",
                    "user_id",
                    window,
                )
            )
            products = tuple(
                ProductState(i, _bool(a), r, s)
                for i, a, r, s in self._in_window(
                    cur,
                    "state_products",
                    "item_id, active, risk_level, sequence",
                    "item_id",
                    window,
                )
            )
            erased = tuple(
                row[0]
                for row in self._in_window(cur, "state_tombstones", "subject", "subject", window)
            )
        return Changes(end, events, customers, products, erased)

    def events_by_time(
        self, upto: int, since: datetime, types: Collection[str]
    ) -> tuple[StoredEvent, ...]:
        _prepare.check_after(0, upto)
        if since.tzinfo is None:
            raise ValueError(f"since must be timezone-aware, not {since!r}")
        kinds = sorted(set(types))
        if not kinds or upto <= 0:
            return ()
        marks = ", ".join("?" * len(kinds))
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_EVENT_COLUMNS} FROM state_events"
                    f" WHERE sequence <= ? AND time > ? AND type IN ({marks})"
                    " ORDER BY sequence, event_id"
                ),
                (upto, self._store_time(since), *kinds),
            )
            rows = cur.fetchall()
        return tuple(
            StoredEvent(*(e, u, i, t, self._load_time(at), w, c, ch), sequence=s)
            for e, u, i, t, at, w, c, ch, s in rows
        )

    def forgotten(self) -> frozenset[str]:
        with self._cursor() as cur:
            cur.execute("SELECT subject FROM state_tombstones")
            return frozenset(row[0] for row in cur.fetchall())
