"""The bank's rules as pure functions over arrays.

- suitability: never an item whose risk level is above the customer's tolerance;
  unknown / anonymous / null tolerance counts as 1, a null item risk as 5; the
  rule is off only when the catalogue has no risk levels at all;
- active: never an inactive item (null ``active`` counts as inactive);
- history and exclusions: never an item the customer already has, or excluded;
- consent: never target a customer without marketing consent (null, false, absent);
- exclusive categories: a customer who holds a product of such a category (a current
  account, a mortgage) is offered no other product of it;
- a cap per category: at most so many products of any one category in an answer.

Categories come from the catalogue's ``category`` column; a null or empty category is
none, and a product without one is a category of its own (never capped, never
exclusive), so a catalogue without the column leaves both category rules without effect.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recsvc.model.allowed import AllowedSet

__all__ = [
    "MAX_LEVEL",
    "MIN_LEVEL",
    "NO_CATEGORY",
    "Categories",
    "ExclusiveCategories",
    "ItemRules",
    "cap_per_category",
    "consent_mask",
    "item_active",
    "item_risk",
    "suitable_users",
    "user_tolerance",
]

MIN_LEVEL, MAX_LEVEL = 1, 5
NO_CATEGORY = -1
"""The category code of a product without a category."""


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
    return table.column("active").fill_null(False).to_numpy()  # boolean: checked at load


def user_tolerance(table: pa.Table) -> np.ndarray:
    """Risk tolerance per user row (int8); null or absent is 1."""
    if "risk_tolerance" not in table.column_names:
        return np.full(table.num_rows, MIN_LEVEL, dtype=np.int8)
    col = table.column("risk_tolerance").cast(pa.int8()).fill_null(MIN_LEVEL)
    return np.clip(col.to_numpy(), MIN_LEVEL, MAX_LEVEL)  # int8 still (NEP 50)


def consent_mask(table: pa.Table) -> np.ndarray:
    """Marketing consent per user row; only an explicit True counts."""
    if "marketing_consent" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return table.column("marketing_consent").fill_null(False).to_numpy()  # boolean: checked at load


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


def cap_per_category(
    rows: np.ndarray, codes: np.ndarray, cap: int, k: int, counts: dict[int, int]
) -> np.ndarray:
    """Walk ranked ``rows`` and take each unless its category already has ``cap``; stop at k.

    Args:
        rows: ranked item rows, best first.
        codes: category code per item row (``Categories.codes``).
        cap: at most this many of one category (a product without one is never capped).
        k: take at most this many.
        counts: products taken so far per category; updated in place, so that a walk
            can go on over the next rows of the same ranking.

    Returns:
        The positions in ``rows`` taken, ascending.
    """
    taken: list[int] = []
    for position, code in enumerate(codes[rows].tolist()):
        if len(taken) == k:
            break
        if code != NO_CATEGORY:
            if counts.get(code, 0) >= cap:
                continue
            counts[code] = counts.get(code, 0) + 1
        taken.append(position)
    return np.array(taken, dtype=np.int64)


@dataclass(frozen=True)
class Categories:
    """The catalogue's categories: a code per item row and the names the codes index.

    Example:
        >>> c = Categories.from_table(pa.table({"category": ["loan", None, "loan", "card"]}))
        >>> c.codes.tolist(), c.names
        ([0, -1, 0, 1], ('loan', 'card'))
    """

    codes: np.ndarray
    """int32 per item row; ``NO_CATEGORY`` where the product has none."""
    names: tuple[str, ...]

    @classmethod
    def from_table(cls, items: pa.Table) -> Categories:
        """The ``category`` column's categories; none at all when there is no such column."""
        if "category" not in items.column_names:
            return cls(np.full(items.num_rows, NO_CATEGORY, dtype=np.int32), ())
        text = items.column("category").cast(pa.string()).combine_chunks()
        encoded = text.dictionary_encode()
        names = [str(n) for n in encoded.dictionary.to_pylist()]
        codes = encoded.indices.fill_null(NO_CATEGORY).to_numpy()  # int32
        if "" in names:  # an empty category is none; the codes above it move down one
            empty = names.index("")
            codes = np.where(codes == empty, NO_CATEGORY, codes - (codes > empty))
            names.pop(empty)
        return cls(codes.astype(np.int32), tuple(names))

    def codes_of(self, names: Collection[str]) -> list[int]:
        """The codes of those of ``names`` the catalogue has, ascending."""
        wanted = set(names)
        return [c for c, n in enumerate(self.names) if n in wanted]

    def flags(self, codes: Collection[int]) -> np.ndarray:
        """A flag per code, set for ``codes``, and a last one, clear, that NO_CATEGORY indexes."""
        flags = np.zeros(len(self.names) + 1, dtype=bool)
        flags[list(codes)] = True
        return flags

    def member(self, codes: Collection[int], rows: np.ndarray | None = None) -> np.ndarray:
        """Mask over every item row (or over ``rows``): of one of the categories ``codes``."""
        # A gather through the flags: no sort, unlike np.isin (the capped search's hot path).
        return self.flags(codes)[self.codes if rows is None else self.codes[rows]]

    def without(
        self, allowed: AllowedSet, codes: Collection[int], keep: np.ndarray | None = None
    ) -> AllowedSet:
        """``allowed`` less every product of the categories ``codes``, but the rows ``keep``."""
        if not codes:
            return allowed
        out = self.member(codes)
        if keep is not None and len(keep):
            out[keep] = False
        return AllowedSet.from_mask(allowed.mask() & ~out)


