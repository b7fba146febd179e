"""The data plane: one loaded bundle answering Recommend, SimilarItems and RankItems.

Knows nothing of gRPC. Scores are inner products of the trained embeddings, as
implicit's own ``recommend`` computes them; rules are allowed sets handed to the
index search (``recsvc.model.rules``, ``recsvc.model.index``), so k eligible items come
back whenever k exist; a cap per category searches on below the categories it fills.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property, partial
from typing import Any

import faiss
import numpy as np
import scipy.linalg

from recsvc.errors import NotFound
from recsvc.model.allowed import AllowedSet
from recsvc.model.bundle import Bundle
from recsvc.model.contact import DEFAULT_POLICY, ContactPolicy, declined_within_cooldown
from recsvc.model.index import IndexSpec, VectorIndex
from recsvc.model.overlay import ERASED, Overlay, OverlayContext, apply, empty, remember
from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery
from recsvc.model.rules import MIN_LEVEL, ExclusiveCategories, ItemRules, cap_per_category
from recsvc.model.weighting import RowWeighting
from recsvc.settings import EXCLUSIVE_CATEGORIES
from recsvc.state.base import Changes, StoredEvent

__all__ = [
    "DropReason",
    "Dropped",
    "Ranked",
    "Recommender",
    "ResolvedUser",
    "ScoredItem",
    "Source",
    "Suitability",
]

_EXPLAIN_TOP = 3
# A capped search asks for this many times what is still missing, so that one round
# mostly does: on the sample, a cap of 1 at k 10 takes 2.8 searches a request asking
# for just what is missing, 1.5 at 4 times (1.4 at 8).
_OVER_FETCH = 4
_NO_ROWS = np.empty(0, dtype=np.int64)

# A ranking of the items in an allowed set, less exclusions: (scores, rows), best first.
_Search = Callable[[AllowedSet, int, np.ndarray], tuple[np.ndarray, np.ndarray]]


class Source(enum.Enum):
    PERSONALIZED = 1
    FOLD_IN = 2
    POPULAR = 3


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    because: tuple[tuple[str, float], ...] = ()


class DropReason(enum.Enum):
    """Why RankItems left a candidate out: the first rule, in this order, that removed it."""

    UNKNOWN_ITEM = 1
    """Not in the model's catalogue."""
    INACTIVE = 2
    UNSUITABLE = 3
    """Its risk level is above the customer's risk tolerance."""
    EXCLUSIVE_CATEGORY = 4
    """Another product of an exclusive category the customer holds one of."""
    INTERACTED = 5
    """The customer already has it or interacted with it (``include_interacted`` allows it)."""


@dataclass(frozen=True)
class Dropped:
    item_id: str
    reason: DropReason


@dataclass(frozen=True)
class Ranked:
    items: list[ScoredItem]
    source: Source
    version: str
    unknown_item_ids: tuple[str, ...] = ()
    sequence: int = 0
    """The live state sequence the answer reflects (0: the bundle alone)."""
    dropped: tuple[Dropped, ...] = ()
    """RankItems: every candidate left out, in the order given, with its reason."""
    suitability: Suitability | None = None
    """The suitability basis the answer used (what its audit record keeps)."""


@dataclass(frozen=True)
class ResolvedUser:
    """Who is asking: their embedding (if any), history rows and rules."""

    vector: np.ndarray | None
    source: Source
    tolerance: int
    history: np.ndarray  # item rows to exclude unless include_interacted
    confidence_rows: np.ndarray  # rows used to fold in / explain
    confidence: np.ndarray  # their confidences (before alpha)
    held: np.ndarray  # item rows of the products they hold


@dataclass(frozen=True)
class Suitability:
    """The suitability basis of an answer: tolerance, its source, products removed by rule."""

    tolerance: int
    basis: str
    """``bundle`` (the trained users table), ``live`` (an update) or ``default`` (unknown)."""
    removed: dict[str, int]


@dataclass(frozen=True)
class _Known:
    """A customer before recent items: vector, source, tolerance, history, confidences,
    holdings, and where the tolerance came from (a :attr:`Suitability.basis`)."""

    vector: np.ndarray | None
    source: Source
    tolerance: int
    rows: np.ndarray
    confidence: np.ndarray
    held: np.ndarray
    basis: str = "bundle"


_UNKNOWN = _Known(
    None, Source.POPULAR, MIN_LEVEL, _NO_ROWS, np.empty(0, np.float32), _NO_ROWS, "default"
)


