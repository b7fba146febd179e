"""Which FAISS index a bundle gets, and building it (the service only reads them).

Every index is inner product over row ids. Approximate indexes leave out the rows
whose embedding is all zeros (``recsvc.model.index`` answers for those).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from recsvc.model.index import IndexSpec

__all__ = ["build_index", "choose_index_spec"]

# Scalar-quantized HNSW storage, by bits per dimension.
_SQ_TYPES: dict[int, Any] = {8: faiss.ScalarQuantizer.QT_8bit, 16: faiss.ScalarQuantizer.QT_fp16}


def choose_index_spec(n: int, kind: str = "auto", exact_max: int = 20_000) -> IndexSpec:
    """Exact search up to ``exact_max`` vectors, HNSW above it (unless ``kind`` says)."""
    if kind == "auto":
        kind = "flat" if n <= exact_max else "hnsw"
    if kind == "flat":
        return IndexSpec("flat")
    if kind == "hnsw":
        # efSearch 64 (widened under selective filters, see recsvc.model.index): recall@10
        # >= 0.95 against exact search at 100K and 1M items. Vectors held as 8-bit codes
        # ("sq": 8): a graph walk is bound by memory reads, and a code is one cache line
        # where a float32 vector is four; results are rescored exactly (docs/BENCHMARKS.md).
        return IndexSpec("hnsw", {"M": 32, "efConstruction": 80, "efSearch": 64, "sq": 8})
    if kind == "ivf":
        nlist = int(max(1, min(65536, 4 * np.sqrt(n))))
        return IndexSpec("ivf", {"nlist": nlist, "nprobe": max(1, nlist // 16)})
    raise ValueError(f"unknown index type {kind!r} (expected auto, flat, hnsw or ivf)")


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> faiss.Index:
    """Build an inner-product index whose ids are the row numbers of ``vectors``.

    Approximate indexes hold only the rows that are not all zeros (wrapped in an
    ``IndexIDMap2`` when some are); ``VectorIndex.search`` answers for the rest.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if spec.kind != "flat" and len(x):
        nonzero = np.flatnonzero(np.any(x != 0, axis=1))
        enough = len(nonzero) >= spec.params.get("nlist", 1)  # IVF needs a point per list
        if 0 < len(nonzero) < len(x) and enough:
            mapped = faiss.IndexIDMap2(_build(x[nonzero], spec, seed))
            mapped.add_with_ids(x[nonzero], nonzero.astype(np.int64))
            return mapped
    index = _build(x, spec, seed)
    if len(x):
        index.add(x)
    return index


def _build(x: np.ndarray, spec: IndexSpec, seed: int) -> faiss.Index:
    """An empty (trained, for IVF) index for ``x``'s dimension."""
    d = x.shape[1]
    index: faiss.Index
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        bits = spec.params.get("sq", 0)
        if bits:
            qtype = _SQ_TYPES.get(bits)
            if qtype is None:
                raise ValueError(f"hnsw sq must be one of {sorted(_SQ_TYPES)}, not {bits}")
            index = faiss.IndexHNSWSQ(d, qtype, spec.params["M"], faiss.METRIC_INNER_PRODUCT)
            if len(x):
                index.train(x)  # per-dimension ranges of the codes
        else:
            index = faiss.IndexHNSWFlat(d, spec.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.params["efConstruction"]
        index.hnsw.efSearch = spec.params["efSearch"]
    elif spec.kind == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, spec.params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = x
        if len(x) > 256 * spec.params["nlist"]:
            rng = np.random.default_rng(seed)
            sample = x[rng.choice(len(x), 256 * spec.params["nlist"], replace=False)]
        index.train(sample)
        index.nprobe = spec.params["nprobe"]
    else:
        raise ValueError(f"unknown index type {spec.kind!r}")
    return index
