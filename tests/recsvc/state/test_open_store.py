"""open_store: URLs, schema set-up and refusal, reopening, closing."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.errors import StateError, StateUnavailable
from recsvc.state import SCHEMA_VERSION, Event, open_store, sqlite_path
from recsvc.state.postgres import PostgresStore
from recsvc.state.sqlite import SQLiteStore
from tests.postgres import Cluster, free_port
from tests.recsvc.state.conftest import PSEUDONYMIZE, Backend
from tests.recsvc.state.test_contract import ev


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///state.db", Path("state.db")),
        ("sqlite:///var/state/live.db", Path("var/state/live.db")),
        ("sqlite:////srv/recsvc/state.db", Path("/srv/recsvc/state.db")),
        ("SQLite:///a%20b.db", Path("a b.db")),
    ],
)
def test_sqlite_urls_name_a_file_as_sqlalchemy_reads_them(url: str, path: Path) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/state.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite:///dir/",
        "sqlite:///x.db?mode=ro",
    ],
)
def test_malformed_sqlite_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="SQLite state store URL"):
        open_store(url, PSEUDONYMIZE)


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("mysql://admin:s3cret@db/state", "'mysql'"),
        ("state.db", "'(none)'"),
        ("redis://x", "'redis'"),
    ],
)
def test_an_unknown_scheme_is_named_and_the_url_is_not_echoed(url: str, scheme: str) -> None:
    with pytest.raises(ValueError, match="unknown state store URL scheme") as caught:
        open_store(url, PSEUDONYMIZE)
    assert scheme in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_relative_sqlite_url_creates_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///var/state/live.db", PSEUDONYMIZE) as store:
        assert isinstance(store, SQLiteStore)
        store.record_events([ev("e1")])
    assert (tmp_path / "var" / "state" / "live.db").is_file()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_both_postgresql_schemes_open_a_postgres_store(pg_cluster: Cluster, scheme: str) -> None:
    url = pg_cluster.emptied().replace("postgresql://", f"{scheme}://", 1)
    with open_store(url, PSEUDONYMIZE) as store:
        assert isinstance(store, PostgresStore) and store.sequence() == 0


def test_an_unreachable_postgres_is_unavailable() -> None:
    url = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/state"
    with pytest.raises(StateUnavailable, match="PostgreSQL") as caught:
        open_store(url, PSEUDONYMIZE)
    assert "pw@" not in str(caught.value)


def test_a_reopened_store_keeps_its_data_and_schema_version(backend: Backend) -> None:
    with backend.open() as store:
        store.record_events([ev("e1")])
        store.forget("u9", "ref", ev("x").time)
    with backend.open() as store:
        assert store.sequence() == 2
        assert [e.event_id for e in store.snapshot(2).events] == ["e1"]
        assert store.forgotten() == {PSEUDONYMIZE("u9")}
    assert f"state_schema (1, {SCHEMA_VERSION})" in backend.dump()


def test_a_newer_schema_is_refused_and_left_alone(backend: Backend) -> None:
    with backend.open() as store:
        store.record_events([ev("e1")])
    backend.execute(f"UPDATE state_schema SET version = {SCHEMA_VERSION + 1}")
    before = backend.dump()
    with pytest.raises(StateError, match=f"schema version {SCHEMA_VERSION + 1}.*refusing"):
        backend.open()
    assert backend.dump() == before


def test_a_closed_store_says_so(backend: Backend) -> None:
    store = backend.open()
    store.close()
    with pytest.raises(StateError, match="closed"):
        store.record_events([Event("e1", "u1", "i1", "view", ev("x").time)])
    with pytest.raises(StateError, match="closed"):
        store.sequence()
