"""Thirty-odd kinds of bad version: each is rejected, counted and logged, the
previous model keeps serving, and the process never crashes."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from recsvc.errors import BundleError
from recsvc.model.bundle import LATEST, load_bundle, read_latest, sha256_file
from recsvc.model.manifest import FILES, MANIFEST
from recsvc.model.queries import RecommendQuery
from recsvc.model.ranking import Source
from recsvc.serving.store import ModelStore
from tests.conftest import write_pickled_npy
from training.publish import write_latest

Corruption = Callable[[Path], None]


def _manifest(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / MANIFEST).read_text())


def _save_manifest(folder: Path, m: dict) -> None:  # type: ignore[type-arg]
    (folder / MANIFEST).write_text(json.dumps(m))


def _restamp(folder: Path, name: str) -> None:
    """Make the manifest agree with a tampered file, so only deeper checks can catch it."""
    m = _manifest(folder)
    p = folder / name
    m["files"][name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    _save_manifest(folder, m)


def _truncate(name: str, keep: float) -> Corruption:
    def f(folder: Path) -> None:
        p = folder / name
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])

    return f


def _flip(name: str) -> Corruption:
    def f(folder: Path) -> None:
        p = folder / name
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x5A
        p.write_bytes(bytes(data))

    return f


def _edit_manifest(edit: Callable[[dict], None]) -> Corruption:  # type: ignore[type-arg]
    def f(folder: Path) -> None:
        m = _manifest(folder)
        edit(m)
        _save_manifest(folder, m)

    return f


def _restamped(name: str, write: Callable[[Path], None]) -> Corruption:
    def f(folder: Path) -> None:
        write(folder / name)
        _restamp(folder, name)

    return f


def _short_table(p: Path) -> None:
    t = pq.read_table(p)
    pq.write_table(t.slice(0, t.num_rows - 1), p)


def _wrong_dim_index(p: Path) -> None:
    idx = faiss.read_index(str(p))
    bad = faiss.IndexFlatIP(idx.d + 1)
    bad.add(np.zeros((idx.ntotal, idx.d + 1), dtype=np.float32))
    faiss.write_index(bad, str(p))


def _l2_index(p: Path) -> None:
    idx = faiss.read_index(str(p))
    bad = faiss.IndexFlatL2(idx.d)
    bad.add(np.zeros((idx.ntotal, idx.d), dtype=np.float32))
    faiss.write_index(bad, str(p))


def _indices_out_of_range(p: Path) -> None:
    a = np.load(p)
    a[0] = 10**6
    np.save(p, a)


def _not_permutation(p: Path) -> None:
    a = np.load(p)
    a[0] = a[1]
    np.save(p, a)


def _nan_factors(p: Path) -> None:
    a = np.load(p)
    a[0, 0] = np.nan
    np.save(p, a)


def _float64_factors(p: Path) -> None:
    np.save(p, np.load(p).astype(np.float64))


def _poke(at: int, value: float) -> Callable[[Path], None]:
    """Overwrite one element of an ``.npy`` file (a negative ``at`` counts from the end)."""

    def write(p: Path) -> None:
        a = np.load(p)
        a[at] = value
        np.save(p, a)

    return write


def _row_twice(p: Path) -> None:
    """A customer's second product row repeats their first."""
    indptr = np.load(p.parent / FILES.indptr)
    start = indptr[np.flatnonzero(np.diff(indptr) >= 2)[0]]
    a = np.load(p)
    a[start + 1] = a[start]
    np.save(p, a)


def _pointer_past_the_end(p: Path) -> None:
    a = np.load(p)
    a[-1] += 1
    np.save(p, a)


def _held_one_longer(p: Path) -> None:
    np.save(p, np.append(np.load(p), False))


def _count(key: str) -> Corruption:
    return _edit_manifest(lambda m: m["counts"].update({key: m["counts"][key] + 1}))


CASES: dict[str, Corruption] = {
    "truncated-empty": _truncate(FILES.item_factors, 0.0),
    "truncated-half": _truncate(FILES.user_factors, 0.5),
    "truncated-tail": _truncate(FILES.item_index, 0.99),
    "flipped-byte-parquet": _flip(FILES.users),
    "flipped-byte-index": _flip(FILES.item_index),
    "missing-file": lambda f: (f / FILES.popularity).unlink(),
    "no-manifest": lambda f: (f / MANIFEST).unlink(),
    "manifest-not-json": lambda f: (f / MANIFEST).write_text("{oops"),
    "manifest-missing-field": _edit_manifest(lambda m: m.pop("dim")),
    "manifest-wrong-schema": _edit_manifest(lambda m: m.update(schema_version=99)),
    "wrong-checksum": _edit_manifest(lambda m: m["files"][FILES.items].update(sha256="0" * 64)),
    "wrong-size": _edit_manifest(lambda m: m["files"][FILES.items].update(size=1)),
    "wrong-dimension": _edit_manifest(lambda m: m.update(dim=m["dim"] * 2)),
    "wrong-count": _edit_manifest(lambda m: m["counts"].update(users=m["counts"]["users"] + 1)),
    "file-name-escapes": _edit_manifest(
        lambda m: m["files"].update({"../../x": {"size": 1, "sha256": "0"}})
    ),
    "id-table-short": _restamped(FILES.users, _short_table),
    "faiss-not-an-index": _restamped(FILES.user_index, lambda p: p.write_bytes(b"\x00" * 4096)),
    "faiss-wrong-dimension": _restamped(FILES.item_index, _wrong_dim_index),
    "faiss-wrong-metric": _restamped(FILES.item_index, _l2_index),
    "npy-holds-pickle": _restamped(FILES.popularity, write_pickled_npy),
    "npy-wrong-dtype": _restamped(FILES.item_factors, _float64_factors),
    "npy-nan": _restamped(FILES.user_factors, _nan_factors),
    "csr-out-of-range": _restamped(FILES.indices, _indices_out_of_range),
    "csr-row-negative": _restamped(FILES.indices, _poke(0, -1)),
    "csr-row-twice": _restamped(FILES.indices, _row_twice),
    "csr-pointer-backwards": _restamped(FILES.indptr, _poke(1, 10**6)),
    "csr-pointer-end-wrong": _restamped(FILES.indptr, _pointer_past_the_end),
    "csr-data-nan": _restamped(FILES.data, _poke(0, np.nan)),
    "csr-data-inf": _restamped(FILES.data, _poke(0, np.inf)),
    "csr-data-negative": _restamped(FILES.data, _poke(0, -1.0)),
    "held-wrong-length": _restamped(FILES.held, _held_one_longer),
    "count-interactions-wrong": _count("interactions"),
    "count-held-wrong": _count("held"),
    "items-table-short": _restamped(FILES.items, _short_table),
    "popularity-not-permutation": _restamped(FILES.popularity, _not_permutation),
    "parquet-garbage": _restamped(FILES.items, lambda p: p.write_bytes(b"PAR1garbagePAR1")),
    "empty-folder": lambda f: [p.unlink() for p in f.iterdir()],
}


