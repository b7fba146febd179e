"""Contact policies: how often a customer may be contacted, and not after a decline.

A policy file (JSON) holds, every key optional::

    {"window_days": 7, "max_per_channel": {"email": 2, "sms": 1},
     "max_all_channels": 4, "decline_cooldown_days": 30,
     "decline_cooldown_days_by_category": {"credit_card": 60},
     "never_together": [["mortgage", "credit_card"]]}

A customer contacted ``max_per_channel[channel]`` times on the campaign's channel, or
``max_all_channels`` times on any, within the last ``window_days`` is capped: in no
audience. After a ``decline`` of a product, no campaign of that product's category
reaches them for the category's cooldown (``decline_cooldown_days`` unless named), and
Recommend offers none of it. ``never_together`` lists categories no campaign may mix.
An event dated ahead of the clock (a skewed sender) counts as recent: the cautious side,
and it lets one latest decline per product stand for all of them.

An absent file means :data:`DEFAULT_POLICY`, never no policy: at most 2 emails, 1 SMS,
2 pushes and 1 call a week, 4 in all; 30 days after a decline, 60 for credit (cards,
loans, mortgages), as retail banks commonly hold them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from recsvc.errors import PreconditionFailed
from recsvc.model.rules import NO_CATEGORY, Categories

__all__ = [
    "CONTACTED_EVENT",
    "DECLINE_EVENT",
    "DEFAULT_POLICY",
    "HISTORY_DAYS",
    "ContactHistory",
    "ContactPolicy",
    "declined_within_cooldown",
    "load_policy",
    "parse_policy",
]

CONTACTED_EVENT = "contacted"
DECLINE_EVENT = "decline"
HISTORY_DAYS = 365
"""The longest window or cooldown a policy may name; older contacts are not kept."""

_DAY = 86_400.0
_KEYS = (
    "window_days",
    "max_per_channel",
    "max_all_channels",
    "decline_cooldown_days",
    "decline_cooldown_days_by_category",
    "never_together",
)


def _frozen(mapping: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ContactPolicy:
    """How often a customer may be contacted, and how long a decline holds (see the module)."""

    window_days: int = 7
    max_per_channel: Mapping[str, int] = field(
        default_factory=lambda: _frozen({"email": 2, "sms": 1, "push": 2, "call": 1})
    )
    """A channel not named is capped by ``max_all_channels`` alone."""
    max_all_channels: int = 4
    decline_cooldown_days: int = 30
    decline_cooldown_days_by_category: Mapping[str, int] = field(
        default_factory=lambda: _frozen(
            {"credit_card": 60, "personal_loan": 60, "car_loan": 60, "mortgage": 60}
        )
    )
    never_together: tuple[tuple[str, str], ...] = ()

    def check_together(self, categories: Collection[str]) -> None:
        """Refuse a campaign of ``categories`` that mixes a ``never_together`` pair."""
        present = set(categories)
        for a, b in self.never_together:
            if a in present and b in present:
                raise PreconditionFailed(
                    f"the contact policy never targets categories {a!r} and {b!r} together"
                )

    def cooldown_seconds(self, categories: Categories) -> np.ndarray:
        """Per item row, how long after a decline of it its category stays closed."""
        days = np.array(
            [
                self.decline_cooldown_days_by_category.get(n, self.decline_cooldown_days)
                for n in categories.names
            ]
            + [self.decline_cooldown_days],  # NO_CATEGORY (-1) indexes the last
            dtype=np.float64,
        )
        return days[categories.codes] * _DAY


DEFAULT_POLICY = ContactPolicy()
"""The policy without a file (see the module)."""


def _whole(data: Mapping[str, Any], key: str, source: str, low: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= HISTORY_DAYS:
        raise ValueError(f"{source}: {key} must be a whole number {low}..{HISTORY_DAYS}")
    return value


def _counts(data: Mapping[str, Any], key: str, source: str, high: int) -> Mapping[str, int]:
    value = data[key]
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {key} must map names to whole numbers")
    for name, n in value.items():
        if not name or isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= high:
            raise ValueError(f"{source}: {key}[{name!r}] must be a whole number 0..{high}")
    return _frozen(value)


def parse_policy(data: Mapping[str, Any], source: str = "contact policy") -> ContactPolicy:
    """A policy from a file's parsed contents: every key checked, named when wrong."""
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    kw: dict[str, Any] = {}
    if "window_days" in data:
        kw["window_days"] = _whole(data, "window_days", source, 1)
    if "max_all_channels" in data:
        kw["max_all_channels"] = _whole(data, "max_all_channels", source, 0)
    if "max_per_channel" in data:
        kw["max_per_channel"] = _counts(data, "max_per_channel", source, HISTORY_DAYS)
    if "decline_cooldown_days" in data:
        kw["decline_cooldown_days"] = _whole(data, "decline_cooldown_days", source, 0)
    if "decline_cooldown_days_by_category" in data:
        by = _counts(data, "decline_cooldown_days_by_category", source, HISTORY_DAYS)
        kw["decline_cooldown_days_by_category"] = by
    if "never_together" in data:
        pairs = data["never_together"]
        ok = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(c, str) and c for c in p)
            for p in pairs
        )
        if not ok:
            raise ValueError(f"{source}: never_together must be a list of category pairs")
        kw["never_together"] = tuple((a, b) for a, b in pairs)
    return ContactPolicy(**kw)


