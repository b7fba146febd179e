"""Write batches are checked whole, and each refusal names the entry and the field."""

from __future__ import annotations

import math
from collections.abc import Callable
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


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"event_id": ""}, "events[1].event_id: is required"),
        ({"user_id": "u" * 129}, "events[1].user_id: must be at most 128 characters, got 129"),
        ({"item_id": "i\x00"}, "events[1].item_id: must not contain NUL"),
        ({"campaign_id": "c\x00"}, "events[1].campaign_id: must not contain NUL"),
        ({"channel": "c" * 129}, "events[1].channel: must be at most 128 characters, got 129"),
        (
            {"type": "teleport"},
            "events[1].type: unknown event type 'teleport' (known: close, purchase, view)",
        ),
        (
            {"type": "t" * 100},  # quoted to 64 characters: the client sent the rest
            f"events[1].type: unknown event type {'t' * 64!r} (known: close, purchase, view)",
        ),
        ({"weight": -0.5}, "events[1].weight: must be finite and not negative, got -0.5"),
        ({"weight": math.inf}, "events[1].weight: must be finite and not negative, got inf"),
    ],
)
def test_a_refusal_says_what_is_wrong_with_the_field(bad: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_events([_event(), _event(**bad)], TYPES)
    assert str(err.value) == message


def test_optional_texts_may_be_empty_and_every_text_may_be_128_characters() -> None:
    longest = "x" * 128
    check_events([_event(campaign_id="", channel="")], TYPES)
    check_events(
        [_event(event_id=longest, user_id=longest, item_id=longest, campaign_id=longest)], TYPES
    )
    check_customers([CustomerUpdate(longest)])
    check_products([ProductUpdate(longest)])


def test_a_weight_of_zero_or_below_one_is_accepted() -> None:
    check_events([_event(weight=0.0), _event(weight=0.5)], TYPES)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_events([], TYPES), "events: must hold 1 to 1000 entries, got 0"),
        (lambda: check_customers([]), "customers: must hold 1 to 1000 entries, got 0"),
        (
            lambda: check_products([ProductUpdate("i")] * 1001),
            "products: must hold 1 to 1000 entries, got 1001",
        ),
        (
            lambda: check_customers([CustomerUpdate("u"), CustomerUpdate("")]),
            "customers[1].user_id: is required",
        ),
        (
            lambda: check_customers([CustomerUpdate("u", 0)]),
            "customers[0].risk_tolerance: must be between 1 and 5, got 0",
        ),
        (
            lambda: check_products([ProductUpdate("i", risk_level=6)]),
            "products[0].risk_level: must be between 1 and 5, got 6",
        ),
    ],
)
def test_a_refused_update_batch_says_what_is_wrong(call: Callable[[], None], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        call()
    assert str(err.value) == message