class ExclusiveCategories:
    """Categories a customer holds one product of at most: no other of it is offered.

    Which categories are a deployment's choice (``ServerSettings.exclusive_categories``);
    a name the catalogue does not have closes nothing. The allowed sets less a customer's
    exclusive categories are built once per (base set, categories) and shared like the
    per-tolerance sets, so the index keeps its search parameters over them; an entry
    goes with its base set.

    Args:
        categories: the catalogue's categories.
        names: the exclusive ones.
    """

    def __init__(self, categories: Categories, names: Collection[str]) -> None:
        self.categories = categories
        self._codes = frozenset(categories.codes_of(names))
        self._sets: weakref.WeakKeyDictionary[AllowedSet, dict[tuple[int, ...], AllowedSet]] = (
            weakref.WeakKeyDictionary()
        )

    def held_categories(self, held_rows: np.ndarray) -> tuple[int, ...]:
        """The exclusive categories of the products ``held_rows``, as ascending codes."""
        if not len(held_rows) or not self._codes:
            return ()
        # A customer holds a handful of products: sets beat numpy's per-call overhead here.
        return tuple(sorted(self._codes.intersection(self.categories.codes[held_rows].tolist())))

    def allowed(
        self, base: AllowedSet, codes: tuple[int, ...], keep: np.ndarray | None = None
    ) -> AllowedSet:
        """``base`` less every product of the categories ``codes`` (from :meth:`held_categories`).

        The rows ``keep`` (the products held, where history may be shown) stay; without
        them the set is shared.
        """
        if not codes:
            return base
        if keep is not None and len(keep):
            return self.categories.without(base, codes, keep)
        per_base = self._sets.get(base)
        if per_base is None:
            per_base = self._sets.setdefault(base, {})
        found = per_base.get(codes)
        if found is None:
            found = per_base.setdefault(codes, self.categories.without(base, codes))
        return found

    def offered(self, rows: np.ndarray, codes: tuple[int, ...], keep: np.ndarray) -> np.ndarray:
        """Mask over ``rows``: not of a category in ``codes``, or one of the rows ``keep``."""
        if not codes:
            return np.ones(len(rows), dtype=bool)
        return ~self.categories.member(codes, rows) | np.isin(rows, keep)
