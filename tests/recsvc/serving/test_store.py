"""ModelStore: unreadable files are retried, defective ones rejected for good, never a crash;
an untrusted version is parsed by the trial child before this process loads it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import recsvc.model.bundle
import recsvc.serving.store
from recsvc.errors import ModelUnavailable, StateUnavailable
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import LATEST, read_latest, sha256_file
from recsvc.model.contact import ContactPolicy
from recsvc.model.manifest import MANIFEST
from recsvc.model.queries import RecommendQuery
from recsvc.model.ranking import Recommender
from recsvc.serving.servable import ServedModel, load_served_model
from recsvc.serving.store import ModelStore
from tests.conftest import PARAMS
from training.data import load_training_data
from training.fit import fit_model
from training.publish import publish, write_latest


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


def _not_a_permutation(folder: Path) -> None:
    """Popularity that fails the parser, re-stamped so its checksum still passes."""
    path = folder / "popularity.npy"
    np.save(path, np.zeros_like(np.load(path, allow_pickle=False)))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _loads_here(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The versions this process goes on to load itself, after any trial."""
    loaded: list[str] = []
    load = recsvc.serving.store.load_served_model

    def spy(folder: Path, *args: bool, **kw: bool) -> ServedModel:
        loaded.append(folder.name)
        return load(folder, *args, **kw)

    monkeypatch.setattr(recsvc.serving.store, "load_served_model", spy)
    return loaded


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


def test_at_start_up_the_newest_valid_version_is_served(models_copy: Path) -> None:
    good = read_latest(models_copy)
    assert good is not None
    valid = [_copy_as(models_copy, good, f"v99990101-000000-00000{n}").name for n in (1, 2, 3)]
    broken = _copy_as(models_copy, good, "v99990101-000000-000004")
    (broken / "popularity.npy").unlink()
    missing = "v99990101-000000-000009"
    write_latest(models_copy, missing)  # LATEST names a folder that is not there
    store = ModelStore(models_copy, trial_in_child=False)
    assert store.refresh() and store.version == valid[-1]
    assert store.stats.rejected_versions == [missing, broken.name]
    assert _answers(store) == 5


