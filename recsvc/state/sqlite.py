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
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from recsvc.errors import StateError, StateUnavailable
from recsvc.state._pool import Pool
from recsvc.state._sql import Cursor, SQLStore, schema
from recsvc.state.base import Receipt

__all__ = ["SQLiteStore"]

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# SQLite before 3.32 allows 999 parameters a statement.
_CHUNK = 500


def _flag(column: str) -> str:
    return f"{column} INTEGER CHECK ({column} IN (0, 1))"


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """The one place sqlite3's exceptions become ours."""
    try:
        yield
    except sqlite3.OperationalError as exc:  # locked past the timeout, I/O, cannot open
        raise StateUnavailable(f"state store (SQLite): {exc}") from exc
    except sqlite3.Error as exc:
        raise StateError(f"state store (SQLite): {exc}") from exc


class SQLiteStore(SQLStore):
    """The state store in one SQLite file; see the module docstring.

    Args:
        path: The database file; its folder is created if missing.
        pseudonymize: Keyed pseudonyms of customer ids, for tombstones and receipts.
        busy_timeout: Seconds a call waits for another writer before
            ``StateUnavailable``.
        pool_size: Idle connections kept for reuse.
        poll_interval: Seconds between checks in ``wait_for_change``.
    """

    _NAME = "SQLite"
    _SCHEMA = schema(counter="INTEGER", moment="INTEGER", real="REAL", flag=_flag)
    _HAS_SCHEMA = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state_schema'"

    def __init__(
        self,
        path: str | Path,
        pseudonymize: Callable[[str], str],
        *,
        busy_timeout: float = 10.0,
        pool_size: int = 8,
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__(pseudonymize, poll_interval)
        self._path = Path(path)
        self._busy_timeout = busy_timeout
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
        with self._cursor() as cur:
            if self._schema_version(cur) is not None:
                return  # no writes, so a read-only file may be opened
            (mode,) = cur.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise StateError(f"state store (SQLite): cannot use WAL mode (got {mode!r})")
        with self._immediate() as cur:
            if self._schema_version(cur) is None:  # not created meanwhile
                self._create_schema(cur)

    @staticmethod
    def _store_time(moment: datetime) -> int:
        return (moment - _EPOCH) // _MICROSECOND

    @staticmethod
    def _load_time(stored: int) -> datetime:
        return _EPOCH + stored * _MICROSECOND

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[sqlite3.Cursor]:
        with _mapped_errors(), self._pool.connection() as conn:
            yield conn.cursor()

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[sqlite3.Cursor]:
        """A transaction holding SQLite's write lock."""
        with self._cursor() as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if cur.connection.in_transaction:
                    cur.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Cursor, int]]:
        with self._immediate() as cur:
            yield cur, self._current(cur)

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Cursor, int]]:
        with self._cursor() as cur:
            cur.execute("BEGIN")
            try:
                yield cur, self._current(cur)
            finally:
                cur.execute("COMMIT")

    def _select_in(self, cur: Cursor, query: str, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        rows: list[Any] = []
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows += cur.execute(query.format(f"IN ({marks})"), chunk).fetchall()
        return rows

    def forget(self, user_id: str, reference: str, received_at: datetime) -> Receipt:
        receipt = super().forget(user_id, reference, received_at)
        # Move the zeroed pages into the main file now; never wait for readers to do it.
        with contextlib.suppress(StateError), self._cursor() as cur:
            cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return receipt

    def wait_for_change(self, after: int, timeout: float) -> int:
        # Reading one row of a WAL database costs microseconds: polling is cheap here.
        return self._poll(after, time.monotonic() + max(0.0, timeout))

    def close(self) -> None:
        self._pool.close()
