"""Offline top-k under the serving rules, for baselines and tuning.

The model itself is evaluated through ``recsvc.model.ranking.Recommender``; what cannot go
through it (a baseline's scores, the many candidate models of a tuning run) is ranked
here under the same rules, built by the same ``recsvc.model.rules`` functions from the same
tables: active and suitable items only, never one the user has in training, none of an
exclusive category the user holds a product of in training, and the most popular eligible
items for a user without training history.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

import numpy as np
import scipy.sparse as sp

from recsvc.model.rules import MIN_LEVEL, Categories, ItemRules, user_tolerance
from recsvc.model.topk import top_k_rows
from recsvc.settings import EXCLUSIVE_CATEGORIES
from training.data import TrainingData

__all__ = ["Eligibility", "batches"]

_BATCH = 512
_CELLS = 4_000_000  # per dense block: 32 MB of float64


class Eligibility:
    """Which items each training user may be shown, as the service decides it.

    Example:
        >>> elig = Eligibility.from_data(data)
        >>> mask = elig.mask(np.array([0, 1]))  # (2, n_items) bool
    """

    def __init__(
        self,
        rules: ItemRules,
        tolerance: np.ndarray,
        history: sp.csr_matrix,
        popularity: np.ndarray,
        closed: sp.csr_matrix | None = None,
    ) -> None:
        self._base = np.stack([s.mask() for s in rules.by_tolerance])  # (5, n_items)
        self.risk = rules.risk
        self.tolerance = tolerance
        self.history = history
        # What no user may see beyond the base rules: their history and closed categories.
        self._hidden = history if closed is None else (history + closed).tocsr()
        self.popularity = popularity  # training users per item

    @classmethod
    def from_data(
        cls,
        data: TrainingData,
        history: sp.csr_matrix | None = None,
        exclusive_categories: Collection[str] = EXCLUSIVE_CATEGORIES,
    ) -> Eligibility:
        """Rules from ``data``'s tables; history from ``history`` (default: its matrix)."""
        rules = ItemRules.from_table(data.item_table, data.has_risk_levels)
        history = (data.user_items if history is None else history).tocsr()
        popularity = np.bincount(history.indices, minlength=len(data.items))
        closed = _closed(data, history, exclusive_categories)
        return cls(rules, user_tolerance(data.user_table), history, popularity, closed)

    @property
    def n_items(self) -> int:
        return int(self._base.shape[1])

    def mask(self, users: np.ndarray) -> np.ndarray:
        """``(len(users), n_items)`` allowed items; a user row of -1 is unknown (tolerance 1)."""
        users = np.asarray(users, dtype=np.int64)
        known = users >= 0
        tol = np.full(len(users), MIN_LEVEL, dtype=np.int64)
        tol[known] = self.tolerance[users[known]]
        out = self._base[np.clip(tol, 1, len(self._base)) - 1].copy()
        sub = self._hidden[users[known]]
        rows = np.repeat(np.flatnonzero(known), np.diff(sub.indptr))
        out[rows, sub.indices] = False
        return out

    def rank(
        self,
        users: np.ndarray,
        k: int,
        scores: Callable[[np.ndarray], np.ndarray] | None,
        cold_popular: bool = True,
    ) -> np.ndarray:
        """Top-k allowed item rows per user, -1 padded; popular items for users without history.

        Args:
            users: training user rows (-1 for unknown users).
            k: list length.
            scores: batch of user rows -> ``(batch, n_items)`` scores; None ranks every
                user by popularity.
            cold_popular: rank users without training history by popularity (as the
                service does); False hands them to ``scores`` too.
        """
        users = np.asarray(users, dtype=np.int64)
        out = np.full((len(users), k), -1, dtype=np.int64)
        lengths = np.zeros(len(users), dtype=np.int64)
        known = users >= 0
        lengths[known] = np.diff(self.history.indptr)[users[known]]
        personal = (lengths > 0) | (not cold_popular)
        if scores is None:
            personal[:] = False
        for idx in batches(len(users), self.n_items):
            mask = self.mask(users[idx])
            batch = np.broadcast_to(self.popularity.astype(np.float64), mask.shape).copy()
            p = personal[idx]
            if scores is not None and p.any():
                batch[p] = scores(users[idx][p])
            out[idx] = top_k_rows(batch, mask, k)
        return out


def _closed(
    data: TrainingData, history: sp.csr_matrix, exclusive: Collection[str]
) -> sp.csr_matrix:
    """Per user, every item of an exclusive category they hold a product of in ``history``."""
    categories = Categories.from_table(data.item_table)
    items = np.flatnonzero(categories.member(categories.codes_of(exclusive)))
    one_hot = sp.csr_matrix(
        (np.ones(len(items), np.float32), (items, categories.codes[items])),
        shape=(len(data.items), len(categories.names)),
    )
    x = data.user_items
    held = sp.csr_matrix((data.held.astype(np.float32), x.indices, x.indptr), shape=x.shape)
    held = held.multiply(history > 0)  # a tuning fold holds only its own pairs
    return ((held @ one_hot) @ one_hot.T).astype(bool).tocsr()


def batches(n: int, n_items: int = 1) -> Iterator[slice]:
    """Slices of ``range(n)`` small enough that a dense batch x items block stays small."""
    size = max(1, min(_BATCH, _CELLS // max(1, n_items)))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
