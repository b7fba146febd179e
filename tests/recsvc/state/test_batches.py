"""Write batches are checked whole, and each refusal names the entry and the field."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from recsvc.errors import InvalidArgument
from recsvc.state import CustomerUpdate, Event, ProductUpdate
from recsvc.state.batches import MAX_BATCH, check_customers, check_events, check_products

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
TYPES = frozenset({"view", "purchase", "close"})


def _event(**kw: object) -> Event:
    base: dict[str, object] = {
        "event_id": "e",
        "user_id": "u",
        "item_id": "i",
        "type": "view",
        "time": NOW,
    }
    return Event(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"event_id": ""}, "events[1].event_id"),
        ({"user_id": ""}, "events[1].user_id"),
        ({"item_id": "x" * 129}, "events[1].item_id"),
        ({"type": "teleport"}, "events[1].type"),
        ({"weight": -1.0}, "events[1].weight"),
        ({"weight": math.nan}, "events[1].weight"),
        ({"channel": "e\x00mail"}, "events[1].channel"),
    ],
)
def test_a_bad_event_is_named_by_entry_and_field(bad: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_events([_event(), _event(**bad)], TYPES)
    assert err.value.field == field


def test_batch_sizes() -> None:
    check_events([_event()] * MAX_BATCH, TYPES)
    for n in (0, MAX_BATCH + 1):
        with pytest.raises(InvalidArgument) as err:
            check_events([_event()] * n, TYPES)
        assert err.value.field == "events"


def test_levels_are_one_to_five() -> None:
    check_customers([CustomerUpdate("u", 1), CustomerUpdate("v", 5, False)])
    check_products([ProductUpdate("i", True, 3)])
    with pytest.raises(InvalidArgument) as err:
        check_customers([CustomerUpdate("u", 1), CustomerUpdate("v", 6)])
    assert err.value.field == "customers[1].risk_tolerance"
    with pytest.raises(InvalidArgument) as err:
        check_products([ProductUpdate("i", risk_level=0)])
    assert err.value.field == "products[0].risk_level"
    with pytest.raises(InvalidArgument) as err:
        check_products([ProductUpdate("")])
    assert err.value.field == "products[0].item_id"
