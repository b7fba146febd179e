"""The Parquet data contract: accepted shapes, clear errors, counted drops."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsvc.errors import DataError
from training.data import DataConfig, load_training_data


def _write(path: Path, **cols: object) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def _dense(data) -> dict[tuple[str, str], float]:  # type: ignore[no-untyped-def]
    m = data.user_items.tocoo()
    return {
        (data.users.ids[u], data.items.ids[i]): float(v)
        for u, i, v in zip(m.row, m.col, m.data, strict=True)
    }


def test_event_weights_sum_per_pair_and_hold_flag(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "i.parquet",
        user_id=["a", "a", "a", "b"],
        item_id=["x", "x", "y", "x"],
        event=["view", "purchase", "click", "apply"],
    )
    data = load_training_data(path)
    assert _dense(data) == {("a", "x"): 9.0, ("a", "y"): 2.0, ("b", "x"): 4.0}
    assert data.report.duplicates_merged == 1
    held = {
        (data.users.ids[u], data.items.ids[i])
        for u, i, h in zip(*data.user_items.nonzero(), data.held, strict=True)
        if h
    }
    assert held == {("a", "x")}


def test_weight_column_wins_and_integer_ids_are_cast(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "i.parquet",
        user_id=pa.array([1, 1, 2], pa.int64()),
        item_id=["x", "x", "y"],
        event=["view", "view", "view"],
        weight=[0.5, 1.5, 3.0],
    )
    assert _dense(load_training_data(path)) == {("1", "x"): 2.0, ("2", "y"): 3.0}


def test_no_event_no_weight_counts_one(tmp_path: Path) -> None:
    path = _write(tmp_path / "i.parquet", user_id=["a", "a"], item_id=["x", "x"])
    assert _dense(load_training_data(path)) == {("a", "x"): 2.0}


def test_custom_event_weights_and_unknown_events(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "i.parquet", user_id=["a", "a"], item_id=["x", "y"], event=["view", "zap"]
    )
    data = load_training_data(path, config=DataConfig(event_weights={"view": 3.0}))
    assert _dense(data) == {("a", "x"): 3.0, ("a", "y"): 1.0}
    assert data.report.unknown_events == 1


@pytest.mark.parametrize(
    ("event", "weight", "shown"),
    [
        (["PURCHASE", "VIEW", "PURCHASE"], None, "'PURCHASE', 'VIEW'; known: apply, click, close"),
        (["txn", "txn", "txn"], [1.0, 2.0, 3.0], "'txn'; known:"),  # a weight column too
        (pa.nulls(3, pa.string()), None, "only nulls; known:"),
    ],
)
def test_an_event_column_naming_no_known_event_is_refused(
    tmp_path: Path, event: object, weight: list[float] | None, shown: str
) -> None:
    cols: dict[str, object] = {"user_id": ["a", "b", "c"], "item_id": ["x", "y", "x"]}
    cols.update(event=event, **({"weight": weight} if weight else {}))
    path = _write(tmp_path / "i.parquet", **cols)
    expected = f"i.parquet: column 'event' names no known event in any of its 3 rows ({shown}"
    with pytest.raises(DataError, match=re.escape(expected)):
        load_training_data(path)
    # One known event is enough: the rest count as before (unknown ones counted, without
    # a weight column; with one, the weight decides the strength).
    mixed = _write(tmp_path / "m.parquet", **{**cols, "event": ["zap", "view", None]})
    assert load_training_data(mixed).report.unknown_events == (0 if weight else 1)
    # Events named in --event-weights are known.
    renamed = DataConfig(event_weights={"PURCHASE": 8.0, "VIEW": 1.0, "txn": 1.0})
    if not isinstance(event, pa.Array):
        assert load_training_data(path, config=renamed).user_items.nnz == 3


def test_time_decay_halves_per_half_life(tmp_path: Path) -> None:
    now = datetime(2026, 1, 31, tzinfo=timezone.utc)
    path = _write(
        tmp_path / "i.parquet",
        user_id=["a", "b"],
        item_id=["x", "x"],
        ts=pa.array([now, now - timedelta(days=30)], pa.timestamp("s", tz="UTC")),
    )
    dense = _dense(load_training_data(path, config=DataConfig(half_life_days=30)))
    assert dense[("a", "x")] == pytest.approx(1.0)
    assert dense[("b", "x")] == pytest.approx(0.5)


def test_null_ids_and_unknown_items_are_dropped_and_counted(tmp_path: Path) -> None:
    inter = _write(
        tmp_path / "i.parquet",
        user_id=["a", None, "b", "c"],
        item_id=["x", "x", None, "ghost"],
    )
    items = _write(
        tmp_path / "items.parquet", item_id=["x", "y"], risk_level=pa.array([1, 3], pa.int8())
    )
    data = load_training_data(inter, items)
    assert data.report.null_ids == 2
    assert data.report.unknown_items == 1
    assert data.items.ids == ["x", "y"]  # catalogue order, unused items kept
    assert data.has_risk_levels


def test_a_risk_column_of_nulls_keeps_suitability_on(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["a"], item_id=["x"])
    items = _write(tmp_path / "items.parquet", item_id=["x"], risk_level=pa.nulls(1, pa.int8()))
    assert load_training_data(inter, items).has_risk_levels  # every product at risk 5
    no_column = _write(tmp_path / "bare.parquet", item_id=["x"])
    assert not load_training_data(inter, no_column).has_risk_levels


def test_users_table_rows_come_first_and_extra_users_are_padded(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["z", "a"], item_id=["x", "x"])
    users = _write(
        tmp_path / "u.parquet",
        user_id=["a", "q"],
        risk_tolerance=pa.array([3, 2], pa.int8()),
        marketing_consent=[True, False],
    )
    data = load_training_data(inter, users=users)
    assert data.users.ids == ["a", "q", "z"]
    assert data.user_table.column("risk_tolerance").to_pylist() == [3, 2, None]


def test_integer_ids_missing_from_the_users_table_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=pa.array([42, 7], pa.int64()), item_id=["x"] * 2)
    users = _write(tmp_path / "u.parquet", user_id=["C00000042", "C00000007", "C00000001"])
    with caplog.at_level(logging.WARNING, logger="training.data"):
        load_training_data(inter, users=users)
    (record,) = [r for r in caplog.records if "missing from the users table" in r.getMessage()]
    assert (record.missing, record.users_table) == (2, 3)  # type: ignore[attr-defined]
    assert record.getMessage().startswith("2 of 2 customers in the interactions are missing")
    assert "42" not in record.getMessage()  # counts only: customer ids stay out of logs


def test_customers_missing_from_the_users_table_are_counted_and_get_the_defaults(
    tmp_path: Path,
) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["a", "b", "c", "d"], item_id=["x"] * 4)
    users = _write(
        tmp_path / "u.parquet",
        user_id=["a", "c"],
        risk_tolerance=pa.array([4, 5], pa.int8()),
        marketing_consent=[True, True],
    )
    data = load_training_data(inter, users=users)
    assert data.report.missing_customers == 2
    assert data.report.as_dict()["missing_customers"] == 2  # what the manifest records
    table = data.user_table
    assert table.column("user_id").to_pylist() == ["a", "c", "b", "d"]
    # Null tolerance and consent: read as 1 and no, the unknown customer's defaults.
    assert table.column("risk_tolerance").to_pylist() == [4, 5, None, None]
    assert table.column("marketing_consent").to_pylist() == [True, True, None, None]
    complete = _write(tmp_path / "all.parquet", user_id=["a", "b", "c", "d", "e"])
    assert load_training_data(inter, users=complete).report.missing_customers == 0


def test_folder_and_glob_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    _write(folder / "p1.parquet", user_id=["a"], item_id=["x"])
    _write(folder / "p2.parquet", user_id=["b"], item_id=["y"])
    assert load_training_data(folder).user_items.nnz == 2
    assert load_training_data(str(folder / "p*.parquet")).user_items.nnz == 2


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"item_id": ["x"]}, "column 'user_id' is missing"),
        ({"user_id": ["a"]}, "column 'item_id' is missing"),
        ({"user_id": [1.5], "item_id": ["x"]}, "column 'user_id' has type double"),
        (
            {"user_id": ["a"], "item_id": ["x"], "weight": ["heavy"]},
            "column 'weight' has type string",
        ),
        ({"user_id": ["a"], "item_id": ["x"], "weight": [-1.0]}, "negative"),
        ({"user_id": ["a"], "item_id": ["x"], "event": [3]}, "column 'event' has type int64"),
        ({"user_id": ["a"], "item_id": ["x"], "ts": ["yesterday"]}, "column 'ts' has type string"),
    ],
)
def test_interaction_contract_errors_name_file_and_column(
    tmp_path: Path, cols: dict[str, list[object]], message: str
) -> None:
    path = _write(tmp_path / "bad.parquet", **cols)
    with pytest.raises(DataError, match=message) as err:
        load_training_data(path, config=DataConfig(half_life_days=10))
    assert "bad.parquet" in str(err.value)


@pytest.mark.parametrize("half_life_days", [None, 10.0])
@pytest.mark.parametrize(
    ("ts", "type_name"),
    [
        (["2024-01-01"], "string"),
        (pa.array([1704067200], pa.int64()), "int64"),
        (pa.array([1.5], pa.float64()), "double"),
    ],
)
def test_a_ts_column_that_is_not_a_timestamp_is_refused_with_or_without_decay(
    tmp_path: Path, ts: object, type_name: str, half_life_days: float | None
) -> None:
    path = _write(tmp_path / "bad.parquet", user_id=["a"], item_id=["x"], ts=ts)
    expected = f"bad.parquet: column 'ts' has type {type_name}, expected timestamp"
    with pytest.raises(DataError, match=expected):
        load_training_data(path, config=DataConfig(half_life_days=half_life_days))


def test_empty_and_missing_inputs(tmp_path: Path) -> None:
    empty = _write(
        tmp_path / "empty.parquet",
        user_id=pa.array([], pa.string()),
        item_id=pa.array([], pa.string()),
    )
    with pytest.raises(DataError, match="empty.parquet: no rows"):
        load_training_data(empty)
    with pytest.raises(DataError, match="nothere.parquet"):
        load_training_data(tmp_path / "nothere.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet"):
        load_training_data(tmp_path / "junk.parquet")


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        ({"item_id": ["x", "x"]}, "duplicate ids"),
        ({"item_id": ["x"], "risk_level": pa.array([9], pa.int8())}, "outside 1..5"),
        ({"item_id": ["x"], "risk_level": ["high"]}, "column 'risk_level' has type string"),
        ({"item_id": ["x"], "active": ["yes"]}, "column 'active' has type string"),
        ({"category": ["card"]}, "column 'item_id' is missing"),
    ],
)
def test_items_contract_errors(tmp_path: Path, cols: dict[str, object], message: str) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["a"], item_id=["x"])
    items = _write(tmp_path / "items.parquet", **cols)
    with pytest.raises(DataError, match=message):
        load_training_data(inter, items)


def test_users_contract_errors(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["a"], item_id=["x"])
    users = _write(tmp_path / "users.parquet", user_id=["a"], marketing_consent=[1])
    with pytest.raises(DataError, match="users .*users.parquet: column 'marketing_consent'"):
        load_training_data(inter, users=users)


def test_tolerances_out_of_range_are_counted_and_a_few_named(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["a"], item_id=["x"])
    ids = [f"C{n:03d}" for n in range(20)]
    tolerance = [3] * 20
    for row, value in zip([2, 5, 6, 11, 12, 17, 19], [0, 6, 9, -1, 7, 8, 6], strict=True):
        tolerance[row] = value
    users = _write(
        tmp_path / "users.parquet",
        user_id=ids,
        risk_tolerance=pa.array(tolerance, pa.int16()),
    )
    expected = (
        "users.parquet: column 'risk_tolerance' holds values outside 1..5 in 7 of 20 rows "
        "(user_id: C002 (0), C005 (6), C006 (9), C011 (-1), C012 (7), ...)"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        load_training_data(inter, users=users)
    # Few bad rows: every one named, no ellipsis; nulls are not out of range.
    one = _write(
        tmp_path / "one.parquet",
        user_id=["a", "b", "c"],
        risk_tolerance=pa.array([None, 2, 6], pa.int8()),
    )
    with pytest.raises(DataError, match=re.escape("in 1 of 3 rows (user_id: c (6))")):
        load_training_data(inter, users=one)


def test_no_interaction_on_a_known_item(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.parquet", user_id=["a"], item_id=["ghost"])
    items = _write(tmp_path / "items.parquet", item_id=["x"])
    with pytest.raises(DataError, match="no interaction names a known item"):
        load_training_data(inter, items)


def test_fingerprint_is_stable_and_content_based(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.parquet", user_id=["a", "b"], item_id=["x", "y"])
    b = _write(tmp_path / "b.parquet", user_id=["b", "a"], item_id=["y", "x"])
    c = _write(tmp_path / "c.parquet", user_id=["a", "b"], item_id=["y", "x"])
    fa, fb, fc = (load_training_data(p).fingerprint() for p in (a, b, c))
    assert fa == fb != fc
    assert np.all(load_training_data(a).user_items.data == 1.0)
