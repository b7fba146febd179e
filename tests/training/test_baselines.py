"""Baselines: ranked under the service's rules, deterministic, with the expected order."""

from __future__ import annotations

import numpy as np
import pytest

from training.baselines import BASELINES, rank_baseline
from training.data import TrainingData
from training.scoring import Eligibility


@pytest.fixture(scope="module")
def eligibility(training_data: TrainingData) -> Eligibility:
    return Eligibility.from_data(training_data)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_never_break_a_rule(
    name: str, eligibility: Eligibility, training_data: TrainingData
) -> None:
    users = np.arange(len(training_data.users))
    rows = rank_baseline(name, eligibility, users, 10, seed=1)
    assert rows.shape == (len(users), 10)
    allowed = eligibility.mask(users)
    filled = rows >= 0
    assert allowed[np.nonzero(filled)[0], rows[filled]].all()
    # Each list is distinct items.
    for r in rows:
        r = r[r >= 0]
        assert len(set(r.tolist())) == len(r)


def test_popularity_ranks_by_training_users(eligibility: Eligibility) -> None:
    rows = rank_baseline("popularity", eligibility, np.array([-1]), 5)[0]
    counts = eligibility.popularity[rows]
    assert (np.diff(counts) <= 0).all()


def test_random_is_seeded_and_reaches_cold_users(eligibility: Eligibility) -> None:
    users = np.array([0, 1, -1, -1])
    a = rank_baseline("random", eligibility, users, 5, seed=3)
    assert (a == rank_baseline("random", eligibility, users, 5, seed=3)).all()
    assert (a != rank_baseline("random", eligibility, users, 5, seed=4)).any()
    # Two cold users get independent random lists, not the popular one.
    assert (a[2] != a[3]).any()


def test_itemknn_scores_items_similar_to_the_users_own(
    eligibility: Eligibility, training_data: TrainingData
) -> None:
    users = np.arange(len(training_data.users))
    knn = rank_baseline("itemknn", eligibility, users, 10)
    rnd = rank_baseline("random", eligibility, users, 10, seed=0)
    assert (knn != rnd).any()
    # Cold users: no history to be similar to, so the popular list.
    cold = rank_baseline("itemknn", eligibility, np.array([-1]), 10)
    assert (cold == rank_baseline("popularity", eligibility, np.array([-1]), 10)).all()


def test_unknown_baseline_is_named(eligibility: Eligibility) -> None:
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        rank_baseline("svd", eligibility, np.array([0]), 5)
