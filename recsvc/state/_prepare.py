"""Checks and batch logic shared by the backends, so that both keep one contract.

Everything here runs before or between SQL statements and knows no SQL: the
backends read what a batch touches under their write lock, hand it here, and
write what comes back.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from recsvc.errors import InvalidArgument
from recsvc.state.base import MAX_TEXT, CustomerUpdate, Event, ProductUpdate

__all__ = [
    "EventBatch",
    "check_after",
    "check_count",
    "check_text",
    "check_time",
    "merge_fields",
    "new_receipt_id",
    "prepare_customers",
    "prepare_events",
    "prepare_products",
]

_INT32 = 2**31


def check_text(field: str, value: object, *, required: bool) -> str:
    """A string the store can hold in any backend; never echoes the value (it may be PII)."""
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a string, not {type(value).__name__}")
    if required and not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_TEXT:
        raise InvalidArgument(field, f"is {len(value)} characters long, over {MAX_TEXT}")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(field, "is not valid Unicode (a lone surrogate)") from None
    return value


def check_time(field: str, value: object) -> datetime:
    """A timezone-aware datetime, converted to UTC."""
    if not isinstance(value, datetime):
        raise InvalidArgument(field, f"must be a datetime, not {type(value).__name__}")
    if value.utcoffset() is None:
        raise InvalidArgument(field, "must be timezone-aware")
    return value.astimezone(timezone.utc)


def check_count(field: str, value: object) -> int:
    """A non-negative 32-bit integer."""
    number = _check_int(field, value)
    if number is None or number < 0:
        raise InvalidArgument(field, "must be a non-negative integer")
    return number


def check_after(after: object, upto: object) -> None:
    """The bounds of a ``changes_since`` window."""
    if not isinstance(after, int) or after < 0:
        raise ValueError(f"after must be a non-negative integer, not {after!r}")
    if upto is not None and (not isinstance(upto, int) or upto < after):
        raise ValueError(f"upto must be an integer at least after ({after}), not {upto!r}")


def _check_int(field: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(field, f"must be an integer, not {type(value).__name__}")
    if not -_INT32 <= value < _INT32:
        raise InvalidArgument(field, "must fit in 32 bits")
    return value


def _check_bool(field: str, value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(field, f"must be a bool, not {type(value).__name__}")
    return value


def _check_weight(field: str, value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidArgument(field, f"must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be finite")
    return float(value)


def _check_event(where: str, event: Event) -> Event:
    for name in ("event_id", "user_id", "item_id"):
        check_text(f"{where}.{name}", getattr(event, name), required=True)
    for name in ("type", "campaign_id", "channel"):
        check_text(f"{where}.{name}", getattr(event, name), required=False)
    return replace(
        event,
        time=check_time(f"{where}.time", event.time),
        weight=_check_weight(f"{where}.weight", event.weight),
    )


@dataclass(frozen=True)
class EventBatch:
    """A checked batch of events (times in UTC), with each customer's pseudonym."""

    events: tuple[Event, ...]
    subjects: Mapping[str, str]
    """user_id -> pseudonym, for every customer in the batch."""

    @property
    def ids(self) -> list[str]:
        return list(dict.fromkeys(e.event_id for e in self.events))

    def classify(
        self, forgotten: Collection[str], stored: Collection[str]
    ) -> tuple[list[Event], tuple[str, ...], int]:
        """Split into (to store, duplicate ids, dropped count), given the erased
        pseudonyms and the already stored ids among this batch's."""
        keep: list[Event] = []
        duplicates: list[str] = []
        dropped = 0
        seen = set(stored)
        for event in self.events:
            if self.subjects[event.user_id] in forgotten:
                dropped += 1
            elif event.event_id in seen:
                duplicates.append(event.event_id)
            else:
                seen.add(event.event_id)
                keep.append(event)
        return keep, tuple(duplicates), dropped


def prepare_events(events: Iterable[Event], pseudonymize: Callable[[str], str]) -> EventBatch:
    checked = tuple(_check_event(f"events[{i}]", e) for i, e in enumerate(events))
    users = dict.fromkeys(e.user_id for e in checked)
    return EventBatch(checked, {u: pseudonymize(u) for u in users})


def prepare_customers(
    updates: Iterable[CustomerUpdate], pseudonymize: Callable[[str], str]
) -> tuple[list[CustomerUpdate], dict[str, str]]:
    """The checked updates, and user_id -> pseudonym for each customer."""
    checked = []
    for i, u in enumerate(updates):
        where = f"customers[{i}]"
        check_text(f"{where}.user_id", u.user_id, required=True)
        _check_int(f"{where}.risk_tolerance", u.risk_tolerance)
        _check_bool(f"{where}.marketing_consent", u.marketing_consent)
        checked.append(u)
    users = dict.fromkeys(u.user_id for u in checked)
    return checked, {u: pseudonymize(u) for u in users}


def prepare_products(updates: Iterable[ProductUpdate]) -> list[ProductUpdate]:
    checked = []
    for i, u in enumerate(updates):
        where = f"products[{i}]"
        check_text(f"{where}.item_id", u.item_id, required=True)
        _check_bool(f"{where}.active", u.active)
        _check_int(f"{where}.risk_level", u.risk_level)
        checked.append(u)
    return checked


def merge_fields(
    stored: Mapping[str, tuple[Any, ...]], updates: Iterable[tuple[str, tuple[Any, ...]]]
) -> dict[str, tuple[Any, ...]]:
    """Fold updates (``None`` keeps a field) into stored rows, in order.

    Args:
        stored: The current fields of every stored row the updates touch.
        updates: (key, fields) pairs; all field tuples have one length.

    Returns:
        key -> merged fields, for the rows that end up different from ``stored``
        (a row never stored counts as all ``None``).
    """
    merged: dict[str, tuple[Any, ...]] = {}
    for key, fields in updates:
        old = merged.get(key) or stored.get(key) or (None,) * len(fields)
        merged[key] = tuple(o if f is None else f for o, f in zip(old, fields, strict=True))
    return {
        key: fields
        for key, fields in merged.items()
        if fields != stored.get(key, (None,) * len(fields))
    }


def new_receipt_id() -> str:
    """``r_`` and 32 random hex digits: unguessable, so a receipt id is not an index."""
    return "r_" + secrets.token_hex(16)
