"""ModelStore: files that cannot even be read are rejections, never crashes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from recsvc.bundle import LATEST, MANIFEST, read_latest
from recsvc.requests import RecommendQuery
from recsvc.store import ModelStore
from training.publish import write_latest


def _copy_as(models: Path, good: str, name: str) -> Path:
    """A copy of version ``good`` published under ``name`` (manifest renamed to match)."""
    dst = models / name
    shutil.copytree(models / good, dst)
    manifest = dst / MANIFEST
    manifest.write_text(manifest.read_text().replace(good, name))
    return dst


def _manifest_is_a_folder(folder: Path) -> None:
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).mkdir()


def _data_file_is_a_folder(folder: Path) -> None:
    (folder / "popularity.npy").unlink()
    (folder / "popularity.npy").mkdir()


UNREADABLE: dict[str, Callable[[Path], None]] = {
    "manifest-is-a-folder": _manifest_is_a_folder,
    "data-file-is-a-folder": _data_file_is_a_folder,
}


def _answers(store: ModelStore) -> int:
    rec = store.current().recommender
    user = rec.bundle.users.ids[0]
    return len(rec.recommend(RecommendQuery(user_id=user, k=5)).items)


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_version_is_rejected_while_serving(models_copy: Path, kind: str) -> None:
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    assert store.refresh() and store.version == good
    bad = _copy_as(models_copy, good, "v99990101-000000-000001")
    UNREADABLE[kind](bad)
    write_latest(models_copy, bad.name)
    assert not store.refresh()
    assert store.version == good and store.stats.rejected == 1
    assert store.stats.rejected_versions == [bad.name]
    assert _answers(store) == 5
    assert not store.refresh() and store.stats.rejected == 1  # not retried every poll


@pytest.mark.parametrize("kind", UNREADABLE)
def test_at_start_an_unreadable_latest_version_falls_back(models_copy: Path, kind: str) -> None:
    good = read_latest(models_copy)
    assert good is not None
    bad = _copy_as(models_copy, good, "v99990101-000000-000001")
    UNREADABLE[kind](bad)
    write_latest(models_copy, bad.name)
    store = ModelStore(models_copy, trial_in_child=False)
    assert store.refresh() and store.version == good
    assert store.stats.rejected_versions == [bad.name]


def test_latest_that_is_not_text_or_not_a_file(models_copy: Path) -> None:
    good = read_latest(models_copy)
    store = ModelStore(models_copy, trial_in_child=False)
    (models_copy / LATEST).write_bytes(b"\xff\xfe\x00v2026")  # not UTF-8
    assert store.refresh() and store.version == good  # falls back to the newest valid
    assert store.stats.rejected == 1
    (models_copy / LATEST).unlink()
    (models_copy / LATEST).mkdir()  # a folder where a file should be
    assert not store.refresh() and store.version == good
    assert not store.refresh()
    assert store.stats.rejected == 2  # counted once, however often it is polled
    assert "LATEST cannot be read" in store.stats.last_error
    assert _answers(store) == 5
