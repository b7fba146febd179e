"""How interaction strengths become the confidences a model is fit on.

The trainer transforms a whole matrix at once (``training.fit.apply_weighting``, with
implicit's own BM25); the live state re-weighs one customer's row when their events
change. BM25 needs corpus statistics (customers, products per customer, customers per
product): a live row uses the ones of the training data, frozen in the bundle, so a
customer's row is weighed as it would have been had the events been in that data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WEIGHTINGS", "RowWeighting"]

WEIGHTINGS = ("raw", "log", "bm25")


@dataclass(frozen=True)
class RowWeighting:
    """Weighs one customer's strengths as the training data's weighting did.

    Example:
        >>> w = RowWeighting("log")
        >>> w.row(np.array([0]), np.array([np.e - 1], dtype=np.float32)).round(3).tolist()
        [1.0]
    """

    kind: str
    bm25_k1: float = 100.0
    bm25_b: float = 0.8
    idf: np.ndarray | None = None
    """BM25: log(customers) - log1p(customers per product), per item row."""
    average_length: float = 1.0
    """BM25: the mean of the customers' summed strengths."""

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {self.kind!r}")
        if self.kind == "bm25" and self.idf is None:
            raise ValueError("bm25 weighting needs the training data's idf")

    @classmethod
    def from_training(
        cls,
        kind: str,
        indptr: np.ndarray,
        indices: np.ndarray,
        strengths: np.ndarray,
        n_items: int,
        bm25_k1: float = 100.0,
        bm25_b: float = 0.8,
    ) -> RowWeighting:
        """The weighting of a training matrix (CSR of raw strengths), statistics included."""
        if kind != "bm25":
            return cls(kind, bm25_k1, bm25_b)
        n_users = max(1, len(indptr) - 1)
        idf = np.log(float(n_users)) - np.log1p(np.bincount(indices, minlength=n_items))
        row_sums = np.add.reduceat(strengths, indptr[:-1]) if len(strengths) else np.zeros(0)
        # reduceat repeats the next value for an empty row: those rows sum to 0.
        row_sums = np.where(np.diff(indptr) > 0, row_sums, 0.0) if len(row_sums) else row_sums
        average = float(row_sums.mean()) if len(row_sums) else 1.0
        return cls(kind, bm25_k1, bm25_b, idf, average if average > 0 else 1.0)

    def row(self, item_rows: np.ndarray, strengths: np.ndarray) -> np.ndarray:
        """Confidences (float32) of one customer's ``strengths`` on ``item_rows``."""
        x = np.asarray(strengths, dtype=np.float32)
        if self.kind == "raw":
            return x.copy()
        if self.kind == "log":
            return np.log1p(x)
        assert self.idf is not None
        b, k1 = self.bm25_b, self.bm25_k1
        length_norm = (1.0 - b) + b * float(x.sum()) / self.average_length
        return (x * (k1 + 1.0) / (k1 * length_norm + x) * self.idf[item_rows]).astype(np.float32)
