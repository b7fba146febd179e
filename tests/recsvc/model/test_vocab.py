"""Vocabulary and allowed-set search: by construction and by property."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsvc.model.allowed import AllowedSet
from recsvc.model.index import VectorIndex
from recsvc.model.vocab import Vocabulary
from training.indexes import build_index, choose_index_spec

ids = st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=50)


@given(ids, st.lists(st.text(max_size=12), max_size=20))
def test_vocabulary_round_trips_and_unknown_is_minus_one(
    known: list[str], probes: list[str]
) -> None:
    v = Vocabulary(known)
    assert [v.ids[v.index(k)] for k in known] == known  # type: ignore[index]
    got = v.indices(probes).tolist()
    assert got == [known.index(p) if p in known else -1 for p in probes]
    assert v.indices_arrow(pa.array(probes, pa.string())).tolist() == got


def test_vocabulary_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(["a", "a"])


def _vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_returns_k_allowed_items_or_all_of_them(kind: str) -> None:
    x = _vectors(6000)
    spec = choose_index_spec(len(x), kind)
    index = VectorIndex(x, build_index(x, spec), spec)
    rng = np.random.default_rng(1)
    for fraction in (1.0, 0.5, 0.01, 0.0005):
        mask = rng.random(len(x)) < fraction
        allowed = AllowedSet.from_mask(mask)
        q = _vectors(1, seed=int(fraction * 1e4))[0]
        scores, rows = index.search(q, 20, allowed)
        assert len(rows) == min(20, allowed.count)
        assert mask[rows].all()
        assert np.all(np.diff(scores) <= 1e-6)
        exact = np.sort(x[mask] @ q)[::-1][: len(rows)]
        if kind == "flat" or allowed.count <= 4096:
            np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4)


def test_hnsw_under_a_very_selective_filter_falls_back_to_exact() -> None:
    x = _vectors(20000, d=8)
    spec = choose_index_spec(len(x), "hnsw")
    spec.params["efSearch"] = 16
    index = VectorIndex(x, build_index(x, spec), spec)
    mask = np.zeros(len(x), dtype=bool)
    mask[np.random.default_rng(2).choice(len(x), 4200, replace=False)] = (
        True  # above the subset cut
    )
    _, rows = index.search(x[0], 500, AllowedSet.from_mask(mask))
    assert len(rows) == 500 and mask[rows].all()
