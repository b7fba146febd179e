"""Index building: the chosen kinds, inner product over row ids, all-zero rows left out."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from recsvc.model.index import read_index
from tests.embeddings import with_zero_rows
from training.indexes import build_index, choose_index_spec


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_leave_out_all_zero_rows(kind: str, tmp_path: Path) -> None:
    x = with_zero_rows(6000, 0.6)
    spec = choose_index_spec(len(x), kind)
    index = build_index(x, spec)
    nonzero = int(np.any(x != 0, axis=1).sum())
    assert index.ntotal == nonzero
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    back = read_index(tmp_path / "i.faiss", x)
    assert back.ntotal == nonzero


def test_flat_and_dense_indexes_stay_plain() -> None:
    x = with_zero_rows(500, 0.5)
    assert build_index(x, choose_index_spec(len(x), "flat")).ntotal == 500
    dense = with_zero_rows(500, 0.0)
    assert build_index(dense, choose_index_spec(len(dense), "hnsw")).ntotal == 500


def test_unknown_quantizer_is_refused() -> None:
    spec = choose_index_spec(100, "hnsw")
    spec.params["sq"] = 4
    with pytest.raises(ValueError, match="sq must be"):
        build_index(with_zero_rows(100, 0.0), spec)


def test_built_indexes_are_inner_product_over_row_ids() -> None:
    x = with_zero_rows(100, 0.0, d=16)
    for kind in ("flat", "hnsw", "ivf"):
        idx = build_index(x, choose_index_spec(len(x), kind))
        assert idx.ntotal == 100 and idx.metric_type == faiss.METRIC_INNER_PRODUCT
    with pytest.raises(ValueError, match="unknown index type"):
        choose_index_spec(10, "lsh")
