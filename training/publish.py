"""Publishing a model bundle atomically, and keeping the newest N.

``publish`` runs in named steps: write the payload (every file of
``recsvc.model.manifest.FILES``) into a hidden temporary folder; build the manifest
(each file flushed to disk, then sized and hashed); commit (the manifest written
last and flushed, the folder renamed into place); then ``LATEST`` is replaced by an
atomic rename and old versions are pruned. A crash, or a power loss, at any point
leaves ``LATEST`` naming a complete bundle.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsvc.errors import RecsvcError
from recsvc.files import fsync_path
from recsvc.model.bundle import LATEST, list_versions, read_latest, sha256_file
from recsvc.model.manifest import (
    FILES,
    MANIFEST,
    Counts,
    Events,
    FileEntry,
    FoldIn,
    Indexes,
    Manifest,
    RuleFlags,
)
from training.data import TrainingData
from training.fit import FittedModel
from training.indexes import build_index, choose_index_spec

__all__ = ["erase_versions", "new_version", "prune", "publish", "write_latest"]

log = logging.getLogger(__name__)
_TMP_PREFIX = ".tmp-"
_ERASING_PREFIX = ".erasing-"


def new_version(now: datetime | None = None) -> str:
    """A sortable version name: UTC time to the microsecond."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("v%Y%m%d-%H%M%S-%f")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _is_disk_full(exc: BaseException) -> bool:
    """Whether a writer failed for want of space: numpy and pyarrow raise OSError with the
    errno; FAISS raises RuntimeError with only the system's message in its text."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return isinstance(exc, RuntimeError) and any(os.strerror(e) in str(exc) for e in _DISK_FULL)


@contextmanager
def _writing(path: Path, needed: Callable[[], int]) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one line naming the file and the space.

    Args:
        path: the file being written.
        needed: its size in bytes, asked only once the disk is full.
    """
    free = shutil.disk_usage(path.parent).free  # before this file took any of it
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        raise RecsvcError(
            f"no space left on device while writing {path.name} "
            f"({_size(needed())} needed, {_size(free)} free)"
        ) from exc


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def _write_npy(folder: Path, name: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    with _writing(folder / name, lambda: array.nbytes + 128):  # + the .npy header
        np.save(folder / name, array, allow_pickle=False)


def _write_parquet(folder: Path, name: str, table: pa.Table) -> None:
    with _writing(folder / name, lambda: _parquet_size(table)):
        pq.write_table(table, folder / name)


def _parquet_size(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return int(sink.getvalue().size)


def _write_index(folder: Path, name: str, index: faiss.Index) -> None:
    with _writing(folder / name, lambda: int(faiss.serialize_index(index).nbytes)):
        faiss.write_index(index, str(folder / name))


def write_latest(models: Path, version: str) -> None:
    """Point ``models/LATEST`` at ``version`` by atomic rename."""
    tmp = models / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}"
    text = version + "\n"
    try:
        with (
            _writing(models / LATEST, lambda: len(text.encode())),
            tmp.open("w", encoding="utf-8") as f,
        ):
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    version, tmp = _reserve(models)
    try:
        indexes = _write_payload(tmp, data, model)
        files = _sync_and_hash(tmp)
        manifest = _build_manifest(version, data, model, indexes, files, evaluation)
        final = _commit(tmp, models / version, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        write_latest(models, version)
    except RecsvcError:  # the disk filled before LATEST changed: never named, so never published
        shutil.rmtree(final, ignore_errors=True)
        raise
    prune(models, keep)
    return final


def _reserve(models: Path) -> tuple[str, Path]:
    """A new version name, and the hidden temporary folder its files are written into."""
    models.mkdir(parents=True, exist_ok=True)
    version = new_version()
    while (models / version).exists():  # two publishes in one microsecond
        version = new_version()
    tmp = models / f"{_TMP_PREFIX}{version}"
    tmp.mkdir()
    return version, tmp


def _write_payload(folder: Path, data: TrainingData, model: FittedModel) -> Indexes:
    """Write every file of ``FILES`` into ``folder``; returns how the indexes were built."""
    params = model.params
    indexes = Indexes(
        items=choose_index_spec(len(data.items), params.item_index, params.exact_max),
        users=choose_index_spec(len(data.users), params.user_index, params.exact_max),
    )
    _write_parquet(folder, FILES.items, data.item_table)
    _write_parquet(folder, FILES.users, data.user_table)
    _write_npy(folder, FILES.item_factors, model.item_factors)
    _write_npy(folder, FILES.user_factors, model.user_factors)
    conf = model.confidence
    _write_npy(folder, FILES.indptr, conf.indptr.astype(np.int64))
    _write_npy(folder, FILES.indices, conf.indices.astype(np.int32))
    _write_npy(folder, FILES.data, conf.data.astype(np.float32))
    _write_npy(folder, FILES.strength, _raw_strengths(data, conf))
    _write_npy(folder, FILES.held, data.held.astype(np.bool_))
    _write_npy(folder, FILES.popularity, _popularity(data))
    for factors, spec, name in (
        (model.item_factors, indexes.items, FILES.item_index),
        (model.user_factors, indexes.users, FILES.user_index),
    ):
        _write_index(folder, name, build_index(factors, spec, params.seed))
    return indexes


def _raw_strengths(data: TrainingData, conf: sp.csr_matrix) -> np.ndarray:
    """The strengths before weighting, aligned with the confidences' CSR."""
    raw = data.user_items
    if not (np.array_equal(raw.indptr, conf.indptr) and np.array_equal(raw.indices, conf.indices)):
        raise AssertionError("weighting changed the interaction matrix's structure")
    return np.asarray(raw.data, dtype=np.float32)


def _sync_and_hash(folder: Path) -> dict[str, FileEntry]:
    """Every file in ``folder``, flushed to disk, with its size and sha256."""
    return {p.name: _synced_entry(p) for p in sorted(folder.iterdir())}


def _synced_entry(path: Path) -> FileEntry:
    # On disk before the manifest that vouches for it: after a power loss, LATEST must
    # never name a bundle whose files came back empty. Some file systems only find the
    # disk full here.
    with _writing(path, lambda: path.stat().st_size):
        fsync_path(path)
    return FileEntry(size=path.stat().st_size, sha256=sha256_file(path))


def _build_manifest(
    version: str,
    data: TrainingData,
    model: FittedModel,
    indexes: Indexes,
    files: dict[str, FileEntry],
    evaluation: bool,
) -> Manifest:
    """The manifest vouching for ``files``: what was fit, on which data, and how."""
    return Manifest(
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
        events=Events(
            weights=dict(data.config.event_weights), held=tuple(sorted(data.config.held_events))
        ),
        data_fingerprint=data.fingerprint(),
        data_report=data.report.as_dict(),
        fit_seconds=round(model.seconds, 3),
        files=files,
        evaluation=evaluation,
        state_sequence=data.state_sequence,
    )


def _commit(tmp: Path, final: Path, manifest: Manifest) -> Path:
    """Write the manifest last, flush, and rename ``tmp`` into place as ``final``."""
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True)
    path = tmp / MANIFEST
    with _writing(path, lambda: len(text.encode())), path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(final.parent)
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


def erase_versions(models: Path, versions: list[str]) -> None:
    """Delete ``versions`` for good; unlike ``prune``, any failure raises.

    Each is first renamed out of sight, so a crash part-way leaves a hidden
    ``.erasing-`` folder, never a version that looks whole or one no longer listed
    yet still on disk; the next call removes such leftovers before anything else.
    Returns once every removal is on disk.
    """
    for leftover in sorted(models.glob(f"{_ERASING_PREFIX}*")):
        shutil.rmtree(leftover)
    for version in versions:
        hidden = models / f"{_ERASING_PREFIX}{version}"
        os.rename(models / version, hidden)
        fsync_path(models)
        shutil.rmtree(hidden)
    fsync_path(models)
