"""Embedding matrices for the index tests, built by construction."""

from __future__ import annotations

import numpy as np

__all__ = ["with_zero_rows"]


def with_zero_rows(n: int, zero_share: float, d: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` normal rows, about ``zero_share`` of them all zeros (products nobody used)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[rng.random(n) < zero_share] = 0.0
    return x