class Recommender:
    """Answers queries from one immutable bundle; safe to share across threads.

    Args:
        bundle: the loaded version.
        exclusive_categories: categories of which a customer who holds one product is
            offered no other (``ServerSettings.exclusive_categories``).
        contact_policy: its decline cooldowns close a declined product's category to
            Recommend too (``ServerSettings.contact_policy``).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        exclusive_categories: Collection[str] = EXCLUSIVE_CATEGORIES,
        contact_policy: ContactPolicy = DEFAULT_POLICY,
    ) -> None:
        self.bundle = bundle
        self.contact_policy = contact_policy
        manifest = bundle.manifest
        self.suitability = bundle.suitability
        self.item_rules = bundle.item_rules
        self.tolerance = bundle.tolerance
        self.exclusive = ExclusiveCategories(bundle.categories, exclusive_categories)
        params = manifest.params
        self.algorithm = manifest.algorithm
        self.alpha = float(params.get("alpha", 1.0)) if self.algorithm == "als" else 1.0
        self.regularization = float(params.get("regularization", 0.0))
        self.recent_confidence = manifest.fold_in.recent_confidence
        factors = bundle.item_index.vectors
        # BPR's last factor is the item bias, paired with a constant 1 in every user vector.
        self._has_bias = self.algorithm == "bpr"
        self._y = factors[:, :-1] if self._has_bias else factors
        self._yty = (self._y.T @ self._y).astype(np.float64)
        n_users, n_items = len(bundle.users), len(bundle.items)
        counts = np.bincount(bundle.indices, minlength=n_items)
        self.popularity_score = (counts / max(1, n_users)).astype(np.float32)
        norms = np.linalg.norm(factors, axis=1, keepdims=True)
        unit = np.ascontiguousarray(factors / np.maximum(norms, 1e-12), dtype=np.float32)
        flat = faiss.IndexFlatIP(unit.shape[1])
        flat.add(unit)
        self._similar = VectorIndex(
            unit, flat, IndexSpec("flat"), exact_subset_max=bundle.item_index.exact_subset_max
        )

    @property
    def version(self) -> str:
        return self.bundle.version

    def overlay(
        self,
        pseudonymize: Callable[[str], str],
        changes: Changes | None = None,
        history: Iterable[StoredEvent] = (),
    ) -> Overlay:
        """The live overlay of this bundle, at its own state sequence, with ``changes`` applied.

        Args:
            pseudonymize: the keyed pseudonym of a customer id (erasures carry only that).
            changes: what the state store holds after ``manifest.state_sequence``.
            history: the contact events up to it (``overlay.contact_history``), which the
                bundle does not hold and the contact policies still count.
        """
        m = self.bundle.manifest
        b = self.bundle
        weighting = RowWeighting.from_training(
            str(m.params.get("weighting", "log")),
            b.indptr,
            b.indices,
            b.strength,
            len(b.items),
            float(m.params.get("bm25_k1", 100.0)),
            float(m.params.get("bm25_b", 0.8)),
        )
        context = OverlayContext(
            bundle=b,
            weighting=weighting,
            event_weights=m.events.weights,
            held_events=frozenset(m.events.held),
            fold_in=self.fold_in_many,
            pseudonymize=pseudonymize,
        )
        overlay = remember(empty(context, m.state_sequence), history)
        return apply(overlay, changes) if changes is not None else overlay

    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {
            "version": self.version,
            "created_at": self.bundle.created_at,
            "algorithm": self.algorithm,
            "n_users": len(self.bundle.users),
            "n_items": len(self.bundle.items),
            "factors": int(m.params.get("factors", m.dim)),
            "suitability": self.suitability,
            "active_only": m.rules.active_flag,
            "item_index": m.indexes.items.kind,
            "user_index": m.indexes.users.kind,
        }

    # --- users -----------------------------------------------------------------

    def fold_in(self, rows: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """A user vector from item rows and confidences, as implicit's recalculate_user.

        Solves (YtY + reg*I + Yu^T (Cu - I) Yu) x = Yu^T Cu, with Cu = alpha * confidence.
        """
        return self.fold_in_many([(rows, confidence)])[0]

    def fold_in_many(
        self, histories: Sequence[tuple[np.ndarray, np.ndarray]], chunk: int = 512
    ) -> np.ndarray:
        """``fold_in`` of each (rows, confidences), one row each: the solves batched.

        One ``numpy.linalg.solve`` per call has a fixed cost several times that of a
        64 x 64 solve itself; a live overlay re-solves every changed customer at once.
        """
        d = self._yty.shape[0]
        out = np.empty((len(histories), d + self._has_bias), dtype=np.float32)
        for start in range(0, len(histories), chunk):
            part = histories[start : start + chunk]
            a = np.empty((len(part), d, d))
            b = np.empty((len(part), d, 1))
            for i, (rows, confidence) in enumerate(part):
                a[i] = self._fold_in_matrix(rows, confidence)
                b[i, :, 0] = self._fold_in_rhs(rows, confidence)
            out[start : start + len(part), :d] = np.linalg.solve(a, b)[:, :, 0]
        if self._has_bias:
            out[:, d] = 1.0
        return out

    @cached_property
    def _fold_in_base(self) -> np.ndarray:
        return self._yty + self.regularization * np.eye(self._yty.shape[0])

    def _fold_in_matrix(self, rows: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        y = self._y[rows].astype(np.float64)
        c = self.alpha * confidence.astype(np.float64)
        return self._fold_in_base + (y.T * (c - 1.0)) @ y

    def _fold_in_rhs(self, rows: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        return (self.alpha * confidence.astype(np.float64)) @ self._y[rows].astype(np.float64)

    def _known(self, user_id: str, overlay: Overlay | None) -> _Known:
        """What the bundle, with the live overlay over it, knows of ``user_id``."""
        b = self.bundle
        live = overlay.user(user_id) if overlay is not None else None
        if live is ERASED:
            return _UNKNOWN  # forgotten: answered as a customer nobody knows
        if live is not None:
            row = live.row
            base = int(self.tolerance[row]) if row is not None else MIN_LEVEL
            tolerance = live.tolerance if live.tolerance is not None else base
            held = live.held_rows
            basis = "bundle" if row is not None else "default"
            if live.tolerance is not None:
                basis = "live"
            if live.refolded:
                return _Known(
                    live.vector, Source.FOLD_IN, tolerance, live.rows, live.confidence, held, basis
                )
            vector = b.user_index.vectors[row] if row is not None and live.rows.size else None
            return _Known(
                vector, Source.PERSONALIZED, tolerance, live.rows, live.confidence, held, basis
            )
        row = b.users.index(user_id) if user_id else None
        if row is None:
            return _UNKNOWN
        history = b.user_item_rows(row)
        held = history[b.held[b.indptr[row] : b.indptr[row + 1]]]
        vector = b.user_index.vectors[row] if history.size else None
        tolerance = int(self.tolerance[row])
        return _Known(vector, Source.PERSONALIZED, tolerance, history, b.user_item_data(row), held)

    def suitability_basis(self, user_id: str, overlay: Overlay | None = None) -> Suitability:
        """The tolerance an answer for ``user_id`` used, where it came from, and how many
        products each rule removed (the facts an audit record keeps; every answer's
        :attr:`Ranked.suitability` holds them already)."""
        return self._suitability(self._known(user_id, overlay), overlay)

    def _suitability(self, known: _Known, overlay: Overlay | None) -> Suitability:
        sets = self._rules(overlay).by_tolerance
        n = len(self.bundle.items)
        # Each set holds the active products up to a risk level: counts, not a pass.
        inactive = n - sets[-1].count
        suitable = sets[known.tolerance - MIN_LEVEL]
        unsuitable = sets[-1].count - suitable.count
        closed = self.exclusive.allowed(suitable, self.exclusive.held_categories(known.held))
        removed = {
            "inactive": inactive,
            "unsuitable": unsuitable,
            "exclusive_category": suitable.count - closed.count,
            "interacted": len(known.rows),
        }
        return Suitability(known.tolerance, known.basis, removed)

    def resolve_user(
        self, user_id: str, recent_item_ids: tuple[str, ...], overlay: Overlay | None = None
    ) -> ResolvedUser:
        """The customer's vector (own, live, folded from recent items, or none), rules, history."""
        return self._resolve(self._known(user_id, overlay), recent_item_ids)

    def _resolve(self, known: _Known, recent_item_ids: tuple[str, ...]) -> ResolvedUser:
        history, conf, tolerance = known.rows, known.confidence, known.tolerance
        recent = self.bundle.items.indices(recent_item_ids) if recent_item_ids else _NO_ROWS
        recent = np.unique(recent[recent >= 0]) if recent.size else recent
        if recent.size:
            rows = np.concatenate([history, recent]).astype(np.int64)
            confs = np.concatenate([conf, np.full(recent.size, self.recent_confidence, np.float32)])
            rows, inverse = np.unique(rows, return_inverse=True)
            confs = np.bincount(inverse, weights=confs).astype(np.float32)
            vector = self.fold_in(rows, confs)
            # History stays excluded: the recent items join it, never replace it.
            return ResolvedUser(vector, Source.FOLD_IN, tolerance, rows, rows, confs, known.held)
        source = known.source if known.vector is not None else Source.POPULAR
        return ResolvedUser(known.vector, source, tolerance, history, history, conf, known.held)

    # --- queries ---------------------------------------------------------------

    def _popular(
        self, allowed: AllowedSet, k: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular of ``allowed`` less ``exclude``: (scores, rows)."""
        rows = allowed.first(self.bundle.popularity, k, exclude)
        return self.popularity_score[rows], rows

    def _nearest(
        self, vector: np.ndarray, allowed: AllowedSet, k: int, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k items of ``allowed`` less ``exclude`` that score best against ``vector``."""
        return self.bundle.item_index.search(vector, k, allowed, exclude)

    def _capped(
        self, search: _Search, k: int, cap: int, allowed: AllowedSet, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first k of ``search``'s ranking with at most ``cap`` of any one category.

        Exactly the ranking walked from the top, skipping each product whose category
        already has ``cap``. A round searches for what is still missing and walks that;
        a round that comes back short skipped only products of categories it filled, so
        the next round searches without those categories and the rows taken, which goes
        on down the same ranking. Each short round fills a category: at most one round
        more than there are categories.
        """
        if not cap:
            return search(allowed, k, exclude)
        categories = self.bundle.categories
        counts: dict[int, int] = {}
        full: set[int] = set()
        got_scores: list[np.ndarray] = []
        got_rows: list[np.ndarray] = []
        need = k
        while True:
            fetch = need * _OVER_FETCH
            scores, rows = search(allowed, fetch, exclude)
            taken = cap_per_category(rows, categories.codes, cap, need, counts)
            got_scores.append(scores[taken])
            got_rows.append(rows[taken])
            if len(taken) == need or len(rows) < fetch:  # full, or nothing more is allowed
                return np.concatenate(got_scores), np.concatenate(got_rows)
            need -= len(taken)
            filled = {c for c, n in counts.items() if n >= cap} - full
            assert filled, "a short round skipped products of no category it filled"
            full |= filled
            allowed = categories.without(allowed, filled)
            exclude = np.concatenate([exclude, rows[taken]])

    def _explain(self, user: ResolvedUser, rows: np.ndarray) -> list[tuple[tuple[str, float], ...]]:
        """Per recommended row, the customer's items that contributed most (implicit's explain)."""
        if user.confidence_rows.size == 0:
            return [() for _ in rows]
        a = self._fold_in_matrix(user.confidence_rows, user.confidence)
        weighted = scipy.linalg.cho_solve(
            scipy.linalg.cho_factor(a), self._y[rows].T.astype(np.float64)
        )
        own = self._y[user.confidence_rows].astype(np.float64)
        contrib = (own @ weighted) * (self.alpha * user.confidence[:, None])  # own x recommended
        ids = self.bundle.items.ids
        out = []
        for j in range(len(rows)):
            top = np.argsort(-contrib[:, j], kind="stable")[:_EXPLAIN_TOP]
            out.append(tuple((ids[user.confidence_rows[t]], float(contrib[t, j])) for t in top))
        return out

    def _rules(self, overlay: Overlay | None) -> ItemRules:
        return overlay.item_rules if overlay is not None else self.item_rules

    def _allowed(
        self, overlay: Overlay | None, tolerance: int, held: np.ndarray, show_held: bool
    ) -> AllowedSet:
        """What a customer may be offered: their tolerance's set, less their exclusive categories.

        The sets are shared by every request (exclusions are applied by the search
        itself), unless the products held may be shown again (``show_held``).
        """
        base = self._rules(overlay).allowed(tolerance)
        codes = self.exclusive.held_categories(held)
        return self.exclusive.allowed(base, codes, held if show_held else None)

    def recommend(
        self, q: RecommendQuery, overlay: Overlay | None = None, now: datetime | None = None
    ) -> Ranked:
        """The customer's top k; ``now`` ends decline cooldowns (default: the clock)."""
        known = self._known(q.user_id, overlay)
        user = self._resolve(known, q.recent_item_ids)
        sequence = overlay.sequence if overlay is not None else 0
        exclude = _NO_ROWS if q.include_interacted else user.history
        if q.exclude_item_ids:
            exclude = np.concatenate([self.bundle.items.indices(q.exclude_item_ids), exclude])
        allowed = self._allowed(overlay, user.tolerance, user.held, q.include_interacted)
        # Declines live in the overlay alone: a category declined within its cooldown is shut.
        live = overlay.user(q.user_id) if overlay is not None else None
        if live is not None and live.declined:
            when = now if now is not None else datetime.now(timezone.utc)
            codes, rows = declined_within_cooldown(
                self.contact_policy, self.bundle.categories, live.declined, when
            )
            allowed = self.bundle.categories.without(allowed, codes)
            exclude = np.concatenate([exclude, rows])
        vector = user.vector
        search: _Search = self._popular if vector is None else partial(self._nearest, vector)
        scores, rows = self._capped(search, q.k, q.max_per_category, allowed, exclude)
        ids = self.bundle.items.ids
        if q.explain and vector is not None:
            because = self._explain(user, rows)
            items = [
                ScoredItem(ids[r], s, bc)
                for r, s, bc in zip(rows.tolist(), scores.tolist(), because, strict=True)
            ]
        else:
            items = [
                ScoredItem(ids[r], s) for r, s in zip(rows.tolist(), scores.tolist(), strict=True)
            ]
        suitability = self._suitability(known, overlay)
        return Ranked(items, user.source, self.version, sequence=sequence, suitability=suitability)

    def similar_items(self, q: SimilarQuery, overlay: Overlay | None = None) -> Ranked:
        b = self.bundle
        row = b.items.index(q.item_id)
        if row is None:
            raise NotFound(f"item_id {q.item_id!r} is not in model {self.version}")
        known = self._known(q.user_id, overlay)
        exclude = [b.items.indices(q.exclude_item_ids), np.array([row]), known.rows]
        allowed = self._allowed(overlay, known.tolerance, known.held, False)
        scores, rows = self._similar.search(
            self._similar.vectors[row], q.k, allowed, np.concatenate(exclude)
        )
        ids = b.items.ids
        return Ranked(
            [ScoredItem(ids[r], s) for r, s in zip(rows.tolist(), scores.tolist(), strict=True)],
            Source.PERSONALIZED,
            self.version,
            sequence=overlay.sequence if overlay is not None else 0,
            suitability=self._suitability(known, overlay),
        )

    def unknown_items(self, item_ids: tuple[str, ...]) -> tuple[str, ...]:
        """The ids among ``item_ids`` that the catalogue lacks, in order."""
        rows = self.bundle.items.indices(item_ids)
        return tuple(item_ids[i] for i in np.flatnonzero(rows < 0).tolist())

    def rank_items(self, q: RankQuery, overlay: Overlay | None = None) -> Ranked:
        b = self.bundle
        customer = self._known(q.user_id, overlay)
        user = self._resolve(customer, q.recent_item_ids)
        candidate_ids = list(dict.fromkeys(q.item_ids))  # first occurrence wins
        rows = b.items.indices(candidate_ids)
        rules = self._rules(overlay)
        known = rows >= 0
        at = rows.clip(0)  # a row to look up for every candidate (unknown ones read row 0)
        closed = self.exclusive.held_categories(user.held)
        interacted = np.isin(rows, _NO_ROWS if q.include_interacted else user.history)
        checks = (
            (DropReason.UNKNOWN_ITEM, ~known),
            (DropReason.INACTIVE, ~rules.active[at]),
            (DropReason.UNSUITABLE, ~rules.eligible(at, user.tolerance)),  # active, too risky
            (DropReason.EXCLUSIVE_CATEGORY, ~self.exclusive.offered(at, closed, user.held)),
            (DropReason.INTERACTED, interacted),
        )
        reasons: list[DropReason | None] = [None] * len(rows)
        for reason, failed in reversed(checks):  # the first rule to fail writes last
            for i in np.flatnonzero(failed).tolist():
                reasons[i] = reason
        dropped = tuple(
            Dropped(i, r) for i, r in zip(candidate_ids, reasons, strict=True) if r is not None
        )
        unknown = tuple(d.item_id for d in dropped if d.reason is DropReason.UNKNOWN_ITEM)
        rows = rows[np.array([r is None for r in reasons], dtype=bool)]
        if user.vector is None:
            scores = self.popularity_score[rows]
        else:
            scores = b.item_index.vectors[rows] @ user.vector
        order = np.lexsort((np.arange(len(rows)), -scores))
        items = [ScoredItem(b.items.ids[rows[i]], float(scores[i])) for i in order]
        sequence = overlay.sequence if overlay is not None else 0
        suitability = self._suitability(customer, overlay)
        return Ranked(items, user.source, self.version, unknown, sequence, dropped, suitability)
