"""Index quality: recall@10 of the served search against exact inner-product search.

Queries are real customers of the bundle, searched exactly as ``Recommend``
searches: their embedding, their tolerance's allowed set, their own products
excluded. The reference is a dense scan of every item under the same rules.
Recall counts ties: a returned item whose exact score reaches the 10th best
exact score is a hit (many items can share a score, e.g. the all-zero ones).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from recsvc.model.bundle import Bundle, load_bundle, read_latest
from recsvc.model.index import VectorIndex, read_index
from recsvc.model.rules import ItemRules, user_tolerance
from training.indexes import build_index, choose_index_spec

__all__ = ["QualityRow", "index_quality"]

K = 10


@dataclass(frozen=True)
class QualityRow:
    items: int
    kind: str
    params: str
    recall: float
    p50_ms: float
    p99_ms: float
    build_s: float | None
    queries: int


def _load(models: Path) -> Bundle:
    version = read_latest(models)
    if version is None:
        raise RuntimeError(f"no LATEST under {models}")
    # The serving benchmark loads (and verifies) the same files; no need to hash them twice.
    return load_bundle(models / version, verify=False)


def _index(
    bundle: Bundle, kind: str, cache: Path, key: str, log: Callable[[str], None]
) -> tuple[VectorIndex, float | None]:
    """The bundle's own index if it is of ``kind``, else one built (and cached) like it."""
    served = bundle.item_index
    if served.spec.kind == kind:
        return served, None
    vectors = served.vectors
    spec = choose_index_spec(len(vectors), kind)
    tag = "-".join(f"{k}{v}" for k, v in sorted(spec.params.items()))
    path = cache / f"{key}-{kind}-{tag}.faiss"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        index = read_index(path, vectors)
        return VectorIndex(vectors, index, spec), json.loads(meta.read_text())["build_s"]
    log(f"  building {kind} index over {len(vectors):,} items")
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    index = build_index(vectors, spec)
    seconds = time.perf_counter() - start
    faiss.write_index(index, str(path))
    meta.write_text(json.dumps({"build_s": round(seconds, 2)}))
    return VectorIndex(vectors, index, spec), seconds


def index_quality(
    models: Path,
    kinds: list[str],
    n_queries: int,
    cache: Path,
    key: str,
    log: Callable[[str], None],
    seed: int = 0,
) -> list[QualityRow]:
    """Recall@10 and per-query latency of each index kind over one bundle's items."""
    b = _load(models)
    rules = ItemRules.from_table(b.item_table, b.suitability)
    tolerance = user_tolerance(b.user_table)
    rng = np.random.default_rng(seed)
    has_history = np.flatnonzero(np.diff(b.indptr) > 0)
    users = rng.choice(has_history, size=min(n_queries, len(has_history)), replace=False)
    queries = np.ascontiguousarray(b.user_index.vectors[users], dtype=np.float32)
    allowed = [rules.allowed(int(tolerance[u])) for u in users]
    history = [b.user_item_rows(int(u)).astype(np.int64) for u in users]
    vectors = b.item_index.vectors
    masks = [s.mask() for s in rules.by_tolerance]

    # Exact reference: the 10th best score under the same rules (batched dense scans).
    kth = np.empty(len(users), dtype=np.float32)
    batch = max(1, (64 << 20) // max(1, 4 * len(vectors)))
    for start in range(0, len(users), batch):
        scores = queries[start : start + batch] @ vectors.T
        for j in range(len(scores)):
            i = start + j
            row = np.where(masks[int(tolerance[users[i]]) - 1], scores[j], -np.inf)
            row[history[i]] = -np.inf
            kth[i] = -np.partition(-row, K - 1)[K - 1]

    rows_out: list[QualityRow] = []
    faiss.omp_set_num_threads(1)  # as served: one thread per query
    with threadpool_limits(1, "blas"):
        for kind in kinds:
            index, build_s = _index(b, kind, cache, key, log)
            index.search(queries[0], K, allowed[0], history[0])
            hits = np.empty(len(users))
            lat = np.empty(len(users))
            for i in range(len(users)):
                t0 = time.perf_counter()
                _, got = index.search(queries[i], K, allowed[i], history[i])
                lat[i] = time.perf_counter() - t0
                exact_scores = vectors[got] @ queries[i]
                hits[i] = min(K, int((exact_scores >= kth[i] - 1e-5).sum())) / K
            params = ",".join(f"{k}={v}" for k, v in sorted(index.spec.params.items()))
            rows_out.append(
                QualityRow(
                    items=len(vectors),
                    kind=kind,
                    params=params or "-",
                    recall=round(float(hits.mean()), 4),
                    p50_ms=round(float(np.percentile(lat, 50)) * 1e3, 3),
                    p99_ms=round(float(np.percentile(lat, 99)) * 1e3, 3),
                    build_s=None if build_s is None else round(build_s, 1),
                    queries=len(users),
                )
            )
            row = rows_out[-1]
            log(
                f"  {row.items:>9,} items {kind:>5}: recall@10 {row.recall:.4f}  "
                f"p50 {row.p50_ms:.3f} ms  p99 {row.p99_ms:.3f} ms"
            )
    return rows_out
