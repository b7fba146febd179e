"""The state store in PostgreSQL: the truth shared by every server and the trainer.

Every write transaction first locks the one row of ``state_sequence``
(``SELECT ... FOR UPDATE``), so writers from any number of connections and hosts
run one at a time and commit in sequence order: a reader that has seen N can never
later see a commit numbered N or below. Commits wait for the WAL flush (the
server's ``synchronous_commit``; turned back on for our sessions if set off).
After each commit a ``NOTIFY`` wakes ``wait_for_change``, which also polls, since
a notification has no replay and may be missed.

Erased rows are deleted at once, but remain on disk as dead tuples until
(auto)vacuum reclaims them; backups are the operator's to expire.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.rows import TupleRow

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

__all__ = ["CHANNEL", "PostgresStore"]

CHANNEL = "recsvc_state"
"""The LISTEN/NOTIFY channel; the payload is the committed sequence."""

# Serializes schema set-up between processes opening a fresh database at once.
_SET_UP_LOCK = 0x7265637376_5354

Connection = psycopg.Connection[TupleRow]
Cursor = psycopg.Cursor[TupleRow]


def _text(column: str, *, required: bool = False) -> str:
    low = 1 if required else 0
    return f"{column} text NOT NULL CHECK (length({column}) BETWEEN {low} AND {MAX_TEXT})"


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS state_sequence (
        id integer PRIMARY KEY CHECK (id = 1),
        value bigint NOT NULL CHECK (value >= 0))""",
    f"""CREATE TABLE IF NOT EXISTS state_events (
        {_text("event_id", required=True)} PRIMARY KEY,
        {_text("user_id", required=True)},
        {_text("item_id", required=True)},
        {_text("type")},
        time timestamptz NOT NULL,
        weight double precision,
        {_text("campaign_id")},
        {_text("channel")},
        sequence bigint NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_events_sequence ON state_events (sequence)",
    "CREATE INDEX IF NOT EXISTS state_events_user ON state_events (user_id)",
    f"""CREATE TABLE IF NOT EXISTS state_customers (
        {_text("user_id", required=True)} PRIMARY KEY,
        risk_tolerance integer,
        marketing_consent boolean,
        sequence bigint NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_customers_sequence ON state_customers (sequence)",
    f"""CREATE TABLE IF NOT EXISTS state_products (
        {_text("item_id", required=True)} PRIMARY KEY,
        active boolean,
        risk_level integer,
        sequence bigint NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_products_sequence ON state_products (sequence)",
    f"""CREATE TABLE IF NOT EXISTS state_tombstones (
        {_text("subject", required=True)} PRIMARY KEY,
        sequence bigint NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS state_tombstones_sequence ON state_tombstones (sequence)",
    f"""CREATE TABLE IF NOT EXISTS state_receipts (
        {_text("receipt_id", required=True)} PRIMARY KEY,
        {_text("reference")},
        {_text("subject", required=True)},
        received_at timestamptz NOT NULL,
        effective_at timestamptz NOT NULL,
        sequence bigint NOT NULL,
        events_deleted integer NOT NULL,
        profile_deleted boolean NOT NULL,
        bundles_holding integer NOT NULL DEFAULT 0,
        complete boolean NOT NULL DEFAULT false,
        completed_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS state_receipts_subject ON state_receipts (subject)",
    "CREATE INDEX IF NOT EXISTS state_receipts_incomplete ON state_receipts (sequence)"
    " WHERE NOT complete",
)

_EVENT_COLUMNS = "event_id, user_id, item_id, type, time, weight, campaign_id, channel, sequence"
_RECEIPT_COLUMNS = (
    "receipt_id, reference, subject, received_at, effective_at, sequence,"
    " events_deleted, profile_deleted, bundles_holding, complete, completed_at"
)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc)


def _message(exc: psycopg.Error) -> str:
    # The primary message only: a constraint error's detail quotes the failing row.
    primary = exc.diag.message_primary if exc.diag else None
    text = primary or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"state store (PostgreSQL): {text}" + (f" [{exc.sqlstate}]" if exc.sqlstate else "")


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """The one place psycopg's exceptions become ours."""
    try:
        yield
    except psycopg.OperationalError as exc:  # unreachable, shut down, deadlock, cancelled
        raise StateUnavailable(_message(exc)) from exc
    except psycopg.Error as exc:
        raise StateError(_message(exc)) from exc


def _reusable(conn: Connection) -> bool:
    return not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _receipt(row: Sequence[Any]) -> Receipt:
    return Receipt(
        *(row[0], row[1], row[2], _utc(row[3]), _utc(row[4]), row[5]),
        *(row[6], row[7], row[8], row[9], None if row[10] is None else _utc(row[10])),
    )


class PostgresStore(StateStore):
    """The state store in a PostgreSQL database; see the module docstring.

    Args:
        url: A libpq connection URL (``postgresql://user@host:5432/db``).
        pseudonymize: Keyed pseudonyms of customer ids, for tombstones and receipts.
        connect_timeout: Seconds to wait for a connection.
        pool_size: Idle connections kept for reuse (besides one for LISTEN).
        poll_interval: Longest wait in ``wait_for_change`` without checking the
            sequence, should a notification be missed.
    """

    def __init__(
        self,
        url: str,
        pseudonymize: Callable[[str], str],
        *,
        connect_timeout: int = 10,
        pool_size: int = 8,
        poll_interval: float = 0.5,
    ) -> None:
        self._url = url
        self._pseudonymize = pseudonymize
        self._connect_timeout = connect_timeout
        self._poll_interval = poll_interval
        self._pool: Pool[Connection] = Pool(
            self._connect, psycopg.Connection.close, _reusable, pool_size
        )
        self._listen_lock = threading.Lock()
        self._listener: Connection | None = None
        try:
            self._set_up()
        except BaseException:
            self._pool.close()
            raise

    def _connect(self) -> Connection:
        conn = psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=self._connect_timeout,
            application_name="recsvc-state",
        )
        try:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is not None and row[0] == "off":
                conn.execute("SET synchronous_commit = on")
            # Writes rely on READ COMMITTED: after waiting for the sequence row's
            # lock, each statement sees what the previous holder committed.
            conn.execute("SET default_transaction_isolation = 'read committed'")
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_up(self) -> None:
        with _mapped_errors(), self._pool.connection() as conn:
            if self._schema_version(conn) is not None:
                return  # no DDL, so a role without CREATE rights may open it
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SET_UP_LOCK,))
                if self._schema_version(conn) is not None:
                    return  # another process created it meanwhile
                conn.execute(
                    "CREATE TABLE state_schema ("
                    " id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
                )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO state_schema VALUES (1, %s)", (SCHEMA_VERSION,))
                conn.execute("INSERT INTO state_sequence VALUES (1, 0)")

    @staticmethod
    def _schema_version(conn: Connection) -> int | None:
        """The schema's version (refusing any other than ours), or None if there is none."""
        exists = conn.execute("SELECT to_regclass('state_schema') IS NOT NULL").fetchone()
        if exists is None or not exists[0]:
            return None
        row = conn.execute("SELECT version FROM state_schema").fetchone()
        if row is None:
            return None
        if row[0] != SCHEMA_VERSION:
            raise StateError(
                f"state store (PostgreSQL): schema version {row[0]}, but this code"
                f" reads version {SCHEMA_VERSION} only; refusing to open it"
            )
        return int(row[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[Cursor, int]]:
        """A transaction holding the sequence row's lock, and the sequence committed before it.

        Under READ COMMITTED each later statement sees every commit made before
        the lock was granted.
        """
        with (
            _mapped_errors(),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.execute("SELECT value FROM state_sequence WHERE id = 1 FOR UPDATE")
            row = cur.fetchone()
            if row is None:
                raise StateError("state store (PostgreSQL): the sequence row is missing")
            yield cur, row[0]

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[Cursor, int]]:
        """A read-only transaction on one snapshot, and the sequence it sees."""
        with (
            _mapped_errors(),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute("SELECT value FROM state_sequence WHERE id = 1")
            row = cur.fetchone()
            if row is None:
                raise StateError("state store (PostgreSQL): the sequence row is missing")
            yield cur, row[0]

    def _bump(self, cur: Cursor, sequence: int) -> None:
        cur.execute("UPDATE state_sequence SET value = %s WHERE id = 1", (sequence,))
        self._notify(cur, sequence)

    @staticmethod
    def _notify(cur: Cursor, sequence: int) -> None:
        # Delivered at commit, and only if it commits.
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(sequence)))

    @staticmethod
    def _tombstoned(cur: Cursor, subjects: Iterable[str]) -> set[str]:
        cur.execute(
            "SELECT subject FROM state_tombstones WHERE subject = ANY(%s)", (list(set(subjects)),)
        )
        return {row[0] for row in cur}

    def record_events(self, events: Iterable[Event]) -> RecordResult:
        batch = _prepare.prepare_events(events, self._pseudonymize)
        if not batch.events:
            return RecordResult(0, (), 0, self.sequence())
        with self._write() as (cur, sequence):
            forgotten = self._tombstoned(cur, batch.subjects.values())
            cur.execute("SELECT event_id FROM state_events WHERE event_id = ANY(%s)", (batch.ids,))
            stored = {row[0] for row in cur}
            keep, duplicates, dropped = batch.classify(forgotten, stored)
            if keep:
                sequence += 1
                cur.executemany(
                    f"INSERT INTO state_events ({_EVENT_COLUMNS})"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            *(e.event_id, e.user_id, e.item_id, e.type, e.time, e.weight),
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
            cur.execute(
                "SELECT user_id, risk_tolerance, marketing_consent FROM state_customers"
                " WHERE user_id = ANY(%s)",
                (list({u.user_id for u in live}),),
            )
            stored = {row[0]: (row[1], row[2]) for row in cur}
            changed = _prepare.merge_fields(
                stored, ((u.user_id, (u.risk_tolerance, u.marketing_consent)) for u in live)
            )
            if changed:
                sequence += 1
                cur.executemany(
                    "INSERT INTO state_customers VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (user_id) DO UPDATE"
                    " SET risk_tolerance = excluded.risk_tolerance,"
                    " marketing_consent = excluded.marketing_consent, sequence = excluded.sequence",
                    [(key, *fields, sequence) for key, fields in changed.items()],
                )
                self._bump(cur, sequence)
        return UpdateResult(len(changed), sequence, len(checked) - len(live))

    def update_products(self, updates: Iterable[ProductUpdate]) -> UpdateResult:
        checked = _prepare.prepare_products(updates)
        if not checked:
            return UpdateResult(0, self.sequence())
        with self._write() as (cur, sequence):
            cur.execute(
                "SELECT item_id, active, risk_level FROM state_products WHERE item_id = ANY(%s)",
                (list({u.item_id for u in checked}),),
            )
            stored = {row[0]: (row[1], row[2]) for row in cur}
            changed = _prepare.merge_fields(
                stored, ((u.item_id, (u.active, u.risk_level)) for u in checked)
            )
            if changed:
                sequence += 1
                cur.executemany(
                    "INSERT INTO state_products VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (item_id) DO UPDATE"
                    " SET active = excluded.active, risk_level = excluded.risk_level,"
                    " sequence = excluded.sequence",
                    [(key, *fields, sequence) for key, fields in changed.items()],
                )
                self._bump(cur, sequence)
        return UpdateResult(len(changed), sequence)

    def forget(self, user_id: str, reference: str, received_at: datetime) -> Receipt:
        _prepare.check_text("user_id", user_id, required=True)
        _prepare.check_text("reference", reference, required=False)
        received = _prepare.check_time("received_at", received_at)
        subject = self._pseudonymize(user_id)
        receipt_id = _prepare.new_receipt_id()
        with self._write() as (cur, sequence):
            sequence += 1
            cur.execute("DELETE FROM state_events WHERE user_id = %s", (user_id,))
            events_deleted = cur.rowcount
            cur.execute("DELETE FROM state_customers WHERE user_id = %s", (user_id,))
            profile_deleted = cur.rowcount > 0
            cur.execute(
                "INSERT INTO state_tombstones VALUES (%s, %s)"
                " ON CONFLICT (subject) DO UPDATE SET sequence = excluded.sequence",
                (subject, sequence),
            )
            effective = datetime.now(timezone.utc)
            receipt = Receipt(
                *(receipt_id, reference, subject, received, effective, sequence),
                *(events_deleted, profile_deleted, 0, False, None),
            )
            cur.execute(
                f"INSERT INTO state_receipts ({_RECEIPT_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    *(receipt_id, reference, subject, received, effective, sequence),
                    *(events_deleted, profile_deleted, 0, False, None),
                ),
            )
            self._bump(cur, sequence)
        return receipt

    def receipt(self, receipt_id: str) -> Receipt | None:
        _prepare.check_text("receipt_id", receipt_id, required=True)
        with _mapped_errors(), self._pool.connection() as conn:
            row = conn.execute(
                f"SELECT {_RECEIPT_COLUMNS} FROM state_receipts WHERE receipt_id = %s",
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
        completed = _prepare.check_time("completed_at", completed_at)
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
                    "UPDATE state_receipts SET complete = true, completed_at = %s"
                    " WHERE NOT complete AND sequence <= %s",
                    (completed, limit),
                )
                return cur.rowcount
            cur.execute(
                "SELECT receipt_id, subject FROM state_receipts"
                " WHERE NOT complete AND sequence <= %s",
                (limit,),
            )
            rows = cur.fetchall()
            cur.executemany(
                "UPDATE state_receipts SET complete = true, completed_at = %s,"
                " bundles_holding = %s WHERE receipt_id = %s",
                [(completed, holding.get(subject, 0), rid) for rid, subject in rows],
            )
            return len(rows)

    def set_bundles_holding(self, subject: str, n: int) -> int:
        _prepare.check_text("subject", subject, required=True)
        count = _prepare.check_count("n", n)
        with self._write() as (cur, _):
            cur.execute(
                "UPDATE state_receipts SET bundles_holding = %s WHERE subject = %s",
                (count, subject),
            )
            return cur.rowcount

    def sequence(self) -> int:
        with _mapped_errors(), self._pool.connection() as conn:
            row = conn.execute("SELECT value FROM state_sequence WHERE id = 1").fetchone()
        if row is None:
            raise StateError("state store (PostgreSQL): the sequence row is missing")
        return int(row[0])

    def changes_since(self, after: int, upto: int | None = None) -> Changes:
        _prepare.check_after(after, upto)
        with self._read() as (cur, current):
            end = current if upto is None else min(upto, current)
            if end <= after:
                return Changes(after, (), (), (), ())
            window = (after, end)
            cur.execute(
                f"SELECT {_EVENT_COLUMNS} FROM state_events"
                " WHERE sequence > %s AND sequence <= %s ORDER BY sequence, event_id",
                window,
            )
            events = tuple(
                StoredEvent(*(e, u, i, t, _utc(at), w, c, ch), sequence=s)
                for e, u, i, t, at, w, c, ch, s in cur
            )
            cur.execute(
                "SELECT user_id, risk_tolerance, marketing_consent, sequence FROM state_customers"
                " WHERE sequence > %s AND sequence <= %s ORDER BY sequence, user_id",
                window,
            )
            customers = tuple(CustomerState(*row) for row in cur)
            cur.execute(
                "SELECT item_id, active, risk_level, sequence FROM state_products"
                " WHERE sequence > %s AND sequence <= %s ORDER BY sequence, item_id",
                window,
            )
            products = tuple(ProductState(*row) for row in cur)
            cur.execute(
                "SELECT subject FROM state_tombstones"
                " WHERE sequence > %s AND sequence <= %s ORDER BY sequence, subject",
                window,
            )
            erased = tuple(row[0] for row in cur)
        return Changes(end, events, customers, products, erased)

    def forgotten(self) -> frozenset[str]:
        with _mapped_errors(), self._pool.connection() as conn:
            rows = conn.execute("SELECT subject FROM state_tombstones").fetchall()
        return frozenset(row[0] for row in rows)

    def wait_for_change(self, after: int, timeout: float) -> int:
        deadline = time.monotonic() + max(0.0, timeout)
        current = self.sequence()
        if current > after or timeout <= 0:
            return current
        # One thread listens; any other waiter meanwhile just polls.
        if not self._listen_lock.acquire(blocking=False):
            return self._poll(after, deadline, self._poll_interval)
        try:
            return self._listen(after, deadline)
        finally:
            self._listen_lock.release()

    def _poll(self, after: int, deadline: float, interval: float) -> int:
        while True:
            current = self.sequence()
            remaining = deadline - time.monotonic()
            if current > after or remaining <= 0:
                return current
            time.sleep(min(interval, remaining))

    def _listen(self, after: int, deadline: float) -> int:
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._connect()
                self._listener.execute(f"LISTEN {CHANNEL}")
            listener = self._listener
        except psycopg.Error:
            self._drop_listener()
            return self._poll(after, deadline, self._poll_interval)
        while True:
            # Read after LISTEN is in force, so no commit slips between the two.
            current = self.sequence()
            remaining = deadline - time.monotonic()
            if current > after or remaining <= 0:
                return current
            try:
                for _ in listener.notifies(
                    timeout=min(remaining, self._poll_interval), stop_after=1
                ):
                    pass
            except psycopg.Error:
                self._drop_listener()
                return self._poll(after, deadline, self._poll_interval)

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()

    def close(self) -> None:
        self._pool.close()
        self._drop_listener()
