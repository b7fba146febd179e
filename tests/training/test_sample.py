"""The synthetic bank: deterministic, realistic columns, real signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.sample import CATEGORIES, SampleSpec, write_sample


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = SampleSpec(users=300, items=60, seed=11, chunk_users=128)
    write_sample(tmp_path / "a", spec, progress=False)
    write_sample(tmp_path / "b", spec, progress=False)
    write_sample(tmp_path / "c", SampleSpec(users=300, items=60, seed=12), progress=False)
    for name in ("interactions", "items", "users"):
        ta = pq.read_table(tmp_path / "a" / f"{name}.parquet")
        assert ta.equals(pq.read_table(tmp_path / "b" / f"{name}.parquet"))
    assert not pq.read_table(tmp_path / "a/interactions.parquet").equals(
        pq.read_table(tmp_path / "c/interactions.parquet")
    )


def test_columns_and_categories(sample_dir: Path) -> None:
    items = pq.read_table(sample_dir / "items.parquet")
    users = pq.read_table(sample_dir / "users.parquet")
    inter = pq.read_table(sample_dir / "interactions.parquet")
    assert {"item_id", "name", "category", "risk_level", "active"} <= set(items.column_names)
    assert {"user_id", "risk_tolerance", "marketing_consent", "age_band", "segment"} <= set(
        users.column_names
    )
    assert {"user_id", "item_id", "event", "ts"} <= set(inter.column_names)
    assert set(items.column("category").to_pylist()) == {c[0] for c in CATEGORIES}
    assert set(inter.column("event").to_pylist()) == {"view", "click", "apply", "purchase"}
    assert pc.min(items.column("risk_level")).as_py() >= 1
    assert pc.max(items.column("risk_level")).as_py() <= 5


def test_purchases_mostly_within_risk_tolerance(sample_dir: Path) -> None:
    items = pq.read_table(sample_dir / "items.parquet").to_pylist()
    users = pq.read_table(sample_dir / "users.parquet").to_pylist()
    risk = {r["item_id"]: r["risk_level"] or 5 for r in items}
    tol = {r["user_id"]: r["risk_tolerance"] or 1 for r in users}
    inter = pq.read_table(sample_dir / "interactions.parquet")
    bought = inter.filter(pc.equal(inter.column("event"), "purchase")).to_pylist()
    within = np.mean([risk[r["item_id"]] <= tol[r["user_id"]] for r in bought])
    assert within > 0.9
