"""The live customer state store: events, profiles, products and erasures, by sequence.

``open_store(url, pseudonymize)`` picks the backend from the URL; the rest of recsvc
depends only on ``StateStore`` and the records (``recsvc.state.base`` states the
contract). The database is the truth: writers commit first, then tell; readers
catch up with ``changes_since(after)`` and wait with ``wait_for_change``.

Example::

    store = open_store("sqlite:////var/lib/recsvc/state.db", Pseudonymizer(key))
    result = store.record_events(events)  # durable once it returns
    changes = store.changes_since(position)  # then position = changes.sequence
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

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

__all__ = [
    "MAX_TEXT",
    "SCHEMA_VERSION",
    "Changes",
    "CustomerState",
    "CustomerUpdate",
    "Event",
    "ProductState",
    "ProductUpdate",
    "Receipt",
    "RecordResult",
    "StateStore",
    "StoredEvent",
    "UpdateResult",
    "open_store",
    "sqlite_path",
]


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:`` URL names, as SQLAlchemy reads them.

    ``sqlite:///state.db`` is relative to the working directory and
    ``sqlite:////var/lib/recsvc/state.db`` absolute (the path is what follows
    the third slash). Percent-escapes are decoded.

    Raises:
        ValueError: The URL names a host, a query, no file, or an in-memory database.
    """
    parts = urlsplit(url)
    if url[: len("sqlite:///")].lower() != "sqlite:///":
        raise ValueError("a SQLite state store URL starts sqlite:/// (then the path)")
    if parts.query or parts.fragment:
        raise ValueError("a SQLite state store URL takes no query or fragment")
    path = unquote(url[len("sqlite:///") :].split("?", 1)[0].split("#", 1)[0])
    if not path or path.endswith("/") or path == ":memory:":
        raise ValueError("a SQLite state store URL must name a file (not memory, not a folder)")
    return Path(path)


def open_store(url: str, pseudonymize: Callable[[str], str]) -> StateStore:
    """Open (creating the schema if missing) the store a URL names.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, or a
            PostgreSQL URL (``postgresql://`` or ``postgres://``).
        pseudonymize: Keyed pseudonyms for customer ids (``recsvc.logs.Pseudonymizer``);
            erasure tombstones and receipts hold only these, so keep the key stable.

    Raises:
        ValueError: The URL's scheme is unknown, or a SQLite URL is malformed.
        StateError: The store holds a schema this code does not read.
        StateUnavailable: The store cannot be reached.
    """
    # Never echo the URL: a PostgreSQL one may carry a password.
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        from recsvc.state.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url), pseudonymize)
    if scheme in ("postgresql", "postgres"):
        from recsvc.state.postgres import PostgresStore

        return PostgresStore(url, pseudonymize)
    raise ValueError(
        f"unknown state store URL scheme {scheme or '(none)'!r}:"
        " use sqlite:///PATH, postgresql:// or postgres://"
    )
