"""Top-k selection with deterministic ties: one score vector, or a batch of rows.

Of equal scores the lower position wins, also at the k-th place, so the service's
answers (``topk``) and the trainer's offline rankings (``top_k_rows``) agree.
"""

from __future__ import annotations

import numpy as np

__all__ = ["top_k_rows", "topk"]


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest scores, best first; ties broken by position."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < len(scores):
        # argpartition picks arbitrarily among ties at the k-th score: take every score
        # above it, then the tied ones in position order, so the answer is deterministic.
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        above = np.flatnonzero(scores > kth)
        part = np.concatenate([above, np.flatnonzero(scores == kth)[: k - len(above)]])
    else:
        part = np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    return part[order].astype(np.int64)


def top_k_rows(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Per row, the k best allowed columns, ties by column; -1 past the allowed count.

    Exact on ties, as ``topk`` and the service's popularity order are: a row's answer is
    ``topk`` over its allowed columns.
    """
    scores = np.where(allowed, scores, -np.inf)
    n_rows, n = scores.shape
    out = np.full((n_rows, k), -1, dtype=np.int64)
    kk = min(k, n)
    if kk == 0 or n_rows == 0:
        return out
    kth = -np.partition(-scores, kk - 1, axis=1)[:, kk - 1 : kk]
    above = scores > kth
    ties = scores == kth
    need = kk - above.sum(axis=1, keepdims=True)
    chosen = above | (ties & (np.cumsum(ties, axis=1) <= need))
    cols = np.nonzero(chosen)[1].reshape(n_rows, kk)  # row-major: columns ascending
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    best = np.take_along_axis(cols, order, axis=1)
    out[:, :kk] = np.where(np.isfinite(np.take_along_axis(vals, order, axis=1)), best, -1)
    return out
