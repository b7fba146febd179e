"""Loading verifies everything before trusting anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsvc.errors import BundleError, BundleUnreadable
from recsvc.model.bundle import (
    LATEST,
    _interactions,
    _table,
    list_versions,
    load_bundle,
    read_latest,
    read_manifest,
    sha256_file,
)
from recsvc.model.manifest import FILES, MANIFEST, Counts
from recsvc.model.ranking import Recommender
from recsvc.model.targeting import Targeter
from tests.conftest import write_pickled_npy


def _version(models: Path) -> Path:
    return models / read_latest(models)  # type: ignore[operator]


def _rewrite_manifest(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_loads_a_good_bundle(bundle_path: Path) -> None:
    b = load_bundle(bundle_path)
    assert len(b.users) == 1500 and len(b.items) == 120
    assert b.item_index.vectors.shape == (120, 16)


def test_rules_are_built_once_per_version_for_ranking_and_targeting(bundle_path: Path) -> None:
    b = load_bundle(bundle_path)
    recommender, targeter = Recommender(b), Targeter(b)
    assert recommender.item_rules is b.item_rules
    assert targeter.item_risk is b.item_rules.risk and targeter.item_active is b.item_rules.active
    assert recommender.tolerance is targeter.tolerance is b.tolerance


def _flip_byte(folder: Path) -> None:
    p = folder / FILES.item_factors
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    p.write_bytes(bytes(raw))


def _truncate(folder: Path) -> None:
    p = folder / FILES.user_index
    p.write_bytes(p.read_bytes()[:100])


def _pickle_npy(folder: Path) -> None:
    p = folder / FILES.popularity
    write_pickled_npy(p)
    _rewrite_manifest(
        folder,
        lambda m: m["files"][p.name].update(size=p.stat().st_size, sha256=sha256_file(p)),
    )


def _wrong_dim(folder: Path) -> None:
    _rewrite_manifest(folder, lambda m: m.update(dim=m["dim"] + 1))


def _wrong_count(folder: Path) -> None:
    _rewrite_manifest(folder, lambda m: m["counts"].update(items=m["counts"]["items"] - 1))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_flip_byte, "fails its sha256"),
        (_truncate, "bytes, manifest says"),
        (lambda f: (f / FILES.items).unlink(), f"{FILES.items} is missing"),
        (lambda f: (f / MANIFEST).unlink(), f"no {MANIFEST}"),
        (lambda f: (f / MANIFEST).write_text("{not json"), "not valid JSON"),
        (_pickle_npy, "not a plain numeric array"),
        (_wrong_dim, "shape"),
        (_wrong_count, "shape"),
    ],
)
def test_corrupt_bundles_are_rejected(models_copy: Path, corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    folder = _version(models_copy)
    corrupt(folder)
    with pytest.raises(BundleError, match=message):
        load_bundle(folder)


def test_missing_folder_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "v0")
    empty = tmp_path / "v1"
    empty.mkdir()
    with pytest.raises(BundleError, match=f"no {MANIFEST}"):
        load_bundle(empty)


def test_renamed_folder_does_not_match_its_manifest(models_copy: Path) -> None:
    src = _version(models_copy)
    dst = models_copy / "v99999999-000000-000000"
    shutil.copytree(src, dst)
    with pytest.raises(BundleError, match="manifest names version"):
        load_bundle(dst)


def _csr(folder: Path, indptr: list[int], indices: list[int], data: list[float]) -> Counts:
    """The five CSR files of a bundle, and the counts a manifest would give them."""
    folder.mkdir(exist_ok=True)
    arrays = {
        FILES.indptr: np.array(indptr, np.int64),
        FILES.indices: np.array(indices, np.int32),
        FILES.data: np.array(data, np.float32),
        FILES.strength: np.array(data, np.float32),
        FILES.held: np.zeros(len(indices), np.bool_),
    }
    for name, array in arrays.items():
        np.save(folder / name, array)
    return Counts(users=len(indptr) - 1, items=4, interactions=len(indices), held=0)


def test_the_interaction_arrays_checks_at_their_edges(tmp_path: Path) -> None:
    """Customers with no interactions at the end, zero strengths and the last item row
    are valid; one item row past the end is not, named with the version."""
    folder = tmp_path / "v20261201-000000-000001"
    counts = _csr(folder, [0, 2, 3, 3, 3], [0, 3, 2], [1.0, 0.0, 2.5])
    loaded = _interactions(folder, counts)
    assert loaded.indices.tolist() == [0, 3, 2] and loaded.data.tolist() == [1.0, 0.0, 2.5]
    counts = _csr(folder, [0, 2, 3, 3, 3], [0, 4, 2], [1.0, 0.0, 2.5])
    with pytest.raises(BundleError) as err:
        _interactions(folder, counts)
    assert str(err.value) == f"{folder.name}: {FILES.indices} holds item rows out of range"


def test_latest_unreadable_says_why(tmp_path: Path) -> None:
    (tmp_path / LATEST).mkdir()
    with pytest.raises(BundleUnreadable) as err:
        read_latest(tmp_path)
    assert str(err.value) == f"{LATEST} cannot be read (Is a directory)"


def test_only_folders_named_as_versions_with_a_manifest_are_versions(tmp_path: Path) -> None:
    for name in ("v1", ".v2-staging", "v3-empty"):
        (tmp_path / name).mkdir()
    for name in ("v1", ".v2-staging"):
        (tmp_path / name / MANIFEST).write_text("{}")
    (tmp_path / "v4.json").write_text("{}")
    assert list_versions(tmp_path) == ["v1"]


def test_a_table_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "v20261201-000000-000001"
    folder.mkdir()
    (folder / FILES.items).write_bytes(b"not parquet at all")
    with pytest.raises(BundleError) as err:
        _table(folder, FILES.items, "item_id", 3)
    assert str(err.value) == f"{folder.name}: {FILES.items} is not a readable Parquet file"


def test_an_array_of_the_wrong_type_is_named_with_both_types(tmp_path: Path) -> None:
    folder = tmp_path / "v20261201-000000-000001"
    counts = _csr(folder, [0, 1], [2], [1.0])
    np.save(folder / FILES.data, np.array([1.0], np.float64))
    with pytest.raises(BundleError) as err:
        _interactions(folder, counts)
    assert str(err.value) == f"{folder.name}: {FILES.data} has dtype float64, expected float32"


def test_a_bundle_holds_its_folder_and_its_published_indexes(bundle_path: Path) -> None:
    """Small catalogues are searched exactly, so only this says the FAISS files loaded."""
    bundle = load_bundle(bundle_path)
    assert bundle.path == bundle_path
    for index, vectors in (
        (bundle.item_index, bundle.item_index.vectors),
        (bundle.user_index, bundle.user_index.vectors),
    ):
        assert isinstance(index.index, faiss.Index)
        assert index.index.d == vectors.shape[1] and index.index.ntotal > 0


def test_a_manifest_outside_any_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as err:
        read_manifest(tmp_path / "v20261201-000000-000009")
    assert str(err.value) == "v20261201-000000-000009: no such bundle folder"


def test_duplicate_product_ids_are_refused_by_name(models_copy: Path) -> None:
    """A buggy writer's items table with one id twice, its checksum stamped to match."""
    folder = _version(models_copy)
    table = pq.read_table(folder / FILES.items)
    ids = table.column("item_id").to_pylist()
    ids[1] = ids[0]
    _restamp(folder, FILES.items, table.set_column(0, "item_id", pa.array(ids)))
    with pytest.raises(BundleError) as err:
        load_bundle(folder)
    assert str(err.value) == f"{folder.name}: duplicate ids in the item or user table"


