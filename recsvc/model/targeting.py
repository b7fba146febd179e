"""Campaign targeting: for products, the customers most likely to want them.

A customer's campaign score is the mean of their predicted affinities for the
campaign's products (the inner product of their embedding with each product's),
which equals the inner product with the products' mean vector: one query.

Rules, with no override: no marketing consent, never in an audience; a customer
whose risk tolerance is below any campaign product's risk level, never; holders
of any campaign product, only with ``include_holders``; a customer the contact policy
caps on the campaign's channel, or who declined a product of a campaign category within
its cooldown, never (``recsvc.model.contact``); a campaign mixing categories the policy
keeps apart is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from recsvc.errors import NotFound, PreconditionFailed
from recsvc.model.allowed import AllowedSet
from recsvc.model.bundle import Bundle
from recsvc.model.contact import DEFAULT_POLICY, ContactHistory, ContactPolicy
from recsvc.model.overlay import Overlay
from recsvc.model.queries import TargetQuery, check_audience_size
from recsvc.model.rules import MIN_LEVEL, NO_CATEGORY, Categories, ItemRules, suitable_users
from recsvc.model.topk import topk

__all__ = ["EXACT_MAX_BASE", "Audience", "ExclusionCounts", "Targeter"]

# Two ways to an audience. Exact: one blocked pass of matrix products over every
# eligible customer, about 0.1 s per million on a 2-core machine. Indexed: the user
# HNSW index with the rules inside the search, which at 1M customers held only 0.3-0.9
# of the exact top 100-50,000 (reverse search over user vectors of very unequal norms;
# docs/BENCHMARKS.md). So the index answers only where an exact pass would be slow:
# audiences up to _INDEX_MAX_AUDIENCE among more than exact_max_base eligible customers.
EXACT_MAX_BASE = 5_000_000
_INDEX_MAX_AUDIENCE = 50_000
_BLOCK = 1 << 18
# Products scored together by target_each, and the most bytes their score matrix takes.
_EACH_BLOCK = 32
_EACH_BYTES = 128 << 20


@dataclass
class ExclusionCounts:
    """Customers left out, each counted under the first rule that removed them."""

    no_consent: int = 0
    unsuitable: int = 0
    holders: int = 0
    below_min_score: int = 0
    contact_capped: int = 0
    """Contacted up to a cap of the contact policy within its window."""
    declined_recently: int = 0
    """Declined a product of a campaign category within its cooldown."""


@dataclass
class Audience:
    rows: np.ndarray  # user rows, best first; rows past the bundle's index new_ids
    scores: np.ndarray  # float32, aligned with rows
    version: str
    eligible: int
    excluded: ExclusionCounts = field(default_factory=ExclusionCounts)
    indexed: bool = False  # found through the user index (approximate), not exactly
    sequence: int = 0
    """The live state sequence the audience reflects (0: the bundle alone)."""
    new_ids: tuple[str, ...] = ()
    """Customers the bundle does not know (live ones), as rows ``n_users + i``."""

    def ids(self, user_ids: list[str]) -> list[str]:
        """Every member's id, best first (``user_ids``: the bundle's, in row order)."""
        return [
            user_ids[r] if r < len(user_ids) else self.new_ids[r - len(user_ids)]
            for r in self.rows.tolist()
        ]

    def batches(self, user_ids: list[str], size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        n = len(user_ids)
        for start in range(0, len(self.rows), size):
            rows = self.rows[start : start + size].tolist()
            ids = [user_ids[r] if r < n else self.new_ids[r - n] for r in rows]
            yield ids, self.scores[start : start + size]


class Targeter:
    """Audiences from one immutable bundle."""

    def __init__(
        self,
        bundle: Bundle,
        no_consent_data: bool = False,
        exact_max_base: int = EXACT_MAX_BASE,
        contact_policy: ContactPolicy = DEFAULT_POLICY,
    ) -> None:
        self.bundle = bundle
        self.contact_policy = contact_policy
        self.exact_max_base = exact_max_base
        has_users = bundle.manifest.rules.users_table
        # Without a users table consent is unknowable: refused, unless the data is declared
        # to carry no consent requirement. A users table's consent always applies.
        self.no_consent_data = no_consent_data and not has_users
        self._consent_unknown = not has_users and not no_consent_data
        self.consent = bundle.consent if has_users else np.ones(len(bundle.users), dtype=bool)
        self.tolerance = bundle.tolerance
        self.item_risk, self.item_active = bundle.item_rules.risk, bundle.item_rules.active
        self._lives: weakref.WeakKeyDictionary[Overlay, _Live] = weakref.WeakKeyDictionary()
        # Holders per item: CSR of held pairs transposed, built once.
        held_users = np.repeat(np.arange(len(bundle.users)), np.diff(bundle.indptr))[bundle.held]
        held_items = bundle.indices[bundle.held]
        order = np.argsort(held_items, kind="stable")
        self._holders = held_users[order]
        self._holder_ptr = np.concatenate(
            [[0], np.cumsum(np.bincount(held_items, minlength=len(bundle.items)))]
        )

    def holders(self, item_row: int) -> np.ndarray:
        return self._holders[self._holder_ptr[item_row] : self._holder_ptr[item_row + 1]]

    def _item_rows(self, item_ids: tuple[str, ...], rules: ItemRules) -> np.ndarray:
        rows = self.bundle.items.indices(item_ids)
        for item_id, row in zip(item_ids, rows, strict=True):
            if row < 0:
                raise NotFound(f"item_id {item_id!r} is not in model {self.bundle.version}")
            if not rules.active[row]:
                raise PreconditionFailed(f"item_id {item_id!r} is not an active product")
        return np.unique(rows)

    def _check_answerable(self) -> None:
        if self._consent_unknown:
            raise PreconditionFailed(
                "the model has no users table, so marketing consent is unknown; start the "
                "server with --no-consent-data if this data set carries no consent requirement"
            )

    def _live(self, overlay: Overlay | None) -> _Live | None:
        """The overlay's customers, scored apart from the base (built once per overlay)."""
        if overlay is None or not (overlay.users or overlay.erased):
            return None
        live = self._lives.get(overlay)
        if live is None:
            live = self._lives[overlay] = _Live.build(self, overlay)
        return live

    def _contact(self, channel: str, now: datetime | None) -> _Contact:
        when = now if now is not None else datetime.now(timezone.utc)
        return _Contact(self.contact_policy, self.bundle.categories, channel, when)

    def target(
        self,
        q: TargetQuery,
        overlay: Overlay | None = None,
        *,
        channel: str = "",
        now: datetime | None = None,
    ) -> Audience:
        """The campaign's audience.

        Args:
            channel: the campaign's channel, for the contact policy's cap on it ("": only
                the cap across channels).
            now: the time contact windows and cooldowns end at (default: the clock).
        """
        self._check_answerable()
        rules = overlay.item_rules if overlay is not None else self.bundle.item_rules
        items = self._item_rows(q.item_ids, rules)
        categories = self.bundle.categories
        codes = categories.codes[items]
        self.contact_policy.check_together(
            {categories.names[c] for c in codes[codes != NO_CATEGORY]}
        )
        contact = self._contact(channel, now)
        risk = int(rules.risk[items].max())
        live = self._live(overlay)
        excluded = ExclusionCounts()
        # The base: every customer without a live record, by the bundle's data.
        base = self.consent if live is None else self.consent & live.outside
        excluded.no_consent = int(len(base) - base.sum()) - (live.n_rows if live else 0)
        suitable = suitable_users(self.tolerance, risk)
        excluded.unsuitable = int((base & ~suitable).sum())
        eligible = base & suitable
        if not q.include_holders:
            holders = np.unique(np.concatenate([self.holders(r) for r in items]))
            excluded.holders = int(eligible[holders].sum())
            eligible[holders] = False
        side = live.eligible(items, risk, q.include_holders, contact, excluded) if live else None
        n_eligible = int(eligible.sum()) + (len(side) if side is not None else 0)
        query = self.bundle.item_index.vectors[items].mean(axis=0)
        size = min(q.audience_size, n_eligible)
        user_index = self.bundle.user_index
        indexed = (
            q.min_score is None and size <= _INDEX_MAX_AUDIENCE and n_eligible > self.exact_max_base
        )
        if indexed:
            scores, rows = user_index.search(query, size, AllowedSet.from_mask(eligible))
        else:
            rows, scores = self._exact(query, eligible, size, q.min_score, excluded)
        if live is not None and side is not None:
            rows, scores = live.merge(rows, scores, side, query, size, q.min_score, excluded)
        sequence = overlay.sequence if overlay is not None else 0
        new_ids = live.new_ids if live is not None else ()
        version = self.bundle.version
        return Audience(rows, scores, version, n_eligible, excluded, indexed, sequence, new_ids)

    def _exact(
        self,
        query: np.ndarray,
        eligible: np.ndarray,
        size: int,
        min_score: float | None,
        excluded: ExclusionCounts,
    ) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.bundle.user_index.vectors
        candidates = np.flatnonzero(eligible)
        scores = np.empty(len(candidates), dtype=np.float32)
        for start in range(0, len(candidates), _BLOCK):
            block = candidates[start : start + _BLOCK]
            scores[start : start + len(block)] = vectors[block] @ query
        if min_score is not None:
            keep = scores >= min_score
            excluded.below_min_score = int((~keep).sum())
            candidates, scores = candidates[keep], scores[keep]
        best = topk(scores, size)
        return candidates[best], scores[best]

    def target_each(
        self,
        size: int,
        include_holders: bool = False,
        block: int = _EACH_BLOCK,
        overlay: Overlay | None = None,
        now: datetime | None = None,
    ) -> Iterator[tuple[int, Audience]]:
        """``(item row, audience)`` for every active product: its top ``size`` customers.

        The same rules and counts as ``target`` for that product alone, found in one
        matrix product per block of products of one risk level rather than one pass over
        every customer per product. Exact, like ``target`` below ``exact_max_base``; a
        block's matrix product may round the last bit of a score differently from
        ``target``'s, so customers within about 1e-6 of each other can swap places.
        The contact policy applies with no channel (its cap across channels).
        """
        self._check_answerable()
        check_audience_size(size)
        contact = self._contact("", now)
        version = self.bundle.version
        rules = overlay.item_rules if overlay is not None else self.bundle.item_rules
        live = self._live(overlay)
        sequence = overlay.sequence if overlay is not None else 0
        new_ids = live.new_ids if live is not None else ()
        consent = self.consent if live is None else self.consent & live.outside
        no_consent = int(len(consent) - consent.sum()) - (live.n_rows if live else 0)
        vectors, item_vectors = self.bundle.user_index.vectors, self.bundle.item_index.vectors
        active = np.flatnonzero(rules.active)
        for risk in np.unique(rules.risk[active]):
            suitable = suitable_users(self.tolerance, int(risk))
            unsuitable = int((consent & ~suitable).sum())
            candidates = np.flatnonzero(consent & suitable)
            base = vectors[candidates].T.copy()  # (dim, candidates), reused by every block
            # Score matrices of about _EACH_BYTES: a block of 32 products at 1M customers.
            step = max(1, min(block, _EACH_BYTES // (4 * max(1, len(candidates)))))
            group = active[rules.risk[active] == risk]
            for start in range(0, len(group), step):
                products = group[start : start + step]
                scores = item_vectors[products] @ base  # (products, candidates)
                for row, own in zip(products.tolist(), scores, strict=True):
                    held = 0 if include_holders else self._drop_holders(row, candidates, own)
                    eligible = len(candidates) - held
                    best = topk(own, min(size, eligible))
                    excluded = ExclusionCounts(no_consent, unsuitable, held)
                    rows, top = candidates[best], own[best]
                    if live is not None:
                        one = np.array([row])
                        side = live.eligible(one, int(risk), include_holders, contact, excluded)
                        eligible += len(side)
                        k = min(size, eligible)
                        rows, top = live.merge(
                            rows, top, side, item_vectors[row], k, None, excluded
                        )
                    audience = Audience(
                        rows, top, version, eligible, excluded, False, sequence, new_ids
                    )
                    yield row, audience
            del base, scores  # before the next risk level's copy

    def _drop_holders(self, item_row: int, candidates: np.ndarray, scores: np.ndarray) -> int:
        """Score the product's holders among ``candidates`` (sorted) out; how many there were."""
        holders = self.holders(item_row)
        at = np.searchsorted(candidates, holders)
        inside = at < len(candidates)
        at = np.unique(at[inside][candidates[at[inside]] == holders[inside]])
        scores[at] = -np.inf
        return len(at)


@dataclass(frozen=True)
class _Contact:
    """The contact policy as one request applies it."""

    policy: ContactPolicy
    categories: Categories
    channel: str
    now: datetime


@dataclass(frozen=True)
class _Live:
    """The overlay's customers as targeting sees them: scored apart from the base.

    The base pass covers every bundle customer without a live record (``outside``);
    these are the rest, each with their live consent, tolerance, holdings and vector
    (their bundle values where nothing live replaced them). Forgotten customers are
    in neither: never in an audience, counted as without consent.
    """

    outside: np.ndarray
    """Per bundle row: no live record, so the base pass answers for it."""
    n_rows: int
    """Bundle rows with a live record (forgotten ones included)."""
    erased: int
    """Forgotten customers among them."""
    rows: np.ndarray
    """Per live customer: their bundle row, or ``n_users + i`` for ``new_ids[i]``."""
    vectors: np.ndarray
    consent: np.ndarray
    tolerance: np.ndarray
    held_user: np.ndarray
    """Per held pair: the live customer (an index into ``rows``) ..."""
    held_item: np.ndarray
    """... and the item row they hold."""
    new_ids: tuple[str, ...]
    history: ContactHistory
    """Their contacts and declines (customers as indexes into ``rows``)."""

    @classmethod
    def build(cls, targeter: Targeter, overlay: Overlay) -> _Live:
        b = targeter.bundle
        n = len(b.users)
        changed = overlay.changed_rows
        outside = np.ones(n, dtype=bool)
        outside[changed] = False
        rows: list[int] = []
        vectors: list[np.ndarray] = []
        consent: list[bool] = []
        tolerance: list[int] = []
        held_user: list[np.ndarray] = []
        held_item: list[np.ndarray] = []
        new_ids: list[str] = []
        contacts: list[tuple[tuple[datetime, str], ...]] = []
        declines: list[Mapping[int, datetime]] = []
        for user_id, live in overlay.users.items():
            if live.row is not None:
                row, vector = live.row, (live.vector if live.refolded else None)
                if vector is None:
                    vector = b.user_index.vectors[live.row]
                base_consent, base_tolerance = targeter.consent[row], targeter.tolerance[row]
            elif live.vector is not None:  # new: a candidate once they have a vector
                row, vector = n + len(new_ids), live.vector
                new_ids.append(user_id)
                base_consent, base_tolerance = False, MIN_LEVEL
            else:
                continue
            held = live.held_rows
            held_user.append(np.full(len(held), len(rows), dtype=np.int64))
            held_item.append(held)
            rows.append(row)
            vectors.append(vector)
            consent.append(live.consent if live.consent is not None else base_consent)
            tolerance.append(live.tolerance if live.tolerance is not None else base_tolerance)
            contacts.append(live.contacts)
            declines.append(live.declined)
        dim = b.user_index.vectors.shape[1]
        return cls(
            outside=outside,
            n_rows=len(changed),
            erased=len(overlay.erased_rows),
            rows=np.array(rows, dtype=np.int64),
            vectors=np.array(vectors, dtype=np.float32).reshape(len(rows), dim),
            consent=np.array(consent, dtype=bool),
            tolerance=np.array(tolerance, dtype=np.int8),
            held_user=np.concatenate(held_user) if held_user else np.empty(0, np.int64),
            held_item=np.concatenate(held_item) if held_item else np.empty(0, np.int64),
            new_ids=tuple(new_ids),
            history=ContactHistory.build(contacts, declines),
        )

    def eligible(
        self,
        items: np.ndarray,
        risk: int,
        include_holders: bool,
        contact: _Contact,
        excluded: ExclusionCounts,
    ) -> np.ndarray:
        """Live customers the campaign may reach (indexes), counting the others by rule."""
        ok = self.consent.copy()
        excluded.no_consent += int((~ok).sum()) + self.erased
        suitable = suitable_users(self.tolerance, risk)
        excluded.unsuitable += int((ok & ~suitable).sum())
        ok &= suitable
        if not include_holders:
            held = np.zeros(len(ok), dtype=bool)
            held[self.held_user[np.isin(self.held_item, items)]] = True
            excluded.holders += int((ok & held).sum())
            ok &= ~held
        # Only live customers have contacts and declines: the base pass has none to check.
        n, policy = len(ok), contact.policy
        capped = self.history.capped(n, policy, contact.channel, contact.now)
        excluded.contact_capped += int((ok & capped).sum())
        ok &= ~capped
        cooling = self.history.cooling(n, policy, contact.categories, items, contact.now)
        excluded.declined_recently += int((ok & cooling).sum())
        ok &= ~cooling
        return np.flatnonzero(ok)

    def merge(
        self,
        rows: np.ndarray,
        scores: np.ndarray,
        side: np.ndarray,
        query: np.ndarray,
        size: int,
        min_score: float | None,
        excluded: ExclusionCounts,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The base's best ``rows`` merged with the eligible live customers: the top ``size``."""
        live_scores = (self.vectors[side] @ query).astype(np.float32)
        live_rows = self.rows[side]
        if min_score is not None:
            keep = live_scores >= min_score
            excluded.below_min_score += int((~keep).sum())
            live_rows, live_scores = live_rows[keep], live_scores[keep]
        all_rows = np.concatenate([rows.astype(np.int64), live_rows])
        all_scores = np.concatenate([scores.astype(np.float32), live_scores])
        order = np.lexsort((all_rows, -all_scores))[:size]
        return all_rows[order], all_scores[order]
