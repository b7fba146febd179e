"""The bank's rules as pure functions over arrays.

- suitability: never an item whose risk level is above the customer's tolerance;
  unknown / anonymous / null tolerance counts as 1, a null item risk as 5; the
  rule is off only when the catalogue has no risk levels at all;
- active: never an inactive item (null ``active`` counts as inactive);
- history and exclusions: never an item the customer already has, or excluded;
- consent: never target a customer without marketing consent (null, false, absent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recsvc.model.allowed import AllowedSet

__all__ = [
    "MAX_LEVEL",
    "MIN_LEVEL",
    "ItemRules",
    "consent_mask",
    "item_active",
    "item_risk",
    "suitable_users",
    "user_tolerance",
]

MIN_LEVEL, MAX_LEVEL = 1, 5


def item_risk(table: pa.Table, rule_on: bool) -> np.ndarray:
    """Risk level per item row (int8); null is 5. All MIN_LEVEL when the rule is off."""
    if not rule_on or "risk_level" not in table.column_names:
        return np.full(table.num_rows, MIN_LEVEL, dtype=np.int8)
    col = table.column("risk_level").cast(pa.int8()).fill_null(MAX_LEVEL)
    return np.asarray(col.to_numpy(), dtype=np.int8)


def item_active(table: pa.Table) -> np.ndarray:
    """Active flag per item row; a null flag is inactive, no column means all active."""
    if "active" not in table.column_names:
        return np.ones(table.num_rows, dtype=bool)
    return np.asarray(table.column("active").fill_null(False).to_numpy(zero_copy_only=False), bool)


def user_tolerance(table: pa.Table) -> np.ndarray:
    """Risk tolerance per user row (int8); null or absent is 1."""
    if "risk_tolerance" not in table.column_names:
        return np.full(table.num_rows, MIN_LEVEL, dtype=np.int8)
    col = table.column("risk_tolerance").cast(pa.int8()).fill_null(MIN_LEVEL)
    return np.clip(np.asarray(col.to_numpy(), dtype=np.int8), MIN_LEVEL, MAX_LEVEL)


def consent_mask(table: pa.Table) -> np.ndarray:
    """Marketing consent per user row; only an explicit True counts."""
    if "marketing_consent" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    col = table.column("marketing_consent").fill_null(False)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=bool)


def suitable_users(tolerance: np.ndarray, risk: int) -> np.ndarray:
    """Users whose tolerance admits an item of ``risk``."""
    return tolerance >= risk


@dataclass(frozen=True)
class ItemRules:
    """Item-side rules, precomputed once per bundle as one allowed set per tolerance."""

    risk: np.ndarray
    active: np.ndarray
    suitability: bool
    by_tolerance: tuple[AllowedSet, ...]  # index t-1 for tolerance t

    @classmethod
    def from_table(cls, items: pa.Table, suitability: bool) -> ItemRules:
        """The rules of a catalogue table (see ``item_risk`` and ``item_active``)."""
        return cls.build(item_risk(items, suitability), item_active(items), suitability)

    @classmethod
    def build(cls, risk: np.ndarray, active: np.ndarray, suitability: bool) -> ItemRules:
        sets = tuple(
            AllowedSet.from_mask(active & (risk <= t)) for t in range(MIN_LEVEL, MAX_LEVEL + 1)
        )
        return cls(risk=risk, active=active, suitability=suitability, by_tolerance=sets)

    def allowed(self, tolerance: int, exclude: np.ndarray | None = None) -> AllowedSet:
        """Items a customer of ``tolerance`` may be shown, less ``exclude`` rows."""
        t = min(max(int(tolerance), MIN_LEVEL), MAX_LEVEL)
        base = self.by_tolerance[t - 1]
        return base if exclude is None or len(exclude) == 0 else base.without(exclude)

    def eligible(self, rows: np.ndarray, tolerance: int) -> np.ndarray:
        """Mask over ``rows``: active and suitable for ``tolerance``."""
        return self.active[rows] & (self.risk[rows] <= tolerance)
