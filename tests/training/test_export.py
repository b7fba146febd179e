"""Offline audiences: the all-items dataset is replaced whole, its partition folders
hold any item id safely, every file is on disk before it is renamed into place, and
through the live state they name live new customers."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from recsvc.errors import InvalidArgument, RecsvcError
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import load_bundle
from recsvc.model.queries import TargetQuery
from recsvc.model.targeting import Targeter
from recsvc.state import CustomerUpdate, Event, open_store
from training.data import load_training_data
from training.export import audience_table, export_all_items, export_audience
from training.fit import FitParams, fit_model
from training.publish import publish
from training.state import live_overlay

# Ids a catalogue may well hold: each would escape or break an unescaped path.
ODD_IDS = ["a/b", "../x", "..", ".", "100%", "x=y", "a b+c", "é✓", "_hidden"]


@pytest.fixture(scope="module")
def targeter(bundle_path: Path) -> Targeter:
    return Targeter(load_bundle(bundle_path))


def _active_ids(targeter: Targeter) -> set[str]:
    return {targeter.bundle.items.ids[r] for r in np.flatnonzero(targeter.item_active)}


def _read_back(out: Path) -> pa.Table:
    return ds.dataset(out, format="parquet", partitioning="hive").to_table()


def _item_ids(table: pa.Table) -> set[str]:
    return {str(i) for i in table.column("item_id").to_pylist()}


def test_a_second_export_leaves_nothing_of_the_first(targeter: Targeter, tmp_path: Path) -> None:
    out = tmp_path / "all"
    export_all_items(targeter, 20, out, progress=False)
    # What an earlier run would leave: a product since retired, as a partition.
    first = next(p for p in out.iterdir() if p.name.startswith("item_id="))
    stale = out / "item_id=RETIRED-000001"
    stale.mkdir()
    (stale / "part-0.parquet").write_bytes((first / "part-0.parquet").read_bytes())

    rows = export_all_items(targeter, 5, out, progress=False)

    assert not stale.exists()
    table = _read_back(out)
    assert table.num_rows == rows
    assert _item_ids(table) == _active_ids(targeter)
    counts = table.group_by("item_id").aggregate([("user_id", "count")])["user_id_count"]
    assert pc.max(counts).as_py() <= 5
    assert (out / "_version").read_text() == targeter.bundle.version + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["all"]  # no temporary folder left over


def test_refuses_to_replace_a_folder_it_did_not_write(targeter: Targeter, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RecsvcError, match="not an earlier --all-items export"):
        export_all_items(targeter, 5, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no such process now


def test_a_crash_between_the_renames_is_repaired(targeter: Targeter, tmp_path: Path) -> None:
    out = tmp_path / "all"
    export_all_items(targeter, 5, out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    dead = _dead_pid()
    out.rename(tmp_path / f".all.old-{dead}")  # the crashed run had moved it aside
    (tmp_path / f".all.tmp-{dead}").mkdir()  # and left its half-built dataset
    (tmp_path / ".all.tmp-x").mkdir()  # no pid: not an export's, left alone
    with pytest.raises(InvalidArgument):  # this run fails too, after the repair
        export_all_items(targeter, 0, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # the previous export is back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".all.tmp-x", "all"]


def _renamed(path: Path, column: str, names: dict[str, str], dst: Path) -> Path:
    table = pq.read_table(path)
    ids = [names.get(i, i) for i in table.column(column).to_pylist()]
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(ids)), dst)
    return dst


@pytest.fixture(scope="module")
def odd_targeter(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Targeter:
    """The sample bank with some active products renamed to ids that are unsafe in paths."""
    items = pq.read_table(sample_dir / "items.parquet").to_pylist()
    active = [r["item_id"] for r in items if r["active"]]
    names = dict(zip(active, ODD_IDS, strict=False))
    assert len(names) == len(ODD_IDS)
    src = tmp_path_factory.mktemp("odd")
    data = load_training_data(
        _renamed(sample_dir / "interactions.parquet", "item_id", names, src / "i.parquet"),
        _renamed(sample_dir / "items.parquet", "item_id", names, src / "items.parquet"),
        sample_dir / "users.parquet",
    )
    params = FitParams(factors=4, iterations=1, seed=1)
    folder = publish(src / "models", data, fit_model(data.user_items, params, progress=False))
    return Targeter(load_bundle(folder))


def test_odd_item_ids_stay_inside_and_read_back(odd_targeter: Targeter, tmp_path: Path) -> None:
    out = tmp_path / "export" / "all"
    export_all_items(odd_targeter, 10, out, progress=False)

    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["all"]
    parts = [p for p in out.iterdir() if p.name != "_version"]
    assert len(parts) == len(_active_ids(odd_targeter))
    for part in parts:
        assert part.is_dir() and part.name.startswith("item_id=")
        assert [f.name for f in part.iterdir()] == ["part-0.parquet"]
    for table in (_read_back(out), pq.read_table(out)):
        assert _item_ids(table) == _active_ids(odd_targeter)
        assert set(ODD_IDS) <= _item_ids(table)
    table = _read_back(out)
    ids = odd_targeter.bundle.items.ids
    audiences = {ids[row]: audience for row, audience in odd_targeter.target_each(10)}
    for item_id in ODD_IDS:
        got = table.filter(pc.equal(table["item_id"], item_id)).sort_by("rank")
        want = audience_table(odd_targeter, audiences[item_id])
        assert got["user_id"].to_pylist() == want["user_id"].to_pylist(), item_id


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files and folders passed to os.fsync, in order (Linux: via /proc)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name a file descriptor")
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_an_audience_is_on_disk_before_it_is_renamed_into_place(
    targeter: Targeter, tmp_path: Path, fsynced: list[str]
) -> None:
    item = next(iter(sorted(_active_ids(targeter))))
    out = tmp_path / "aud.parquet"
    export_audience(targeter, TargetQuery(item_ids=(item,), audience_size=5), out, False)
    assert fsynced == [".aud.parquet.tmp", ".aud.parquet.json.tmp", tmp_path.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aud.parquet", "aud.parquet.json"]


def test_every_export_file_is_on_disk_before_the_swap(
    targeter: Targeter, tmp_path: Path, fsynced: list[str]
) -> None:
    out = tmp_path / "all"
    export_all_items(targeter, 3, out, progress=False)
    n = len(_active_ids(targeter))
    assert fsynced.count("part-0.parquet") == n
    assert sum(name.startswith("item_id=") for name in fsynced) == n
    assert fsynced[-3:] == ["_version", f".all.tmp-{os.getpid()}", tmp_path.name]


def test_exports_through_the_live_state_name_live_new_customers(
    targeter: Targeter, tmp_path: Path
) -> None:
    bundle = targeter.bundle
    pseudonymize = Pseudonymizer(b"audience-test-key")
    items = [bundle.items.ids[r] for r in np.flatnonzero(targeter.item_active)[:3]]
    when = datetime(2027, 6, 1, tzinfo=timezone.utc)
    with open_store(f"sqlite:///{tmp_path}/state.db", pseudonymize) as store:
        store.record_events(
            [Event(f"e{i}", "NEW-1", item, "view", when) for i, item in enumerate(items)]
        )
        store.update_customers([CustomerUpdate("NEW-1", risk_tolerance=5, marketing_consent=True)])
        overlay = live_overlay(bundle, store, pseudonymize)
    assert overlay.users["NEW-1"].row is None  # a customer the bundle does not know

    audience, _ = export_audience(
        targeter,
        TargetQuery(item_ids=(items[0],), audience_size=100_000),
        tmp_path / "a",
        False,
        overlay,
    )
    assert "NEW-1" in pq.read_table(tmp_path / "a")["user_id"].to_pylist()
    assert audience.ids(bundle.users.ids) == pq.read_table(tmp_path / "a")["user_id"].to_pylist()

    out = tmp_path / "all"
    export_all_items(targeter, 100_000, out, progress=False, overlay=overlay)
    table = _read_back(out)
    reached = table.filter(pc.equal(table["user_id"], "NEW-1"))
    assert len(reached) > 0 and (out / "_state_sequence").read_text() == f"{overlay.sequence}\n"
    export_all_items(targeter, 5, out, progress=False)  # without the state: the bundle alone
    assert not (out / "_state_sequence").exists()
    assert "NEW-1" not in _read_back(out)["user_id"].to_pylist()
