"""A live row is weighed exactly as the trainer weighed the whole matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsvc.model.weighting import RowWeighting
from training.fit import FitParams, apply_weighting


def _strengths(rng: np.random.Generator) -> sp.csr_matrix:
    dense = rng.gamma(1.0, 4.0, size=(60, 25)) * (rng.random((60, 25)) < 0.2)
    dense[7] = 0  # a customer with no interactions
    return sp.csr_matrix(dense.astype(np.float32))


@pytest.mark.parametrize("kind", ["raw", "log", "bm25"])
def test_each_row_matches_the_trainers_weighting(kind: str, rng: np.random.Generator) -> None:
    x = _strengths(rng)
    params = FitParams(weighting=kind, bm25_k1=50.0, bm25_b=0.7)
    whole = apply_weighting(x, params)
    w = RowWeighting.from_training(
        kind, x.indptr, x.indices, x.data, x.shape[1], params.bm25_k1, params.bm25_b
    )
    for u in range(x.shape[0]):
        lo, hi = x.indptr[u], x.indptr[u + 1]
        got = w.row(x.indices[lo:hi], x.data[lo:hi])
        np.testing.assert_allclose(got, whole.data[lo:hi], rtol=1e-5)


def test_bm25_needs_statistics_and_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="idf"):
        RowWeighting("bm25")
    with pytest.raises(ValueError, match="weighting must be one of"):
        RowWeighting("tfidf")
