"""Write batches checked whole before anything is stored.

Each check names the entry and the field (``events[3].type: ...``), so a client can
fix its batch; a batch with one bad entry stores nothing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from recsvc.errors import InvalidArgument
from recsvc.model.rules import MAX_LEVEL, MIN_LEVEL
from recsvc.state.base import MAX_TEXT, CustomerUpdate, Event, ProductUpdate

__all__ = [
    "CONTACT_EVENTS",
    "MAX_BATCH",
    "STATE_EVENTS",
    "check_customers",
    "check_events",
    "check_products",
]

MAX_BATCH = 1000
"""Entries in one write call."""
CONTACT_EVENTS = frozenset({"contacted", "decline"})
"""Recorded for the contact policies; not interactions the model learns from."""
STATE_EVENTS = frozenset({"close"})
"""Changes what the customer holds; not an interaction either."""


def _check_size(field: str, n: int) -> None:
    if not 1 <= n <= MAX_BATCH:
        raise InvalidArgument(field, f"must hold 1 to {MAX_BATCH} entries, got {n}")


def _check_text(field: str, value: str, required: bool = True) -> None:
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_TEXT:
        raise InvalidArgument(field, f"must be at most {MAX_TEXT} characters, got {len(value)}")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL")


def _check_level(field: str, value: int | None) -> None:
    if value is not None and not MIN_LEVEL <= value <= MAX_LEVEL:
        raise InvalidArgument(field, f"must be between {MIN_LEVEL} and {MAX_LEVEL}, got {value}")


def check_events(events: Sequence[Event], types: Collection[str]) -> None:
    """Refuse the batch unless every event is well-formed and of a known type.

    Args:
        events: the batch.
        types: the event types this deployment knows (the model's weighted and held
            events, ``close``, ``decline`` and ``contacted``).
    """
    _check_size("events", len(events))
    for i, e in enumerate(events):
        at = f"events[{i}]"
        _check_text(f"{at}.event_id", e.event_id)
        _check_text(f"{at}.user_id", e.user_id)
        _check_text(f"{at}.item_id", e.item_id)
        _check_text(f"{at}.campaign_id", e.campaign_id, required=False)
        _check_text(f"{at}.channel", e.channel, required=False)
        if e.type not in types:
            known = ", ".join(sorted(types))
            raise InvalidArgument(
                f"{at}.type", f"unknown event type {e.type[:64]!r} (known: {known})"
            )
        if e.weight is not None and not (math.isfinite(e.weight) and e.weight >= 0):
            raise InvalidArgument(
                f"{at}.weight", f"must be finite and not negative, got {e.weight}"
            )


def check_customers(customers: Sequence[CustomerUpdate]) -> None:
    """Refuse the batch unless every update names a customer and valid values."""
    _check_size("customers", len(customers))
    for i, c in enumerate(customers):
        _check_text(f"customers[{i}].user_id", c.user_id)
        _check_level(f"customers[{i}].risk_tolerance", c.risk_tolerance)


def check_products(products: Sequence[ProductUpdate]) -> None:
    """Refuse the batch unless every update names a product and valid values."""
    _check_size("products", len(products))
    for i, p in enumerate(products):
        _check_text(f"products[{i}].item_id", p.item_id)
        _check_level(f"products[{i}].risk_level", p.risk_level)
