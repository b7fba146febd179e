"""Requests as validated domain objects: every bad field is named.

The gRPC edge builds these from protobuf; evaluation builds them directly, so
both paths run the same checks and the same ranking code.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from recsvc.errors import InvalidArgument

__all__ = [
    "DEFAULT_K",
    "MAX_AUDIENCE",
    "MAX_ID_LENGTH",
    "MAX_K",
    "MAX_LIST",
    "MAX_RANK_CANDIDATES",
    "RankQuery",
    "RecommendQuery",
    "SimilarQuery",
    "TargetQuery",
    "check_audience_size",
    "check_id",
    "check_ids",
    "check_k",
]

DEFAULT_K, MAX_K = 10, 500
MAX_ID_LENGTH = 256
MAX_LIST = 1000
MAX_RANK_CANDIDATES = 500
MAX_AUDIENCE = 10_000_000


def check_id(value: str, field_name: str, required: bool = True) -> str:
    """An id: non-empty (if required), at most 256 characters, no control characters."""
    if not value:
        if required:
            raise InvalidArgument(field_name, "must not be empty")
        return value
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(field_name, f"longer than {MAX_ID_LENGTH} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise InvalidArgument(field_name, "contains control characters")
    return value


def check_audience_size(size: int) -> int:
    """``size`` if it is a valid audience size (1..MAX_AUDIENCE), else InvalidArgument."""
    if not 1 <= size <= MAX_AUDIENCE:
        message = f"must be between 1 and {MAX_AUDIENCE:,}, got {size}"
        raise InvalidArgument("audience_size", message)
    return size


def check_ids(values: Sequence[str], field_name: str, limit: int = MAX_LIST) -> tuple[str, ...]:
    if len(values) > limit:
        raise InvalidArgument(field_name, f"has {len(values)} entries, at most {limit} allowed")
    for i, v in enumerate(values):
        check_id(v, f"{field_name}[{i}]")
    return tuple(values)


def check_k(k: int) -> int:
    if k == 0:
        return DEFAULT_K
    if not 1 <= k <= MAX_K:
        raise InvalidArgument("k", f"must be between 1 and {MAX_K} (0 means {DEFAULT_K}), got {k}")
    return k


@dataclass(frozen=True)
class RecommendQuery:
    """Example: ``RecommendQuery(user_id="C00000042", k=5, recent_item_ids=("CC-000003",))``."""

    user_id: str = ""
    k: int = DEFAULT_K
    exclude_item_ids: tuple[str, ...] = ()
    recent_item_ids: tuple[str, ...] = ()
    explain: bool = False
    include_interacted: bool = False
    max_per_category: int = 0
    """At most this many products of any one category; 0: no cap."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_k(self.k))
        if not 0 <= self.max_per_category <= MAX_K:
            message = f"must be between 0 and {MAX_K} (0 means no cap), got {self.max_per_category}"
            raise InvalidArgument("max_per_category", message)
        check_id(self.user_id, "user_id", required=False)
        check_ids(self.exclude_item_ids, "exclude_item_ids")
        check_ids(self.recent_item_ids, "recent_item_ids")
        if not self.user_id and not self.recent_item_ids:
            raise InvalidArgument("user_id", "give a user_id or recent_item_ids")


@dataclass(frozen=True)
class SimilarQuery:
    item_id: str
    k: int = DEFAULT_K
    user_id: str = ""
    exclude_item_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.item_id, "item_id")
        object.__setattr__(self, "k", check_k(self.k))
        check_id(self.user_id, "user_id", required=False)
        check_ids(self.exclude_item_ids, "exclude_item_ids")


@dataclass(frozen=True)
class RankQuery:
    user_id: str = ""
    item_ids: tuple[str, ...] = ()
    recent_item_ids: tuple[str, ...] = ()
    include_interacted: bool = False

    def __post_init__(self) -> None:
        check_id(self.user_id, "user_id", required=False)
        if not self.item_ids:
            raise InvalidArgument("item_ids", "must not be empty")
        check_ids(self.item_ids, "item_ids", MAX_RANK_CANDIDATES)
        check_ids(self.recent_item_ids, "recent_item_ids")


@dataclass(frozen=True)
class TargetQuery:
    item_ids: tuple[str, ...] = ()
    audience_size: int = 0
    min_score: float | None = None
    include_holders: bool = False

    def __post_init__(self) -> None:
        if not self.item_ids:
            raise InvalidArgument("item_ids", "must not be empty")
        check_ids(self.item_ids, "item_ids")
        check_audience_size(self.audience_size)
        if self.min_score is not None and self.min_score != self.min_score:
            raise InvalidArgument("min_score", "must be a number")
