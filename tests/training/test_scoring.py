"""Offline ranking under the serving rules gives the served answers."""

from __future__ import annotations

import numpy as np
import pytest

from recsvc.model.queries import RecommendQuery
from recsvc.model.ranking import Recommender, Source
from training.data import TrainingData
from training.scoring import Eligibility, batches


def test_batches_cover_the_range_in_small_blocks() -> None:
    blocks = list(batches(1000, n_items=100_000))
    assert blocks[0] == slice(0, 40) and blocks[-1].stop == 1000
    assert sum(b.stop - b.start for b in blocks) == 1000


def test_mask_removes_history_and_ineligible_items(training_data: TrainingData) -> None:
    elig = Eligibility.from_data(training_data)
    users = np.array([0, 5, -1])
    mask = elig.mask(users)
    risk = elig.risk
    history = training_data.user_items
    for i, u in enumerate(users[:2]):
        own = history.indices[history.indptr[u] : history.indptr[u + 1]]
        assert not mask[i, own].any()
        assert not mask[i, risk > elig.tolerance[u]].any()
    # An unknown user: tolerance 1, no history.
    assert not mask[2, risk > 1].any()


def test_cold_users_get_the_services_popular_list(
    training_data: TrainingData, recommender: Recommender
) -> None:
    elig = Eligibility.from_data(training_data)
    ranked = recommender.recommend(RecommendQuery(user_id="nobody-we-know", k=10))
    assert ranked.source == Source.POPULAR
    rows = elig.rank(np.array([-1]), 10, None)[0]
    assert [training_data.items.ids[r] for r in rows] == [i.item_id for i in ranked.items]


def test_ranking_model_scores_reproduces_recommend(
    training_data: TrainingData, recommender: Recommender
) -> None:
    """Tuning ranks offline; it must pick what the service would, up to float ties."""
    bundle = recommender.bundle
    users_f, items_f = bundle.user_index.vectors, bundle.item_index.vectors
    elig = Eligibility.from_data(training_data)
    users = np.arange(0, len(training_data.users), 37)

    def scores(u: np.ndarray) -> np.ndarray:
        return np.asarray(users_f[u] @ items_f.T, dtype=np.float64)

    ours = elig.rank(users, 10, scores)
    for i, u in enumerate(users):
        served = recommender.recommend(RecommendQuery(user_id=training_data.users.ids[u], k=10))
        ids = [training_data.items.ids[r] for r in ours[i] if r >= 0]
        if ids != [s.item_id for s in served.items]:
            # Only near-ties may swap: the scores, place by place, are equal.
            mine = scores(np.array([u]))[0][[r for r in ours[i] if r >= 0]]
            assert mine == pytest.approx([s.score for s in served.items], abs=1e-5)
