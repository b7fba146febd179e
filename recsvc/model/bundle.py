"""The model bundle: finding, verifying and loading a version.

A bundle is a folder ``MODELS/<version>/`` holding ``manifest.json`` and the files
it names, each with its size and sha256 (the format is ``recsvc.model.manifest``).
``MODELS/LATEST`` names the version to serve. Files are verified against the
manifest *before* any is parsed, arrays are read with ``allow_pickle=False``, and
every array's invariants (shapes against the counts, finite values, row bounds,
CSR order) are checked before a version is served.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsvc.errors import BundleError, BundleUnreadable
from recsvc.model.index import VectorIndex, read_index
from recsvc.model.manifest import FILES, MANIFEST, Counts, Manifest
from recsvc.model.rules import (
    MAX_LEVEL,
    MIN_LEVEL,
    Categories,
    ItemRules,
    consent_mask,
    user_tolerance,
)
from recsvc.model.vocab import Vocabulary

__all__ = [
    "LATEST",
    "VERSION_RE",
    "Bundle",
    "list_versions",
    "load_bundle",
    "read_latest",
    "read_manifest",
    "sha256_file",
    "verify_files",
]

LATEST = "LATEST"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_latest(models: Path) -> str | None:
    """The version named by ``models/LATEST``, or None if there is none."""
    try:
        # Undecodable bytes come through as U+FFFD: no version name matches them.
        text = (models / LATEST).read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a folder, no permission, an I/O error
        raise BundleUnreadable(f"{LATEST} cannot be read ({exc.strerror or exc})") from exc
    return text or None


def list_versions(models: Path) -> list[str]:
    """Published versions (folders with a manifest), oldest first."""
    if not models.is_dir():
        return []
    return sorted(
        p.name
        for p in models.iterdir()
        if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST).is_file()
    )


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate ``folder/manifest.json`` (structure only, not file contents)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder.name}: no such bundle folder")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{folder.name}: no {MANIFEST}") from exc
    except OSError as exc:
        message = f"{folder.name}: {MANIFEST} cannot be read ({exc.strerror})"
        raise BundleUnreadable(message) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{folder.name}: {MANIFEST} is not valid JSON") from exc
    return Manifest.from_json(obj, folder.name)


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check every file's size, then its sha256, against the manifest."""
    for name, entry in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder.name}: {name} is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{folder.name}: {name} is {size} bytes, manifest says {entry.size}")
    for name, entry in manifest.files.items():
        try:
            digest = sha256_file(folder / name)
        except OSError as exc:
            message = f"{folder.name}: {name} cannot be read ({exc.strerror})"
            raise BundleUnreadable(message) from exc
        if digest != entry.sha256:
            raise BundleError(f"{folder.name}: {name} fails its sha256 check")


def _npy(folder: Path, name: str, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    try:
        arr = np.load(folder / name, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise BundleError(f"{folder.name}: {name} is not a plain numeric array") from exc
    if arr.dtype != np.dtype(dtype):
        raise BundleError(
            f"{folder.name}: {name} has dtype {arr.dtype}, expected {np.dtype(dtype)}"
        )
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=False)
    ):
        raise BundleError(f"{folder.name}: {name} has shape {arr.shape}, expected {shape}")
    return arr


# The rule columns a table may carry: a level is an integer 1..5 or null, a flag a
# boolean or null. The trainer writes nothing else; a version holding anything else (a
# consent of "no", which a cast to bool reads as True) is refused, not guessed at.
_LEVELS = {"risk_level", "risk_tolerance"}
_FLAGS = {"active", "marketing_consent"}


def _table(folder: Path, name: str, id_column: str, n: int) -> pa.Table:
    try:
        table = pq.read_table(folder / name)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BundleError(f"{folder.name}: {name} is not a readable Parquet file") from exc
    if id_column not in table.column_names or table.num_rows != n:
        raise BundleError(f"{folder.name}: {name} must have {n} rows and a {id_column} column")
    for column in (_LEVELS | _FLAGS) & set(table.column_names):
        _rule_column(folder, name, column, table.column(column))
    return table


def _rule_column(folder: Path, name: str, column: str, values: pa.ChunkedArray) -> None:
    where = f"{folder.name}: {name} column {column!r}"
    if column in _FLAGS:
        if not pa.types.is_boolean(values.type):
            raise BundleError(f"{where} must be boolean, got {values.type}")
        return
    if not pa.types.is_integer(values.type):
        raise BundleError(f"{where} must hold integer levels, got {values.type}")
    extremes = pc.min_max(values)
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    if low is not None and (low < MIN_LEVEL or high > MAX_LEVEL):
        raise BundleError(f"{where} holds levels {low}..{high}, outside {MIN_LEVEL}..{MAX_LEVEL}")


