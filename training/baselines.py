"""Baselines scored on the same split, under the same rules as the model.

- ``popularity``: the items most training users interacted with;
- ``itemknn``: implicit's item-item ``BM25Recommender`` (100 neighbours), a user's
  score for an item being the sum of its similarities to the user's training items;
- ``random``: a uniformly random order (seeded).

Every baseline excludes the user's training items and ineligible items exactly as the
service does (``training.scoring.Eligibility``); popularity answers users without
training history, as the service's ``POPULAR`` source does, except for ``random``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from training.scoring import Eligibility

__all__ = ["BASELINES", "ITEMKNN_NEIGHBOURS", "rank_baseline"]

BASELINES = ("popularity", "itemknn", "random")
ITEMKNN_NEIGHBOURS = 100


def _itemknn(user_items: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
    from implicit.nearest_neighbours import BM25Recommender

    model = BM25Recommender(K=ITEMKNN_NEIGHBOURS, num_threads=1)
    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        # implicit's BM25Recommender hands its own COO weighting to a CSR-only fit.
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        model.fit(user_items.astype(np.float32).tocsr(), show_progress=False)
    similarity = model.similarity.tocsr()

    def scores(users: np.ndarray) -> np.ndarray:
        return np.asarray((user_items[users] @ similarity).todense(), dtype=np.float64)

    return scores


def _random(n_items: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)

    def scores(users: np.ndarray) -> np.ndarray:
        return rng.random((len(users), n_items))

    return scores


def rank_baseline(
    name: str, eligibility: Eligibility, users: np.ndarray, k: int, seed: int = 0
) -> np.ndarray:
    """Top-k item rows per user (training user rows, -1 for unknown), -1 padded.

    Raises:
        ValueError: an unknown baseline name.
    """
    if name == "popularity":
        return eligibility.rank(users, k, None)
    if name == "itemknn":
        return eligibility.rank(users, k, _itemknn(eligibility.history))
    if name == "random":
        return eligibility.rank(users, k, _random(eligibility.n_items, seed), cold_popular=False)
    raise ValueError(f"baselines: unknown baseline {name!r} (expected {', '.join(BASELINES)})")