def _restamp(folder: Path, name: str, table: pa.Table) -> None:
    """Write a table as a buggy writer would: its checksum stamped to match."""
    path = folder / name
    pq.write_table(table, path)
    _rewrite_manifest(
        folder,
        lambda m: m["files"][name].update(size=path.stat().st_size, sha256=sha256_file(path)),
    )


@pytest.mark.parametrize(
    ("name", "column", "values", "message"),
    [
        (FILES.users, "marketing_consent", "no", "must be boolean, got string"),
        (FILES.users, "marketing_consent", 1, "must be boolean, got int64"),
        (FILES.users, "risk_tolerance", 9, "holds levels 1..9, outside 1..5"),
        (FILES.users, "risk_tolerance", 0, "holds levels 0..5, outside 1..5"),
        (FILES.users, "risk_tolerance", 2.5, "must hold integer levels, got double"),
        (FILES.items, "risk_level", 0, "holds levels 0..5, outside 1..5"),
        (FILES.items, "risk_level", "low", "must hold integer levels, got string"),
        (FILES.items, "active", "yes", "must be boolean, got string"),
    ],
)
def test_a_rule_column_holding_what_no_trainer_writes_is_refused_by_name(
    models_copy: Path, name: str, column: str, values: object, message: str
) -> None:
    """Consent "no" cast to bool would read True, level 0 would pass every tolerance:
    such a version is refused at load, naming the table, the column and what it holds."""
    folder = _version(models_copy)
    table = pq.read_table(folder / name)
    old = table.column(column).to_pylist()
    if isinstance(values, int) and not isinstance(values, bool) and column != "marketing_consent":
        new = pa.array([values, *[min(5, max(1, v or 1)) for v in old[1:]]], pa.int64())
    else:
        new = pa.array([values] * len(old))
    _restamp(folder, name, table.set_column(table.schema.get_field_index(column), column, new))
    with pytest.raises(BundleError) as err:
        load_bundle(folder)
    assert str(err.value) == f"{folder.name}: {name} column {column!r} {message}"


def test_rule_columns_may_hold_nulls(models_copy: Path) -> None:
    folder = _version(models_copy)
    table = pq.read_table(folder / FILES.users)
    n = table.num_rows
    for column, kind in (("risk_tolerance", pa.int8()), ("marketing_consent", pa.bool_())):
        at = table.schema.get_field_index(column)
        table = table.set_column(at, column, pa.nulls(n, kind))
    _restamp(folder, FILES.users, table)
    bundle = load_bundle(folder)
    assert (bundle.tolerance == 1).all() and not bundle.consent.any()
