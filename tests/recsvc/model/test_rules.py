"""The rules over small tables whose answers are plain by construction: nulls, missing
columns and out-of-range levels each have one defined meaning."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsvc.model.rules import (
    ItemRules,
    consent_mask,
    item_active,
    item_risk,
    suitable_users,
    user_tolerance,
)

ITEMS = pa.table(
    {
        "item_id": ["a", "b", "c", "d", "e"],
        "risk_level": pa.array([1, 3, None, 5, 2], pa.int64()),
        "active": pa.array([True, False, True, None, True]),
    }
)
USERS = pa.table(
    {
        "user_id": ["u", "v", "w", "x", "y"],
        "risk_tolerance": pa.array([1, 4, None, 9, 0], pa.int64()),
        "marketing_consent": pa.array([True, False, None, True, False]),
    }
)


def test_item_risk_reads_levels_and_a_null_is_the_highest() -> None:
    np.testing.assert_array_equal(item_risk(ITEMS, True), [1, 3, 5, 5, 2])
    assert item_risk(ITEMS, True).dtype == np.int8


def test_item_risk_is_lowest_everywhere_when_the_rule_is_off_or_there_are_no_levels() -> None:
    np.testing.assert_array_equal(item_risk(ITEMS, False), [1] * 5)
    np.testing.assert_array_equal(item_risk(ITEMS.drop_columns(["risk_level"]), True), [1] * 5)
    assert item_risk(ITEMS, False).dtype == np.int8


def test_item_active_a_null_flag_is_inactive_and_no_column_is_all_active() -> None:
    np.testing.assert_array_equal(item_active(ITEMS), [True, False, True, False, True])
    assert item_active(ITEMS).dtype == bool  # a null is False, not None
    np.testing.assert_array_equal(item_active(ITEMS.drop_columns(["active"])), [True] * 5)
    # bool, not ones of another dtype: the rules combine the flags with ``&``.
    assert item_active(ITEMS.drop_columns(["active"])).dtype == bool


def test_user_tolerance_a_null_is_lowest_and_levels_are_clipped_to_one_to_five() -> None:
    np.testing.assert_array_equal(user_tolerance(USERS), [1, 4, 1, 5, 1])
    no_column = USERS.drop_columns(["risk_tolerance"])
    np.testing.assert_array_equal(user_tolerance(no_column), [1] * 5)
    assert user_tolerance(no_column).dtype == user_tolerance(USERS).dtype == np.int8


def test_consent_only_an_explicit_true_counts() -> None:
    np.testing.assert_array_equal(consent_mask(USERS), [True, False, False, True, False])
    assert consent_mask(USERS).dtype == bool  # a null is False, not None


def test_consent_a_users_table_without_the_column_means_nobody_consents() -> None:
    assert not consent_mask(USERS.drop_columns(["marketing_consent"])).any()
    assert len(consent_mask(USERS.drop_columns(["marketing_consent"]))) == 5


def test_suitable_users_admit_a_risk_up_to_their_tolerance() -> None:
    tolerance = np.array([1, 2, 3, 4, 5], dtype=np.int8)
    np.testing.assert_array_equal(suitable_users(tolerance, 3), [False, False, True, True, True])


@given(
    st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=40),
    st.integers(-2, 8),
    st.lists(st.integers(0, 39), max_size=6),
)
def test_item_rules_allow_exactly_the_active_suitable_unexcluded_items(
    items: list[tuple[int, bool]], tolerance: int, exclude: list[int]
) -> None:
    risk = np.array([r for r, _ in items], dtype=np.int8)
    active = np.array([a for _, a in items])
    rules = ItemRules.build(risk, active, suitability=True)
    t = min(max(tolerance, 1), 5)  # tolerance outside 1..5 counts as its nearest level
    drop = np.array([e for e in exclude if e < len(items)], dtype=np.int64)
    expected = active & (risk <= t)
    np.testing.assert_array_equal(rules.allowed(tolerance).mask(), expected)
    expected[drop] = False
    np.testing.assert_array_equal(rules.allowed(tolerance, drop).mask(), expected)
    rows = np.arange(len(items))
    np.testing.assert_array_equal(rules.eligible(rows, t), active & (risk <= t))


@pytest.mark.parametrize("suitability", [True, False])
def test_item_rules_from_a_table(suitability: bool) -> None:
    rules = ItemRules.from_table(ITEMS, suitability)
    assert rules.suitability is suitability
    lowest = [True, False, not suitability, False, not suitability]
    np.testing.assert_array_equal(rules.allowed(1).mask(), lowest)
    np.testing.assert_array_equal(rules.allowed(5).mask(), [True, False, True, False, True])
