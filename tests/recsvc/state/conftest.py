"""Backends for the state contract suite: a SQLite file, and a throwaway PostgreSQL cluster.

The cluster (``tests/postgres.py``) is started once a session. Each test gets an
empty database: the shared one with a new schema, or a new one where a test alters it.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from recsvc.logs import Pseudonymizer
from recsvc.state import StateStore, open_store
from tests.postgres import Cluster

PSEUDONYMIZE = Pseudonymizer(b"state-test-key")


@dataclass
class Backend:
    """One backend under test: a fresh store's URL, and raw access for inspection."""

    name: str
    url: str

    def open(self, pseudonymize: Callable[[str], str] = PSEUDONYMIZE) -> StateStore:
        return open_store(self.url, pseudonymize)

    def execute(self, sql: str) -> None:
        """Run one statement on a raw connection, committed."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                with conn:
                    conn.execute(sql)
            finally:
                conn.close()
        else:
            with psycopg.connect(self.url, autocommit=True) as pg:
                pg.execute(sql)

    def reset(self) -> None:
        """Empty every table and restart the sequence, as if newly created (cheaper)."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                query = "SELECT name FROM sqlite_master WHERE type = 'table'"
                with conn:
                    for (table,) in conn.execute(query).fetchall():
                        if table not in ("state_schema", "state_sequence"):
                            conn.execute(f"DELETE FROM {table}")
                    conn.execute("UPDATE state_sequence SET value = 0")
            finally:
                conn.close()
        else:
            with psycopg.connect(self.url, autocommit=True) as pg:
                query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                tables = [
                    t for (t,) in pg.execute(query) if t not in ("state_schema", "state_sequence")
                ]
                pg.execute(f"TRUNCATE {', '.join(tables)}")
                pg.execute("UPDATE state_sequence SET value = 0")

    def dump(self) -> str:
        """Every row of every table, as text."""
        lines: list[str] = []
        if self.name == "sqlite":
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                query = "SELECT name FROM sqlite_master WHERE type = 'table'"
                for (table,) in conn.execute(query).fetchall():
                    lines += [f"{table} {row!r}" for row in conn.execute(f"SELECT * FROM {table}")]
            finally:
                conn.close()
        else:
            with psycopg.connect(self.url) as pg:
                tables = pg.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
                for (table,) in tables:
                    lines += [f"{table} {row!r}" for row in pg.execute(f"SELECT * FROM {table}")]
        return "\n".join(lines)


@pytest.fixture(params=["sqlite", "postgres"])
def new_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Backend]:
    """Makes an empty backend of one kind: a new file, or the test database emptied.

    A PostgreSQL backend is valid until the next one is made.
    """
    names = itertools.count()
    if request.param == "sqlite":
        return lambda: Backend("sqlite", f"sqlite:///{tmp_path}/state-{next(names)}.db")
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    return lambda: Backend("postgres", cluster.emptied())


@pytest.fixture
def backend(new_backend: Callable[[], Backend]) -> Backend:
    return new_backend()


@pytest.fixture
def store(backend: Backend) -> Iterator[StateStore]:
    with backend.open() as opened:
        yield opened
