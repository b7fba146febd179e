"""Writing an audience: Parquet via pyarrow, plus a JSON sidecar, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsvc.files import fsync_path
from recsvc.model.queries import TargetQuery
from recsvc.model.targeting import ExclusionCounts

__all__ = ["audience_meta", "shortfall", "write_audience"]


_LEFT_OUT = {
    "no_consent": "without marketing consent",
    "unsuitable": "whose risk tolerance is below the products' risk",
    "holders": "who hold one already",
    "below_min_score": "below the minimum score",
    "contact_capped": "contacted up to the contact policy's cap",
    "declined_recently": "who declined one within the cooldown",
}
"""What each of ``ExclusionCounts``' rules leaves out, in words."""


def audience_meta(
    version: str,
    query: TargetQuery,
    eligible: int,
    excluded: ExclusionCounts,
    approximate: bool,
    source: str,
) -> dict[str, Any]:
    """The sidecar of an audience: model version, time, request, customers left out by rule."""
    return {
        "model_version": version,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "request": {**dataclasses.asdict(query), "item_ids": list(query.item_ids)},
        "eligible_users": eligible,
        "excluded": dataclasses.asdict(excluded),
        "approximate": approximate,
        "source": source,
    }


def shortfall(asked: int, rows: int, eligible: int, excluded: ExclusionCounts) -> str:
    """Why an audience has fewer customers than asked for, by rule; "" when it has them all."""
    if rows >= asked:
        return ""
    left_out = ", ".join(
        f"{getattr(excluded, f.name):,} {_LEFT_OUT.get(f.name, f.name)}"
        for f in dataclasses.fields(excluded)
    )
    return (
        f"{rows:,} customers, not the {asked:,} asked for: {eligible:,} are eligible; "
        f"left out {left_out}"
    )


def write_audience(out: Path, table: pa.Table, meta: dict[str, Any]) -> Path:
    """Write ``out`` and ``out.json`` (model version, time, request, exclusions).

    Both are written beside their final names, flushed to disk and renamed into
    place, data first: a reader never sees half a file, nor (after a power loss) a
    sidecar vouching for an empty one. Returns the sidecar path.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = out.with_name(out.name + ".json")
    tmp_data = out.with_name(f".{out.name}.tmp")
    tmp_meta = sidecar.with_name(f".{sidecar.name}.tmp")
    pq.write_table(table, tmp_data)
    tmp_meta.write_text(json.dumps({**meta, "rows": table.num_rows}, indent=2, default=str))
    fsync_path(tmp_data)
    fsync_path(tmp_meta)
    os.replace(tmp_data, out)
    os.replace(tmp_meta, sidecar)
    fsync_path(out.parent)  # the renames themselves
    return sidecar
