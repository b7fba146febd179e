"""Reports: the lines saying where a baseline beats the served model."""

from __future__ import annotations

from typing import Any

from training.report import QUALITY, baseline_notes, model_losses


def _result(name: str, value: float, **overrides: float) -> dict[str, Any]:
    metrics = {m: {"10": overrides.get(m, value)} for m in (*QUALITY, "coverage", "novelty")}
    return {"name": name, "metrics": metrics}


def test_a_line_per_metric_a_baseline_wins_naming_every_winner_best_first() -> None:
    report = {
        "ks": [10],
        "results": [
            _result("model", 0.30, ndcg=0.40),
            _result("model@endpoint", 0.30, ndcg=0.40),
            _result("popularity", 0.10, map=0.35),
            _result("ease", 0.20, map=0.50, ndcg=0.45, coverage=0.9, novelty=9.0),
        ],
    }
    assert model_losses(report) == [
        "the served model loses on nDCG@10: 0.4000 against ease 0.4500",
        "the served model loses on MAP@10: 0.3000 against ease 0.5000, popularity 0.3500",
    ]


def test_no_line_when_the_model_wins_or_ties_or_there_is_no_model() -> None:
    report = {"ks": [10], "results": [_result("model", 0.3), _result("itemknn", 0.3)]}
    assert model_losses(report) == []
    assert model_losses({"ks": [10], "results": [_result("itemknn", 0.3)]}) == []


def test_ease_note_names_its_lambda_and_what_chose_it() -> None:
    ease = _result("ease", 0.2) | {
        "params": {
            "lambda": 300.0,
            "chosen_by": "ndcg@10 on a validation carve of the train part",
            "by_lambda": {"100": 0.25, "1000": 0.24, "300": 0.26},  # as JSON sorts it
            "at_edge": False,
        }
    }
    assert baseline_notes([_result("model", 0.3), ease]) == [
        "ease: lambda 300, chosen by ndcg@10 on a validation carve of the train part "
        "(tried: 100 0.2500, 300 0.2600, 1000 0.2400)"
    ]
    ease["params"] |= {"lambda": 225.0, "validated_lambda": 300.0, "refit_share": 0.75}
    assert baseline_notes([ease]) == [
        "ease: lambda 225 (300 on validation, times the 75% of the pairs it fitted on), "
        "chosen by ndcg@10 on a validation carve of the train part "
        "(tried: 100 0.2500, 300 0.2600, 1000 0.2400)"
    ]
