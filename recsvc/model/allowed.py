"""Allowed rows as a packed bitmap: the value type the rules produce and search takes.

Numpy only. The FAISS objects built over a set (its selector and search parameters)
belong to the index that searches it (``recsvc.model.index``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["AllowedSet"]


# eq=False: a set is identified by the object, not its bits, so that each index can
# key the FAISS parameters it builds over a set weakly by the set (hashable by identity).
@dataclass(frozen=True, eq=False)
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

    @cached_property
    def _bytes(self) -> bytes:
        return self.bits.tobytes()

    def member(self, row: int) -> bool:
        """Membership of one row (in range), without numpy's per-call cost."""
        return bool((self._bytes[row >> 3] >> (row & 7)) & 1)

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

    def first(
        self, candidates: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """The first ``k`` of ``candidates`` (in their order) that are in the set, less ``exclude``.

        Looks at a growing prefix only, so a long candidate list costs what it takes.
        """
        picks: list[np.ndarray] = []
        found, start, step = 0, 0, max(256, 8 * k)
        while found < k and start < len(candidates):
            chunk = candidates[start : start + step]
            ok = self.contains(chunk)
            if exclude is not None and len(exclude):
                ok &= ~np.isin(chunk, exclude)
            picks.append(chunk[ok][: k - found])
            found += len(picks[-1])
            start += len(chunk)
            step *= 4
        return np.concatenate(picks).astype(np.int64) if picks else np.empty(0, np.int64)

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.n, bitorder="little").astype(bool)

    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.mask())
