"""Evaluation through the serving path; the endpoint figure agrees with the in-process one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsvc.errors import BundleError, DataError, RecsvcError
from recsvc.model.bundle import load_bundle, read_latest
from recsvc.model.queries import RecommendQuery
from recsvc.model.ranking import Recommender
from tests.conftest import PARAMS, ServerThread, settings_for
from training.data import load_training_data
from training.evaluate import EvalOptions, evaluate, holdout, rank_endpoint, rank_in_process
from training.evaluate_cli import main, parse_ks
from training.metrics import METRICS
from training.splits import SplitSpec, make_split


@pytest.fixture(scope="module")
def evaluated(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI evaluation on the sample bank: split, train, rank, baselines, report."""
    report = tmp_path_factory.mktemp("eval")
    status = main(
        [
            "--interactions", str(sample_dir / "interactions.parquet"),
            "--items", str(sample_dir / "items.parquet"),
            "--users", str(sample_dir / "users.parquet"),
            "--split", "stratified:0.25", "--seed", "1", "-k", "1,5,10",
            "--factors", str(PARAMS.factors), "--iterations", str(PARAMS.iterations),
            "--report", str(report), "-q",
        ]
    )  # fmt: skip
    assert status == 0
    return report


@pytest.fixture(scope="module")
def serving(evaluated: Path) -> Iterator[ServerThread]:
    """A real server on port 0 serving the bundle the evaluation trained."""
    s = ServerThread(settings_for(evaluated / "models"))
    yield s
    s.stop()


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_report_has_every_metric_at_every_k_for_model_and_baselines(evaluated: Path) -> None:
    report = _report(evaluated)
    assert report["ks"] == [1, 5, 10]
    names = [r["name"] for r in report["results"]]
    assert names == ["model", "popularity", "itemknn", "ease", "random"]
    for r in report["results"]:
        assert set(r["metrics"]) == set(METRICS)
        assert set(r["metrics"]["ndcg"]) == {"1", "5", "10"}
        assert r["violations"] == {"suitability": 0, "inactive": 0, "seen_in_training": 0}
    model = report["results"][0]
    random = report["results"][-1]
    assert model["metrics"]["recall"]["10"] > random["metrics"]["recall"]["10"]
    # Users whose every pair was held out are unknown to the model: the service answers POPULAR.
    assert sum(model["sources"].values()) == report["data"]["test_users"]
    assert model["sources"]["PERSONALIZED"] > model["sources"].get("POPULAR", 0)
    assert "command" in report and report["machine"]["cores"] >= 1
    # The split is written next to the report, and the bundle it trained.
    assert (evaluated / "split" / "train.parquet").is_file()
    assert (evaluated / "split" / "test.parquet").is_file()
    assert read_latest(evaluated / "models") == report["bundle"]["version"]
    markdown = (evaluated / "report.md").read_text(encoding="utf-8")
    assert "| model |" in markdown and "nDCG@10" in markdown
    # EASE's lambda was chosen on the train part's validation carve, and the report says so.
    ease = next(r for r in report["results"] if r["name"] == "ease")
    chosen = ease["params"]
    assert chosen["validated_lambda"] in [float(v) for v in chosen["by_lambda"]]
    assert chosen["lambda"] < chosen["validated_lambda"]  # scaled for the fit on all pairs
    assert (
        f"- ease: lambda {chosen['lambda']:g} ({chosen['validated_lambda']:g} on validation, "
        f"times the {chosen['refit_share']:.0%} of the pairs it fitted on), chosen by ndcg@10 "
        "on 3 validation carves (the mean)"
    ) in markdown
    assert "## Where a baseline beats the served model" in markdown
    assert all(line in markdown for line in report["model_losses"])
    assert sorted(p.name for p in (evaluated / "plots").iterdir()) == sorted(
        f"{m}.png" for m in METRICS
    )


def test_in_process_lists_are_what_recommend_returns(evaluated: Path, sample_dir: Path) -> None:
    split = make_split("", SplitSpec.parse(f"replay:{evaluated / 'split'}"))
    data = load_training_data(
        evaluated / "split" / "train.parquet",
        sample_dir / "items.parquet",
        sample_dir / "users.parquet",
    )
    test = holdout(split.test, data)
    bundle = load_bundle(evaluated / "models" / str(read_latest(evaluated / "models")))
    rec = Recommender(bundle)
    lists = rank_in_process(rec, test, data, 10, progress=False)
    for i in range(0, len(test.user_ids), 97):
        served = rec.recommend(RecommendQuery(user_id=test.user_ids[i], k=10))
        assert lists.ids is not None
        assert lists.ids[i] == [s.item_id for s in served.items]
        assert [data.items.ids[r] for r in lists.rows[i] if r >= 0] == lists.ids[i]


def test_endpoint_figure_agrees_with_in_process(
    evaluated: Path, serving: ServerThread, sample_dir: Path, tmp_path: Path
) -> None:
    status = main(
        [
            "--interactions", str(sample_dir / "interactions.parquet"),
            "--items", str(sample_dir / "items.parquet"),
            "--users", str(sample_dir / "users.parquet"),
            "--split", f"replay:{evaluated / 'split'}", "--seed", "1", "-k", "5,10",
            "--bundle", str(evaluated / "models"),
            "--endpoint", f"localhost:{serving.running.port}",
            "--baselines", "none", "--report", str(tmp_path), "-q",
        ]
    )  # fmt: skip
    assert status == 0
    report = _report(tmp_path)
    model, remote = report["results"]
    assert (model["name"], remote["name"]) == ("model", "model@endpoint")
    assert model["metrics"] == remote["metrics"]
    assert report["endpoint_agreement"]["agree"] is True
    assert report["endpoint_agreement"]["users_with_different_lists"] == 0
    # And both equal the figure of the run that trained the bundle.
    first = _report(evaluated)["results"][0]["metrics"]
    assert all(model["metrics"][m]["10"] == first[m]["10"] for m in METRICS)


