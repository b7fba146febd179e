"""Search under rules with exclusions, all-zero rows and shared FAISS parameters."""

from __future__ import annotations

import weakref
from pathlib import Path

import faiss
import numpy as np
import pytest

from recsvc.errors import BundleError
from recsvc.model.allowed import AllowedSet
from recsvc.model.index import VectorIndex, read_index
from tests.embeddings import with_zero_rows
from training.indexes import build_index, choose_index_spec


def _exact(x: np.ndarray, q: np.ndarray, k: int, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference answer: best score first, ties by row."""
    rows = np.flatnonzero(ok)
    scores = x[rows] @ q
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]


def test_an_index_that_drops_a_real_row_is_refused(tmp_path: Path) -> None:
    x = with_zero_rows(3000, 0.5)
    nonzero = np.flatnonzero(np.any(x != 0, axis=1))
    bad = faiss.IndexIDMap2(faiss.IndexHNSWFlat(x.shape[1], 8, faiss.METRIC_INNER_PRODUCT))
    keep = nonzero[1:]  # one row with a real embedding missing, one zero row in its place
    zero_row = np.flatnonzero(~np.any(x != 0, axis=1))[0]
    ids = np.concatenate([keep, [zero_row]]).astype(np.int64)
    bad.add_with_ids(x[ids], ids)
    faiss.write_index(bad, str(tmp_path / "bad.faiss"))
    with pytest.raises(BundleError, match="not all zeros"):
        read_index(tmp_path / "bad.faiss", x)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_with_exclusions_is_k_allowed_rows(kind: str) -> None:
    x = with_zero_rows(8000, 0.5, seed=1)
    spec = choose_index_spec(len(x), kind)
    index = VectorIndex(x, build_index(x, spec), spec)
    rng = np.random.default_rng(3)
    for share in (0.3, 0.6, 0.95):
        mask = rng.random(len(x)) < share
        allowed = AllowedSet.from_mask(mask)
        for _ in range(5):
            q = rng.normal(size=x.shape[1]).astype(np.float32)
            exclude = rng.choice(len(x), 40, replace=False)
            scores, rows = index.search(q, 10, allowed, exclude)
            ok = mask.copy()
            ok[exclude] = False
            assert len(rows) == 10 and ok[rows].all()
            assert np.all(np.diff(scores) <= 1e-6)
            if kind == "flat":
                want, _ = _exact(x, q, 10, ok)
                np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)


def test_zero_rows_come_back_as_ties_in_row_order() -> None:
    # Few rows have a positive score: the answer must continue with the all-zero rows.
    rng = np.random.default_rng(5)
    x = np.zeros((6000, 8), dtype=np.float32)
    real = rng.choice(len(x), 3000, replace=False)
    x[real] = -np.abs(rng.normal(size=(len(real), 8)))  # every real row scores below 0
    x[real[:3]] = np.abs(x[real[:3]])  # except three
    q = np.ones(8, dtype=np.float32)
    spec = choose_index_spec(len(x), "ivf")
    spec.params["nprobe"] = spec.params["nlist"]  # every list: exact, so the order is checkable
    index = VectorIndex(x, build_index(x, spec), spec)
    mask = np.ones(len(x), dtype=bool)
    mask[rng.choice(len(x), 500, replace=False)] = False
    exclude = np.flatnonzero(~np.any(x != 0, axis=1))[:2]
    scores, rows = index.search(q, 10, AllowedSet.from_mask(mask), exclude)
    ok = mask.copy()
    ok[exclude] = False
    want_scores, want_rows = _exact(x, q, 10, ok)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_shared_allowed_set_serves_two_indexes_without_mixing_them() -> None:
    x = with_zero_rows(6000, 0.5, seed=2)
    spec = choose_index_spec(len(x), "hnsw")
    sparse = VectorIndex(x, build_index(x, spec), spec)
    dense_x = np.where(x == 0, 1e-3, x).astype(np.float32)
    dense = VectorIndex(dense_x, build_index(dense_x, spec), spec)
    mask = np.random.default_rng(4).random(len(x)) < 0.5
    allowed = AllowedSet.from_mask(mask)
    q = np.ones(8, dtype=np.float32)
    for _ in range(3):  # the second and third searches reuse cached parameters
        for idx in (sparse, dense, sparse):
            _, rows = idx.search(q, 20, allowed)
            assert len(rows) == 20 and mask[rows].all()


@pytest.mark.parametrize("bits", [8, 16])
def test_quantized_hnsw_answers_with_exact_scores(bits: int) -> None:
    x = with_zero_rows(6000, 0.3, seed=6)
    spec = choose_index_spec(len(x), "hnsw")
    spec.params["sq"] = bits
    index = VectorIndex(x, build_index(x, spec), spec)
    assert isinstance(faiss.downcast_index(index.index.index), faiss.IndexHNSWSQ)
    q = np.random.default_rng(7).normal(size=x.shape[1]).astype(np.float32)
    mask = np.random.default_rng(8).random(len(x)) < 0.5
    scores, rows = index.search(q, 15, AllowedSet.from_mask(mask))
    assert len(rows) == 15 and mask[rows].all()
    np.testing.assert_allclose(scores, x[rows] @ q, rtol=1e-6)
    assert np.all(np.diff(scores) <= 0)


class _CountingIndex:
    """A FAISS index that counts the searches asked of it."""

    def __init__(self, index: faiss.Index) -> None:
        self.index, self.searches = index, 0

    def search(self, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        self.searches += 1
        return self.index.search(*args, **kwargs)


@pytest.mark.parametrize(("subset_max", "searches"), [(990, 0), (989, 1), (0, 1)])
def test_exact_subset_max_is_where_the_index_takes_over(subset_max: int, searches: int) -> None:
    x = with_zero_rows(3000, 0.0, seed=9)
    spec = choose_index_spec(len(x), "flat")
    counting = _CountingIndex(build_index(x, spec))
    index = VectorIndex(x, counting, spec, exact_subset_max=subset_max)
    mask = np.zeros(len(x), dtype=bool)
    mask[np.random.default_rng(9).choice(len(x), 1000, replace=False)] = True
    exclude = np.flatnonzero(mask)[:10]  # 990 rows left to answer from
    q = np.ones(8, dtype=np.float32)
    _, rows = index.search(q, 10, AllowedSet.from_mask(mask), exclude)
    assert counting.searches == searches
    ok = mask.copy()
    ok[exclude] = False
    np.testing.assert_array_equal(rows, _exact(x, q, 10, ok)[1])


def test_search_parameters_go_with_their_allowed_set() -> None:
    x = with_zero_rows(6000, 0.5, seed=10)
    spec = choose_index_spec(len(x), "hnsw")
    index = VectorIndex(x, build_index(x, spec), spec)
    rng = np.random.default_rng(10)
    q = np.ones(8, dtype=np.float32)
    for _ in range(15):  # a new set may take a dead one's address
        mask = rng.random(len(x)) < 0.8  # more rows than exact search takes
        allowed = AllowedSet.from_mask(mask)
        _, rows = index.search(q, 20, allowed)
        assert len(rows) == 20 and mask[rows].all()
        gone = weakref.ref(allowed)
        del allowed
        assert gone() is None  # the index's parameters do not keep the set alive
