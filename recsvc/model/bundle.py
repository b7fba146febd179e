"""The model bundle: layout, manifest, verification and loading.

A bundle is a folder ``MODELS/<version>/`` holding ``manifest.json`` and the files
it names, each with its size and sha256. ``MODELS/LATEST`` names the version to
serve. Files are verified against the manifest *before* any is parsed, arrays
are read with ``allow_pickle=False``, and shapes are checked against the counts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsvc.errors import BundleError, BundleUnreadable
from recsvc.model.index import IndexSpec, VectorIndex, read_index
from recsvc.model.vocab import Vocabulary

__all__ = [
    "BUNDLE_FILES",
    "LATEST",
    "MANIFEST",
    "SCHEMA_VERSION",
    "VERSION_RE",
    "Bundle",
    "list_versions",
    "load_bundle",
    "read_latest",
    "read_manifest",
    "sha256_file",
    "verify_files",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Every file a bundle must hold, besides the manifest.
BUNDLE_FILES = (
    "items.parquet",
    "users.parquet",
    "item_factors.npy",
    "user_factors.npy",
    "user_items_indptr.npy",
    "user_items_indices.npy",
    "user_items_data.npy",
    "user_items_held.npy",
    "popularity.npy",
    "items.faiss",
    "users.faiss",
)

_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "version": str,
    "created_at": str,
    "algorithm": str,
    "params": dict,
    "counts": dict,
    "dim": int,
    "indexes": dict,
    "rules": dict,
    "data_fingerprint": str,
    "files": dict,
}


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


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and validate ``folder/manifest.json`` (structure only, not file contents)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder.name}: no such bundle folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{folder.name}: no {MANIFEST}") from exc
    except OSError as exc:
        message = f"{folder.name}: {MANIFEST} cannot be read ({exc.strerror})"
        raise BundleUnreadable(message) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{folder.name}: {MANIFEST} is not valid JSON") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{folder.name}: {MANIFEST} is not an object")
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{folder.name}: {MANIFEST} field {key!r} missing or mistyped")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"{folder.name}: schema_version {manifest['schema_version']} "
            f"is not the supported {SCHEMA_VERSION}"
        )
    if manifest["version"] != folder.name:
        raise BundleError(f"{folder.name}: manifest names version {manifest['version']!r}")
    missing = [f for f in BUNDLE_FILES if f not in manifest["files"]]
    if missing:
        raise BundleError(f"{folder.name}: manifest lists no {', '.join(missing)}")
    for name, entry in manifest["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
            or "/" in name
            or name.startswith(".")
        ):
            raise BundleError(f"{folder.name}: manifest entry for {name!r} is malformed")
    for key in ("users", "items"):
        if not isinstance(manifest["counts"].get(key), int) or manifest["counts"][key] < 0:
            raise BundleError(f"{folder.name}: manifest counts.{key} missing or negative")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check every file's size, then its sha256, against the manifest."""
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder.name}: {name} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise BundleError(
                f"{folder.name}: {name} is {size} bytes, manifest says {entry['size']}"
            )
    for name, entry in manifest["files"].items():
        try:
            digest = sha256_file(folder / name)
        except OSError as exc:
            message = f"{folder.name}: {name} cannot be read ({exc.strerror})"
            raise BundleUnreadable(message) from exc
        if digest != entry["sha256"]:
            raise BundleError(f"{folder.name}: {name} fails its sha256 check")


def _npy(folder: Path, name: str, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    try:
        arr = np.load(folder / name, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise BundleError(f"{folder.name}: {name} is not a plain numeric array") from exc
    if arr.dtype != np.dtype(dtype):
        raise BundleError(f"{folder.name}: {name} has dtype {arr.dtype}, expected {dtype}")
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=False)
    ):
        raise BundleError(f"{folder.name}: {name} has shape {arr.shape}, expected {shape}")
    return arr


def _table(folder: Path, name: str, id_column: str, n: int) -> pa.Table:
    try:
        table = pq.read_table(folder / name)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BundleError(f"{folder.name}: {name} is not a readable Parquet file") from exc
    if id_column not in table.column_names or table.num_rows != n:
        raise BundleError(f"{folder.name}: {name} must have {n} rows and a {id_column} column")
    return table


@dataclass(frozen=True)
class Bundle:
    """A verified, loaded model version. Read-only once built."""

    path: Path
    manifest: dict[str, Any]
    items: Vocabulary
    users: Vocabulary
    item_table: pa.Table
    user_table: pa.Table
    item_index: VectorIndex
    user_index: VectorIndex
    # CSR of each user's interactions: item rows, weighted strength, held flag.
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    held: np.ndarray
    popularity: np.ndarray

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.manifest["created_at"])

    @property
    def suitability(self) -> bool:
        """Whether the catalogue carries risk levels, so the suitability rule applies."""
        return bool(self.manifest["rules"].get("risk_levels"))

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
    n_users, n_items = manifest["counts"]["users"], manifest["counts"]["items"]
    dim = manifest["dim"]
    item_factors = _npy(folder, "item_factors.npy", np.float32, (n_items, dim))
    user_factors = _npy(folder, "user_factors.npy", np.float32, (n_users, dim))
    indptr = _npy(folder, "user_items_indptr.npy", np.int64, (n_users + 1,))
    nnz = int(indptr[-1]) if len(indptr) else 0
    indices = _npy(folder, "user_items_indices.npy", np.int32, (nnz,))
    data = _npy(folder, "user_items_data.npy", np.float32, (nnz,))
    held = _npy(folder, "user_items_held.npy", np.bool_, (nnz,))
    popularity = _npy(folder, "popularity.npy", np.int32, (n_items,))
    for name, arr in (("item_factors.npy", item_factors), ("user_factors.npy", user_factors)):
        if not np.isfinite(arr).all():
            raise BundleError(f"{folder.name}: {name} holds NaN or infinite values")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise BundleError(f"{folder.name}: user_items_indptr.npy is not a valid CSR pointer")
    if nnz and (indices.min() < 0 or indices.max() >= n_items):
        raise BundleError(f"{folder.name}: user_items_indices.npy holds item rows out of range")
    if n_items and (np.sort(popularity) != np.arange(n_items)).any():
        raise BundleError(f"{folder.name}: popularity.npy is not a permutation of the items")
    item_table = _table(folder, "items.parquet", "item_id", n_items)
    user_table = _table(folder, "users.parquet", "user_id", n_users)
    try:
        items = Vocabulary(item_table.column("item_id").combine_chunks())
        users = Vocabulary(user_table.column("user_id").combine_chunks())
    except ValueError as exc:
        raise BundleError(f"{folder.name}: duplicate ids in the item or user table") from exc
    specs = {}
    for key in ("items", "users"):
        entry = manifest["indexes"].get(key)
        if not isinstance(entry, dict) or entry.get("type") not in ("flat", "hnsw", "ivf"):
            raise BundleError(f"{folder.name}: manifest indexes.{key} is malformed")
        specs[key] = IndexSpec(entry["type"], dict(entry.get("params", {})))
    item_faiss = read_index(folder / "items.faiss", specs["items"], item_factors)
    user_faiss = read_index(folder / "users.faiss", specs["users"], user_factors)
    return Bundle(
        path=folder,
        manifest=manifest,
        items=items,
        users=users,
        item_table=item_table,
        user_table=user_table,
        item_index=VectorIndex(item_factors, item_faiss, specs["items"]),
        user_index=VectorIndex(user_factors, user_faiss, specs["users"]),
        indptr=indptr,
        indices=indices,
        data=data,
        held=held,
        popularity=popularity,
    )
