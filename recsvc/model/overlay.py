"""The live overlay: what changed after a bundle was trained, held in memory.

A bundle is a snapshot; the state store records what happened since (events,
profile and product updates, erasures), each change with a sequence number. An
:class:`Overlay` is one immutable view of a bundle plus every change up to
``sequence``, built by :func:`apply` from the one before: the apply loop swaps in a
new overlay with one reference assignment, as the model store swaps bundles, so a
request reads one consistent overlay from start to end.

Its size is bounded by what changed since training, never by the base: one
:class:`LiveUser` per customer with a change, one override per product with a change,
one pseudonym per erasure. Per-customer work (re-weighing and re-solving a vector)
happens once per change, here, never per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import cached_property
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from recsvc.model.bundle import Bundle
from recsvc.model.contact import CONTACTED_EVENT, DECLINE_EVENT, HISTORY_DAYS
from recsvc.model.rules import MAX_LEVEL, MIN_LEVEL, ItemRules
from recsvc.model.weighting import RowWeighting
from recsvc.state.base import Changes, StateStore, StoredEvent

__all__ = [
    "CLOSE_EVENT",
    "CONTACT_EVENTS",
    "ERASED",
    "LiveUser",
    "Overlay",
    "OverlayContext",
    "apply",
    "contact_history",
    "empty",
    "remember",
]

CLOSE_EVENT = "close"
"""The customer no longer holds the product (the held events say they do)."""

_NO_ROWS = np.empty(0, dtype=np.int64)
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class LiveUser:
    """One customer as the live state has them: the bundle's row with changes applied.

    ``rows`` (sorted item rows the customer interacted with), ``strength`` (their raw
    strengths), ``confidence`` (weighted as the training data was) and ``held`` are
    aligned. ``vector`` is re-solved whenever their events change; None when only their
    profile changed (the bundle's own vector stands) or when they have no history.
    """

    row: int | None
    """Their bundle row; None for a customer the model does not know."""
    rows: np.ndarray
    strength: np.ndarray
    confidence: np.ndarray
    held: np.ndarray
    vector: np.ndarray | None = None
    refolded: bool = False
    """Whether ``vector`` replaces the bundle's (their events changed)."""
    tolerance: int | None = None
    """A live risk tolerance; None keeps the bundle's (or the unknown default)."""
    consent: bool | None = None
    """A live marketing consent; None keeps the bundle's."""
    held_at: Mapping[int, datetime] = field(default_factory=dict)
    """Per item row, the time of the latest live held or close event: an older one, recorded
    late, changes nothing (the latest by time decides, as in training)."""
    contacts: tuple[tuple[datetime, str], ...] = ()
    """Time and channel of each live ``contacted`` event, within ``HISTORY_DAYS`` of the latest
    event (no contact policy looks further back)."""
    declined: Mapping[int, datetime] = field(default_factory=dict)
    """Per item row, the time of the latest live ``decline`` of it."""

    @property
    def held_rows(self) -> np.ndarray:
        return self.rows[self.held]


# The answer for a forgotten customer: treated as unknown, everywhere.
ERASED = LiveUser(
    None, _NO_ROWS, np.empty(0, np.float32), np.empty(0, np.float32), np.empty(0, bool)
)


@dataclass(frozen=True)
class OverlayContext:
    """What applying changes needs of the bundle they apply to; built once per bundle.

    Args:
        bundle: the served bundle.
        weighting: its training data's weighting (one customer's row at a time).
        event_weights: strength of one event of each kind (the trainer's).
        held_events: events that mean the customer holds the product from now on.
        fold_in: the bundle's least-squares solve from (rows, confidences) to a vector,
            for many customers at once (one row each).
        pseudonymize: the keyed pseudonym of a customer id (erasures carry only that).
    """

    bundle: Bundle
    weighting: RowWeighting
    event_weights: Mapping[str, float]
    held_events: frozenset[str]
    fold_in: Callable[[Sequence[tuple[np.ndarray, np.ndarray]]], np.ndarray]
    pseudonymize: Callable[[str], str]

    @cached_property
    def pseudonym_rows(self) -> Mapping[str, int]:
        """Bundle row by pseudonym: built on the first erasure (one HMAC per customer)."""
        p = self.pseudonymize
        return {p(user_id): row for row, user_id in enumerate(self.bundle.users.ids)}

    def bundle_user(self, user_id: str) -> LiveUser:
        """A customer as the bundle has them, before any change."""
        b = self.bundle
        row = b.users.index(user_id)
        if row is None:
            empty_f = np.empty(0, np.float32)
            return LiveUser(None, _NO_ROWS, empty_f, empty_f, np.empty(0, bool))
        lo, hi = int(b.indptr[row]), int(b.indptr[row + 1])
        return LiveUser(
            row,
            b.indices[lo:hi].astype(np.int64),
            b.strength[lo:hi].copy(),
            b.data[lo:hi].copy(),
            b.held[lo:hi].copy(),
        )


@dataclass(frozen=True, eq=False)
class Overlay:
    """A bundle's live changes up to ``sequence``. Immutable; :func:`apply` makes the next.

    Compared and hashed by identity: targeting keeps per-overlay work in a weak map.
    """

    context: OverlayContext
    sequence: int
    users: Mapping[str, LiveUser]
    erased: frozenset[str]
    """Pseudonyms of every forgotten customer."""
    erased_rows: np.ndarray
    """Bundle rows of forgotten customers, sorted."""
    item_rules: ItemRules
    """The bundle's item rules with every product update applied."""
    products_changed: int = 0
    unknown_item_events: int = 0
    """Events applied so far on products the bundle does not have (kept for training)."""
    _by_row: Mapping[int, str] = field(default_factory=dict, repr=False)

    def user(self, user_id: str) -> LiveUser | None:
        """The live record of ``user_id``: ERASED if forgotten, None if nothing changed."""
        if not user_id:
            return None
        live = self.users.get(user_id)
        if live is not None:
            return live
        if self.erased and self.context.pseudonymize(user_id) in self.erased:
            return ERASED
        return None

    @cached_property
    def changed_rows(self) -> np.ndarray:
        """Bundle rows of customers with a live record (sorted), erased ones included."""
        rows = np.fromiter(self._by_row, dtype=np.int64, count=len(self._by_row))
        return np.union1d(rows, self.erased_rows)


def empty(context: OverlayContext, sequence: int) -> Overlay:
    """A bundle with no changes, at the bundle's own state sequence."""
    b = context.bundle
    return Overlay(
        context=context,
        sequence=sequence,
        users=MappingProxyType({}),
        erased=frozenset(),
        erased_rows=_NO_ROWS,
        item_rules=b.item_rules,
    )


def apply(overlay: Overlay, changes: Changes) -> Overlay:
    """The overlay with ``changes`` (every change after ``overlay.sequence``) applied."""
    if changes.sequence <= overlay.sequence:
        return overlay
    ctx = overlay.context
    users = _thawed(overlay.users)
    by_row = _thawed(overlay._by_row)
    erased = overlay.erased | frozenset(changes.erased)
    # Erasures first: any record of a forgotten customer goes, whatever else arrived.
    if changes.erased:
        gone = frozenset(changes.erased)
        for user_id in [u for u in users if ctx.pseudonymize(u) in gone]:
            live = users.pop(user_id)
            if live.row is not None:
                by_row.pop(live.row, None)
    unknown = overlay.unknown_item_events
    unsolved: list[str] = []
    for user_id, events in _by_user(changes.events).items():
        if ctx.pseudonymize(user_id) in erased:
            continue  # the store drops these too; a race must not resurrect a customer
        before = users.get(user_id) or ctx.bundle_user(user_id)
        after, skipped = _with_events(ctx, before, events)
        unknown += skipped
        users[user_id] = after
        if after.refolded and after.vector is None and len(after.rows):
            unsolved.append(user_id)
        if after.row is not None:
            by_row[after.row] = user_id
    if unsolved:  # every changed history re-solved in one batch
        vectors = ctx.fold_in([(users[u].rows, users[u].confidence) for u in unsolved])
        for user_id, vector in zip(unsolved, vectors, strict=True):
            users[user_id] = replace(users[user_id], vector=vector)
    for c in changes.customers:
        if ctx.pseudonymize(c.user_id) in erased:
            continue
        before = users.get(c.user_id) or ctx.bundle_user(c.user_id)
        users[c.user_id] = replace(
            before,
            tolerance=c.risk_tolerance if c.risk_tolerance is not None else before.tolerance,
            consent=c.marketing_consent if c.marketing_consent is not None else before.consent,
        )
        if before.row is not None:
            by_row[before.row] = c.user_id
    item_rules, products_changed = overlay.item_rules, overlay.products_changed
    if changes.products:
        item_rules, n = _with_products(ctx, item_rules, changes)
        products_changed += n
    erased_rows = overlay.erased_rows
    if len(erased) != len(overlay.erased):
        rows = [ctx.pseudonym_rows.get(p) for p in erased]
        erased_rows = np.array(sorted(r for r in rows if r is not None), dtype=np.int64)
    return Overlay(
        context=ctx,
        sequence=changes.sequence,
        users=MappingProxyType(users),
        erased=erased,
        erased_rows=erased_rows,
        item_rules=item_rules,
        products_changed=products_changed,
        unknown_item_events=unknown,
        _by_row=MappingProxyType(by_row),
    )


CONTACT_EVENTS = frozenset({CONTACTED_EVENT, DECLINE_EVENT})
"""The events the contact policies count: no bundle holds them (training learns nothing
from them), so an overlay keeps them by time, not by sequence (:func:`remember`)."""


def contact_history(
    store: StateStore, upto: int, now: datetime | None = None
) -> tuple[StoredEvent, ...]:
    """The contact events at or below state sequence ``upto`` (a bundle's) dated within
    ``HISTORY_DAYS`` of ``now`` (default: the clock): what a retrain must not forget."""
    if upto <= 0:
        return ()
    since = (now if now is not None else datetime.now(timezone.utc)) - timedelta(days=HISTORY_DAYS)
    return store.events_by_time(upto, since, CONTACT_EVENTS)


def remember(overlay: Overlay, events: Iterable[StoredEvent]) -> Overlay:
    """The overlay with older contact history (from :func:`contact_history`): each
    customer's ``contacted`` and ``decline`` events at or below its sequence, which the
    bundle does not hold. Only the contacts and declines change, never a strength, a
    holding or the sequence; other event types are ignored.
    """
    ctx = overlay.context
    kept = [e for e in events if e.type in CONTACT_EVENTS]
    if not kept:
        return overlay
    users = _thawed(overlay.users)
    by_row = _thawed(overlay._by_row)
    items = ctx.bundle.items
    for user_id, history in _by_user(kept).items():
        if overlay.erased and ctx.pseudonymize(user_id) in overlay.erased:
            continue  # one HMAC per customer only where someone was forgotten
        before = users.get(user_id) or ctx.bundle_user(user_id)
        contacts = [(e.time, e.channel) for e in history if e.type == CONTACTED_EVENT]
        declined = dict(before.declined)
        for e in history:
            row = items.index(e.item_id) if e.type == DECLINE_EVENT else None
            if row is not None and not (row in declined and e.time < declined[row]):
                declined[row] = e.time
        merged = tuple(sorted([*contacts, *before.contacts]))
        users[user_id] = replace(before, contacts=merged, declined=declined)
        if before.row is not None:
            by_row[before.row] = user_id
    return replace(overlay, users=MappingProxyType(users), _by_row=MappingProxyType(by_row))


def _thawed(m: Mapping[K, V]) -> dict[K, V]:
    """A dict copy of ``m``. A mapping proxy's own copy() copies its dict at C speed, where
    dict(proxy) walks it item by item: 3.4 ms against 119 ms at 100,000 customers, most
    of applying one commit."""
    if isinstance(m, MappingProxyType):
        return m.copy()
    return dict(m)


def _by_user(events: Iterable[StoredEvent]) -> dict[str, list[StoredEvent]]:
    out: dict[str, list[StoredEvent]] = {}
    for e in sorted(events, key=lambda e: (e.time, e.sequence, e.event_id)):
        out.setdefault(e.user_id, []).append(e)
    return out


def _with_events(
    ctx: OverlayContext, before: LiveUser, events: list[StoredEvent]
) -> tuple[LiveUser, int]:
    """``before`` with ``events`` applied, and the unknown-item count. A changed history
    comes back ``refolded`` with no vector: ``apply`` solves them together."""
    strength = dict(zip(before.rows.tolist(), before.strength.tolist(), strict=True))
    held = dict(zip(before.rows.tolist(), before.held.tolist(), strict=True))
    held_at = dict(before.held_at)
    contacts = list(before.contacts)
    declined = dict(before.declined)
    items, unknown, changed = ctx.bundle.items, 0, False
    for e in events:
        if e.type == CONTACTED_EVENT:  # counts whatever the product: a contact is a contact
            contacts.append((e.time, e.channel))
        row = items.index(e.item_id)
        if row is None:
            unknown += 1
            continue
        if e.type == DECLINE_EVENT and not (row in declined and e.time < declined[row]):
            declined[row] = e.time
        weight = ctx.event_weights.get(e.type)
        if weight is not None:
            strength[row] = strength.get(row, 0.0) + (e.weight if e.weight is not None else weight)
            held.setdefault(row, False)
            changed = True
        holds = e.type in ctx.held_events and row in strength
        closes = e.type == CLOSE_EVENT and row in held
        if (holds or closes) and not (row in held_at and e.time < held_at[row]):
            held[row] = holds
            held_at[row] = e.time
    if events:  # bounded: drop what no policy window reaches (events come sorted by time)
        since = events[-1].time - timedelta(days=HISTORY_DAYS)
        contacts = [c for c in contacts if c[0] > since]
        declined = {r: t for r, t in declined.items() if t > since}
    kept = tuple(contacts)
    if not changed and len(held) == len(before.held):
        flags = np.array([held[r] for r in before.rows.tolist()], dtype=bool)
        after = replace(before, held=flags, held_at=held_at, contacts=kept, declined=declined)
        return after, unknown
    rows = np.array(sorted(strength), dtype=np.int64)
    s = np.array([strength[r] for r in rows.tolist()], dtype=np.float32)
    conf = ctx.weighting.row(rows, s)
    after = replace(
        before,
        rows=rows,
        strength=s,
        confidence=conf,
        held=np.array([held[r] for r in rows.tolist()], dtype=bool),
        held_at=held_at,
        vector=None,
        refolded=True,
        contacts=kept,
        declined=declined,
    )
    return after, unknown


def _with_products(
    ctx: OverlayContext, rules: ItemRules, changes: Changes
) -> tuple[ItemRules, int]:
    """Item rules with product updates applied (products the bundle lacks wait for training)."""
    risk, active = rules.risk.copy(), rules.active.copy()
    n = 0
    for p in changes.products:
        row = ctx.bundle.items.index(p.item_id)
        if row is None:
            continue
        n += 1
        if p.active is not None:
            active[row] = p.active
        if p.risk_level is not None and rules.suitability:
            risk[row] = min(max(int(p.risk_level), MIN_LEVEL), MAX_LEVEL)
    return ItemRules.build(risk, active, rules.suitability), n
