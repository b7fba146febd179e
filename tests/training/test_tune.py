"""Tuning: a validation carve of the training data only, valid parameters out."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recsvc.errors import DataError
from tests.conftest import PARAMS
from training.cli import main as train_main
from training.data import TrainingData, load_training_data
from training.evaluate_cli import main as eval_main
from training.fit import FitParams, fit_model
from training.sample import SampleSpec, write_sample
from training.tune import (
    SEARCH_SPACE,
    TuneOptions,
    carve_validation,
    for_refit,
    neighbours,
    sample_params,
    tune,
)

# Small and fast: a handful of cheap candidates.
FAST = TuneOptions(trials=3, seed=1, base=replace(PARAMS, iterations=3), k=10)


def test_carve_puts_every_pair_on_exactly_one_side(training_data: TrainingData) -> None:
    x = training_data.user_items
    fit, valid = carve_validation(x, 0.25, seed=4)
    assert fit.shape == valid.shape == x.shape
    assert fit.nnz + valid.nnz == x.nnz
    assert (fit + valid != x).nnz == 0
    assert fit.multiply(valid).nnz == 0
    per_user = np.diff(x.indptr)
    assert (np.diff(fit.indptr) == np.round(0.75 * per_user)).all()  # the split's rounding
    again, _ = carve_validation(x, 0.25, seed=4)
    other, _ = carve_validation(x, 0.25, seed=5)
    assert (again != fit).nnz == 0 and (other != fit).nnz > 0


def test_sampled_candidates_stay_in_range_and_are_valid(rng: np.random.Generator) -> None:
    options = TuneOptions(base=PARAMS)
    for _ in range(300):
        p = sample_params(rng, options)
        assert isinstance(p, FitParams)  # __post_init__ validated it
        for name, r in SEARCH_SPACE[p.algorithm].items():
            assert r.low <= getattr(p, name) <= r.high, (name, p)
        assert p.weighting in options.weightings


def test_neighbours_step_each_value_both_ways_within_the_space() -> None:
    options = TuneOptions()
    p = FitParams(factors=64, regularization=1.0, alpha=2.0, iterations=15, weighting="log")
    moves = neighbours(p, math.log(2), options)
    changed = [{k for k, v in m.to_json().items() if v != p.to_json()[k]} for m in moves]
    assert {"factors"} in changed and {"alpha"} in changed
    assert {"regularization", "alpha"} in changed  # the ridge move
    assert any(m.factors == 128 for m in moves) and any(m.factors == 32 for m in moves)
    assert {m.weighting for m in moves} == {"log", "raw", "bm25"}
    # BM25's constants are not moved unless BM25 weighting is on.
    assert not any(c & {"bm25_k1", "bm25_b"} for c in changed)
    bm25 = neighbours(replace(p, weighting="bm25"), 1.0, options)
    assert any(m.bm25_k1 != p.bm25_k1 for m in bm25)
    assert p not in moves and len(moves) == len(set(moves))


def test_at_a_range_edge_neighbours_step_past_it_up_to_the_hard_limit() -> None:
    options = TuneOptions()
    als = SEARCH_SPACE["als"]
    top = FitParams(factors=256, regularization=als["regularization"].high, alpha=50.0)
    moves = neighbours(top, 1.0, options)
    assert max(m.factors for m in moves) == round(256 * math.e)  # past the range's 256
    assert max(m.regularization for m in moves) > als["regularization"].high
    assert max(m.alpha for m in moves) > als["alpha"].high
    # At the hard limit it stops; an integer too close to move by a step moves by one.
    ceiling = FitParams(factors=1024, iterations=5, regularization=1.0, alpha=2.0)
    assert max(m.factors for m in neighbours(ceiling, 1.0, options)) == 1024
    assert min(m.iterations for m in neighbours(ceiling, 0.01, options)) == 4


def test_tune_keeps_the_best_trial_and_starts_from_the_defaults(
    training_data: TrainingData,
) -> None:
    result = tune(training_data, FAST, progress=False)
    assert [t.number for t in result.trials] == [0, 1, 2]
    assert result.trials[0].params == replace(FAST.base, seed=1).resolved(training_data.user_items)
    assert result.best.score == max(t.score for t in result.trials)
    assert result.best.score == result.best.metrics["ndcg"]
    assert result.stopped_by == "trials"
    v = result.validation
    assert v["fit_pairs"][0] + v["validation_pairs"][0] == training_data.user_items.nnz
    assert v["data_fingerprint"] == training_data.fingerprint()
    # The winner's values for the fit on all the pairs: scaled by the carve's share.
    assert result.share == np.mean(v["fit_pairs"]) / training_data.user_items.nnz
    assert result.refit == for_refit(result.best.params, result.share)
    assert result.to_json()["refit"]["share"] == result.share


def test_after_exploring_the_three_best_explorers_climb(training_data: TrainingData) -> None:
    result = tune(training_data, replace(FAST, trials=12, algorithms=("als",)), progress=False)
    explorers = result.trials[:4]  # 30% of 12
    assert [t.family for t in explorers] == [0, 1, 2, 3]
    founders = {t.number for t in sorted(explorers, key=lambda t: -t.score)[:3]}
    assert {t.family for t in result.trials[4:]} == founders
    # Each climbing candidate is a neighbour of something its family already tried.
    for t in result.trials[4:]:
        family = [f.params for f in result.trials[: t.number] if f.family == t.family]
        assert any(
            t.params in neighbours(f, s, FAST) for f in family for s in (1.0, 0.5, 0.25, 0.125)
        )


def test_tune_is_deterministic_for_a_seed(training_data: TrainingData) -> None:
    options = replace(FAST, algorithms=("als",))
    a = tune(training_data, options, progress=False)
    b = tune(training_data, options, progress=False)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.score for t in a.trials] == [t.score for t in b.trials]


def test_time_budget_stops_after_the_first_trial(training_data: TrainingData) -> None:
    result = tune(training_data, replace(FAST, trials=50, time_budget=0.0), progress=False)
    assert len(result.trials) == 1 and result.stopped_by == "time_budget"


def test_a_diverging_candidate_is_a_failed_trial_not_a_failed_search(
    training_data: TrainingData,
) -> None:
    diverging = FitParams(algorithm="bpr", learning_rate=10.0, iterations=3, factors=8)
    result = tune(training_data, replace(FAST, trials=3, base=diverging), progress=False)
    first = result.trials[0]
    assert first.error == "NaN encountered in factors" and first.to_json()["score"] is None
    assert result.best.error is None and result.best.number > 0
    with pytest.raises(DataError, match="every trial failed to fit"):
        tune(training_data, replace(FAST, trials=1, base=diverging), progress=False)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="metric must be one of"):
        TuneOptions(metric="auc")
    with pytest.raises(ValueError, match="validation_fraction must be between 0 and 1"):
        TuneOptions(validation_fraction=1.0)
    with pytest.raises(ValueError, match="algorithms must be among als, bpr"):
        TuneOptions(algorithms=("svd",))
    with pytest.raises(ValueError, match="ranges: 'gamma' is not a searched value"):
        TuneOptions(ranges={"gamma": (1.0, 2.0)})
    with pytest.raises(ValueError, match="ranges: alpha low 2.0 is above high 1.0"):
        TuneOptions(ranges={"alpha": (2.0, 1.0)})


def test_too_little_data_to_carve_is_an_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One pair per user: each keeps round((1 - f) * 1) = 1 pair, so nothing is left to validate.
    pq.write_table(pa.table({"user_id": ["a", "b"], "item_id": ["x", "y"]}), tmp_path / "i.parquet")
    data = load_training_data(tmp_path / "i.parquet")
    with pytest.raises(DataError, match="too few pairs per user to carve out a validation part"):
        tune(data, FAST, progress=False)


def test_cli_tunes_on_the_train_part_only_and_fit_accepts_the_result(
    sample_dir: Path, tmp_path: Path
) -> None:
    inputs = [
        "--items", str(sample_dir / "items.parquet"),
        "--users", str(sample_dir / "users.parquet"),
    ]  # fmt: skip
    assert eval_main(
        ["--interactions", str(sample_dir / "interactions.parquet"), *inputs,
         "--split", "stratified", "--seed", "2", "--split-only", "--report", str(tmp_path), "-q"]
    ) == 0  # fmt: skip
    train = tmp_path / "split" / "train.parquet"
    out = tmp_path / "best" / "params.json"
    assert train_main(
        ["-q", "tune", "--interactions", str(train), *inputs, "--trials", "2", "--seed", "2",
         "--iterations", "3", "--factors", "8", "--out", str(out)]
    ) == 0  # fmt: skip
    params = FitParams.from_json(out)  # only FitParams keys: usable by fit --params
    assert params.seed == 2
    log = json.loads((tmp_path / "best" / "params.tune.json").read_text(encoding="utf-8"))
    # What fit gets is the winner scaled for all the train part's pairs, as logged.
    refit = log["refit"]
    assert refit["share"] == log["validation"]["fit_pairs"][0] / (
        log["validation"]["fit_pairs"][0] + log["validation"]["validation_pairs"][0]
    )
    assert {k: getattr(params, k) for k in refit["params"]} == refit["params"]
    best = log["best"]["params"]
    if best["algorithm"] == "als":
        assert params.alpha == float(f"{best['alpha'] * refit['share']:.4g}")
        assert params.regularization == float(f"{best['regularization'] * refit['share']:.4g}")
    assert len(log["trials"]) == 2 and log["interactions"] == str(train)
    # The carve came out of the train part, never the full log (which holds the test pairs).
    train_data = load_training_data(
        train, sample_dir / "items.parquet", sample_dir / "users.parquet"
    )
    full = load_training_data(
        sample_dir / "interactions.parquet",
        sample_dir / "items.parquet",
        sample_dir / "users.parquet",
    )
    assert log["validation"]["data_fingerprint"] == train_data.fingerprint() != full.fingerprint()
    assert (
        log["validation"]["fit_pairs"][0] + log["validation"]["validation_pairs"][0]
        == train_data.user_items.nnz
    )
    assert train_main(
        ["-q", "fit", "--interactions", str(train), *inputs, "--params", str(out),
         "--models", str(tmp_path / "models")]
    ) == 0  # fmt: skip


def test_for_refit_scales_als_strengths_and_leaves_bpr_alone() -> None:
    als = FitParams(algorithm="als", factors=32, alpha=12.0, regularization=90.0)
    scaled = for_refit(als, 0.75)
    assert (scaled.alpha, scaled.regularization) == (9.0, 67.5)
    assert replace(scaled, alpha=als.alpha, regularization=als.regularization) == als
    assert for_refit(als, 1.0) == als
    assert for_refit(FitParams(alpha=1 / 3, regularization=2 / 3), 0.5).alpha == 0.1667
    bpr = FitParams(algorithm="bpr", alpha=12.0, regularization=0.01, learning_rate=0.05)
    assert for_refit(bpr, 0.75) == bpr
    unset = FitParams(algorithm="als")  # the data-scaled defaults resolve on all the data
    assert for_refit(unset, 0.75) == unset
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="share must be in"):
            for_refit(als, bad)


# Cheap fits for searches of many trials: few factors and iterations to draw from.
SMALL = {"factors": (4.0, 8.0), "iterations": (2.0, 4.0)}


def test_a_best_at_a_range_edge_is_searched_past_it(training_data: TrainingData) -> None:
    # Regularization drawn from far below what the sample wants: local search must widen.
    options = replace(
        FAST,
        trials=24,
        explore=4,
        algorithms=("als",),
        weightings=("log",),
        ranges={**SMALL, "regularization": (1e-3, 1e-2)},
    )
    result = tune(training_data, options, progress=False)
    explorers = [t.params.regularization for t in result.trials[1:4]]
    assert all(1e-3 <= r <= 1e-2 for r in explorers)
    assert result.best.params.regularization > 1e-2
    assert result.widened["regularization"] == result.best.params.regularization
    assert result.to_json()["widened"] == result.widened


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TrainingData:
    """A bank small enough for a search run to convergence in seconds."""
    out = tmp_path_factory.mktemp("tiny")
    write_sample(out, SampleSpec(users=300, items=40, seed=7), progress=False)
    return load_training_data(
        out / "interactions.parquet", out / "items.parquet", out / "users.parquet"
    )


def test_the_default_search_stops_when_converged_and_reproduces(tiny_data: TrainingData) -> None:
    base = replace(PARAMS, iterations=3, factors=4, threads=1)
    options = TuneOptions(seed=2, explore=4, base=base, ranges=SMALL)
    assert options.trials is None and options.time_budget is not None
    a = tune(tiny_data, options, progress=False)
    assert a.stopped_by == "converged"
    assert {"als", "bpr"} <= {t.params.algorithm for t in a.trials}
    b = tune(tiny_data, options, progress=False)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.score for t in a.trials] == [t.score for t in b.trials]
    assert a.best.params == b.best.params


def test_bpr_trials_reproduce_when_many_threads_are_asked_for(tiny_data: TrainingData) -> None:
    # Multi-threaded BPR is Hogwild: two fits differ. Trials fit it on one thread.
    bpr = FitParams(algorithm="bpr", factors=16, iterations=50, threads=2, seed=1)
    hogwild = [fit_model(tiny_data.user_items, bpr, progress=False) for _ in range(2)]
    assert not np.array_equal(hogwild[0].item_factors, hogwild[1].item_factors)
    once = TuneOptions(trials=1, seed=1, base=bpr)
    a, b = (tune(tiny_data, once, progress=False).best for _ in range(2))
    assert a.params.threads == 2 and a.metrics == b.metrics


def test_the_spread_is_the_winners_standard_error(training_data: TrainingData) -> None:
    result = tune(training_data, replace(FAST, ranges=SMALL), progress=False)
    best = result.best
    assert best.stderr is not None and 0 < best.stderr < best.score
    # Three carves by default: the score is their mean.
    assert len(best.fold_scores) == 3 and best.score == pytest.approx(np.mean(best.fold_scores))
    assert result.validation["folds"] == 3
    spread = result.spread
    within = [t for t in result.trials if t.score >= best.score - best.stderr]
    assert spread["stderr"] == best.stderr and spread["trials_within_stderr"] == len(within) >= 1
    # Coverage has no per-user values to take an error over.
    assert tune(training_data, replace(FAST, metric="coverage"), progress=False).best.stderr is None
