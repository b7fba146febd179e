"""MovieLens-100K import, on a tiny synthetic copy of its three files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsvc.errors import DataError
from training.cli import main as train_main
from training.data import load_training_data
from training.movielens import GENRES, import_movielens, read_movielens

REAL = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ml-100k"


def _write_ml(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(
        "1\t10\t5\t881250949\n1\t20\t3\t891717742\n2\t10\t4\t878887116\n3\t30\t1\t880606923\n",
        encoding="ascii",
    )
    flags = ["0"] * len(GENRES)
    comedy = flags.copy()
    comedy[GENRES.index("Comedy")] = "1"
    comedy[GENRES.index("Drama")] = "1"
    lines = [
        "|".join(["10", "Toy Story (1995)", "01-Jan-1995", "", "http://x/1", *comedy]),
        # Latin-1, as the real u.item is.
        "|".join(["20", "Andaz Apna Apna (1994)", "", "", "", *flags]).replace("Andaz", "Ándaz"),
        "|".join(["30", "Big Night (1996)", "20-Sep-1996", "", "http://x/3", *flags]),
    ]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "u.user").write_text(
        "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n", encoding="ascii"
    )
    return folder


def test_import_follows_the_data_contract(tmp_path: Path) -> None:
    counts = import_movielens(_write_ml(tmp_path / "ml"), tmp_path / "out")
    assert counts == {"interactions": 4, "items": 3, "users": 3}
    inter = pq.read_table(tmp_path / "out" / "interactions.parquet")
    assert inter.column("user_id").to_pylist() == ["1", "1", "2", "3"]
    assert inter.column("item_id").to_pylist() == ["10", "20", "10", "30"]
    assert inter.column("weight").to_pylist() == [5.0, 3.0, 4.0, 1.0]
    assert pa.types.is_timestamp(inter.schema.field("ts").type)
    assert inter.column("ts")[0].as_py().timestamp() == 881250949
    items = pq.read_table(tmp_path / "out" / "items.parquet")
    assert items.column("title").to_pylist()[1] == "Ándaz Apna Apna (1994)"
    assert items.column("genres").to_pylist() == [["Comedy", "Drama"], [], []]
    users = pq.read_table(tmp_path / "out" / "users.parquet")
    assert users.column("age").to_pylist() == [24, 53, 23]
    # No risk levels, activity, tolerance or consent: those rules stay off.
    for column in ("risk_level", "active"):
        assert column not in items.column_names
    for column in ("risk_tolerance", "marketing_consent"):
        assert column not in users.column_names
    data = load_training_data(
        tmp_path / "out" / "interactions.parquet",
        tmp_path / "out" / "items.parquet",
        tmp_path / "out" / "users.parquet",
    )
    assert not data.has_risk_levels and not data.has_active
    assert data.user_items.nnz == 4 and data.user_items.sum() == pytest.approx(13.0)


def test_weight_none_counts_each_rating_once(tmp_path: Path) -> None:
    tables = read_movielens(_write_ml(tmp_path / "ml"), weight="none")
    assert "weight" not in tables["interactions"].column_names


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    folder = _write_ml(tmp_path / "ml")
    (folder / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user: no such file"):
        read_movielens(folder)
    _write_ml(folder)
    (folder / "u.data").write_text("1\t10\t5\n", encoding="ascii")
    with pytest.raises(DataError, match=r"u\.data"):
        read_movielens(folder)
    (folder / "u.data").write_text("1\t10\t9\t881250949\n", encoding="ascii")
    with pytest.raises(DataError, match="column 'rating' holds values outside 1..5"):
        read_movielens(folder)


def test_cli_import_movielens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = train_main(
        ["import-movielens", str(_write_ml(tmp_path / "ml")), "--out", str(tmp_path / "out")]
    )
    assert status == 0
    assert "wrote 4 interactions, 3 users, 3 items" in capsys.readouterr().out
    assert train_main(["import-movielens", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2


@pytest.mark.real_data
def test_real_movielens_100k(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # The default run never reads ../shared: ask for it with `pytest -m real_data`.
    if "real_data" not in (request.config.option.markexpr or ""):
        pytest.skip("reads ../shared/datasets: run with -m real_data")
    if not (REAL / "u.data").is_file():
        pytest.skip(f"{REAL} not present")
    counts = import_movielens(REAL, tmp_path)
    assert counts == {"interactions": 100_000, "items": 1682, "users": 943}
    data = load_training_data(
        tmp_path / "interactions.parquet", tmp_path / "items.parquet", tmp_path / "users.parquet"
    )
    assert data.user_items.shape == (943, 1682) and data.report.duplicates_merged == 0
