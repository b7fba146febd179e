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

import faiss
import numpy as np
import pyarrow.parquet as pq

from recsvc.files import fsync_path
from recsvc.model.bundle import LATEST, list_versions, read_latest, sha256_file
from recsvc.model.index import build_index, choose_index_spec
from recsvc.model.manifest import (
    FILES,
    MANIFEST,
    Counts,
    FileEntry,
    FoldIn,
    Indexes,
    Manifest,
    RuleFlags,
)
from training.data import TrainingData
from training.fit import FittedModel

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
    evaluation: bool = False,
) -> Path:
    """Write a new bundle under ``models`` and point LATEST at it.

    Args:
        evaluation: recorded in the manifest: an offline evaluation publishes into
            its report folder, not for serving.

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
        indexes = Indexes(
            items=choose_index_spec(
                len(data.items), model.params.item_index, model.params.exact_max
            ),
            users=choose_index_spec(
                len(data.users), model.params.user_index, model.params.exact_max
            ),
        )
        pq.write_table(data.item_table, tmp / FILES.items)
        pq.write_table(data.user_table, tmp / FILES.users)
        _write_npy(tmp, FILES.item_factors, model.item_factors)
        _write_npy(tmp, FILES.user_factors, model.user_factors)
        conf = model.confidence
        _write_npy(tmp, FILES.indptr, conf.indptr.astype(np.int64))
        _write_npy(tmp, FILES.indices, conf.indices.astype(np.int32))
        _write_npy(tmp, FILES.data, conf.data.astype(np.float32))
        _write_npy(tmp, FILES.held, data.held.astype(np.bool_))
        _write_npy(tmp, FILES.popularity, _popularity(data))
        faiss.write_index(
            build_index(model.item_factors, indexes.items, model.params.seed),
            str(tmp / FILES.item_index),
        )
        faiss.write_index(
            build_index(model.user_factors, indexes.users, model.params.seed),
            str(tmp / FILES.user_index),
        )
        files = {}
        for p in sorted(tmp.iterdir()):
            # On disk before the manifest that vouches for it: after a power loss,
            # LATEST must never name a bundle whose files came back empty.
            fsync_path(p)
            files[p.name] = FileEntry(size=p.stat().st_size, sha256=sha256_file(p))
        manifest = Manifest(
            version=version,
            created_at=datetime.now(timezone.utc),
            algorithm=model.params.algorithm,
            params=model.params.to_json(),
            counts=Counts(
                users=len(data.users),
                items=len(data.items),
                interactions=int(data.user_items.nnz),
                held=int(data.held.sum()),
            ),
            dim=int(model.item_factors.shape[1]),
            indexes=indexes,
            rules=RuleFlags(
                risk_levels=data.has_risk_levels,
                active_flag=data.has_active,
                users_table=data.has_users_table,
            ),
            fold_in=FoldIn(recent_confidence=_recent_confidence(model)),
            data_fingerprint=data.fingerprint(),
            data_report=data.report.as_dict(),
            fit_seconds=round(model.seconds, 3),
            files=files,
            evaluation=evaluation,
        )
        with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
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
