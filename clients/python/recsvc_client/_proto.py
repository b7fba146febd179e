"""The generated code, imported in one place, and the values it shares with Python.

The code is generated from ``proto/recsvc/v1`` when the package is built. Its proto
files keep the server's names (``recsvc/v1/*.proto``), so a process that also imports
the server's ``recsvc.v1`` registers each file once and both share the message
classes. Only files from two different revisions of the proto clash; that gets an
ImportError saying so instead of protobuf's bare "duplicate file name".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

try:
    from recsvc_client._v1 import (
        recommender_pb2,
        recommender_pb2_grpc,
        updates_pb2,
        updates_pb2_grpc,
    )
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("recsvc_client._v1"):
        raise
    raise ImportError(
        "recsvc_client has no generated code: install the package (pip install clients/python) "
        "rather than importing its source folder"
    ) from exc
except TypeError as exc:
    raise ImportError(
        f"recsvc_client and code already loaded in this process were built from different "
        f"revisions of proto/recsvc/v1 ({exc}); install the server and the client from "
        "one revision"
    ) from exc

__all__ = [
    "ids",
    "recommender_pb2",
    "recommender_pb2_grpc",
    "timestamp",
    "to_datetime",
    "updates_pb2",
    "updates_pb2_grpc",
]


def ids(values: Sequence[str], name: str) -> list[str]:
    """``values`` as a list, refusing one string (which would be sent as its characters)."""
    if isinstance(values, str):
        raise TypeError(f"{name}: a sequence of ids, not one string ({values!r})")
    return list(values)


def timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp for an aware datetime (a naive one has no defined instant)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"a naive datetime ({value.isoformat()}): give it a timezone")
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def to_datetime(message: Message, field: str) -> datetime | None:
    """The Timestamp ``field`` of ``message`` as an aware UTC datetime; None when unset."""
    if not message.HasField(field):
        return None
    ts: Timestamp = getattr(message, field)
    return ts.ToDatetime(timezone.utc)
