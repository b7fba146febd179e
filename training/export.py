"""Offline campaign audiences straight from a bundle (no server), for big exports.

Given the live overlay (``training.state.live_overlay``), they answer as a server
would: every consent, tolerance, product and erasure the state store holds applies,
and live new customers are among the candidates.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsvc.audience_file import audience_meta, write_audience
from recsvc.errors import BundleError, RecsvcError
from recsvc.files import fsync_path
from recsvc.model.bundle import Bundle, load_bundle, read_latest
from recsvc.model.contact import DEFAULT_POLICY, ContactPolicy
from recsvc.model.overlay import Overlay
from recsvc.model.queries import TargetQuery
from recsvc.model.targeting import Audience, Targeter

__all__ = ["audience_table", "export_all_items", "export_audience", "open_targeter"]

log = logging.getLogger(__name__)
_CHUNK = 100_000
_VERSION_FILE = "_version"  # marks a folder as an all-items export (readers skip "_" names)
_SEQUENCE_FILE = "_state_sequence"  # the live state it answered through, if any


def open_targeter(
    models: Path, no_consent_data: bool = False, contact_policy: ContactPolicy = DEFAULT_POLICY
) -> Targeter:
    version = read_latest(models)
    if version is None:
        raise BundleError(f"{models}: no LATEST; publish a model first")
    bundle = load_bundle(models / version)
    return Targeter(bundle, no_consent_data, contact_policy=contact_policy)


def _member_ids(bundle: Bundle, audience: Audience) -> pa.Array:
    """Every id an audience row may name: the bundle's customers, then its live new ones."""
    ids = bundle.users.arrow()
    if not audience.new_ids:
        return ids
    return pa.concat_arrays([ids, pa.array(audience.new_ids, pa.string())])


def audience_table(targeter: Targeter, audience: Audience, progress: bool = False) -> pa.Table:
    """Audience rows as a (user_id, score) table, best first."""
    return _table(_member_ids(targeter.bundle, audience), audience, progress)


def _table(ids: pa.Array, audience: Audience, progress: bool = False) -> pa.Table:
    parts = []
    for start in tqdm(
        range(0, len(audience.rows), _CHUNK), desc="audience", unit="chunk", disable=not progress
    ):
        parts.append(ids.take(pa.array(audience.rows[start : start + _CHUNK])))
    user_ids = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    return pa.table({"user_id": user_ids, "score": pa.array(audience.scores, pa.float32())})


def export_audience(
    targeter: Targeter,
    query: TargetQuery,
    out: Path,
    progress: bool = True,
    overlay: Overlay | None = None,
    channel: str = "",
) -> tuple[Audience, Path]:
    """Write one campaign's audience and its sidecar, through ``overlay`` if given.

    ``channel`` is the campaign's, for the contact policy's cap on it.
    """
    audience = targeter.target(query, overlay, channel=channel)
    table = audience_table(targeter, audience, progress)
    meta = audience_meta(
        audience.version, query, audience.eligible, audience.excluded, audience.indexed, "offline"
    )
    meta["state_sequence"] = audience.sequence
    return audience, write_audience(out, table, meta)


def export_all_items(
    targeter: Targeter,
    size: int,
    out: Path,
    include_holders: bool = False,
    progress: bool = True,
    overlay: Overlay | None = None,
) -> int:
    """Top-``size`` audience of every active product into one dataset partitioned by item_id.

    Through ``overlay`` if given; then ``_state_sequence`` beside ``_version`` names the
    state sequence it reflects.

    The dataset is built in a hidden sibling folder and swapped in whole, so ``out``
    never mixes two runs (a product since retired, customers who since withdrew
    consent would otherwise stay in it, looking current). Partition folders are
    ``item_id=<percent-encoded id>``: any id stays inside ``out``, and pyarrow's hive
    partitioning (``segment_encoding="uri"``, its default) reads the id back.

    Returns:
        The number of rows written.

    Raises:
        RecsvcError: ``out`` exists and is neither empty nor an earlier export.
    """
    out = out.resolve()
    _recover(out)
    if out.exists() and not _replaceable(out):
        raise RecsvcError(f"{out} is not an earlier --all-items export; refusing to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
    tmp.mkdir(parents=True)
    try:
        rows = _write_partitions(targeter, size, tmp, include_holders, progress, overlay)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out: Path) -> None:
    """Tidy up after exports that died: their folders, and an export left renamed away.

    A run that crashed between its two renames left ``out`` missing and the previous
    export at ``.{name}.old-<pid>``: that one is put back. Folders of runs whose process
    is gone are removed; those of a run still going are left to it.
    """
    if not out.parent.is_dir():
        return
    for kind in ("old", "tmp"):
        for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.rename(path, out)
                log.warning("restored the export a crashed run left aside", extra={"out": str(out)})
            else:
                shutil.rmtree(path, ignore_errors=True)


def _replaceable(out: Path) -> bool:
    """An empty folder, or one an earlier export wrote: never a user's other files."""
    return out.is_dir() and ((out / _VERSION_FILE).is_file() or next(out.iterdir(), None) is None)


def _write_partitions(
    targeter: Targeter,
    size: int,
    folder: Path,
    include_holders: bool,
    progress: bool,
    overlay: Overlay | None,
) -> int:
    b = targeter.bundle
    rows_written = 0
    audiences = targeter.target_each(size, include_holders, overlay=overlay)  # blocks of products
    rules = overlay.item_rules if overlay is not None else b.item_rules
    ids, new_ids = b.users.arrow(), ()
    for row, audience in tqdm(
        audiences, total=int(rules.active.sum()), desc="products", unit="item", disable=not progress
    ):
        if audience.new_ids is not new_ids:  # one tuple for every audience of an overlay
            ids, new_ids = _member_ids(b, audience), audience.new_ids
        item_id = b.items.ids[row]
        table = _table(ids, audience)
        table = table.append_column("rank", pa.array(np.arange(1, table.num_rows + 1), pa.int32()))
        # Every character but letters, digits and "_.-~" is escaped, "/" and "%" too, so
        # the name is one path segment and distinct ids get distinct folders.
        part = folder / f"item_id={quote(item_id, safe='')}"
        part.mkdir()
        pq.write_table(table, part / "part-0.parquet")
        fsync_path(part / "part-0.parquet")
        fsync_path(part)
        rows_written += table.num_rows
    if overlay is not None:
        (folder / _SEQUENCE_FILE).write_text(f"{overlay.sequence}\n")
        fsync_path(folder / _SEQUENCE_FILE)
    (folder / _VERSION_FILE).write_text(b.version + "\n")
    fsync_path(folder / _VERSION_FILE)
    fsync_path(folder)
    return rows_written


def _swap_in(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out`` by renames, removing what was there.

    Between the two renames ``out`` is briefly absent, never half written.
    """
    if not out.exists():
        os.rename(new, out)
        fsync_path(out.parent)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)
