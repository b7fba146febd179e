"""Each backend beyond the shared contract: durability settings, wake-ups, erasure on disk."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from recsvc.state.postgres import PostgresStore
from recsvc.state.sqlite import SQLiteStore
from tests.postgres import Cluster
from tests.recsvc.state.conftest import PSEUDONYMIZE
from tests.recsvc.state.test_contract import ev

AT = datetime(2024, 5, 1, tzinfo=timezone.utc)


def test_sqlite_commits_wait_for_the_disk(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s.db", PSEUDONYMIZE) as store, store._pool.connection() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert conn.execute("PRAGMA secure_delete").fetchone() == (1,)


def test_sqlite_erasure_leaves_no_trace_in_the_database_file(tmp_path: Path) -> None:
    raw = b"CUST-8675309"
    with SQLiteStore(tmp_path / "s.db", PSEUDONYMIZE) as store:
        store.record_events([ev(f"x{i}", user_id=raw.decode()) for i in range(50)])
        store.record_events([ev(f"y{i}", user_id="other") for i in range(50)])
        with store._pool.connection() as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert raw in (tmp_path / "s.db").read_bytes()
        store.forget(raw.decode(), "ref", AT)
        assert raw not in (tmp_path / "s.db").read_bytes()  # zeroed and checkpointed
    # The last connection's checkpoint retires the WAL and its older frames.
    assert all(raw not in f.read_bytes() for f in tmp_path.iterdir())


def test_postgres_sessions_commit_synchronously_even_if_the_database_says_off(
    pg_cluster: Cluster,
) -> None:
    url = pg_cluster.new_database()
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET synchronous_commit = off")
    with PostgresStore(url, PSEUDONYMIZE) as store, store._pool.connection() as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)


def _write_soon(
    url: str, delay: float, committed: list[float], notify: bool = True
) -> threading.Thread:
    def write() -> None:
        time.sleep(delay)
        with PostgresStore(url, PSEUDONYMIZE) as writer:
            if not notify:
                writer._notify = lambda cur, sequence: None  # type: ignore[method-assign]
            writer.record_events([ev("late")])
            committed.append(time.monotonic())

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_postgres_notify_wakes_a_waiter_long_before_its_poll(pg_cluster: Cluster) -> None:
    url = pg_cluster.emptied()
    committed: list[float] = []
    with PostgresStore(url, PSEUDONYMIZE, poll_interval=30) as store:
        thread = _write_soon(url, 0.3, committed)
        try:
            assert store.wait_for_change(0, 20) == 1
            woke = time.monotonic()
        finally:
            thread.join()
    assert woke - committed[0] < 2  # far below the 30 s poll: the notification woke it


def test_postgres_a_missed_notification_costs_latency_not_the_change(pg_cluster: Cluster) -> None:
    url = pg_cluster.emptied()
    committed: list[float] = []
    with PostgresStore(url, PSEUDONYMIZE, poll_interval=0.2) as store:
        thread = _write_soon(url, 0.3, committed, notify=False)
        try:
            assert store.wait_for_change(0, 10) == 1
            woke = time.monotonic()
        finally:
            thread.join()
    assert woke - committed[0] < 2  # a poll found it


def test_postgres_two_waiting_threads_both_wake(pg_cluster: Cluster) -> None:
    url = pg_cluster.emptied()
    committed: list[float] = []
    results: list[int] = []
    with PostgresStore(url, PSEUDONYMIZE, poll_interval=0.2) as store:
        waiters = [
            threading.Thread(target=lambda: results.append(store.wait_for_change(0, 10)))
            for _ in range(2)
        ]
        for w in waiters:
            w.start()
        _write_soon(url, 0.3, committed).join()
        for w in waiters:
            w.join()
    assert results == [1, 1]


@pytest.mark.parametrize("keep", [0, 4])
def test_sqlite_many_threads_share_one_store(tmp_path: Path, keep: int) -> None:
    with SQLiteStore(tmp_path / "s.db", PSEUDONYMIZE) as store:
        store._pool._keep = keep  # 0: a fresh connection every call

        def write(t: int) -> None:
            for n in range(10):
                store.record_events([ev(f"t{t}-{n}")])

        threads = [threading.Thread(target=write, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.sequence() == 60 and len(store.snapshot(60).events) == 60
