"""The contact policy: its file, its defaults, and its rules over flat histories."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsvc.errors import PreconditionFailed
from recsvc.model.contact import (
    DEFAULT_POLICY,
    ContactHistory,
    ContactPolicy,
    declined_within_cooldown,
    load_policy,
    parse_policy,
)
from recsvc.model.rules import Categories

NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
# Rows 0, 1: credit_card; 2: savings_account; 3: no category.
CATEGORIES = Categories.from_table(
    pa.table({"category": ["credit_card", "credit_card", "savings_account", None]})
)


def _ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data))
    return path


def test_no_file_means_the_documented_defaults() -> None:
    assert load_policy(None) is DEFAULT_POLICY
    p = DEFAULT_POLICY
    assert (p.window_days, p.max_all_channels, p.decline_cooldown_days) == (7, 4, 30)
    assert dict(p.max_per_channel) == {"email": 2, "sms": 1, "push": 2, "call": 1}
    credit = {"credit_card", "personal_loan", "car_loan", "mortgage"}
    assert {c: 60 for c in credit} == dict(p.decline_cooldown_days_by_category)
    assert p.never_together == ()


def test_a_file_sets_its_keys_and_keeps_the_defaults_of_the_rest(tmp_path: Path) -> None:
    data = {
        "window_days": 14,
        "max_per_channel": {"email": 3},
        "decline_cooldown_days_by_category": {"mortgage": 90},
        "never_together": [["mortgage", "credit_card"]],
    }
    p = load_policy(_write(tmp_path, data))
    assert p.window_days == 14 and dict(p.max_per_channel) == {"email": 3}
    assert dict(p.decline_cooldown_days_by_category) == {"mortgage": 90}
    assert p.never_together == (("mortgage", "credit_card"),)
    assert p.max_all_channels == 4 and p.decline_cooldown_days == 30


def test_every_key_at_its_limits_is_read(tmp_path: Path) -> None:
    """Each number at the edges of its range, in a file: read as written."""
    for low in (True, False):
        data = {
            "window_days": 1 if low else 365,
            "max_all_channels": 0 if low else 365,
            "max_per_channel": {"email": 0 if low else 365},
            "decline_cooldown_days": 0 if low else 365,
            "decline_cooldown_days_by_category": {"loan": 0 if low else 365},
            "never_together": [],
        }
        p = load_policy(_write(tmp_path, data))
        assert (p.window_days, p.max_all_channels, p.decline_cooldown_days) == (
            data["window_days"],
            data["max_all_channels"],
            data["decline_cooldown_days"],
        ), low
        assert dict(p.max_per_channel) == data["max_per_channel"]
        assert (
            dict(p.decline_cooldown_days_by_category) == data["decline_cooldown_days_by_category"]
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"window": 7},
            "unknown key 'window' (known: window_days, max_per_channel, max_all_channels, "
            "decline_cooldown_days, decline_cooldown_days_by_category, never_together)",
        ),
        ({"window_days": 366}, "window_days must be a whole number 1..365"),
        ({"max_all_channels": 1.0}, "max_all_channels must be a whole number 0..365"),
        ({"decline_cooldown_days": -1}, "decline_cooldown_days must be a whole number 0..365"),
        ({"max_per_channel": {"": 1}}, "max_per_channel[''] must be a whole number 0..365"),
        ({"max_per_channel": {"sms": 366}}, "max_per_channel['sms'] must be a whole number 0..365"),
        ({"max_per_channel": "sms"}, "max_per_channel must map names to whole numbers"),
        (
            {"decline_cooldown_days_by_category": {"loan": True}},
            "decline_cooldown_days_by_category['loan'] must be a whole number 0..365",
        ),
        ({"never_together": [["mortgage", ""]]}, "never_together must be a list of category pairs"),
    ],
)
def test_a_bad_key_is_refused_naming_the_file_and_the_rule(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"window": 7}, "unknown key 'window'"),
        ({"window_days": "7"}, "window_days"),
        ({"window_days": 0}, "window_days"),
        ({"window_days": True}, "window_days"),
        ({"max_all_channels": -1}, "max_all_channels"),
        ({"decline_cooldown_days": 400}, "decline_cooldown_days"),
        ({"max_per_channel": {"email": -1}}, "max_per_channel['email']"),
        ({"max_per_channel": [2]}, "max_per_channel"),
        ({"decline_cooldown_days_by_category": {"loan": 1.5}}, "['loan']"),
        ({"never_together": [["mortgage"]]}, "never_together"),
        ({"never_together": "mortgage,credit_card"}, "never_together"),
    ],
)
def test_a_bad_key_is_named(data: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(data, "policy.json")


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        load_policy(bad)
    with pytest.raises(ValueError, match="an object of keys"):
        load_policy(_write(tmp_path, [1]))
    with pytest.raises(ValueError, match="missing.json"):
        load_policy(tmp_path / "missing.json")


def test_categories_kept_apart_are_refused_together_naming_the_pair() -> None:
    p = ContactPolicy(never_together=(("mortgage", "credit_card"),))
    p.check_together({"mortgage", "etf"})
    with pytest.raises(PreconditionFailed, match="'mortgage' and 'credit_card'"):
        p.check_together({"credit_card", "mortgage"})


def test_caps_count_contacts_within_the_window_per_channel_and_across() -> None:
    policy = ContactPolicy(
        window_days=7, max_per_channel={"email": 2, "sms": 1}, max_all_channels=3
    )
    history = ContactHistory.build(
        [
            [(_ago(1), "email"), (_ago(2), "email")],  # 0: email capped
            [(_ago(1), "email"), (_ago(8), "email")],  # 1: one inside the window
            [(_ago(1), "sms"), (_ago(2), "push"), (_ago(3), "call")],  # 2: 3 in all
            [(_ago(1), "push"), (NOW + timedelta(hours=1), "sms")],  # 3: one dated ahead
        ],
        [{}, {}, {}, {}],
    )
    assert history.capped(4, policy, "email", NOW).tolist() == [True, False, True, False]
    assert history.capped(4, policy, "sms", NOW).tolist() == [False, False, True, True]
    assert history.capped(4, policy, "", NOW).tolist() == [False, False, True, False]
    assert history.capped(4, policy, "letter", NOW).tolist() == [False, False, True, False]


def test_a_decline_closes_its_category_for_the_category_cooldown() -> None:
    policy = ContactPolicy(
        decline_cooldown_days=30, decline_cooldown_days_by_category={"credit_card": 60}
    )
    history = ContactHistory.build(
        [(), (), (), ()],
        [{0: _ago(45)}, {2: _ago(45)}, {3: _ago(10)}, {1: _ago(61)}],
    )
    cards, savings, uncategorised = np.array([1]), np.array([2]), np.array([3])
    assert history.cooling(4, policy, CATEGORIES, cards, NOW).tolist() == [True] + [False] * 3
    assert not history.cooling(4, policy, CATEGORIES, savings, NOW).any()  # 45 > 30 days
    assert history.cooling(4, policy, CATEGORIES, uncategorised, NOW).tolist() == [
        False,
        False,
        True,
        False,
    ]
    # A product without a category closes itself alone, not every uncategorised one.
    other = Categories(np.array([0, 0, 1, -1, -1], dtype=np.int32), CATEGORIES.names)
    history5 = ContactHistory.build([()], [{3: _ago(1)}])
    assert not history5.cooling(1, policy, other, np.array([4]), NOW).any()


def test_the_window_and_the_cooldown_end_exactly_at_their_length() -> None:
    """A contact exactly a window ago, a decline exactly a cooldown ago: no longer counted."""
    policy = ContactPolicy(window_days=7, max_all_channels=1, decline_cooldown_days=30)
    week, month = timedelta(days=7), timedelta(days=30)
    history = ContactHistory.build(
        [[(NOW - week, "email")], [(NOW - week + timedelta(seconds=1), "email")]],
        [{2: NOW - month}, {2: NOW - month + timedelta(seconds=1)}],
    )
    assert history.capped(2, policy, "", NOW).tolist() == [False, True]
    assert history.cooling(2, policy, CATEGORIES, np.array([2]), NOW).tolist() == [False, True]


def test_no_declines_close_nothing() -> None:
    codes, rows = declined_within_cooldown(DEFAULT_POLICY, CATEGORIES, {}, NOW)
    assert codes == () and rows.dtype == np.int64 and rows.size == 0
    codes, rows = declined_within_cooldown(DEFAULT_POLICY, CATEGORIES, {3: _ago(1)}, NOW)
    assert codes == () and rows.tolist() == [3]


def test_a_policy_from_no_file_is_named_so() -> None:
    with pytest.raises(ValueError) as err:
        parse_policy({"window_days": 0})
    assert str(err.value) == "contact policy: window_days must be a whole number 1..365"


def test_recommend_closes_the_declined_categories_and_uncategorised_products() -> None:
    policy = ContactPolicy(
        decline_cooldown_days=30, decline_cooldown_days_by_category={"credit_card": 60}
    )
    codes, rows = declined_within_cooldown(
        policy, CATEGORIES, {0: _ago(45), 2: _ago(45), 3: _ago(1)}, NOW
    )
    assert codes == (CATEGORIES.codes_of(["credit_card"])[0],)
    assert rows.tolist() == [3]
    assert declined_within_cooldown(policy, CATEGORIES, {}, NOW)[0] == ()
