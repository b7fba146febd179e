"""FAISS indexes over embeddings: read from a bundle, searched among allowed rows.

Business rules are applied *inside* the search: the allowed set travels to FAISS
as an ``IDSelectorBitmap``, so asking for k items yields k eligible items
whenever k exist. Approximate indexes can fall short under a very selective
filter (HNSW stops exploring); we detect that and answer exactly instead.

The allowed sets per risk tolerance are shared by every request, so each index
builds its FAISS selector and search parameters over a set once and keeps them
while the set lives; a customer's own products are left out of an over-fetched
answer instead of being copied into a fresh bitmap per request.

Rows whose embedding is all zeros (products nobody has interacted with: ALS
solves them to exactly 0) score 0 against any query. Approximate indexes leave
them out, since many identical points wreck an HNSW graph and crowd into one
IVF list; search adds them back exactly, as one tie group in row order.
Building indexes is the trainer's (``training.indexes``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsvc.errors import BundleError
from recsvc.model.allowed import AllowedSet
from recsvc.model.topk import topk

__all__ = ["IndexSpec", "VectorIndex", "read_index"]

# Up to this many allowed rows, a dense matmul over just those rows beats any index
# (the default of VectorIndex's exact_subset_max).
_EXACT_SUBSET_MAX = 4096
# A filter that rejects most visited nodes leaves HNSW fewer usable candidates per step:
# widen its beam by sqrt(n / allowed), up to this factor (recall at 24% selectivity).
_EF_BOOST_MAX = 4.0
# Up to this many rows from the index, drop exclusions in plain Python (see _found).
_SMALL = 256


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


def read_index(path: Path, vectors: np.ndarray) -> faiss.Index:
    """Read a FAISS file and check it matches the vectors it claims to index."""
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise BundleError(f"{path.name}: not a readable FAISS index") from exc
    n, d = vectors.shape
    ids = _id_map(index)
    expected_total = n if ids is None else n - _zero_count(vectors)
    if index.ntotal != expected_total or index.d != d:
        raise BundleError(
            f"{path.name}: index holds {index.ntotal} vectors of dimension {index.d}, "
            f"expected {expected_total} of dimension {d}"
        )
    if not index.metric_type == faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"{path.name}: index metric is not inner product")
    if ids is not None:
        held = np.zeros(n, dtype=bool)
        in_range = ids[(ids >= 0) & (ids < n)]
        held[in_range] = True
        # Exactly the rows that are not all zeros, each once: the rest are answered as ties.
        if len(in_range) != len(ids) or held.sum() != len(ids) or (~held).sum() != n - len(ids):
            raise BundleError(f"{path.name}: index ids are not distinct rows")
        if np.any(vectors[~held] != 0) or not np.all(np.any(vectors[held] != 0, axis=1)):
            raise BundleError(f"{path.name}: index leaves out rows that are not all zeros")
    return index


def _id_map(index: faiss.Index) -> np.ndarray | None:
    """The row ids of an ``IndexIDMap`` (None for a plain index, whose ids are positions)."""
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    return None


def _zero_count(vectors: np.ndarray) -> int:
    return int(len(vectors) - np.count_nonzero(np.any(vectors != 0, axis=1)))


@dataclass(frozen=True)
class _Params:
    """FAISS search parameters over one allowed set, and what FAISS reads through them."""

    params: Any
    # FAISS holds raw pointers to the set's bitmap and to the selectors: kept alive here
    # as long as the parameters are.
    pointees: tuple[object, ...]


class VectorIndex:
    """An embedding matrix and its FAISS index, searched under an allowed set.

    Args:
        vectors: one embedding per row.
        index: the FAISS index over ``vectors`` (ids are rows; see ``IndexSpec``).
        spec: how ``index`` was built.
        exact_subset_max: up to this many allowed rows (less exclusions), search those
            rows exactly instead of asking the index; 0 always asks the index.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        index: faiss.Index,
        spec: IndexSpec,
        *,
        exact_subset_max: int = _EXACT_SUBSET_MAX,
    ) -> None:
        self.vectors = vectors
        self.index = index
        self.spec = spec
        self.exact_subset_max = exact_subset_max
        # Quantized codes give approximate scores: rescore what the index finds, exactly.
        self._rescore = bool(spec.params.get("sq"))
        ids = _id_map(index)
        # Rows the index leaves out (all-zero embeddings), ascending, and a bitmap of the rest.
        self._zero_rows: np.ndarray | None = None
        self._held_bits: np.ndarray | None = None
        self._id_map_vector: Any = getattr(index, "id_map", None)
        if ids is not None:
            held = np.zeros(len(vectors), dtype=bool)
            held[ids] = True
            self._zero_rows = np.flatnonzero(~held)
            self._held_bits = np.packbits(held, bitorder="little")
        # Search parameters per allowed set and beam width; an entry goes with its set.
        self._params_by_set: weakref.WeakKeyDictionary[AllowedSet, dict[int, _Params]] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def _params(self, allowed: AllowedSet, fetch: int) -> _Params:
        """Search parameters over ``allowed``, built once per (set, beam width)."""
        ef = 0
        if self.spec.kind == "hnsw":
            boost = min(_EF_BOOST_MAX, max(1.0, (self.n / max(1, allowed.count)) ** 0.5))
            ef = max(fetch, int(self.spec.params["efSearch"] * boost))
        per_set = self._params_by_set.get(allowed)
        if per_set is None:
            per_set = self._params_by_set.setdefault(allowed, {})
        cached = per_set.get(ef)
        if cached is not None:
            return cached
        bitmap = faiss.IDSelectorBitmap(allowed.n, faiss.swig_ptr(allowed.bits))
        sel: Any = bitmap
        if self._zero_rows is not None:
            # Translate index positions to rows ourselves: FAISS would otherwise swap the
            # selector inside these (shared) parameters for the duration of each search.
            sel = faiss.IDSelectorTranslated(self._id_map_vector, bitmap)
        # faiss's bundled stubs lack these classes' keyword arguments.
        lib: Any = faiss
        if self.spec.kind == "hnsw":
            params = lib.SearchParametersHNSW(sel=sel, efSearch=ef)
        elif self.spec.kind == "ivf":
            params = lib.SearchParametersIVF(sel=sel, nprobe=self.spec.params["nprobe"])
        else:
            params = lib.SearchParameters(sel=sel)
        # The entry must not hold the set itself, or the set would never go.
        return per_set.setdefault(ef, _Params(params, (allowed.bits, bitmap, sel)))

    def search(
        self,
        query: np.ndarray,
        k: int,
        allowed: AllowedSet,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product with ``query``, only among ``allowed`` less ``exclude``.

        Returns:
            (scores, rows), best first; ``min(k, rows allowed and not excluded)`` of them.
        """
        ex = _excluded(allowed, exclude)
        available = allowed.count - len(ex)
        k = min(k, available)
        if k <= 0:
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        found = None
        if available > self.exact_subset_max:
            found = self._approximate(q, k, allowed, ex)
        # Few rows allowed, or an approximate graph/list under a selective filter ran dry.
        return self._exact(q[0], k, allowed, ex) if found is None else found

    def _approximate(
        self, q: np.ndarray, k: int, allowed: AllowedSet, ex: list[int]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The index's top-k among ``allowed`` less ``ex``; None if it finds fewer than k."""
        # The index knows the set but not the exclusions: ask for that many more.
        fetch = k + len(ex)
        entry = self._params(allowed, fetch)
        dist, labels = self.index.search(q, fetch, params=entry.params)
        scores, rows = self._found(dist[0], labels[0], q[0], k, ex)
        if self._zero_rows is not None and (len(rows) < k or scores[-1] < 0):
            # The rows left out of the index (score 0) belong in the answer, unless the
            # index ran dry among the rows it holds.
            ex_rows = np.array(ex, dtype=np.int64)
            if len(rows) < min(k, self._held_available(allowed, ex_rows)):
                return None
            scores, rows = self._with_zero_rows(rows, scores, k, allowed, ex_rows)
        return None if len(rows) < k else (scores, rows)

    def _exact(
        self, q: np.ndarray, k: int, allowed: AllowedSet, ex: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among ``allowed`` less ``ex``: a dense product over those rows."""
        rows = allowed.rows()
        if ex:
            rows = rows[~np.isin(rows, ex)]
        scores = self.vectors[rows] @ q
        best = topk(scores, k)
        return scores[best].astype(np.float32), rows[best]

    def _found(
        self, dist: np.ndarray, labels: np.ndarray, q: np.ndarray, k: int, ex: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's answer less padding and ``ex``, rescored if quantized; the first k."""
        keep: Any
        if len(labels) <= _SMALL:
            # A recommendation's handful of rows (the serving hot path, profiled): a Python
            # filter costs less than numpy's per-call overhead in np.isin.
            skip = set(ex)
            keep = [i for i, r in enumerate(labels.tolist()) if r >= 0 and r not in skip]
        else:
            keep = labels >= 0
            if ex:
                keep &= ~np.isin(labels, ex)
        rows, scores = labels[keep], dist[keep]
        if self._rescore and len(rows):
            scores = (self.vectors[rows] @ q).astype(np.float32)
            order = np.lexsort((rows, -scores))
            rows, scores = rows[order], scores[order]
        return scores[:k], rows[:k]

    def _held_available(self, allowed: AllowedSet, ex: np.ndarray) -> int:
        """How many rows the index holds that are allowed and not excluded."""
        assert self._held_bits is not None
        both = np.unpackbits(allowed.bits & self._held_bits, bitorder="little")
        held_ex = int(both[ex].sum()) if len(ex) else 0
        return int(both.sum()) - held_ex

    def _with_zero_rows(
        self, rows: np.ndarray, scores: np.ndarray, k: int, allowed: AllowedSet, ex: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Merge in the first allowed all-zero rows (score 0, ties by row)."""
        assert self._zero_rows is not None
        zero = allowed.first(self._zero_rows, k, ex)
        all_rows = np.concatenate([rows.astype(np.int64), zero])
        all_scores = np.concatenate([scores, np.zeros(len(zero), dtype=np.float32)])
        order = np.lexsort((all_rows, -all_scores))[:k]
        return all_scores[order], all_rows[order]


def _excluded(allowed: AllowedSet, exclude: np.ndarray | None) -> list[int]:
    """The rows of ``exclude`` inside ``allowed``, ascending: only those change an answer."""
    if exclude is None or not len(exclude):
        return []
    # A customer excludes a handful of rows: at this size plain Python beats numpy's
    # per-call overhead (the serving hot path, profiled).
    member, n = allowed.member, allowed.n
    rows = exclude.tolist() if isinstance(exclude, np.ndarray) else list(exclude)
    return sorted({int(r) for r in rows if 0 <= r < n and member(int(r))})
