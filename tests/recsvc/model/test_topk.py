"""Top-k, single and batched: best first, ties by position, also at the k-th place."""

from __future__ import annotations

import numpy as np

from recsvc.model.topk import top_k_rows, topk


def test_topk_orders_by_score_then_position() -> None:
    s = np.array([0.1, 0.9, 0.5, 0.9, -1.0])
    assert topk(s, 3).tolist() == [1, 3, 2]
    assert topk(s, 10).tolist() == [1, 3, 2, 0, 4]
    assert topk(s, 0).tolist() == []


def test_topk_breaks_ties_at_the_cut_by_position() -> None:
    # Many equal scores straddle the k-th place: the earliest positions win, every time.
    s = np.zeros(1000)
    s[[700, 5]] = 1.0
    assert topk(s, 5).tolist() == [5, 700, 0, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, size=200).astype(float)
        k = int(rng.integers(1, 200))
        expected = sorted(range(200), key=lambda i: (-s[i], i))[:k]
        assert topk(s, k).tolist() == expected


def test_top_k_rows_orders_by_score_then_column_and_pads() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    allowed = np.array([[True, True, True, True, True], [False, True, False, True, False]])
    # Row 0: three tied at 3.0 and only two places: the lower columns win.
    assert top_k_rows(scores, allowed, 2).tolist() == [[1, 2], [1, 3]]
    assert top_k_rows(scores, allowed, 4).tolist() == [[1, 2, 4, 3], [1, 3, -1, -1]]
    assert top_k_rows(scores, allowed, 7)[1].tolist() == [1, 3, -1, -1, -1, -1, -1]


def test_top_k_rows_matches_a_full_sort(rng: np.random.Generator) -> None:
    for _ in range(200):
        n, k = int(rng.integers(1, 25)), int(rng.integers(1, 30))
        scores = rng.integers(0, 4, (3, n)).astype(float)
        allowed = rng.random((3, n)) < 0.7
        got = top_k_rows(scores, allowed, k)
        for r in range(3):
            cols = np.flatnonzero(allowed[r])
            want = cols[np.lexsort((cols, -scores[r][cols]))][:k]
            assert got[r][: len(want)].tolist() == want.tolist()
            assert (got[r][len(want) :] == -1).all()


def test_a_batched_row_is_topk_over_its_allowed_columns(rng: np.random.Generator) -> None:
    scores = rng.integers(0, 5, (50, 40)).astype(float)
    allowed = rng.random((50, 40)) < 0.6
    for k in (1, 7, 40):
        got = top_k_rows(scores, allowed, k)
        for r in range(len(scores)):
            cols = np.flatnonzero(allowed[r])
            assert got[r][got[r] >= 0].tolist() == cols[topk(scores[r][cols], k)].tolist()
