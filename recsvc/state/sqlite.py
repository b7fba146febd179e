"""The state store in one SQLite file, for a single host.

Writers queue on SQLite's one write lock (``BEGIN IMMEDIATE``, waiting up to
``busy_timeout``), so commit order is sequence order across threads and processes;
several server workers may open the same file. The file is in WAL mode with
``synchronous=FULL``, so a returned write survives a crash, and readers never
block writers. ``secure_delete`` zeroes what an erasure deletes; until SQLite
reuses the WAL, its older frames may still hold erased rows (as PostgreSQL's dead
tuples do until vacuum).

Times are stored as integer microseconds since the Unix epoch (UTC), booleans as
0 or 1.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from recsvc.errors import StateError, StateUnavailable
from recsvc.state import _prepare
from recsvc.state._pool import Pool
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

__all__ = ["SQLiteStore"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# SQLite before 3.32 allows 999 parameters a statement.
_CHUNK = 500


def _text(column: str, *, required: bool = False) -> str:
    low = 1 if required else 0
    return f"{column} TEXT NOT NULL CHECK (length({column}) BETWEEN {low} AND {MAX_TEXT})"


def _flag(column: str, *, null: bool) -> str:
    return f"{column} INTEGER {'' if null else 'NOT NULL '}CHECK ({column} IN (0, 1))"


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS state_sequence (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        value INTEGER NOT NULL CHECK (value >= 0))""",
    f"""CREATE TABLE IF NOT EXISTS state_events (
        {_text("event_id", required=True)} PRIMARY KEY,
        {_text("user_id", required=True)},
        {_text("item_id", required=True)},
        {_text("type")},
        time INTEGER NOT NULL,
        weight REAL,
        {_text("campaign_id")},
        {_text("channel")},
        sequence INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_events_sequence ON state_events (sequence)",
    "CREATE INDEX IF NOT EXISTS state_events_user ON state_events (user_id)",
    f"""CREATE TABLE IF NOT EXISTS state_customers (
        {_text("user_id", required=True)} PRIMARY KEY,
        risk_tolerance INTEGER,
        {_flag("marketing_consent", null=True)},
        sequence INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_customers_sequence ON state_customers (sequence)",
    f"""CREATE TABLE IF NOT EXISTS state_products (
        {_text("item_id", required=True)} PRIMARY KEY,
        {_flag("active", null=True)},
        risk_level INTEGER,
        sequence INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_products_sequence ON state_products (sequence)",
    f"""CREATE TABLE IF NOT EXISTS state_tombstones (
        {_text("subject", required=True)} PRIMARY KEY,
        sequence INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_tombstones_sequence ON state_tombstones (sequence)",
    f"""CREATE TABLE IF NOT EXISTS state_receipts (
        {_text("receipt_id", required=True)} PRIMARY KEY,
        {_text("reference")},
        {_text("subject", required=True)},
        received_at INTEGER NOT NULL,
        effective_at INTEGER NOT NULL,
        sequence INTEGER NOT NULL,
        events_deleted INTEGER NOT NULL,
        {_flag("profile_deleted", null=False)},
        bundles_holding INTEGER NOT NULL DEFAULT 0,
        {_flag("complete", null=False)} DEFAULT 0,
        completed_at INTEGER)""",
    "CREATE INDEX IF NOT EXISTS state_receipts_subject ON state_receipts (subject)",
    "CREATE INDEX IF NOT EXISTS state_receipts_incomplete ON state_receipts (sequence)"
    " WHERE NOT complete",
)

_EVENT_COLUMNS = "event_id, user_id, item_id, type, time, weight, campaign_id, channel, sequence"
_RECEIPT_COLUMNS = (
    "receipt_id, reference, subject, received_at, effective_at, sequence,"
    " events_deleted, profile_deleted, bundles_holding, complete, completed_at"
)


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _time(us: int) -> datetime:
    return _EPOCH + us * _MICROSECOND


def _flag_value(value: int | None) -> bool | None:
    return None if value is None else bool(value)


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """The one place sqlite3's exceptions become ours."""
    try:
        yield
    except sqlite3.OperationalError as exc:  # locked past the timeout, I/O, cannot open
        raise StateUnavailable(f"state store (SQLite): {exc}") from exc
    except sqlite3.Error as exc:
        raise StateError(f"state store (SQLite): {exc}") from exc


def _receipt(row: Sequence[Any]) -> Receipt:
    return Receipt(
        receipt_id=row[0],
        reference=row[1],
        subject=row[2],
        received_at=_time(row[3]),
        effective_at=_time(row[4]),
        sequence=row[5],
        events_deleted=row[6],
        profile_deleted=bool(row[7]),
        bundles_holding=row[8],
        complete=bool(row[9]),
        completed_at=None if row[10] is None else _time(row[10]),
    )


class SQLiteStore(StateStore):
    """The state store in one SQLite file; see the module docstring.

    Args:
        path: The database file; its folder is created if missing.
        pseudonymize: Keyed pseudonyms of customer ids, for tombstones and receipts.
        busy_timeout: Seconds a call waits for another writer before
            ``StateUnavailable``.
        pool_size: Idle connections kept for reuse.
        poll_interval: Seconds between checks in ``wait_for_change``.
    """

    def __init__(
        self,
        path: str | Path,
        pseudonymize: Callable[[str], str],
        *,
        busy_timeout: float = 10.0,
        pool_size: int = 8,
        poll_interval: float = 0.05,
    ) -> None:
        self._path = Path(path)
        self._pseudonymize = pseudonymize
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"state store (SQLite): cannot create its folder: {exc}"
            raise StateUnavailable(message) from exc
        self._pool: Pool[sqlite3.Connection] = Pool(
            self._connect, sqlite3.Connection.close, lambda c: not c.in_transaction, pool_size
        )
        try:
            self._set_up()
        except BaseException:
            self._pool.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN and COMMIT ourselves. A connection
        # serves one call at a time, but not always from the same thread.
        conn = sqlite3.connect(
            self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_up(self) -> None:
        with _mapped_errors(), self._pool.connection() as conn:
            if self._schema_version(conn) is not None:
                return  # no writes, so a read-only file may be opened
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise StateError(f"state store (SQLite): cannot use WAL mode (got {mode!r})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._schema_version(conn) is None:  # not created meanwhile
                    conn.execute(
                        "CREATE TABLE state_schema ("
                        " id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
                    )
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute("INSERT INTO state_schema VALUES (1, ?)", (SCHEMA_VERSION,))
                    conn.execute("INSERT INTO state_sequence VALUES (1, 0)")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int | None:
        """The schema's version (refusing any other than ours), or None if there is none."""
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state_schema'"
        if conn.execute(query).fetchone() is None:
            return None
        row = conn.execute("SELECT version FROM state_schema").fetchone()
        if row is None:
            return None
        if row[0] != SCHEMA_VERSION:
            raise StateError(
                f"state store (SQLite): schema version {row[0]}, but this code"
                f" reads version {SCHEMA_VERSION} only; refusing to open it"
            )
        return int(row[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, int]]:
        """A transaction holding the write lock, and the sequence committed before it."""
        with _mapped_errors(), self._pool.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (current,) = conn.execute("SELECT value FROM state_sequence").fetchone()
                yield conn, current
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, int]]:
        """A read transaction (one snapshot), and the sequence it sees."""
        with _mapped_errors(), self._pool.connection() as conn:
            conn.execute("BEGIN")
            try:
                (current,) = conn.execute("SELECT value FROM state_sequence").fetchone()
                yield conn, current
            finally:
                conn.execute("COMMIT")

    @staticmethod
    def _bump(conn: sqlite3.Connection, sequence: int) -> None:
        conn.execute("UPDATE state_sequence SET value = ?", (sequence,))

    @staticmethod
    def _select_in(conn: sqlite3.Connection, query: str, keys: Iterable[str]) -> list[Any]:
        """Rows of ``query`` (whose one ``IN ({})`` takes the keys), chunk by chunk."""
        keys = list(keys)
        rows: list[Any] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows += conn.execute(query.format(", ".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def _tombstoned(self, conn: sqlite3.Connection, subjects: Iterable[str]) -> set[str]:
        query = "SELECT subject FROM state_tombstones WHERE subject IN ({})"
        return {row[0] for row in self._select_in(conn, query, set(subjects))}

    def record_events(self, events: Iterable[Event]) -> RecordResult:
        batch = _prepare.prepare_events(events, self._pseudonymize)
        if not batch.events:
            return RecordResult(0, (), 0, self.sequence())
        with self._write() as (conn, sequence):
            forgotten = self._tombstoned(conn, batch.subjects.values())
            query = "SELECT event_id FROM state_events WHERE event_id IN ({})"
            stored = {row[0] for row in self._select_in(conn, query, batch.ids)}
            keep, duplicates, dropped = batch.classify(forgotten, stored)
            if keep:
                sequence += 1
                conn.executemany(
                    f"INSERT INTO state_events ({_EVENT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            *(e.event_id, e.user_id, e.item_id, e.type, _us(e.time), e.weight),
                            *(e.campaign_id, e.channel, sequence),
                        )
                        for e in keep
                    ],
                )
                self._bump(conn, sequence)
        return RecordResult(len(keep), duplicates, dropped, sequence)

    def update_customers(self, updates: Iterable[CustomerUpdate]) -> UpdateResult:
        checked, subjects = _prepare.prepare_customers(updates, self._pseudonymize)
        if not checked:
            return UpdateResult(0, self.sequence())
        with self._write() as (conn, sequence):
            forgotten = self._tombstoned(conn, subjects.values())
            live = [u for u in checked if subjects[u.user_id] not in forgotten]
            query = (
                "SELECT user_id, risk_tolerance, marketing_consent FROM state_customers"
                " WHERE user_id IN ({})"
            )
            stored = {
                row[0]: (row[1], _flag_value(row[2]))
                for row in self._select_in(conn, query, {u.user_id for u in live})
            }
            changed = _prepare.merge_fields(
                stored, ((u.user_id, (u.risk_tolerance, u.marketing_consent)) for u in live)
            )
            if changed:
                sequence += 1
                conn.executemany(
                    "INSERT INTO state_customers VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (user_id) DO UPDATE"
                    " SET risk_tolerance = excluded.risk_tolerance,"
                    " marketing_consent = excluded.marketing_consent, sequence = excluded.sequence",
                    [(key, *fields, sequence) for key, fields in changed.items()],
                )
                self._bump(conn, sequence)
        return UpdateResult(len(changed), sequence, len(checked) - len(live))

    def update_products(self, updates: Iterable[ProductUpdate]) -> UpdateResult:
        checked = _prepare.prepare_products(updates)
        if not checked:
            return UpdateResult(0, self.sequence())
        with self._write() as (conn, sequence):
            query = "SELECT item_id, active, risk_level FROM state_products WHERE item_id IN ({})"
            stored = {
                row[0]: (_flag_value(row[1]), row[2])
                for row in self._select_in(conn, query, {u.item_id for u in checked})
            }
            changed = _prepare.merge_fields(
                stored, ((u.item_id, (u.active, u.risk_level)) for u in checked)
            )
            if changed:
                sequence += 1
                conn.executemany(
                    "INSERT INTO state_products VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (item_id) DO UPDATE"
                    " SET active = excluded.active, risk_level = excluded.risk_level,"
                    " sequence = excluded.sequence",
                    [(key, *fields, sequence) for key, fields in changed.items()],
                )
                self._bump(conn, sequence)
        return UpdateResult(len(changed), sequence)

    def forget(self, user_id: str, reference: str, received_at: datetime) -> Receipt:
        _prepare.check_text("user_id", user_id, required=True)
        _prepare.check_text("reference", reference, required=False)
        received = _prepare.check_time("received_at", received_at)
        subject = self._pseudonymize(user_id)
        receipt_id = _prepare.new_receipt_id()
        with self._write() as (conn, sequence):
            sequence += 1
            deleted = conn.execute("DELETE FROM state_events WHERE user_id = ?", (user_id,))
            events_deleted = deleted.rowcount
            profile = conn.execute("DELETE FROM state_customers WHERE user_id = ?", (user_id,))
            profile_deleted = profile.rowcount > 0
            conn.execute(
                "INSERT INTO state_tombstones VALUES (?, ?)"
                " ON CONFLICT (subject) DO UPDATE SET sequence = excluded.sequence",
                (subject, sequence),
            )
            effective = datetime.now(timezone.utc)
            receipt = Receipt(
                *(receipt_id, reference, subject, received, effective, sequence),
                *(events_deleted, profile_deleted, 0, False, None),
            )
            conn.execute(
                f"INSERT INTO state_receipts ({_RECEIPT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    *(receipt_id, reference, subject, _us(received), _us(effective), sequence),
                    *(events_deleted, int(profile_deleted), 0, 0, None),
                ),
            )
            self._bump(conn, sequence)
        # Move the zeroed pages into the main file now; never wait for readers to do it.
        with contextlib.suppress(StateError), _mapped_errors(), self._pool.connection() as conn:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return receipt

    def receipt(self, receipt_id: str) -> Receipt | None:
        _prepare.check_text("receipt_id", receipt_id, required=True)
        with _mapped_errors(), self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM state_receipts WHERE receipt_id = ?",
                (receipt_id,),
            ).fetchone()
        return None if row is None else _receipt(row)

    def complete_receipts(
        self,
        completed_at: datetime,
        bundles_holding_by_subject: Mapping[str, int] | None = None,
        *,
        upto: int | None = None,
    ) -> int:
        completed = _us(_prepare.check_time("completed_at", completed_at))
        _prepare.check_after(0, upto)
        holding = None
        if bundles_holding_by_subject is not None:
            holding = {
                _prepare.check_text("subject", s, required=True): _prepare.check_count(
                    "bundles_holding", n
                )
                for s, n in bundles_holding_by_subject.items()
            }
        with self._write() as (conn, sequence):
            limit = sequence if upto is None else upto
            if holding is None:
                return conn.execute(
                    "UPDATE state_receipts SET complete = 1, completed_at = ?"
                    " WHERE NOT complete AND sequence <= ?",
                    (completed, limit),
                ).rowcount
            rows = conn.execute(
                "SELECT receipt_id, subject FROM state_receipts"
                " WHERE NOT complete AND sequence <= ?",
                (limit,),
            ).fetchall()
            conn.executemany(
                "UPDATE state_receipts SET complete = 1, completed_at = ?, bundles_holding = ?"
                " WHERE receipt_id = ?",
                [(completed, holding.get(subject, 0), rid) for rid, subject in rows],
            )
            return len(rows)

    def set_bundles_holding(self, subject: str, n: int) -> int:
        _prepare.check_text("subject", subject, required=True)
        count = _prepare.check_count("n", n)
        with self._write() as (conn, _):
            return conn.execute(
                "UPDATE state_receipts SET bundles_holding = ? WHERE subject = ?", (count, subject)
            ).rowcount

    def sequence(self) -> int:
        with _mapped_errors(), self._pool.connection() as conn:
            (current,) = conn.execute("SELECT value FROM state_sequence").fetchone()
        return int(current)

    def changes_since(self, after: int, upto: int | None = None) -> Changes:
        _prepare.check_after(after, upto)
        with self._read() as (conn, current):
            end = current if upto is None else min(upto, current)
            if end <= after:
                return Changes(after, (), (), (), ())
            window = (after, end)
            events = tuple(
                StoredEvent(
                    *(e, u, i, t, _time(us), w, c, ch),
                    sequence=s,
                )
                for e, u, i, t, us, w, c, ch, s in conn.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM state_events"
                    " WHERE sequence > ? AND sequence <= ? ORDER BY sequence, event_id",
                    window,
                )
            )
            customers = tuple(
                CustomerState(u, r, _flag_value(m), s)
                for u, r, m, s in conn.execute(
                    "SELECT user_id, risk_tolerance, marketing_consent, sequence"
                    " FROM state_customers WHERE sequence > ? AND sequence <= ?"
                    " ORDER BY sequence, user_id",
                    window,
                )
            )
            products = tuple(
                ProductState(i, _flag_value(a), r, s)
                for i, a, r, s in conn.execute(
                    "SELECT item_id, active, risk_level, sequence FROM state_products"
                    " WHERE sequence > ? AND sequence <= ? ORDER BY sequence, item_id",
                    window,
                )
            )
            erased = tuple(
                row[0]
                for row in conn.execute(
                    "SELECT subject FROM state_tombstones"
                    " WHERE sequence > ? AND sequence <= ? ORDER BY sequence, subject",
                    window,
                )
            )
        return Changes(end, events, customers, products, erased)

    def forgotten(self) -> frozenset[str]:
        with _mapped_errors(), self._pool.connection() as conn:
            return frozenset(r[0] for r in conn.execute("SELECT subject FROM state_tombstones"))

    def wait_for_change(self, after: int, timeout: float) -> int:
        # Reading one row of a WAL database costs microseconds: polling is cheap here.
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            current = self.sequence()
            remaining = deadline - time.monotonic()
            if current > after or remaining <= 0:
                return current
            time.sleep(min(self._poll_interval, remaining))

    def close(self) -> None:
        self._pool.close()
