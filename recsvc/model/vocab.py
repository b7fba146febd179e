"""Vocabulary: string ids to row numbers and back, built once per bundle."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["Vocabulary"]


class Vocabulary:
    """Maps external ids to dense row numbers.

    An unknown id is an expected case: :meth:`index` returns ``None`` and
    :meth:`indices` returns ``-1``; callers decide what it means.

    Example:
        >>> v = Vocabulary(["a", "b"])
        >>> v.index("b"), v.index("zz"), v.ids[0]
        (1, None, 'a')
    """

    __slots__ = ("_arrow", "_index", "ids")

    def __init__(self, ids: Sequence[str] | pa.Array) -> None:
        arrow = ids if isinstance(ids, pa.Array) else pa.array(list(ids), type=pa.string())
        arrow = arrow.cast(pa.string())
        self._arrow: pa.Array = arrow
        self.ids: list[str] = arrow.to_pylist()
        self._index: dict[str, int] = {v: i for i, v in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("vocabulary ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def index(self, key: str) -> int | None:
        """Row of ``key``, or None when unknown."""
        return self._index.get(key)

    def indices(self, keys: Iterable[str]) -> np.ndarray:
        """Rows of ``keys`` as int64; -1 where unknown."""
        get = self._index.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64)

    def indices_arrow(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorized lookup for large arrays (training, targeting); -1 where unknown."""
        found = pc.index_in(keys.cast(pa.string()), value_set=self._arrow)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)

    def arrow(self) -> pa.Array:
        """The ids as an Arrow string array, in row order."""
        return self._arrow
