"""Metric functions against cases computed by hand (see docs/EVALUATION.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import (
    METRICS,
    coverage_at_k,
    hit_matrix,
    hit_rate_at_k,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    novelty_at_k,
    precision_at_k,
    recall_at_k,
    suitability_violations,
    summarize,
)

# Three users, lists of length 4 (-1: an empty slot).
#   user 0: relevant {1, 3, 9}; list [1, 2, 3, 4]  -> hits at ranks 1 and 3
#   user 1: relevant {7};       list [5, 7, -1, -1] (only two items) -> hit at rank 2
#   user 2: no relevant items (undefined; left out of averages)
LISTS = np.array([[1, 2, 3, 4], [5, 7, -1, -1], [1, 2, 3, 4]])
REL_USERS = np.array([0, 0, 0, 1])
REL_ITEMS = np.array([1, 3, 9, 7])
N_REL = np.array([3, 1, 0])


@pytest.fixture
def hits() -> np.ndarray:
    return hit_matrix(LISTS, REL_USERS, REL_ITEMS)


def test_hit_matrix_marks_relevant_slots_and_never_empty_ones(hits: np.ndarray) -> None:
    assert hits.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [False, False, False, False],
    ]
    # -1 is never a hit, even if a (user, -1) pair were somehow "relevant".
    assert not hit_matrix(np.array([[-1]]), np.array([0]), np.array([-1])).any()


def test_precision_divides_by_k_even_for_a_short_list(hits: np.ndarray) -> None:
    p = precision_at_k(hits, N_REL, 4)
    assert p[0] == pytest.approx(2 / 4)
    assert p[1] == pytest.approx(1 / 4)  # two items returned, still over k = 4
    assert math.isnan(p[2])
    assert precision_at_k(hits, N_REL, 1)[:2].tolist() == [1.0, 0.0]


def test_recall_divides_by_relevant_count(hits: np.ndarray) -> None:
    r = recall_at_k(hits, N_REL, 4)
    assert r[:2] == pytest.approx([2 / 3, 1.0])
    assert math.isnan(r[2])
    assert recall_at_k(hits, N_REL, 2)[:2] == pytest.approx([1 / 3, 1.0])


def test_ndcg_binary_with_ideal_of_min_relevant_k(hits: np.ndarray) -> None:
    n = ndcg_at_k(hits, N_REL, 4)
    d = [1 / math.log2(r + 1) for r in range(1, 5)]
    # user 0: hits at 1, 3; ideal puts min(3, 4) = 3 hits first.
    assert n[0] == pytest.approx((d[0] + d[2]) / (d[0] + d[1] + d[2]))
    # user 1: hit at 2; ideal is one hit at rank 1.
    assert n[1] == pytest.approx(d[1] / d[0])
    assert math.isnan(n[2])
    # k = 1: user 0's ideal is one hit, which it has.
    assert ndcg_at_k(hits, N_REL, 1)[:2] == pytest.approx([1.0, 0.0])


def test_map_follows_microsoft_recommenders(hits: np.ndarray) -> None:
    m = map_at_k(hits, N_REL, 4)
    # user 0: precision 1/1 at rank 1, 2/3 at rank 3, over all 3 relevant items.
    assert m[0] == pytest.approx((1 + 2 / 3) / 3)
    # user 1: 1/2 at rank 2, over 1 relevant item.
    assert m[1] == pytest.approx(0.5)
    assert math.isnan(m[2])
    # Divided by n_relevant, not min(n_relevant, k): at k = 1 user 0 gets 1/3, not 1.
    assert map_at_k(hits, N_REL, 1)[0] == pytest.approx(1 / 3)


def test_hit_rate_and_mrr(hits: np.ndarray) -> None:
    assert hit_rate_at_k(hits, N_REL, 4)[:2].tolist() == [1.0, 1.0]
    assert hit_rate_at_k(hits, N_REL, 1)[:2].tolist() == [1.0, 0.0]
    assert mrr_at_k(hits, N_REL, 4)[:2] == pytest.approx([1.0, 0.5])
    assert mrr_at_k(hits, N_REL, 1)[:2] == pytest.approx([1.0, 0.0])
    assert math.isnan(mrr_at_k(hits, N_REL, 4)[2])


def test_k_beyond_the_list_counts_missing_slots_as_misses(hits: np.ndarray) -> None:
    assert precision_at_k(hits, N_REL, 8)[0] == pytest.approx(2 / 8)
    assert recall_at_k(hits, N_REL, 8)[0] == pytest.approx(2 / 3)
    assert ndcg_at_k(hits, N_REL, 8)[0] == pytest.approx(ndcg_at_k(hits, N_REL, 4)[0])


def test_coverage_counts_distinct_items_in_the_top_k() -> None:
    assert coverage_at_k(LISTS, 4, 10) == pytest.approx(6 / 10)  # {1, 2, 3, 4, 5, 7}
    assert coverage_at_k(LISTS, 1, 10) == pytest.approx(2 / 10)  # {1, 5}
    assert coverage_at_k(np.full((2, 3), -1), 3, 10) == 0.0


def test_novelty_is_mean_self_information() -> None:
    item_users = np.array([8, 4, 0, 2])  # of 8 training users
    lists = np.array([[0, 1], [3, -1]])
    # -log2(8/8) = 0, -log2(4/8) = 1, -log2(2/8) = 2; the empty slot is skipped.
    assert novelty_at_k(lists, 2, item_users, 8) == pytest.approx((0 + 1 + 2) / 3)
    # An item no training user touched counts as touched once: -log2(1/8) = 3.
    assert novelty_at_k(np.array([[2]]), 1, item_users, 8) == pytest.approx(3.0)


def test_suitability_violations_count_risk_above_tolerance() -> None:
    risk = np.array([1, 3, 5])
    lists = np.array([[0, 1, 2], [2, -1, -1]])
    tolerance = np.array([3, 5])
    assert suitability_violations(lists, risk, tolerance) == 1  # user 0, item 2
    assert suitability_violations(lists, risk, np.array([1, 1])) == 3


def test_summarize_averages_over_users_with_relevant_items() -> None:
    item_users = np.ones(10, dtype=np.int64)
    out = summarize(LISTS, REL_USERS, REL_ITEMS, (1, 4), item_users, 4)
    assert set(out) == set(METRICS)
    assert out["precision"][4] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert out["recall"][4] == pytest.approx((2 / 3 + 1) / 2)
    assert out["map"][4] == pytest.approx(((1 + 2 / 3) / 3 + 0.5) / 2)
    assert out["hit_rate"][1] == pytest.approx(0.5)
    # Coverage and novelty over the two evaluated users only: items {1,2,3,4,5,7}.
    assert out["coverage"][4] == pytest.approx(6 / 10)
    assert out["novelty"][4] == pytest.approx(2.0)  # every item: -log2(1/4)


def test_summarize_with_no_relevant_pairs_is_zero_not_nan() -> None:
    out = summarize(LISTS, np.array([], int), np.array([], int), (4,), np.ones(10), 4)
    assert all(out[m][4] == 0.0 for m in METRICS)


def test_summarize_refuses_k_above_the_list_length() -> None:
    with pytest.raises(ValueError, match="k 5 is above the list length 4"):
        summarize(LISTS, REL_USERS, REL_ITEMS, (5,), np.ones(10), 4)
