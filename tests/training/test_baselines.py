"""Baselines: ranked under the service's rules, deterministic, with the expected order."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.errors import DataError
from training.baselines import (
    BASELINES,
    EASE_GRID,
    EASE_MAX_ITEMS,
    choose_ease_lambda,
    ease_weights,
    rank_baseline,
)
from training.data import TrainingData
from training.metrics import hit_matrix, ndcg_at_k
from training.scoring import Eligibility
from training.tune import TuneOptions, carve_validation


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


# Four users over three items; the weights (ratings) must not matter, EASE reads 0/1.
X = np.array([[5, 1, 0], [2, 0, 0], [1, 4, 3], [0, 2, 5]], dtype=np.float32)


def _direct_ease(x: np.ndarray, lam: float) -> np.ndarray:
    """Steck's closed form, written out: B = I - P diag(1/diag(P)), P = (X^T X + lam I)^-1."""
    binary = (x > 0).astype(np.float64)
    p = np.linalg.inv(binary.T @ binary + lam * np.eye(x.shape[1]))
    return np.eye(x.shape[1]) - p @ np.diag(1.0 / np.diag(p))


@pytest.mark.parametrize("lam", [0.5, 1.0, 10.0])
def test_ease_weights_are_steck_closed_form(lam: float) -> None:
    b = ease_weights(sp.csr_matrix(X), lam)
    assert b.shape == (3, 3)
    assert np.allclose(b, _direct_ease(X, lam), atol=1e-12)
    assert (np.diag(b) == 0).all()  # exactly: an item never recommends itself
    # It is the constrained least squares: the gradient of ||X - XB||^2 + lam ||B||^2
    # vanishes off the diagonal, where B is free.
    g = (X > 0).T.astype(np.float64) @ (X > 0).astype(np.float64)
    residual = (g + lam * np.eye(3)) @ b - g
    assert np.allclose(residual[~np.eye(3, dtype=bool)], 0, atol=1e-12)


def test_ease_two_items_by_hand() -> None:
    # Items 0 and 1: three users each, two users both. Item 0's weight towards item 1 is
    # the ridge regression of item 1 on item 0: G01 / (G00 + lambda) = 2 / (3 + 1).
    x = sp.csr_matrix(np.array([[1, 1], [1, 0], [1, 1], [0, 1]], dtype=np.float32))
    assert np.allclose(ease_weights(x, 1.0), [[0.0, 0.5], [0.5, 0.0]])
    # A user holding only item 0 scores item 0 at 0 (not itself) and item 1 at 0.5.
    assert np.allclose(x[1] @ ease_weights(x, 1.0), [[0.0, 0.5]])


def test_ease_refuses_a_catalogue_too_large_for_a_dense_inverse() -> None:
    too_many = sp.csr_matrix((2, EASE_MAX_ITEMS + 1), dtype=np.float32)
    with pytest.raises(DataError, match="ease: 20,001 products is above the 20,000"):
        ease_weights(too_many, 500.0)
    with pytest.raises(ValueError, match="lambda must be above 0"):
        ease_weights(sp.csr_matrix(X), 0.0)


def test_ease_ranks_under_the_rules_and_cold_users_get_popular(
    eligibility: Eligibility, training_data: TrainingData
) -> None:
    users = np.arange(len(training_data.users))
    ease = rank_baseline("ease", eligibility, users, 10, ease_lambda=50.0)
    assert (ease != rank_baseline("itemknn", eligibility, users, 10)).any()
    # The top item is the highest-scoring allowed one: held items are never shown.
    b = ease_weights(eligibility.history, 50.0)
    scores = (eligibility.history[users] > 0).astype(np.float64) @ b
    allowed = eligibility.mask(users)
    best = np.where(allowed, scores, -np.inf).max(axis=1)
    has = ease[:, 0] >= 0
    assert np.allclose(scores[np.flatnonzero(has), ease[has, 0]], best[has])
    cold = rank_baseline("ease", eligibility, np.array([-1]), 10)
    assert (cold == rank_baseline("popularity", eligibility, np.array([-1]), 10)).all()


