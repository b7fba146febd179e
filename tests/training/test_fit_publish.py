"""Fitting and publishing: determinism, implicit's scores, checksums, atomicity."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from implicit.cpu.als import AlternatingLeastSquares

from recsvc.errors import FitError
from recsvc.model.bundle import (
    LATEST,
    list_versions,
    load_bundle,
    read_latest,
    read_manifest,
    sha256_file,
)
from recsvc.model.manifest import FILES, MANIFEST, RuleFlags
from training.cli import main as train_main
from training.data import TrainingData
from training.fit import FitParams, apply_weighting, check_converged, fit_checked, fit_model
from training.publish import prune, publish

PARAMS = FitParams(factors=8, iterations=4, seed=5)


def test_als_is_reproducible_for_a_seed(training_data: TrainingData) -> None:
    a = fit_model(training_data.user_items, PARAMS, progress=False)
    b = fit_model(training_data.user_items, PARAMS, progress=False)
    c = fit_model(training_data.user_items, replace(PARAMS, seed=6), progress=False)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    np.testing.assert_array_equal(a.user_factors, b.user_factors)
    assert not np.array_equal(a.item_factors, c.item_factors)


def test_bpr_single_thread_is_reproducible(training_data: TrainingData) -> None:
    params = FitParams(algorithm="bpr", factors=8, iterations=3, seed=5, threads=1)
    a = fit_model(training_data.user_items, params, progress=False)
    b = fit_model(training_data.user_items, params, progress=False)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    assert a.item_factors.shape[1] == 9  # implicit's BPR appends an item bias


def test_bundle_embeddings_reproduce_implicits_own_scores(
    training_data: TrainingData, tmp_path: Path
) -> None:
    params = replace(PARAMS, alpha=3.0).resolved(training_data.user_items)
    model = AlternatingLeastSquares(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        random_state=params.seed,
        calculate_training_loss=False,
    )
    weighted = apply_weighting(training_data.user_items, params)
    model.fit(weighted, show_progress=False)
    folder = publish(
        tmp_path, training_data, fit_model(training_data.user_items, params, progress=False)
    )
    bundle = load_bundle(folder)
    users = np.arange(0, len(training_data.users), 97)
    ids, scores = model.recommend(users, weighted[users], N=10)
    ours = bundle.user_index.vectors[users] @ bundle.item_index.vectors.T
    for row in range(len(users)):
        np.testing.assert_allclose(ours[row, ids[row]], scores[row], rtol=1e-4, atol=1e-5)


def test_manifest_names_every_file_with_size_and_sha256(bundle_path: Path) -> None:
    manifest = read_manifest(bundle_path)
    on_disk = {p.name for p in bundle_path.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk
    for name, entry in manifest.files.items():
        assert entry.size == (bundle_path / name).stat().st_size
        assert entry.sha256 == sha256_file(bundle_path / name)
    assert manifest.counts.users == 1500 and manifest.counts.items == 120
    assert manifest.indexes.items.kind == "flat"
    assert manifest.rules == RuleFlags(risk_levels=True, active_flag=True, users_table=True)
    assert len(manifest.data_fingerprint) == 64


def test_no_pickle_in_bundle_arrays(bundle_path: Path) -> None:
    for path in bundle_path.glob("*.npy"):
        arr = np.load(path, allow_pickle=False)
        assert arr.dtype != object


def test_publish_keeps_the_newest_versions(training_data: TrainingData, tmp_path: Path) -> None:
    model = fit_model(training_data.user_items, PARAMS, progress=False)
    published = [publish(tmp_path, training_data, model, keep=2).name for _ in range(4)]
    assert list_versions(tmp_path) == published[-2:]
    assert read_latest(tmp_path) == published[-1]
    assert prune(tmp_path, keep=1) == [published[-2]]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds via /proc")
def test_every_bundle_file_is_on_disk_before_the_manifest_and_the_renames(
    training_data: TrainingData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a power loss LATEST must not name a bundle whose files came back empty."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    models = Path(os.path.realpath(tmp_path))
    folder = publish(
        models, training_data, fit_model(training_data.user_items, PARAMS, progress=False)
    )
    tmp = models / f".tmp-{folder.name}"
    data = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert len(data) >= 10
    assert synced == [
        *(str(tmp / name) for name in data),  # each file once, before the manifest
        str(tmp / MANIFEST),
        str(tmp),
        str(models),  # the bundle's rename
        str(models / f".tmp-{LATEST}-{os.getpid()}"),
        str(models),  # LATEST's rename
    ]


def test_killed_publish_leaves_latest_intact(models_copy: Path, sample_dir: Path) -> None:
    """A trainer killed mid-publish (SIGKILL-like os._exit) never moves LATEST."""
    before = read_latest(models_copy)
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        import training.publish as pub
        calls = 0
        real = pub._write_npy
        def dying(folder, name, array):
            global calls
            calls += 1
            if calls == 3:
                os._exit(9)
            real(folder, name, array)
        pub._write_npy = dying
        from training.cli import main
        main(["-q", "fit", "--interactions", "{sample_dir}/interactions.parquet",
              "--models", "{models_copy}", "--factors", "4", "--iterations", "1"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9
    assert read_latest(models_copy) == before
    assert list_versions(models_copy) == [before]
    load_bundle(models_copy / before)  # still complete and valid


def test_cli_fit_prints_summary_and_fails_cleanly(
    sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"factors": 6, "iterations": 2, "weighting": "bm25"}))
    code = train_main(
        [
            "-q",
            "fit",
            "--interactions",
            str(sample_dir / "interactions.parquet"),
            "--items",
            str(sample_dir / "items.parquet"),
            "--models",
            str(tmp_path / "m"),
            "--params",
            str(params),
            "--seed",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "published v" in out and "factors=6" in out
    manifest = read_manifest(tmp_path / "m" / read_latest(tmp_path / "m"))  # type: ignore[operator]
    assert manifest.params["weighting"] == "bm25" and manifest.params["seed"] == 4

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"factorz": 3}))
    code = train_main(
        [
            "-q",
            "fit",
            "--interactions",
            str(sample_dir / "interactions.parquet"),
            "--models",
            str(tmp_path / "m2"),
            "--params",
            str(bad),
        ]
    )
    assert code == 2 and "unknown keys factorz" in capsys.readouterr().err
    assert not (tmp_path / "m2" / LATEST).exists()


def test_cli_bad_input_publishes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = train_main(
        [
            "-q",
            "fit",
            "--interactions",
            str(tmp_path / "missing.parquet"),
            "--models",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2 and "missing.parquet" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not os.listdir(tmp_path / "m")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (
            ["--algorithm=bpr", "--learning-rate=1e9"],
            "the bpr fit diverged (NaN encountered in factors) with factors=8, iterations=3, "
            "learning_rate=1e+09, regularization=0.05, weighting=log: try a smaller "
            "learning_rate or a larger regularization; nothing was published",
        ),
        (
            ["--alpha=1e30", "--regularization=0", "--weighting=raw"],
            "the als fit diverged (NaN encountered in factors) with factors=8, iterations=3, "
            "regularization=0, alpha=1e+30, weighting=raw: try a smaller alpha or a larger "
            "regularization or log weighting; nothing was published",
        ),
    ],
)
def test_a_diverging_fit_is_named_with_its_parameters_and_publishes_nothing(
    models_copy: Path,
    sample_dir: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: str,
) -> None:
    before = sorted(p.name for p in models_copy.iterdir())
    latest = (models_copy / LATEST).read_bytes()
    data = [f"--{t}={sample_dir / t}.parquet" for t in ("interactions", "items", "users")]
    fit = ["-q", "fit", *data, "--models", str(models_copy), "--factors=8", "--iterations=3"]
    code = train_main([*fit, *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"recsvc-train: error: {named}"
    assert sorted(p.name for p in models_copy.iterdir()) == before  # no version, no leftovers
    assert (models_copy / LATEST).read_bytes() == latest


def test_infinite_factors_are_refused_too(training_data: TrainingData) -> None:
    model = fit_checked(training_data.user_items, PARAMS, progress=False)  # a sound fit passes
    model.item_factors[[3, 7], 0] = np.inf  # implicit returns these as they are
    model.user_factors[5, 1] = -np.inf
    expected = "the als fit diverged (non-finite factors for 1 users and 2 items) with factors=8"
    with pytest.raises(FitError, match=re.escape(expected)):
        check_converged(model)


def test_cli_fit_counts_customers_missing_from_the_users_table(
    sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = pq.read_table(sample_dir / "users.parquet")
    kept = users.slice(100)  # the first 100 customers lose their profile row
    pq.write_table(kept, tmp_path / "users.parquet")
    models = tmp_path / "m"
    data = [f"--interactions={sample_dir / 'interactions.parquet'}"]
    data += [f"--items={sample_dir / 'items.parquet'}", f"--users={tmp_path / 'users.parquet'}"]
    code = train_main(["-q", "fit", *data, "--models", str(models), "--factors=4"])
    out = capsys.readouterr().out
    assert code == 0, out
    active = set(pq.read_table(sample_dir / "interactions.parquet")["user_id"].to_pylist())
    missing = set(users.column("user_id").to_pylist()[:100]) & active
    assert 50 < len(missing) <= 100
    bundle = load_bundle(models / read_latest(models))  # type: ignore[operator]
    rows = [bundle.users.index(u) for u in sorted(missing)]
    assert None not in rows  # kept and ranked, not dropped
    n = len(missing)
    assert f"customers missing from the users table: {n} (kept" in out
    assert bundle.manifest.data_report["missing_customers"] == n
    # The unknown customer's defaults: the lowest tolerance, no consent.
    assert set(bundle.tolerance[rows].tolist()) == {1}
    assert not bundle.consent[rows].any()
    assert bundle.consent.sum() > 0  # the others keep theirs


def _fill_the_disk_at(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """The disk fills while ``target`` is written: it keeps half its bytes, and its writer
    fails as each does on a full disk (numpy and pyarrow: OSError ENOSPC; FAISS: a
    RuntimeError carrying the system's message; the manifest and LATEST: at fsync)."""
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fail_after(writer, exc: Exception):  # type: ignore[no-untyped-def]
        def write(obj, where, *args, **kwargs):  # type: ignore[no-untyped-def]
            writer(obj, where, *args, **kwargs)
            path = Path(where) if isinstance(where, (str, os.PathLike)) else None
            if path is not None and path.name == target:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise exc

        return write

    def save(where, array, *args, **kwargs):  # type: ignore[no-untyped-def]
        fail_after(lambda a, w, *r, **k: real_save(w, a, *r, **k), enospc)(
            array, where, *args, **kwargs
        )

    real_save, real_fsync = np.save, os.fsync
    faiss_full = RuntimeError(f"write error in {target}: 40 != 400 ({os.strerror(errno.ENOSPC)})")
    monkeypatch.setattr(np, "save", save)
    monkeypatch.setattr(pq, "write_table", fail_after(pq.write_table, enospc))
    monkeypatch.setattr(faiss, "write_index", fail_after(faiss.write_index, faiss_full))

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name == target or (target == LATEST and name.startswith(f".tmp-{LATEST}")):
            raise enospc
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("target", [*dataclasses.astuple(FILES), MANIFEST, LATEST])
def test_a_full_disk_is_named_and_publishes_nothing(
    models_copy: Path,
    sample_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
) -> None:
    before = sorted(p.name for p in models_copy.iterdir())
    latest = (models_copy / LATEST).read_bytes()
    _fill_the_disk_at(monkeypatch, target)
    data = [f"--{t}={sample_dir / t}.parquet" for t in ("interactions", "items", "users")]
    fit = ["-q", "fit", *data, "--models", str(models_copy), "--factors=4", "--iterations=2"]
    code = train_main(fit)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    size = r"[\d,]+\.\d [kMG]B"
    assert re.fullmatch(
        rf"recsvc-train: error: no space left on device while writing {re.escape(target)} "
        rf"\({size} needed, {size} free\)",
        err.splitlines()[-1],
    ), err
    assert sorted(p.name for p in models_copy.iterdir()) == before  # no version, no leftovers
    assert (models_copy / LATEST).read_bytes() == latest


def test_unset_regularization_and_alpha_are_scaled_to_the_data() -> None:
    import scipy.sparse as sp

    # 400 users with interactions (and 100 without), 1200 pairs over 7 items (and 3 unseen).
    rows = np.repeat(np.arange(400), 3)
    cols = (rows + np.tile(np.arange(3), 400)) % 7
    x = sp.csr_matrix((np.ones(1200), (rows, cols)), shape=(500, 10))
    assert x.nnz == 1200
    als = FitParams().resolved(x)
    ridge = 1.5 * math.log1p(1200 / 7)
    assert als.alpha == 0.5 * math.sqrt(400) == 10.0
    assert als.regularization == round(10.0 * ridge, 3)
    assert FitParams(regularization=14.0).resolved(x).alpha == round(14.0 / ridge, 3)
    assert FitParams(alpha=5.0).resolved(x).regularization == round(5.0 * ridge, 3)
    assert FitParams(algorithm="bpr").resolved(x).regularization == 0.05
    given = FitParams(regularization=1.0, alpha=2.0)
    assert given.resolved(x) is given
    # The model (hence the manifest, which fold-in reads) carries the resolved values.
    assert fit_model(x, FitParams(factors=2, iterations=1), progress=False).params == replace(
        als, factors=2, iterations=1
    )


def test_the_default_fit_beats_popularity_and_item_knn(tmp_path: Path) -> None:
    from training.evaluate_cli import main as eval_main
    from training.sample import SampleSpec, write_sample

    # The sample's own catalogue (400 products), 2,000 customers. (On the 120-product
    # sample of the other tests the default ties item-kNN: docs/EVALUATION.md.)
    sample = tmp_path / "sample"
    write_sample(sample, SampleSpec(users=2000, items=400, seed=7), progress=False)
    assert eval_main(
        ["--interactions", str(sample / "interactions.parquet"),
         "--items", str(sample / "items.parquet"),
         "--users", str(sample / "users.parquet"),
         "--split", "stratified:0.25", "--seed", "1", "--baselines", "popularity,itemknn",
         "--report", str(tmp_path / "report"), "-q"]
    ) == 0  # fmt: skip
    report = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    ndcg = {r["name"]: r["metrics"]["ndcg"]["10"] for r in report["results"]}
    assert ndcg["model"] > ndcg["itemknn"] > ndcg["popularity"], ndcg
