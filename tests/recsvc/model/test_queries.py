"""Request objects check every field and name the bad one."""

from __future__ import annotations

import pytest

from recsvc.errors import InvalidArgument
from recsvc.model.queries import RecommendQuery


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_id": "u", "k": 501}, "k"),
        ({"user_id": "u", "k": -1}, "k"),
        ({"user_id": "x" * 257}, "user_id"),
        ({"user_id": "bad\x00id"}, "user_id"),
        ({}, "user_id"),
        ({"user_id": "u", "exclude_item_ids": ("",)}, "exclude_item_ids[0]"),
        ({"user_id": "u", "recent_item_ids": ("a",) * 1001}, "recent_item_ids"),
    ],
)
def test_bad_queries_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        RecommendQuery(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_k_zero_means_ten() -> None:
    assert RecommendQuery(user_id="u", k=0).k == 10
