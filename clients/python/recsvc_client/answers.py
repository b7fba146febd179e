"""What the service answers, as small frozen dataclasses (no protobuf in sight).

Times are aware UTC datetimes; a time the server left unset is None.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "ActiveRules",
    "Audience",
    "Contribution",
    "DropReason",
    "Dropped",
    "ErasureReceipt",
    "ExclusionCounts",
    "ModelInfo",
    "Recommendation",
    "RecordResult",
    "ScoredItem",
    "Source",
    "UpdateResult",
]


class Source(enum.Enum):
    """Where a recommendation came from (the values are the API's)."""

    UNSPECIFIED = 0
    PERSONALIZED = 1
    """From the customer's trained embedding."""
    FOLD_IN = 2
    """From a user vector folded in from ``recent_item_ids`` (and history, if any)."""
    POPULAR = 3
    """The most popular eligible products: an unknown customer with no recent items."""


@dataclass(frozen=True, slots=True)
class Contribution:
    """One of the customer's own items behind a recommended one (with ``explain``)."""

    item_id: str
    weight: float


@dataclass(frozen=True, slots=True)
class ScoredItem:
    """A product and its score; ``because`` is filled with ``explain``, best first."""

    item_id: str
    score: float
    because: tuple[Contribution, ...] = ()


class DropReason(enum.Enum):
    """Why RankItems left a candidate out (the values are the API's)."""

    UNSPECIFIED = 0
    UNKNOWN_ITEM = 1
    """Not in the model's catalogue."""
    INACTIVE = 2
    UNSUITABLE = 3
    """Its risk level is above the customer's risk tolerance."""
    EXCLUSIVE_CATEGORY = 4
    """Another product of an exclusive category the customer holds one of."""
    INTERACTED = 5
    """The customer already has it or interacted with it (``include_interacted`` allows it)."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """A RankItems candidate left out, and why."""

    item_id: str
    reason: DropReason


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Products for a customer, best first (Recommend, SimilarItems and RankItems).

    ``source`` is None for similar items (the API has none there); ``unknown_item_ids``
    lists the RankItems candidates the model does not know, ``dropped`` every RankItems
    candidate left out with its reason, and ``unknown_recent_item_ids`` the recent items
    the model does not know (not folded in).
    """

    items: tuple[ScoredItem, ...]
    model_version: str
    source: Source | None
    recommendation_id: str
    state_sequence: int
    unknown_item_ids: tuple[str, ...] = ()
    dropped: tuple[Dropped, ...] = ()
    unknown_recent_item_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ActiveRules:
    """Which of the bank's rules the served model applies."""

    suitability: bool
    active_only: bool
    exclude_interacted: bool
    marketing_consent: bool


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model, its rules and the live state sequence it has applied."""

    version: str
    created_at: datetime | None
    algorithm: str
    n_users: int
    n_items: int
    factors: int
    rules: ActiveRules
    item_index: str
    user_index: str
    state_sequence: int
    model_state_sequence: int


@dataclass(frozen=True, slots=True)
class ExclusionCounts:
    """Customers left out of an audience, each under the first rule that removed them."""

    no_consent: int = 0
    unsuitable: int = 0
    holders: int = 0
    below_min_score: int = 0
    contact_capped: int = 0
    """Contacted up to a cap of the contact policy within its window."""
    declined_recently: int = 0
    """Declined a product of a campaign category within its cooldown."""


@dataclass(frozen=True, slots=True)
class Audience:
    """A campaign audience, best first: ``user_ids[i]`` scored ``scores[i]``.

    Two columns rather than an object per customer: an audience may hold millions.
    """

    user_ids: tuple[str, ...]
    scores: tuple[float, ...]
    model_version: str
    state_sequence: int
    eligible_users: int
    excluded: ExclusionCounts
    approximate: bool


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What RecordEvents stored: ``duplicates`` are event ids seen before, not stored again."""

    recorded: int
    duplicates: tuple[str, ...]
    sequence: int
    unknown_items: int
    dropped_forgotten: int


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """How many customers or products an update changed, and the state sequence after it."""

    updated: int
    sequence: int


@dataclass(frozen=True, slots=True)
class ErasureReceipt:
    """The receipt of a customer's erasure; ``subject`` is a pseudonym, never the raw id."""

    receipt_id: str
    reference: str
    subject: str
    received_at: datetime | None
    effective_at: datetime | None
    sequence: int
    events_deleted: int
    profile_deleted: bool
    bundles_holding: int
    complete: bool
    completed_at: datetime | None
    note: str
