"""Offline campaign audiences straight from a bundle (no server), for big exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsvc.audience import audience_meta, write_audience
from recsvc.bundle import load_bundle, read_latest
from recsvc.errors import BundleError
from recsvc.requests import TargetQuery
from recsvc.targeting import Audience, Targeter

__all__ = ["audience_table", "export_all_items", "export_audience", "open_targeter"]

_CHUNK = 100_000


def open_targeter(models: Path, consent_required: bool = True) -> Targeter:
    version = read_latest(models)
    if version is None:
        raise BundleError(f"{models}: no LATEST; publish a model first")
    return Targeter(load_bundle(models / version), consent_required)


def audience_table(targeter: Targeter, audience: Audience, progress: bool = False) -> pa.Table:
    """Audience rows as a (user_id, score) table, best first."""
    ids = targeter.bundle.users.arrow()
    parts = []
    for start in tqdm(
        range(0, len(audience.rows), _CHUNK), desc="audience", unit="chunk", disable=not progress
    ):
        parts.append(ids.take(pa.array(audience.rows[start : start + _CHUNK])))
    user_ids = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    return pa.table({"user_id": user_ids, "score": pa.array(audience.scores, pa.float32())})


def export_audience(
    targeter: Targeter, query: TargetQuery, out: Path, progress: bool = True
) -> tuple[Audience, Path]:
    audience = targeter.target(query)
    table = audience_table(targeter, audience, progress)
    meta = audience_meta(audience.version, query, audience.eligible, audience.excluded, "offline")
    return audience, write_audience(out, table, meta)


def export_all_items(
    targeter: Targeter, size: int, out: Path, include_holders: bool = False, progress: bool = True
) -> int:
    """Top-``size`` audience of every active product into one dataset partitioned by item_id."""
    out.mkdir(parents=True, exist_ok=True)
    b = targeter.bundle
    rows_written = 0
    active = np.flatnonzero(targeter.item_active)
    for row in tqdm(active, desc="products", unit="item", disable=not progress):
        item_id = b.items.ids[row]
        query = TargetQuery(
            item_ids=(item_id,), audience_size=size, include_holders=include_holders
        )
        audience = targeter.target(query)
        table = audience_table(targeter, audience)
        table = table.append_column("rank", pa.array(np.arange(1, table.num_rows + 1), pa.int32()))
        part = out / f"item_id={item_id}"
        part.mkdir(exist_ok=True)
        pq.write_table(table, part / "part-0.parquet")
        rows_written += table.num_rows
    (out / "_version").write_text(b.version + "\n")
    return rows_written