def load_policy(path: Path | None) -> ContactPolicy:
    """The policy in the JSON file ``path``; :data:`DEFAULT_POLICY` for None."""
    if path is None:
        return DEFAULT_POLICY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # a JSON error is a ValueError
        raise ValueError(f"{path}: cannot read the contact policy: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a contact policy is an object of keys")
    return parse_policy(data, str(path))


@dataclass(frozen=True)
class ContactHistory:
    """Contacts and declines of a set of customers (indexes ``0..n``), as flat arrays.

    Times are POSIX seconds. Built once per overlay; each request evaluates it with
    numpy, never customer by customer.
    """

    contact_user: np.ndarray
    contact_time: np.ndarray
    contact_channel: np.ndarray
    """Per contact, its channel (a string array; empty where the event named none)."""
    decline_user: np.ndarray
    decline_item: np.ndarray
    decline_time: np.ndarray

    @classmethod
    def build(
        cls,
        contacts: Sequence[Sequence[tuple[datetime, str]]],
        declines: Sequence[Mapping[int, datetime]],
    ) -> ContactHistory:
        """From each customer's ``(time, channel)`` contacts and latest decline per item row."""
        cu = [i for i, c in enumerate(contacts) for _ in c]
        ct = [t.timestamp() for c in contacts for t, _ in c]
        cc = [ch for c in contacts for _, ch in c]
        du = [i for i, d in enumerate(declines) for _ in d]
        di = [row for d in declines for row in d]
        dt = [t.timestamp() for d in declines for t in d.values()]
        return cls(
            np.array(cu, dtype=np.int64),
            np.array(ct, dtype=np.float64),
            np.array(cc, dtype=np.str_),
            np.array(du, dtype=np.int64),
            np.array(di, dtype=np.int64),
            np.array(dt, dtype=np.float64),
        )

    def capped(self, n: int, policy: ContactPolicy, channel: str, now: datetime) -> np.ndarray:
        """Mask over the ``n`` customers: contacted up to a cap within the window."""
        recent = self.contact_time > now.timestamp() - policy.window_days * _DAY
        users = self.contact_user[recent]
        out = np.bincount(users, minlength=n) >= policy.max_all_channels
        cap = policy.max_per_channel.get(channel) if channel else None
        if cap is not None:
            on = users[self.contact_channel[recent] == channel]
            out |= np.bincount(on, minlength=n) >= cap
        return out

    def cooling(
        self,
        n: int,
        policy: ContactPolicy,
        categories: Categories,
        items: np.ndarray,
        now: datetime,
    ) -> np.ndarray:
        """Mask over the ``n`` customers: declined a product of a category of ``items``
        (or, for a product without a category, that product) within its cooldown."""
        hit = _open(self.decline_time, self.decline_item, policy, categories, now)
        campaign = categories.codes[items]
        named = campaign[campaign != NO_CATEGORY]
        hit &= np.isin(categories.codes[self.decline_item], named) | np.isin(
            self.decline_item, items
        )
        out = np.zeros(n, dtype=bool)
        out[self.decline_user[hit]] = True
        return out


def _open(
    times: np.ndarray,
    rows: np.ndarray,
    policy: ContactPolicy,
    categories: Categories,
    now: datetime,
) -> np.ndarray:
    """Mask over declines (their times and item rows): still within their cooldown at ``now``."""
    return times > now.timestamp() - policy.cooldown_seconds(categories)[rows]


def declined_within_cooldown(
    policy: ContactPolicy,
    categories: Categories,
    declined: Mapping[int, datetime],
    now: datetime,
) -> tuple[tuple[int, ...], np.ndarray]:
    """One customer's closed categories (ascending codes) and closed uncategorised rows.

    Args:
        declined: the customer's latest decline time per item row.
    """
    if not declined:
        return (), np.empty(0, dtype=np.int64)
    rows = np.fromiter(declined, dtype=np.int64, count=len(declined))
    times = np.array([t.timestamp() for t in declined.values()], dtype=np.float64)
    rows = rows[_open(times, rows, policy, categories, now)]
    codes = categories.codes[rows]
    return tuple(sorted(set(codes[codes != NO_CATEGORY].tolist()))), rows[codes == NO_CATEGORY]
