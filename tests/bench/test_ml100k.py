"""``make reproduce-ml100k`` end to end, on a small synthetic MovieLens folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.ml100k import EASE, ENDPOINT, MODEL, PUBLISHED, PUBLISHED_SPLITS, main
from training.movielens import GENRES


def _synthetic_movielens(folder: Path, rng: np.random.Generator) -> Path:
    """60 users rating 12..20 of 50 films, each user mostly within one of five tastes."""
    folder.mkdir(parents=True)
    rows = []
    for user in range(1, 61):
        taste = user % 5
        liked = [i for i in range(1, 51) if i % 5 == taste]
        others = [i for i in range(1, 51) if i % 5 != taste]
        films = list(rng.choice(liked, 8, replace=False)) + list(
            rng.choice(others, int(rng.integers(4, 12)), replace=False)
        )
        for film in films:
            rows.append(f"{user}\t{film}\t{rng.integers(1, 6)}\t{880000000 + len(rows)}")
    (folder / "u.data").write_text("\n".join(rows) + "\n", encoding="ascii")
    flags = "|".join(["0"] * len(GENRES))
    (folder / "u.item").write_text(
        "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x/{i}|{flags}\n" for i in range(1, 51)),
        encoding="ascii",
    )
    (folder / "u.user").write_text(
        "".join(f"{u}|30|F|other|00000\n" for u in range(1, 61)), encoding="ascii"
    )
    return folder


def test_reproduction_prints_the_table_and_the_endpoint_agrees(
    tmp_path: Path, rng: np.random.Generator, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _synthetic_movielens(tmp_path / "ml", rng)
    status = main(["--data", str(data), "--work", str(tmp_path / "work"), "--quick"])
    out = capsys.readouterr().out
    assert status == 0
    assert "in-process and --endpoint figures agree" in out
    for row in (MODEL, ENDPOINT, EASE, *PUBLISHED):
        assert f"| {row} |" in out
    # Each published row says which split it came from.
    for row, split in PUBLISHED_SPLITS.items():
        assert f"| {split} |" in out.split(f"| {row} |")[1].splitlines()[0]
    assert 'per-item stratified (filter_by="item"), seed 42' in out
    result = json.loads((tmp_path / "work" / "ml100k.json").read_text(encoding="utf-8"))
    assert result["agree"] is True and result["seeds"] == [1]
    means = result["means"]
    assert means[MODEL] == means[ENDPOINT]
    assert set(means) >= {"baseline: popularity", "baseline: itemknn", EASE, "baseline: random"}
    # The per-seed table names EASE's chosen lambda; the verdict against it is printed.
    lam = result["per_seed"]["1"]["ease_lambda"]
    assert lam > 0 and "| 1 | ease |" in out and f"lambda {lam:g} |" in out
    assert "the default tune beats tuned EASE in the mean on all four metrics:" in out
    assert set(result["beats_tuned_ease"]) == {"map", "ndcg", "precision", "recall"}
    # Tuning read the split's train part, never the whole log.
    tune = next(c for c in result["commands"] if " tune " in c)
    assert str(tmp_path / "work" / "seed1" / "split" / "train.parquet") in tune
    assert result["per_seed"]["1"]["violations"]["suitability"] == 0
    # How each search stopped is shown: one the time budget stopped is the machine's.
    seed1 = result["per_seed"]["1"]
    assert (seed1["tune_trials"], seed1["tune_stopped_by"]) == (4, "trials")
    assert ", 4 trials, all trials run)" in out


def test_missing_data_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    assert "u.data not found" in capsys.readouterr().err