def test_endpoint_serving_another_model_is_refused(
    evaluated: Path, server: ServerThread, sample_dir: Path
) -> None:
    """The session server serves the conftest bundle, not the evaluated one."""
    split = make_split("", SplitSpec.parse(f"replay:{evaluated / 'split'}"))
    data = load_training_data(evaluated / "split" / "train.parquet", sample_dir / "items.parquet")
    test = holdout(split.test, data)
    with pytest.raises(RecsvcError, match="not the evaluated bundle v-expected"):
        rank_endpoint(
            f"localhost:{server.running.port}", test, data, 10, "v-expected", progress=False
        )


def test_unreachable_endpoint_is_named(evaluated: Path, sample_dir: Path) -> None:
    split = make_split("", SplitSpec.parse(f"replay:{evaluated / 'split'}"))
    data = load_training_data(evaluated / "split" / "train.parquet", sample_dir / "items.parquet")
    with pytest.raises(RecsvcError, match="endpoint localhost:1: UNAVAILABLE"):
        rank_endpoint("localhost:1", holdout(split.test, data), data, 10, timeout=2, progress=False)


@pytest.mark.parametrize(
    ("given", "missing"), [((), "--users and --items"), (("--items",), "--users")]
)
def test_replaying_without_the_tables_it_was_trained_with_names_them(
    evaluated: Path,
    sample_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    given: tuple[str, ...],
    missing: str,
) -> None:
    tables = [a for flag in given for a in (flag, str(sample_dir / f"{flag[2:]}.parquet"))]
    argv = [
        "--interactions", str(sample_dir / "interactions.parquet"), *tables,
        "--split", f"replay:{evaluated / 'split'}", "--bundle", str(evaluated / "models"),
        "--baselines", "none", "--report", str(tmp_path), "-q",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"give {missing}" in err and "not trained on this split" not in err


def test_a_bundle_trained_on_other_data_is_refused(
    evaluated: Path, models_dir: Path, sample_dir: Path, tmp_path: Path
) -> None:
    """The conftest bundle saw every interaction, test pairs included: its figure would lie."""
    split = make_split("", SplitSpec.parse(f"replay:{evaluated / 'split'}"))
    with pytest.raises(BundleError, match="was not trained on this split's train part"):
        evaluate(
            split,
            tmp_path,
            PARAMS,
            EvalOptions(baselines=(), progress=False),
            items=sample_dir / "items.parquet",
            users=sample_dir / "users.parquet",
            bundle=models_dir,
        )


def test_endpoint_without_bundle_and_bad_k_are_refused(
    evaluated: Path, sample_dir: Path, tmp_path: Path
) -> None:
    split = make_split("", SplitSpec.parse(f"replay:{evaluated / 'split'}"))
    with pytest.raises(DataError, match="--endpoint needs --bundle"):
        evaluate(split, tmp_path, PARAMS, EvalOptions(endpoint="localhost:1"))
    with pytest.raises(DataError, match="k: each k must be between 1 and 500"):
        evaluate(split, tmp_path, PARAMS, EvalOptions(ks=(0, 10)))
    with pytest.raises(RecsvcError, match="-k:"):
        parse_ks(["5,ten"])
    assert parse_ks(["10,5", "20"]) == (5, 10, 20)


def test_holdout_maps_users_and_drops_items_outside_the_catalogue(sample_dir: Path) -> None:
    data = load_training_data(sample_dir / "interactions.parquet", sample_dir / "items.parquet")
    known_user, known_item = data.users.ids[3], data.items.ids[7]
    test = pa.table(
        {
            "user_id": [known_user, known_user, "stranger"],
            "item_id": [known_item, "NOT-IN-CATALOGUE", known_item],
        }
    )
    h = holdout(test, data)
    assert h.user_ids == sorted([known_user, "stranger"])
    rows = dict(zip(h.user_ids, h.user_rows.tolist(), strict=True))
    assert rows == {known_user: 3, "stranger": -1}
    assert h.dropped_unknown_items == 1
    assert h.relevant_items.tolist() == [7, 7]
    assert sorted(np.asarray(h.user_ids)[h.relevant_users].tolist()) == sorted(
        [known_user, "stranger"]
    )


def test_cli_bad_split_exits_2_naming_it(sample_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    status = main(
        ["--interactions", str(sample_dir / "interactions.parquet"), "--split", "kfold",
         "--report", str(tmp_path), "-q"]
    )  # fmt: skip
    assert status == 2
    assert "split 'kfold': kind must be one of" in capsys.readouterr().err


def test_cli_a_diverging_fit_exits_2_naming_its_parameters(
    sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["--interactions", str(sample_dir / "interactions.parquet"), "--report", str(tmp_path),
         "--split", "stratified:0.25", "--algorithm", "bpr", "--learning-rate", "1e9",
         "--factors", "8", "--baselines", "popularity", "-q"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert "the bpr fit diverged" in err and "learning_rate=1e+09" in err