def test_ease_lambda_is_chosen_on_the_tuners_carve(training_data: TrainingData) -> None:
    choice = choose_ease_lambda(training_data, seed=2)
    assert choice.validated in choice.by_lambda
    assert choice.by_lambda[choice.validated] == max(choice.by_lambda.values())
    # The grid, then the geometric midpoints between the best step and its neighbours.
    coarse = max(EASE_GRID, key=choice.by_lambda.__getitem__)
    i = EASE_GRID.index(coarse)
    assert set(choice.by_lambda) == {
        *EASE_GRID,
        float(f"{(coarse * EASE_GRID[i - 1]) ** 0.5:.3g}"),
        float(f"{(coarse * EASE_GRID[i + 1]) ** 0.5:.3g}"),
    }
    assert not choice.at_edge
    assert choice.metric == "ndcg@10"
    # The tuner's three carves, seeds 2, 3, 4: the same validation pairs.
    carves = [carve_validation(training_data.user_items, 0.25, seed=s) for s in (2, 3, 4)]
    assert choice.validation["folds"] == 3
    assert choice.validation["fit_pairs"] == [fit.nnz for fit, _ in carves]
    assert choice.validation["validation_pairs"] == [valid.nnz for _, valid in carves]
    # Each lambda's figure is the mean of its nDCG@10 over the three carves.
    per_carve = []
    for fit, valid in carves:
        users = np.flatnonzero(np.diff(valid.indptr) > 0)
        b = ease_weights(fit, choice.validated)
        x = (fit > 0).astype(np.float64)
        rows = Eligibility.from_data(training_data, history=fit).rank(
            users, 10, lambda u, x=x, b=b: np.asarray(x[u] @ b)
        )
        sub = valid[users]
        relevant = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
        per_carve.append(
            ndcg_at_k(hit_matrix(rows, relevant, sub.indices), np.diff(sub.indptr), 10).mean()
        )
    assert choice.by_lambda[choice.validated] == pytest.approx(np.mean(per_carve), rel=1e-9)
    # EASE is fit on all the pairs with the best lambda times the carves' share of them.
    share = np.mean([fit.nnz for fit, _ in carves]) / training_data.user_items.nnz
    assert 0.5 < choice.share < 1.0 and choice.share == pytest.approx(share, rel=1e-12)
    assert choice.lam == float(f"{choice.validated * share:.4g}") < choice.validated
    assert choice.to_json()["lambda"] == choice.lam
    assert choice.to_json()["validated_lambda"] == choice.validated
    assert (
        choice.to_json()["chosen_by"]
        == "ndcg@10 on 3 validation carves (the mean) of the train part"
    )
    one = choose_ease_lambda(training_data, seed=2, options=TuneOptions(folds=1))
    assert one.validation["validation_pairs"] == [carves[0][1].nnz]
    assert one.to_json()["chosen_by"] == "ndcg@10 on a validation carve of the train part"


@pytest.mark.parametrize("grid", [(3000.0, 10000.0), (1.0, 3.0)])
def test_ease_lambda_at_the_edge_widens_the_grid(
    training_data: TrainingData, grid: tuple[float, float]
) -> None:
    # Both narrow grids miss the best lambda (on either side): widening by half-decades
    # (1, 3, 10, 30, ...) must reach the same choice as the default grid, inside the range.
    wide = choose_ease_lambda(training_data, seed=2)
    narrow = choose_ease_lambda(training_data, seed=2, grid=grid)
    assert narrow.lam == wide.lam and not narrow.at_edge
    assert narrow.validated is not None
    assert min(narrow.by_lambda) < narrow.validated < max(narrow.by_lambda)
    ladder = {1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0}
    midpoints = set(narrow.by_lambda) - set(grid) - ladder
    assert len(midpoints) == 2  # the refinement around the best, between ladder steps


def test_unknown_baseline_is_named(eligibility: Eligibility) -> None:
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        rank_baseline("svd", eligibility, np.array([0]), 5)
