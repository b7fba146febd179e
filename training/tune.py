"""Hyper-parameter search on a validation split carved out of the training data only.

``tune`` is given training data (for an honest evaluation, the train part of a
split: it never sees the test part). It holds out a random share of each user's pairs
as validation (``training.splits.stratified_holdout``, the rounding of the evaluation
split), fits every candidate on the rest with the project's trainer, ranks the
validation users under the serving rules (``training.scoring``) and keeps the
candidate with the best validation metric. The winner is written as ``FitParams``
JSON for ``recsvc-train fit --params`` and ``recsvc-eval --params``.

The search: the default parameters first, then random candidates, then (from 40% of
the trials on) random perturbations of the best so far, all drawn from one seeded
generator. A time budget stops it between trials.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from recsvc.errors import DataError
from training.data import TrainingData
from training.fit import FitParams, fit_model
from training.metrics import METRICS, summarize
from training.scoring import Eligibility
from training.splits import stratified_holdout

__all__ = [
    "SEARCH_SPACE",
    "Trial",
    "TuneOptions",
    "TuneResult",
    "carve_validation",
    "sample_params",
    "tune",
    "validation_score",
]

log = logging.getLogger(__name__)

# name: (low, high, log scale, integer, algorithms it applies to)
SEARCH_SPACE: dict[str, tuple[float, float, bool, bool, tuple[str, ...]]] = {
    "factors": (16, 256, True, True, ("als", "bpr")),
    "regularization": (1e-3, 300.0, True, False, ("als",)),
    "alpha": (0.1, 50.0, True, False, ("als",)),
    "iterations": (5, 40, False, True, ("als",)),
    "bm25_k1": (0.5, 200.0, True, False, ("als", "bpr")),
    "bm25_b": (0.0, 1.0, False, False, ("als", "bpr")),
}
"""Ranges searched; BPR has its own for regularization, learning rate and iterations."""

_BPR_SPACE: dict[str, tuple[float, float, bool, bool]] = {
    "regularization": (1e-5, 0.1, True, False),
    "learning_rate": (1e-3, 0.2, True, False),
    "iterations": (50, 300, False, True),
}
_EXPLORE_SHARE = 0.4


@dataclass(frozen=True)
class TuneOptions:
    """How to search.

    Example:
        >>> TuneOptions(trials=60, time_budget=300, metric="ndcg", k=10)
    """

    trials: int = 40
    time_budget: float | None = None
    """Seconds; no new trial starts after it."""
    seed: int = 0
    """Seeds the validation carve, the search and every fit."""
    validation_fraction: float = 0.25
    folds: int = 1
    """Independent validation carves (seeds seed, seed+1, ...); the score is their mean."""
    metric: str = "ndcg"
    k: int = 10
    algorithms: tuple[str, ...] = ("als", "bpr")
    weightings: tuple[str, ...] = ("raw", "log", "bm25")
    base: FitParams = field(default_factory=FitParams)
    """Fields not searched (threads, indexes) come from here; so does the first trial."""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        if self.folds < 1:
            raise ValueError(f"folds must be at least 1, got {self.folds}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be between 0 and 1, got {self.validation_fraction}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if not self.algorithms or set(self.algorithms) - {"als", "bpr"}:
            raise ValueError(f"algorithms must be among als, bpr, got {self.algorithms}")


@dataclass
class Trial:
    number: int
    params: FitParams
    score: float
    metrics: dict[str, float]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        searched = {k: v for k, v in self.params.to_json().items() if k in _SEARCHED}
        return {
            "trial": self.number,
            "score": self.score,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
            "params": searched,
        }


@dataclass
class TuneResult:
    best: Trial
    trials: list[Trial]
    validation: dict[str, Any]
    seconds: float
    stopped_by: str  # "trials" or "time_budget"

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best.to_json(),
            "trials": [t.to_json() for t in self.trials],
            "validation": self.validation,
            "seconds": round(self.seconds, 3),
            "stopped_by": self.stopped_by,
        }


_SEARCHED = {"algorithm", "weighting", "learning_rate", *SEARCH_SPACE}


def carve_validation(
    user_items: sp.csr_matrix, fraction: float, seed: int
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Split a training matrix into (fit, validation) pairs, per user, by ``fraction``.

    Every stored pair lands in exactly one of the two; shapes are kept.
    """
    x = user_items.tocsr()
    x.sort_indices()
    pair_user = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    held = stratified_holdout(pair_user, fraction, np.random.default_rng(seed))
    coo = x.tocoo()
    parts = []
    for keep in (~held, held):
        parts.append(
            sp.csr_matrix(
                (coo.data[keep], (coo.row[keep], coo.col[keep])), shape=x.shape, dtype=x.dtype
            )
        )
    return parts[0], parts[1]


def _draw(rng: np.random.Generator, low: float, high: float, log_scale: bool, integer: bool) -> Any:
    value = (
        math.exp(rng.uniform(math.log(low), math.log(high)))
        if log_scale
        else rng.uniform(low, high)
    )
    return round(value) if integer else float(value)


def _space(algorithm: str) -> dict[str, tuple[float, float, bool, bool]]:
    space = {k: v[:4] for k, v in SEARCH_SPACE.items() if algorithm in v[4]}
    if algorithm == "bpr":
        space.update(_BPR_SPACE)
    return space


