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
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.rows import TupleRow

import recsvc.state._sql as _sql
from recsvc.errors import StateError, StateUnavailable
from recsvc.state._pool import Pool

__all__ = ["CHANNEL", "PostgresStore"]

CHANNEL = "recsvc_state"
"""The LISTEN/NOTIFY channel; the payload is the committed sequence."""

# Serializes schema set-up between processes opening a fresh database at once.
_SET_UP_LOCK = 0x7265637376_5354

Connection = psycopg.Connection[TupleRow]
Cursor = psycopg.Cursor[TupleRow]


def _flag(column: str) -> str:
    return f"{column} boolean"


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


class PostgresStore(_sql.SQLStore):
    """The state store in a PostgreSQL database; see the module docstring.

    Args:
        url: A libpq connection URL (``postgresql://user@host:5432/db``).
        pseudonymize: Keyed pseudonyms of customer ids, for tombstones and receipts.
        connect_timeout: Seconds to wait for a connection.
        pool_size: Idle connections kept for reuse (besides one for LISTEN).
        poll_interval: Longest wait in ``wait_for_change`` without checking the
            sequence, should a notification be missed.
    """

    _NAME = "PostgreSQL"
    _PLACEHOLDER = "%s"
    _SCHEMA = _sql.schema(
        counter="bigint", moment="timestamptz", real="double precision", flag=_flag
    )
    _HAS_SCHEMA = "SELECT 1 WHERE to_regclass('state_schema') IS NOT NULL"

    def __init__(
        self,
        url: str,
        pseudonymize: Callable[[str], str],
        *,
        connect_timeout: int = 10,
        pool_size: int = 8,
        poll_interval: float = 0.5,
    ) -> None:
        super().__init__(pseudonymize, poll_interval)
        self._url = url
        self._connect_timeout = connect_timeout
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
        with self._cursor() as cur:
            if self._schema_version(cur) is not None:
                return  # no DDL, so a role without CREATE rights may open it
        try:
            with self._transaction() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SET_UP_LOCK,))
                if self._schema_version(cur) is None:  # not created meanwhile
                    self._create_schema(cur)
        except StateError:
            # Processes opening a fresh database at once: one may still see no schema
            # after the lock and collide with the one that made it (42P07). Its
            # transaction rolled back; if the schema is there now, that is success.
            with self._cursor() as cur:
                if self._schema_version(cur) is None:
                    raise

    @staticmethod
    def _store_time(moment: datetime) -> datetime:
        return moment

    @staticmethod
    def _load_time(stored: datetime) -> datetime:
        return stored.astimezone(timezone.utc)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Cursor]:
        with _mapped_errors(), self._pool.connection() as conn, conn.cursor() as cur:
            yield cur

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        with (
            _mapped_errors(),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            yield cur

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[Cursor, int]]:
        """See ``SQLStore._write``.

        Under READ COMMITTED each later statement sees every commit made before
        the sequence row's lock was granted.
        """
        with self._transaction() as cur:
            yield cur, self._current(cur, " FOR UPDATE")

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[Cursor, int]]:
        """See ``SQLStore._read``; read-only, on one snapshot."""
        with self._transaction() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield cur, self._current(cur)

    def _select_in(self, cur: _sql.Cursor, query: str, keys: Iterable[str]) -> list[Any]:
        cur.execute(query.format("= ANY(%s)"), (list(keys),))
        return cur.fetchall()

    def _bump(self, cur: _sql.Cursor, sequence: int) -> None:
        super()._bump(cur, sequence)
        # Delivered at commit, and only if it commits.
        cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(sequence)))

    def wait_for_change(self, after: int, timeout: float) -> int:
        deadline = time.monotonic() + max(0.0, timeout)
        current = self.sequence()
        if current > after or timeout <= 0:
            return current
        # One thread listens; any other waiter meanwhile just polls.
        if not self._listen_lock.acquire(blocking=False):
            return self._poll(after, deadline)
        try:
            return self._listen(after, deadline)
        finally:
            self._listen_lock.release()

    def _listen(self, after: int, deadline: float) -> int:
        try:
            if self._listener is None or self._listener.closed:
                self._listener = self._connect()
                self._listener.execute(f"LISTEN {CHANNEL}")
            listener = self._listener
        except psycopg.Error:
            self._drop_listener()
            return self._poll(after, deadline)
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
                return self._poll(after, deadline)

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()

    def close(self) -> None:
        self._pool.close()
        self._drop_listener()