@dataclass(frozen=True)
class _Interactions:
    """Each customer's products as CSR: item rows, weighted and raw strength, held flag."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    strength: np.ndarray
    held: np.ndarray


def _interactions(folder: Path, counts: Counts) -> _Interactions:
    """Read the CSR arrays and check every invariant serving relies on.

    Checksums only prove the files are the ones published: a buggy writer stamps
    bad numbers too. NaN strengths break explain and fold-in; an item row out of
    range, or twice in a customer's slice, breaks history, popularity and holders.
    """
    name = folder.name
    indptr = _npy(folder, FILES.indptr, np.int64, (counts.users + 1,))
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise BundleError(f"{name}: {FILES.indptr} is not a valid CSR pointer")
    nnz = int(indptr[-1])
    if nnz != counts.interactions:
        raise BundleError(
            f"{name}: {FILES.indptr} ends at {nnz}, manifest counts {counts.interactions} pairs"
        )
    indices = _npy(folder, FILES.indices, np.int32, (nnz,))
    data = _npy(folder, FILES.data, np.float32, (nnz,))
    strength = _npy(folder, FILES.strength, np.float32, (nnz,))
    held = _npy(folder, FILES.held, np.bool_, (nnz,))
    if nnz and (indices.min() < 0 or indices.max() >= counts.items):
        raise BundleError(f"{name}: {FILES.indices} holds item rows out of range")
    # Publish writes CSR's canonical form: within a customer, item rows strictly increase.
    row_start = np.zeros(nnz, dtype=bool)
    row_start[indptr[:-1][indptr[:-1] < nnz]] = True
    if np.any((np.diff(indices) <= 0) & ~row_start[1:]):
        raise BundleError(f"{name}: {FILES.indices} repeats or unsorts a customer's item rows")
    for file, values in ((FILES.data, data), (FILES.strength, strength)):
        if not np.isfinite(values).all() or np.any(values < 0):
            raise BundleError(f"{name}: {file} holds negative, NaN or infinite strengths")
    n_held = int(held.sum())
    if n_held != counts.held:
        raise BundleError(
            f"{name}: {FILES.held} flags {n_held} pairs, manifest counts {counts.held}"
        )
    return _Interactions(indptr, indices, data, strength, held)


@dataclass(frozen=True)
class Bundle:
    """A verified, loaded model version. Read-only once built."""

    path: Path
    manifest: Manifest
    items: Vocabulary
    users: Vocabulary
    item_table: pa.Table
    user_table: pa.Table
    item_index: VectorIndex
    user_index: VectorIndex
    # CSR of each user's interactions: item rows, weighted and raw strength, held flag.
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    strength: np.ndarray
    held: np.ndarray
    popularity: np.ndarray

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def created_at(self) -> datetime:
        return self.manifest.created_at

    @property
    def suitability(self) -> bool:
        """Whether the catalogue carries risk levels, so the suitability rule applies."""
        return self.manifest.rules.risk_levels

    # Built once per version, shared by ranking and targeting. A frozen dataclass
    # allows cached_property: it writes the instance __dict__, not through __setattr__.
    @cached_property
    def item_rules(self) -> ItemRules:
        """The catalogue's rules: risk levels, active flags, one allowed set per tolerance."""
        return ItemRules.from_table(self.item_table, self.suitability)

    @cached_property
    def categories(self) -> Categories:
        """The catalogue's category per item row (see ``rules.Categories``)."""
        return Categories.from_table(self.item_table)

    @cached_property
    def tolerance(self) -> np.ndarray:
        """Risk tolerance per user row (see ``rules.user_tolerance``)."""
        return user_tolerance(self.user_table)

    @cached_property
    def consent(self) -> np.ndarray:
        """Marketing consent per user row (see ``rules.consent_mask``)."""
        return consent_mask(self.user_table)

    def user_item_rows(self, user: int) -> np.ndarray:
        return self.indices[self.indptr[user] : self.indptr[user + 1]]

    def user_item_data(self, user: int) -> np.ndarray:
        return self.data[self.indptr[user] : self.indptr[user + 1]]


def load_bundle(folder: Path, verify: bool = True) -> Bundle:
    """Verify and load one bundle folder.

    Raises:
        BundleError: anything missing, corrupt or inconsistent; nothing is half-loaded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder.name}: no such bundle folder")
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    counts, dim = manifest.counts, manifest.dim
    item_factors = _npy(folder, FILES.item_factors, np.float32, (counts.items, dim))
    user_factors = _npy(folder, FILES.user_factors, np.float32, (counts.users, dim))
    for name, arr in ((FILES.item_factors, item_factors), (FILES.user_factors, user_factors)):
        if not np.isfinite(arr).all():
            raise BundleError(f"{folder.name}: {name} holds NaN or infinite values")
    pairs = _interactions(folder, counts)
    popularity = _npy(folder, FILES.popularity, np.int32, (counts.items,))
    if counts.items and (np.sort(popularity) != np.arange(counts.items)).any():
        raise BundleError(f"{folder.name}: {FILES.popularity} is not a permutation of the items")
    item_table = _table(folder, FILES.items, "item_id", counts.items)
    user_table = _table(folder, FILES.users, "user_id", counts.users)
    try:
        items = Vocabulary(item_table.column("item_id").combine_chunks())
        users = Vocabulary(user_table.column("user_id").combine_chunks())
    except ValueError as exc:
        raise BundleError(f"{folder.name}: duplicate ids in the item or user table") from exc
    specs = manifest.indexes
    item_faiss = read_index(folder / FILES.item_index, item_factors)
    user_faiss = read_index(folder / FILES.user_index, user_factors)
    return Bundle(
        path=folder,
        manifest=manifest,
        items=items,
        users=users,
        item_table=item_table,
        user_table=user_table,
        item_index=VectorIndex(item_factors, item_faiss, specs.items),
        user_index=VectorIndex(user_factors, user_faiss, specs.users),
        indptr=pairs.indptr,
        indices=pairs.indices,
        data=pairs.data,
        strength=pairs.strength,
        held=pairs.held,
        popularity=popularity,
    )