# The check that must catch each bad array, whatever the others do.
CAUGHT_BY = {
    "id-table-short": f"{FILES.users} must have",
    "items-table-short": f"{FILES.items} must have",
    "npy-nan": f"{FILES.user_factors} holds NaN",
    "csr-out-of-range": f"{FILES.indices} holds item rows out of range",
    "csr-row-negative": f"{FILES.indices} holds item rows out of range",
    "csr-row-twice": f"{FILES.indices} repeats",
    "csr-pointer-backwards": f"{FILES.indptr} is not a valid CSR pointer",
    "csr-pointer-end-wrong": f"{FILES.indptr} ends at",
    "csr-data-nan": f"{FILES.data} holds negative, NaN or infinite",
    "csr-data-inf": f"{FILES.data} holds negative, NaN or infinite",
    "csr-data-negative": f"{FILES.data} holds negative, NaN or infinite",
    "held-wrong-length": f"{FILES.held} has shape",
    "count-interactions-wrong": f"{FILES.indptr} ends at",
    "count-held-wrong": f"{FILES.held} flags",
    "popularity-not-permutation": f"{FILES.popularity} is not a permutation",
}


def _publish_copy(models: Path, good: str, name: str) -> Path:
    dst = models / name
    shutil.copytree(models / good, dst)
    m = _manifest(dst)
    m["version"] = name
    _save_manifest(dst, m)
    return dst


def test_at_least_twenty_kinds() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize(("kind", "message"), CAUGHT_BY.items())
def test_each_bad_array_is_caught_by_its_own_check(
    models_copy: Path, kind: str, message: str
) -> None:
    folder = models_copy / str(read_latest(models_copy))
    CASES[kind](folder)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(folder)


def test_every_corrupt_version_is_rejected_and_the_old_one_keeps_serving(
    models_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy)
    assert store.refresh() and store.version == good
    recommender = store.current().recommender
    query = next(
        q
        for q in (RecommendQuery(user_id=u, k=5) for u in recommender.bundle.users.ids)
        if recommender.recommend(q).source == Source.PERSONALIZED
    )
    expected = recommender.recommend(query)
    assert len(expected.items) == 5
    rejected = 0
    with caplog.at_level(logging.ERROR, logger="recsvc.serving.store"):
        for n, (kind, corrupt) in enumerate(CASES.items()):
            folder = _publish_copy(models_copy, good, f"v99990101-000000-{n:06d}")
            corrupt(folder)
            write_latest(models_copy, folder.name)
            assert not store.refresh(), kind
            rejected += 1
            assert store.version == good, kind
            assert store.stats.rejected == rejected, kind
            # Still answering, the same as before, from the good version.
            assert store.current().recommender.recommend(query) == expected, kind
            assert any(folder.name == getattr(r, "version", None) for r in caplog.records), kind
            assert not store.refresh()  # a rejected version is not retried every poll
    for latest in ("v-missing-folder", "../../etc", "", "\x00bad"):
        (models_copy / LATEST).write_text(latest)
        assert not store.refresh()
        assert store.version == good
    store.close()
    # An empty LATEST names nothing; the other three are rejected, each once.
    assert store.stats.rejected == len(CASES) + 3 and store.stats.unreadable == 0
    assert store.stats.rejected_versions[-3:] == ["v-missing-folder", "../../etc", "\x00bad"]


def test_a_good_version_after_corrupt_ones_is_served(models_copy: Path) -> None:
    good = read_latest(models_copy)
    assert good is not None
    store = ModelStore(models_copy, trial_in_child=False)
    store.refresh()
    bad = _publish_copy(models_copy, good, "v99990101-000000-000001")
    CASES["faiss-not-an-index"](bad)
    write_latest(models_copy, bad.name)
    assert not store.refresh()
    fixed = _publish_copy(models_copy, good, "v99990101-000000-000002")
    write_latest(models_copy, fixed.name)
    assert store.refresh() and store.version == fixed.name
