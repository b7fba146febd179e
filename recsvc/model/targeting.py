"""Campaign targeting: for products, the customers most likely to want them.

A customer's campaign score is the mean of their predicted affinities for the
campaign's products (the inner product of their embedding with each product's),
which equals the inner product with the products' mean vector: one query.

Rules, with no override: no marketing consent, never in an audience; a customer
whose risk tolerance is below any campaign product's risk level, never; holders
of any campaign product, only with ``include_holders``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from recsvc.errors import NotFound, PreconditionFailed
from recsvc.model.allowed import AllowedSet
from recsvc.model.bundle import Bundle
from recsvc.model.queries import TargetQuery, check_audience_size
from recsvc.model.rules import consent_mask, suitable_users
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


@dataclass
class Audience:
    rows: np.ndarray  # user rows, best first
    scores: np.ndarray  # float32, aligned with rows
    version: str
    eligible: int
    excluded: ExclusionCounts = field(default_factory=ExclusionCounts)
    indexed: bool = False  # found through the user index (approximate), not exactly

    def batches(self, user_ids: list[str], size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, len(self.rows), size):
            rows = self.rows[start : start + size]
            yield [user_ids[r] for r in rows], self.scores[start : start + size]


class Targeter:
    """Audiences from one immutable bundle."""

    def __init__(
        self, bundle: Bundle, no_consent_data: bool = False, exact_max_base: int = EXACT_MAX_BASE
    ) -> None:
        self.bundle = bundle
        self.exact_max_base = exact_max_base
        has_users = bundle.manifest.rules.users_table
        # Without a users table consent is unknowable: refused, unless the data is declared
        # to carry no consent requirement. A users table's consent always applies.
        self.no_consent_data = no_consent_data and not has_users
        self._consent_unknown = not has_users and not no_consent_data
        self.consent = (
            consent_mask(bundle.user_table) if has_users else np.ones(len(bundle.users), dtype=bool)
        )
        self.tolerance = bundle.tolerance
        self.item_risk, self.item_active = bundle.item_rules.risk, bundle.item_rules.active
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

    def _item_rows(self, item_ids: tuple[str, ...]) -> np.ndarray:
        rows = self.bundle.items.indices(item_ids)
        for item_id, row in zip(item_ids, rows, strict=True):
            if row < 0:
                raise NotFound(f"item_id {item_id!r} is not in model {self.bundle.version}")
            if not self.item_active[row]:
                raise PreconditionFailed(f"item_id {item_id!r} is not an active product")
        return np.unique(rows)

    def _check_answerable(self) -> None:
        if self._consent_unknown:
            raise PreconditionFailed(
                "the model has no users table, so marketing consent is unknown; start the "
                "server with --no-consent-data if this data set carries no consent requirement"
            )

    def target(self, q: TargetQuery) -> Audience:
        self._check_answerable()
        items = self._item_rows(q.item_ids)
        excluded = ExclusionCounts()
        eligible = self.consent.copy()
        excluded.no_consent = int(len(eligible) - eligible.sum())
        suitable = suitable_users(self.tolerance, int(self.item_risk[items].max()))
        excluded.unsuitable = int((eligible & ~suitable).sum())
        eligible &= suitable
        if not q.include_holders:
            holders = np.unique(np.concatenate([self.holders(r) for r in items]))
            excluded.holders = int(eligible[holders].sum())
            eligible[holders] = False
        n_eligible = int(eligible.sum())
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
        return Audience(rows, scores, self.bundle.version, n_eligible, excluded, indexed)

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
        self, size: int, include_holders: bool = False, block: int = _EACH_BLOCK
    ) -> Iterator[tuple[int, Audience]]:
        """``(item row, audience)`` for every active product: its top ``size`` customers.

        The same rules and counts as ``target`` for that product alone, found in one
        matrix product per block of products of one risk level rather than one pass over
        every customer per product. Exact, like ``target`` below ``exact_max_base``; a
        block's matrix product may round the last bit of a score differently from
        ``target``'s, so customers within about 1e-6 of each other can swap places.
        """
        self._check_answerable()
        check_audience_size(size)
        version = self.bundle.version
        vectors, item_vectors = self.bundle.user_index.vectors, self.bundle.item_index.vectors
        active = np.flatnonzero(self.item_active)
        no_consent = int(len(self.consent) - self.consent.sum())
        for risk in np.unique(self.item_risk[active]):
            suitable = suitable_users(self.tolerance, int(risk))
            unsuitable = int((self.consent & ~suitable).sum())
            candidates = np.flatnonzero(self.consent & suitable)
            base = vectors[candidates].T.copy()  # (dim, candidates), reused by every block
            # Score matrices of about _EACH_BYTES: a block of 32 products at 1M customers.
            step = max(1, min(block, _EACH_BYTES // (4 * max(1, len(candidates)))))
            group = active[self.item_risk[active] == risk]
            for start in range(0, len(group), step):
                products = group[start : start + step]
                scores = item_vectors[products] @ base  # (products, candidates)
                for row, own in zip(products.tolist(), scores, strict=True):
                    held = 0 if include_holders else self._drop_holders(row, candidates, own)
                    eligible = len(candidates) - held
                    best = topk(own, min(size, eligible))
                    excluded = ExclusionCounts(no_consent, unsuitable, held)
                    rows, top = candidates[best], own[best]
                    yield row, Audience(rows, top, version, eligible, excluded)
            del base, scores  # before the next risk level's copy

    def _drop_holders(self, item_row: int, candidates: np.ndarray, scores: np.ndarray) -> int:
        """Score the product's holders among ``candidates`` (sorted) out; how many there were."""
        holders = self.holders(item_row)
        at = np.searchsorted(candidates, holders)
        inside = at < len(candidates)
        at = np.unique(at[inside][candidates[at[inside]] == holders[inside]])
        scores[at] = -np.inf
        return len(at)