def sample_params(
    rng: np.random.Generator, options: TuneOptions, around: FitParams | None = None
) -> FitParams:
    """A random candidate; with ``around``, a perturbation of 1 to 3 of its values."""
    if around is None:
        algorithm = str(rng.choice(options.algorithms))
        values: dict[str, Any] = {
            name: _draw(rng, *spec) for name, spec in _space(algorithm).items()
        }
        values["weighting"] = str(rng.choice(options.weightings))
        return replace(options.base, algorithm=algorithm, **values)
    algorithm = around.algorithm
    if len(options.algorithms) > 1 and rng.random() < 0.1:
        algorithm = str(rng.choice([a for a in options.algorithms if a != algorithm]))
        return sample_params(rng, replace(options, algorithms=(algorithm,)))
    space = _space(algorithm)
    # BM25's constants only matter under BM25 weighting; perturbing them otherwise wastes a trial.
    names = [n for n in space if around.weighting == "bm25" or not n.startswith("bm25")]
    names.append("weighting")
    changes: dict[str, Any] = {}
    for name in rng.choice(names, size=int(rng.integers(1, 4)), replace=False):
        if name == "weighting":
            changes["weighting"] = str(rng.choice(options.weightings))
            continue
        low, high, log_scale, integer = space[str(name)]
        current = float(getattr(around, str(name)))
        if log_scale:
            value = current * math.exp(rng.normal(0.0, 0.5))
        else:
            value = current + rng.normal(0.0, 0.15 * (high - low))
        value = min(max(value, low), high)
        changes[str(name)] = round(value) if integer else float(value)
    return replace(around, **changes)


@dataclass
class _Fold:
    fit: sp.csr_matrix
    eligibility: Eligibility
    users: np.ndarray
    relevant_users: np.ndarray
    relevant_items: np.ndarray
    item_users: np.ndarray


def _fold(data: TrainingData, fraction: float, seed: int) -> _Fold:
    fit, valid = carve_validation(data.user_items, fraction, seed)
    users = np.flatnonzero(np.diff(valid.indptr) > 0)
    sub = valid[users]
    relevant_users = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    return _Fold(
        fit=fit,
        eligibility=Eligibility.from_data(data, history=fit),
        users=users,
        relevant_users=relevant_users,
        relevant_items=sub.indices.astype(np.int64),
        item_users=np.bincount(fit.indices, minlength=fit.shape[1]),
    )


def validation_score(
    params: FitParams, fold: _Fold, k: int, progress: bool = False
) -> dict[str, float]:
    """Fit ``params`` on the fold's fit part; every metric at ``k`` on its validation part."""
    model = fit_model(fold.fit, params, progress=progress)
    user_factors, item_factors = model.user_factors, model.item_factors

    def scores(users: np.ndarray) -> np.ndarray:
        return np.asarray(user_factors[users] @ item_factors.T, dtype=np.float64)

    rows = fold.eligibility.rank(fold.users, k, scores)
    figures = summarize(
        rows, fold.relevant_users, fold.relevant_items, (k,), fold.item_users, fold.fit.shape[0]
    )
    return {name: by_k[k] for name, by_k in figures.items()}


def tune(
    data: TrainingData,
    options: TuneOptions,
    progress: bool = True,
    on_trial: Callable[[Trial, Trial], None] | None = None,
) -> TuneResult:
    """Search ``options.trials`` candidates (or until the time budget); the best wins.

    Args:
        data: the training data; a validation part is carved out of it.
        options: the search.
        progress: a progress bar over trials.
        on_trial: called with (trial, best so far) after each trial.

    Raises:
        DataError: nothing left to validate on.
    """
    start = time.perf_counter()
    folds = [
        _fold(data, options.validation_fraction, options.seed + i) for i in range(options.folds)
    ]
    if any(f.fit.nnz == 0 or len(f.users) == 0 for f in folds):
        raise DataError(
            "interactions: too few pairs per user to carve out a validation part and still fit"
        )
    validation = {
        "fraction": options.validation_fraction,
        "folds": options.folds,
        "seed": options.seed,
        "fit_pairs": [int(f.fit.nnz) for f in folds],
        "validation_pairs": [len(f.relevant_items) for f in folds],
        "validation_users": [len(f.users) for f in folds],
        "data_fingerprint": data.fingerprint(),
        "metric": f"{options.metric}@{options.k}",
    }
    rng = np.random.default_rng(options.seed)
    explore = max(1, round(options.trials * _EXPLORE_SHARE))
    options = replace(options, base=replace(options.base, seed=options.seed))
    trials: list[Trial] = []
    best: Trial | None = None
    stopped_by = "trials"
    bar = tqdm(total=options.trials, desc="tune", disable=not progress)
    for number in range(options.trials):
        elapsed = time.perf_counter() - start
        if number and options.time_budget is not None and elapsed > options.time_budget:
            stopped_by = "time_budget"
            break
        if number == 0:
            params = options.base
        elif number < explore or best is None:
            params = sample_params(rng, options)
        else:
            params = sample_params(rng, options, around=best.params)
        t0 = time.perf_counter()
        per_fold = [validation_score(params, f, options.k) for f in folds]
        metrics = {m: float(np.mean([p[m] for p in per_fold])) for m in per_fold[0]}
        trial = Trial(number, params, metrics[options.metric], metrics, time.perf_counter() - t0)
        trials.append(trial)
        if best is None or trial.score > best.score:
            best = trial
        bar.update(1)
        bar.set_postfix({options.metric: f"{best.score:.4f}"})
        if on_trial is not None:
            on_trial(trial, best)
    bar.close()
    assert best is not None  # the first trial always runs
    return TuneResult(best, trials, validation, time.perf_counter() - start, stopped_by)