def test_a_version_that_fails_warm_up_is_rejected(
    models_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    assert store.refresh()
    new = _copy_as(models_copy, good, "v99990101-000000-000001")  # verifies and loads
    write_latest(models_copy, new.name)

    def broken(*_args: object, **_kw: object) -> None:
        raise RuntimeError("no similar items today")

    monkeypatch.setattr(Recommender, "similar_items", broken)
    assert not store.refresh() and store.version == good
    assert store.stats.rejected_versions == [new.name]
    assert "failed warm-up (RuntimeError: no similar items today)" in store.stats.last_error
    monkeypatch.undo()
    assert not store.refresh() and _answers(store) == 5  # rejected for good


def test_the_trial_child_parses_an_untrusted_version_before_this_process_does(
    models_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = read_latest(models_copy)
    assert good is not None
    loaded = _loads_here(monkeypatch)
    store = ModelStore(models_copy)
    try:
        assert store.refresh() and loaded == [good]  # the child passed it; then it loads here
        bad = _copy_as(models_copy, good, "v99990101-000000-000001")
        _not_a_permutation(bad)  # checksums pass; only a parser can tell
        write_latest(models_copy, bad.name)
        assert not store.refresh() and store.version == good
        assert store.stats.rejected_versions == [bad.name]
        assert "popularity.npy is not a permutation" in store.stats.last_error
        assert loaded == [good]  # the child's verdict: never parsed in this process
    finally:
        store.close()


def test_a_version_whose_trial_child_dies_is_rejected_and_never_loaded_here(
    models_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every child is killed as it starts, as a crash in a native reader would end it.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    loaded = _loads_here(monkeypatch)
    store = ModelStore(models_copy)
    try:
        assert not store.refresh() and store.version is None
        assert store.stats.rejected_versions == [read_latest(models_copy)]
        assert "trial load died (exit -9)" in store.stats.last_error
        assert loaded == []
    finally:
        store.close()


def test_every_version_gets_the_stores_rules_and_its_attach_step(models_copy: Path) -> None:
    """The store's contact policy and exclusive categories reach each loaded version, and
    ``attach`` (the live overlay) completes it before it serves."""
    policy = ContactPolicy(window_days=3, max_all_channels=1)
    attached: list[str] = []

    def attach(model: ServedModel) -> ServedModel:
        attached.append(model.version)
        return replace(model, overlay=model.recommender.overlay(Pseudonymizer(b"k")))

    store = ModelStore(
        models_copy, trial_in_child=False, exclusive_categories=(), contact_policy=policy
    )
    store.attach = attach
    assert store.refresh()
    served = store.current()
    assert attached == [served.version] and served.overlay is not None
    assert served.recommender.contact_policy is policy
    assert served.targeter.contact_policy is policy
    assert not served.recommender.exclusive._codes  # none exclusive, as asked
    assert ModelStore(models_copy, trial_in_child=False).refresh()  # and the default:
    assert load_served_model(models_copy / served.version).recommender.exclusive._codes


def test_an_attach_step_that_fails_is_retried_or_rejected_by_its_error(
    models_copy: Path,
) -> None:
    """A state store that cannot be read is a passing trouble; any other failure of
    ``attach`` rejects the version for good, naming the error's type."""
    failures: list[Exception] = [StateUnavailable("state store down"), RuntimeError("boom")]

    def attach(model: ServedModel) -> ServedModel:
        raise failures.pop(0)

    store = ModelStore(models_copy, trial_in_child=False, attach=attach)
    assert not store.refresh()
    assert store.stats.unreadable == 1 and store.stats.rejected == 0
    assert store.stats.last_error == "state store down"
    assert not store.refresh()
    version = read_latest(models_copy)
    assert store.stats.rejected_versions == [version]
    assert store.stats.last_error == "RuntimeError: boom"


def test_loads_and_rejections_are_counted_and_logged(
    models_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    with caplog.at_level(logging.INFO, logger="recsvc.serving.store"):
        assert store.refresh()
        for n in (1, 2):
            bad = _copy_as(models_copy, good, f"v9999010{n}-000000-000001")
            (bad / "popularity.npy").unlink()
            write_latest(models_copy, bad.name)
            assert not store.refresh()
        newer = _copy_as(models_copy, good, "v99990201-000000-000001")
        write_latest(models_copy, newer.name)
        assert store.refresh()
    assert (store.stats.loaded, store.stats.rejected) == (2, 2)
    served = [r for r in caplog.records if r.getMessage() == "serving model version"]
    assert [r.version for r in served] == [good, newer.name]  # type: ignore[attr-defined]
    assert all(0 <= r.load_seconds < 60 for r in served)  # type: ignore[attr-defined]
    rejected = [r for r in caplog.records if r.getMessage() == "rejected model version"]
    assert [r.version for r in rejected] == [  # type: ignore[attr-defined]
        "v99990101-000000-000001",
        "v99990102-000000-000001",
    ]
    assert all("popularity.npy is missing" in r.reason for r in rejected)  # type: ignore[attr-defined]


def test_the_consent_waiver_reaches_each_loaded_version(sample_dir: Path, tmp_path: Path) -> None:
    """``no_consent_data`` is the store's to hand on: trained without a users table, a
    version serves audiences only when the waiver is given (see ``Targeter``)."""
    data = load_training_data(sample_dir / "interactions.parquet", sample_dir / "items.parquet")
    publish(tmp_path / "m", data, fit_model(data.user_items, PARAMS, progress=False))
    waived = ModelStore(tmp_path / "m", no_consent_data=True, trial_in_child=False)
    assert waived.refresh() and waived.current().targeter.no_consent_data
    plain = ModelStore(tmp_path / "m", trial_in_child=False)
    assert plain.refresh() and not plain.current().targeter.no_consent_data


def test_advance_loses_to_a_reload(models_copy: Path) -> None:
    """The follower's swap applies only while the version it caught up still serves."""
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    with pytest.raises(ModelUnavailable, match="^no model is loaded yet$"):
        store.current()
    assert store.refresh()
    caught_up = store.current()
    newer = _copy_as(models_copy, good, "v99990101-000000-000001")
    write_latest(models_copy, newer.name)
    assert store.refresh()
    reloaded = store.current()
    assert not store.advance(caught_up, replace(caught_up))  # a reload won
    assert store.current() is reloaded
    ahead = replace(reloaded)
    assert store.advance(reloaded, ahead) and store.current() is ahead


def test_each_distinct_read_failure_is_counted_and_logged_once(
    models_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read failure is noted once per distinct error, under what could not be read; once
    readable again, the same error later counts again."""
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    assert store.refresh()
    latest = models_copy / LATEST

    def unreadable() -> None:
        latest.unlink()
        latest.mkdir()

    with caplog.at_level(logging.ERROR, logger="recsvc.serving.store"):
        unreadable()
        assert not store.refresh() and not store.refresh()
        latest.rmdir()
        write_latest(models_copy, good)
        assert not store.refresh()  # readable: the note is cleared
        unreadable()
        assert not store.refresh()
    notes = [r for r in caplog.records if r.getMessage() == "cannot read model version"]
    assert store.stats.unreadable == 2 and len(notes) == 2
    assert [r.version for r in notes] == [LATEST, LATEST]  # type: ignore[attr-defined]
    assert all(r.reason == store.stats.last_error for r in notes)  # type: ignore[attr-defined]
    assert "LATEST cannot be read" in store.stats.last_error
    # One version's failure does not hide another's: each is noted under its own name.
    new = _copy_as(models_copy, good, "v99990101-000000-000001")
    _manifest_is_a_folder(new)
    latest.rmdir()
    write_latest(models_copy, new.name)
    with caplog.at_level(logging.ERROR, logger="recsvc.serving.store"):
        assert not store.refresh()
    last = [r for r in caplog.records if r.getMessage() == "cannot read model version"][-1]
    assert last.version == new.name and store.stats.unreadable == 3  # type: ignore[attr-defined]


def test_the_load_time_is_logged_in_milliseconds(
    models_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ModelStore(models_copy, trial_in_child=False)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="recsvc.serving.store"):
        assert store.refresh()
    took = time.perf_counter() - start
    (seconds,) = [r.load_seconds for r in caplog.records if hasattr(r, "load_seconds")]
    assert 0 < seconds <= round(took, 3) + 0.001 and seconds == round(seconds, 3)


def test_each_file_is_hashed_once_a_load(
    models_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksums are checked before anything is parsed, and not again by the load."""
    hashed: list[str] = []
    real = recsvc.model.bundle.sha256_file

    def counting(path: Path, *args: int) -> str:
        hashed.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(recsvc.model.bundle, "sha256_file", counting)
    assert ModelStore(models_copy, trial_in_child=False).refresh()
    assert hashed and len(hashed) == len(set(hashed))


def test_a_bad_latest_is_named_in_the_reason_up_to_64_characters(models_copy: Path) -> None:
    good = read_latest(models_copy)
    store = ModelStore(models_copy, trial_in_child=False)
    (models_copy / LATEST).write_text("x" * 130)  # longer than a version name may be
    assert store.refresh() and store.version == good
    assert store.stats.last_error == f"LATEST names {'x' * 64!r}, which is not a version name"


def test_a_version_that_recovers_is_noted_afresh_if_it_fails_again(models_copy: Path) -> None:
    """A read failure is one incident per version until the version is read: after it
    served, the same failure is counted again."""
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    flaky = _copy_as(models_copy, good, "v99990101-000000-000001")
    manifest = (flaky / MANIFEST).read_bytes()
    _manifest_is_a_folder(flaky)
    write_latest(models_copy, flaky.name)
    assert store.refresh() and store.version == good  # at start: the older one
    assert store.stats.unreadable == 1
    (flaky / MANIFEST).rmdir()
    (flaky / MANIFEST).write_bytes(manifest)
    assert store.refresh() and store.version == flaky.name
    newer = _copy_as(models_copy, good, "v99990201-000000-000001")
    write_latest(models_copy, newer.name)
    assert store.refresh()
    _manifest_is_a_folder(flaky)
    write_latest(models_copy, flaky.name)  # rolled back to a version that fails again
    assert not store.refresh() and store.stats.unreadable == 2
