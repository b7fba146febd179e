"""FAISS indexes over embeddings, and search restricted to an allowed id set.

Business rules are applied *inside* the search: the allowed set travels to FAISS
as an ``IDSelectorBitmap``, so asking for k items yields k eligible items
whenever k exist. Approximate indexes can fall short under a very selective
filter (HNSW stops exploring); we detect that and answer exactly instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsvc.errors import BundleError

__all__ = [
    "AllowedSet",
    "IndexSpec",
    "VectorIndex",
    "build_index",
    "choose_index_spec",
    "read_index",
    "topk",
]

# Below this many allowed rows, a dense matmul over just those rows beats any index.
_EXACT_SUBSET_MAX = 4096


@dataclass(frozen=True)
class AllowedSet:
    """A set of allowed rows as a little-endian packed bitmap (FAISS's layout).

    Example:
        >>> a = AllowedSet.from_mask(np.array([True, False, True]))
        >>> a.count, a.rows().tolist(), a.without(np.array([2])).count
        (2, [0, 2], 1)
    """

    bits: np.ndarray
    n: int
    count: int

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> AllowedSet:
        mask = np.asarray(mask, dtype=bool)
        return cls(np.packbits(mask, bitorder="little"), len(mask), int(mask.sum()))

    @classmethod
    def all(cls, n: int) -> AllowedSet:
        return cls.from_mask(np.ones(n, dtype=bool))

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """Membership of each row (rows must be in range)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ((self.bits[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1).astype(bool)

    def without(self, rows: np.ndarray) -> AllowedSet:
        """A copy with ``rows`` removed (out-of-range and negative rows are ignored)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = np.unique(rows[(rows >= 0) & (rows < self.n)])
        if rows.size == 0:
            return self
        removed = int(self.contains(rows).sum())
        bits = self.bits.copy()
        np.bitwise_and.at(bits, rows >> 3, ~(np.uint8(1) << (rows & 7).astype(np.uint8)))
        return AllowedSet(bits, self.n, self.count - removed)

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.n, bitorder="little").astype(bool)

    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.mask())


@dataclass(frozen=True)
class IndexSpec:
    """How to build an index; recorded in the manifest.

    Example:
        >>> IndexSpec("hnsw", {"M": 32, "efConstruction": 80, "efSearch": 128})
    """

    kind: str  # flat | hnsw | ivf
    params: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "params": dict(self.params)}


def choose_index_spec(n: int, kind: str = "auto", exact_max: int = 20_000) -> IndexSpec:
    """Exact search up to ``exact_max`` vectors, HNSW above it (unless ``kind`` says)."""
    if kind == "auto":
        kind = "flat" if n <= exact_max else "hnsw"
    if kind == "flat":
        return IndexSpec("flat")
    if kind == "hnsw":
        return IndexSpec("hnsw", {"M": 32, "efConstruction": 80, "efSearch": 128})
    if kind == "ivf":
        nlist = int(max(1, min(65536, 4 * np.sqrt(n))))
        return IndexSpec("ivf", {"nlist": nlist, "nprobe": max(1, nlist // 16)})
    raise ValueError(f"unknown index type {kind!r} (expected auto, flat, hnsw or ivf)")


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> faiss.Index:
    """Build an inner-product index whose ids are the row numbers of ``vectors``."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    d = x.shape[1]
    index: faiss.Index
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
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
    if len(x):
        index.add(x)
    return index


def read_index(path: Path, spec: IndexSpec, vectors: np.ndarray) -> faiss.Index:
    """Read a FAISS file and check it matches the vectors it claims to index."""
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise BundleError(f"{path.name}: not a readable FAISS index") from exc
    n, d = vectors.shape
    if index.ntotal != n or index.d != d:
        raise BundleError(
            f"{path.name}: index holds {index.ntotal} vectors of dimension {index.d}, "
            f"expected {n} of dimension {d}"
        )
    if not index.metric_type == faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"{path.name}: index metric is not inner product")
    return index


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first; ties broken by position."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    return part[order].astype(np.int64)


class VectorIndex:
    """An embedding matrix and its FAISS index, searched under an allowed set."""

    def __init__(self, vectors: np.ndarray, index: faiss.Index, spec: IndexSpec) -> None:
        self.vectors = vectors
        self.index = index
        self.spec = spec

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def _params(self, sel: faiss.IDSelector, k: int) -> faiss.SearchParameters:
        if self.spec.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.spec.params["efSearch"], k))
        if self.spec.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.spec.params["nprobe"])
        return faiss.SearchParameters(sel=sel)

    def exact(self, query: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among ``rows``."""
        scores = self.vectors[rows] @ query
        best = topk(scores, k)
        return scores[best].astype(np.float32), rows[best]

    def search(
        self, query: np.ndarray, k: int, allowed: AllowedSet
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product with ``query``, only among ``allowed``.

        Returns:
            (scores, rows), best first; ``min(k, allowed.count)`` of them.
        """
        k = min(k, allowed.count)
        if k <= 0:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if allowed.count <= _EXACT_SUBSET_MAX:
            return self.exact(q[0], k, allowed.rows())
        sel = faiss.IDSelectorBitmap(allowed.n, faiss.swig_ptr(allowed.bits))
        dist, labels = self.index.search(q, k, params=self._params(sel, k))
        found = labels[0] >= 0
        if int(found.sum()) < k:
            # An approximate graph/list under a selective filter ran dry: be exact.
            return self.exact(q[0], k, allowed.rows())
        return dist[0][found], labels[0][found].astype(np.int64)
