"""Publishing a model bundle atomically, and keeping the newest N.

Everything is written into a hidden temporary folder and flushed to disk, the
manifest last; the folder is renamed into place; then ``LATEST`` is replaced by an
atomic rename. A crash, or a power loss, at any point leaves ``LATEST`` naming a
complete bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from recsvc.files import fsync_path
from recsvc.model.bundle import (
    LATEST,
    MANIFEST,
    SCHEMA_VERSION,
    list_versions,
    read_latest,
    sha256_file,
)
from training.data import TrainingData
from training.fit import FittedModel
from training.indexes import build_index, choose_index_spec

__all__ = ["new_version", "prune", "publish", "write_latest"]

log = logging.getLogger(__name__)
_TMP_PREFIX = ".tmp-"


def new_version(now: datetime | None = None) -> str:
    """A sortable version name: UTC time to the microsecond."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("v%Y%m%d-%H%M%S-%f")


def _write_npy(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / name, np.ascontiguousarray(array), allow_pickle=False)


def write_latest(models: Path, version: str) -> None:
    """Point ``models/LATEST`` at ``version`` by atomic rename."""
    tmp = models / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, models / LATEST)
    fsync_path(models)


def _popularity(data: TrainingData) -> np.ndarray:
    """Item rows by number of distinct customers, most popular first (ties by row)."""
    users_per_item = np.bincount(data.user_items.indices, minlength=len(data.items))
    return np.lexsort((np.arange(len(data.items)), -users_per_item)).astype(np.int32)


def _recent_confidence(model: FittedModel) -> float:
    """Confidence a just-seen item gets at fold-in: the typical weighted interaction."""
    data = model.confidence.data
    return float(np.median(data)) if data.size else 1.0


def publish(
    models: Path,
    data: TrainingData,
    model: FittedModel,
    keep: int = 5,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a new bundle under ``models`` and point LATEST at it.

    Returns:
        The published bundle folder.
    """
    models.mkdir(parents=True, exist_ok=True)
    version = new_version()
    while (models / version).exists():  # two publishes in one microsecond
        version = new_version()
    tmp = models / f"{_TMP_PREFIX}{version}"
    tmp.mkdir()
    try:
        item_spec = choose_index_spec(
            len(data.items), model.params.item_index, model.params.exact_max
        )
        user_spec = choose_index_spec(
            len(data.users), model.params.user_index, model.params.exact_max
        )
        pq.write_table(data.item_table, tmp / "items.parquet")
        pq.write_table(data.user_table, tmp / "users.parquet")
        _write_npy(tmp, "item_factors.npy", model.item_factors)
        _write_npy(tmp, "user_factors.npy", model.user_factors)
        conf = model.confidence
        _write_npy(tmp, "user_items_indptr.npy", conf.indptr.astype(np.int64))
        _write_npy(tmp, "user_items_indices.npy", conf.indices.astype(np.int32))
        _write_npy(tmp, "user_items_data.npy", conf.data.astype(np.float32))
        _write_npy(tmp, "user_items_held.npy", data.held.astype(np.bool_))
        _write_npy(tmp, "popularity.npy", _popularity(data))
        faiss.write_index(
            build_index(model.item_factors, item_spec, model.params.seed), str(tmp / "items.faiss")
        )
        faiss.write_index(
            build_index(model.user_factors, user_spec, model.params.seed), str(tmp / "users.faiss")
        )
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(tmp.iterdir()):
            # On disk before the manifest that vouches for it: after a power loss,
            # LATEST must never name a bundle whose files came back empty.
            fsync_path(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "version": version,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "algorithm": model.params.algorithm,
            "params": model.params.to_json(),
            "counts": {
                "users": len(data.users),
                "items": len(data.items),
                "interactions": int(data.user_items.nnz),
                "held": int(data.held.sum()),
            },
            "dim": int(model.item_factors.shape[1]),
            "indexes": {"items": item_spec.to_json(), "users": user_spec.to_json()},
            "rules": {
                "risk_levels": data.has_risk_levels,
                "active_flag": data.has_active,
                "users_table": data.has_users_table,
            },
            "fold_in": {"recent_confidence": _recent_confidence(model)},
            "data_fingerprint": data.fingerprint(),
            "data_report": data.report.as_dict(),
            "fit_seconds": round(model.seconds, 3),
            "files": files,
            **(extra or {}),
        }
        with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        final = models / version
        os.rename(tmp, final)
        fsync_path(models)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(models, version)
    prune(models, keep)
    return final


def prune(models: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (never the one LATEST names),
    and temporary folders left by crashed publishes. Returns what was removed."""
    latest = read_latest(models)
    versions = list_versions(models)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != latest]
    for v in doomed:
        shutil.rmtree(models / v, ignore_errors=True)
    # Another trainer may be publishing right now: only sweep leftovers an hour old.
    cutoff = time.time() - 3600
    for p in models.iterdir():
        if p.name.startswith(_TMP_PREFIX) and p.stat().st_mtime < cutoff:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return doomed
