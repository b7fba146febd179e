"""ModelStore: unreadable files are retried, defective ones rejected for good, never a crash."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest

import recsvc.model.bundle
from recsvc.model.bundle import LATEST, read_latest
from recsvc.model.manifest import MANIFEST
from recsvc.model.queries import RecommendQuery
from recsvc.serving.store import ModelStore
from training.publish import write_latest


def _copy_as(models: Path, good: str, name: str) -> Path:
    """A copy of version ``good`` published under ``name`` (manifest renamed to match)."""
    dst = models / name
    shutil.copytree(models / good, dst)
    manifest = dst / MANIFEST
    manifest.write_text(manifest.read_text().replace(good, name))
    return dst


def _answers(store: ModelStore) -> int:
    rec = store.current().recommender
    user = rec.bundle.users.ids[0]
    return len(rec.recommend(RecommendQuery(user_id=user, k=5)).items)


def _manifest_is_a_folder(folder: Path) -> None:
    (folder / MANIFEST).unlink()
    (folder / MANIFEST).mkdir()


def test_an_unreadable_manifest_is_retried_then_served_once_readable(
    models_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = read_latest(models_copy)
    store = ModelStore(models_copy, trial_in_child=False)
    assert store.refresh() and store.version == good
    new = _copy_as(models_copy, good, "v99990101-000000-000001")
    manifest = (new / MANIFEST).read_bytes()
    _manifest_is_a_folder(new)
    write_latest(models_copy, new.name)
    with caplog.at_level(logging.ERROR, logger="recsvc.serving.store"):
        assert not store.refresh() and not store.refresh()
    assert store.version == good and _answers(store) == 5
    assert store.stats.unreadable == 1 and store.stats.rejected == 0  # logged once, retried
    assert "manifest.json cannot be read" in store.stats.last_error
    assert sum(r.getMessage() == "cannot read model version" for r in caplog.records) == 1
    (new / MANIFEST).rmdir()
    (new / MANIFEST).write_bytes(manifest)  # the volume came back
    assert store.refresh() and store.version == new.name


def test_an_io_error_on_a_data_file_is_not_a_verdict(
    models_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = read_latest(models_copy)
    assert good is not None
    new = _copy_as(models_copy, good, "v99990101-000000-000001")
    write_latest(models_copy, new.name)

    def eio(path: Path, chunk: int = 0) -> str:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(recsvc.model.bundle, "sha256_file", eio)
    store = ModelStore(models_copy, trial_in_child=False)
    # At start, the newest version cannot be read, nor can the older one: nothing served yet.
    assert not store.refresh() and store.version is None
    assert store.stats.rejected == 0 and "Input/output error" in store.stats.last_error
    monkeypatch.undo()
    assert store.refresh() and store.version == new.name


@pytest.mark.parametrize("start", [True, False])
def test_a_missing_data_file_is_rejected_for_good(models_copy: Path, start: bool) -> None:
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    if not start:
        assert store.refresh()
    bad = _copy_as(models_copy, good, "v99990101-000000-000001")
    (bad / "popularity.npy").unlink()
    (bad / "popularity.npy").mkdir()  # a folder where the file should be
    write_latest(models_copy, bad.name)
    assert store.refresh() is start  # at start: falls back to the good version
    assert store.version == good and store.stats.rejected_versions == [bad.name]
    assert "popularity.npy is missing" in store.stats.last_error
    assert not store.refresh() and store.stats.rejected == 1  # not retried every poll
    assert _answers(store) == 5


def test_latest_that_is_not_text_or_not_a_file(models_copy: Path) -> None:
    good = read_latest(models_copy)
    store = ModelStore(models_copy, trial_in_child=False)
    (models_copy / LATEST).write_bytes(b"\xff\xfe\x00v2026")  # not UTF-8: no version name
    assert store.refresh() and store.version == good  # falls back to the newest valid
    assert store.stats.rejected == 1 and "not a version name" in store.stats.last_error
    (models_copy / LATEST).unlink()
    (models_copy / LATEST).mkdir()  # a folder where a file should be
    assert not store.refresh() and not store.refresh() and store.version == good
    assert store.stats.unreadable == 1  # counted once, however often it is polled
    assert "LATEST cannot be read" in store.stats.last_error
    assert _answers(store) == 5
    (models_copy / LATEST).rmdir()
    write_latest(models_copy, good)
    assert not store.refresh()  # readable again, naming what is served: nothing to do
