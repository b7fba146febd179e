"""Ranking metrics at k over recommendation lists, as docs/EVALUATION.md defines them.

Lists are an ``(n_users, K)`` matrix of item rows, best first, padded with -1 where a
user got fewer than K items. Relevance is binary: a test pair (user, item) is relevant.
Per-user functions return NaN for a user without relevant items (the metric is
undefined there); :func:`summarize` averages over users with at least one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "METRICS",
    "PER_USER",
    "coverage_at_k",
    "hit_matrix",
    "hit_rate_at_k",
    "map_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "novelty_at_k",
    "precision_at_k",
    "recall_at_k",
    "suitability_violations",
    "summarize",
]

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr", "coverage", "novelty")
"""Every metric :func:`summarize` reports, in report order."""


def hit_matrix(
    recommended: np.ndarray, relevant_users: np.ndarray, relevant_items: np.ndarray
) -> np.ndarray:
    """Which recommended slots are relevant.

    Args:
        recommended: ``(n_users, K)`` item rows, -1 for an empty slot.
        relevant_users: row in ``recommended`` of each relevant pair.
        relevant_items: item row of each relevant pair.

    Returns:
        Bool ``(n_users, K)``; an empty slot is never a hit.
    """
    recommended = np.asarray(recommended, dtype=np.int64)
    n_users = recommended.shape[0]
    span = int(max(recommended.max(initial=-1), np.max(relevant_items, initial=-1))) + 1
    keys = np.arange(n_users, dtype=np.int64)[:, None] * span + recommended
    wanted = np.asarray(relevant_users, np.int64) * span + np.asarray(relevant_items, np.int64)
    return np.isin(keys, wanted) & (recommended >= 0)


def _undefined(values: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(n_relevant) > 0, values, np.nan)


def precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Hits in the top k over k (not over the list length: a short list is not rewarded)."""
    return _undefined(hits[:, :k].sum(axis=1) / k, n_relevant)


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Hits in the top k over the user's number of relevant items."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _undefined(hits[:, :k].sum(axis=1) / n_relevant, n_relevant)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """DCG of the top k (binary gains, 1/log2(rank + 1)) over the ideal DCG.

    The ideal list puts ``min(n_relevant, k)`` hits first.
    """
    top = hits[:, :k]
    disc = _discounts(k)
    dcg = top @ disc[: top.shape[1]]
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(n_relevant, k)]
    with np.errstate(divide="ignore", invalid="ignore"):
        return _undefined(dcg / ideal, n_relevant)


def map_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Average precision as Microsoft Recommenders' ``map``.

    The sum of precision at each hit's rank within the top k, over the user's number of
    relevant items (all of them, not ``min(n_relevant, k)``).
    """
    top = hits[:, :k].astype(np.float64)
    ranks = np.arange(1, top.shape[1] + 1)
    precision_at_hit = np.cumsum(top, axis=1) / ranks * top
    with np.errstate(divide="ignore", invalid="ignore"):
        return _undefined(precision_at_hit.sum(axis=1) / n_relevant, n_relevant)


def hit_rate_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """1 if any of the top k is relevant, else 0."""
    return _undefined(np.asarray(hits[:, :k].any(axis=1), dtype=np.float64), n_relevant)


def mrr_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """1 / rank of the first relevant item in the top k, 0 if there is none."""
    top = hits[:, :k]
    first = np.argmax(top, axis=1) + 1
    return _undefined(np.where(top.any(axis=1), 1.0 / first, 0.0), n_relevant)


def coverage_at_k(recommended: np.ndarray, k: int, n_items: int) -> float:
    """Share of the catalogue that appears in at least one user's top k."""
    top = recommended[:, :k]
    return float(np.unique(top[top >= 0]).size / n_items) if n_items else 0.0


def novelty_at_k(
    recommended: np.ndarray, k: int, item_users: np.ndarray, n_train_users: int
) -> float:
    """Mean self-information ``-log2 p(i)`` of the recommended items in the top k.

    ``p(i)`` is the share of training users who interacted with item i; an item no
    training user touched counts as touched once (so its novelty is finite).
    """
    top = recommended[:, :k]
    rows = top[top >= 0]
    if rows.size == 0 or n_train_users == 0:
        return 0.0
    p = np.maximum(np.asarray(item_users, np.float64)[rows], 1.0) / n_train_users
    return float(np.mean(-np.log2(p)))


def suitability_violations(
    recommended: np.ndarray, item_risk: np.ndarray, user_tolerance: np.ndarray
) -> int:
    """Recommended (user, item) slots whose item risk is above the user's tolerance."""
    filled = recommended >= 0
    risk = np.where(filled, np.asarray(item_risk)[np.where(filled, recommended, 0)], 0)
    return int((risk > np.asarray(user_tolerance)[:, None]).sum())


PER_USER = {
    "precision": precision_at_k,
    "recall": recall_at_k,
    "ndcg": ndcg_at_k,
    "map": map_at_k,
    "hit_rate": hit_rate_at_k,
    "mrr": mrr_at_k,
}
"""The metrics computed per user (each user's value at k; :func:`summarize` averages them)."""


def summarize(
    recommended: np.ndarray,
    relevant_users: np.ndarray,
    relevant_items: np.ndarray,
    ks: Sequence[int],
    item_users: np.ndarray,
    n_train_users: int,
) -> dict[str, dict[int, float]]:
    """Every metric at every k, averaged over users with at least one relevant item.

    Args:
        recommended: ``(n_users, K)`` item rows, -1 padded; K must be at least ``max(ks)``.
        relevant_users, relevant_items: the relevant pairs (row in ``recommended``, item row).
        ks: cut-offs.
        item_users: training users per item row (for novelty); its length is the catalogue size.
        n_train_users: users in the training data (for novelty).

    Returns:
        ``{metric: {k: value}}`` for every name in :data:`METRICS`.
    """
    recommended = np.asarray(recommended, dtype=np.int64)
    if ks and max(ks) > recommended.shape[1]:
        raise ValueError(f"k {max(ks)} is above the list length {recommended.shape[1]}")
    n_relevant = np.bincount(np.asarray(relevant_users, np.int64), minlength=len(recommended))
    evaluated = n_relevant > 0
    hits = hit_matrix(recommended, relevant_users, relevant_items)[evaluated]
    n_rel = n_relevant[evaluated]
    lists = recommended[evaluated]
    out: dict[str, dict[int, float]] = {name: {} for name in METRICS}
    for k in ks:
        for name, fn in PER_USER.items():
            values = fn(hits, n_rel, k)
            out[name][k] = float(np.mean(values)) if values.size else 0.0
        out["coverage"][k] = coverage_at_k(lists, k, len(item_users))
        out["novelty"][k] = novelty_at_k(lists, k, item_users, n_train_users)
    return out
