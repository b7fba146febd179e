"""Hyper-parameter search on a validation split carved out of the training data only.

``tune`` is given training data (for an honest evaluation, the train part of a
split: it never sees the test part). It holds out a random share of each user's pairs
as validation (``training.splits.stratified_holdout``, the rounding of the evaluation
split), fits every candidate on the rest with the project's trainer, ranks the
validation users under the serving rules (``training.scoring``) and keeps the
candidate with the best validation metric. The winner is written as ``FitParams``
JSON for ``recsvc-train fit --params`` and ``recsvc-eval --params``.

The search: the default parameters first, then random candidates (30% of the trials);
then the three best of those each found a local search, and the three take turns. A
local search is an opportunistic pattern search: it tries each value of its best one
step up and down (log units for log-scale values; regularization and alpha also
together, as they trade off), and the other weightings; an improvement restarts the
sweep around the new best, a sweep without one halves the step. Converged searches give
their turns back to random candidates. All is drawn from one seeded generator; a time
budget stops the search between trials.
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
from implicit.recommender_base import ModelFitError
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
    "neighbours",
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
_EXPLORE_SHARE = 0.3
_STARTS = 3  # local searches after exploring
_MIN_STEP = 0.1


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
    """One candidate's validation figures, or why its fit failed."""

    number: int
    params: FitParams
    score: float
    metrics: dict[str, float]
    seconds: float
    family: int = 0
    """The exploring trial this one descends from (its own number while exploring)."""
    error: str | None = None
    """Why the fit failed (the score is then -inf)."""

    def to_json(self) -> dict[str, Any]:
        searched = {k: v for k, v in self.params.to_json().items() if k in _SEARCHED}
        return {
            "trial": self.number,
            "score": self.score if math.isfinite(self.score) else None,
            "error": self.error,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
            "family": self.family,
            "params": searched,
        }


@dataclass
class TuneResult:
    """The winning trial, every trial, and how the validation part was carved."""

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


def sample_params(rng: np.random.Generator, options: TuneOptions) -> FitParams:
    """A random candidate from the whole space (log-uniform for log-scale values)."""
    algorithm = str(rng.choice(options.algorithms))
    values: dict[str, Any] = {name: _draw(rng, *spec) for name, spec in _space(algorithm).items()}
    values["weighting"] = str(rng.choice(options.weightings))
    return replace(options.base, algorithm=algorithm, **values)


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


def neighbours(params: FitParams, step: float, options: TuneOptions) -> list[FitParams]:
    """Pattern-search moves around ``params``, within the search space.

    Each searched value once up and once down by ``step`` (log units for log-scale
    values, ``step / 4`` of the range for the others); for ALS also regularization and
    alpha together, since they trade off along a ridge; and each other weighting.
    """
    space = _space(params.algorithm)
    out: list[FitParams] = []

    def moved(name: str, sign: float) -> Any:
        low, high, log_scale, integer = space[name]
        current = float(getattr(params, name))
        if log_scale:
            value = current * math.exp(sign * step)
        else:
            value = current + sign * step * 0.25 * (high - low)
        value = min(max(value, low), high)
        return round(value) if integer else float(value)

    # BM25's constants only matter under BM25 weighting.
    names = [n for n in space if params.weighting == "bm25" or not n.startswith("bm25")]
    groups = [[n] for n in names]
    if params.algorithm == "als":
        groups.append(["regularization", "alpha"])
    for group in groups:
        for sign in (1.0, -1.0):
            candidate = replace(params, **{n: moved(n, sign) for n in group})
            if candidate != params and candidate not in out:
                out.append(candidate)
    out += [replace(params, weighting=w) for w in options.weightings if w != params.weighting]
    return out


@dataclass
class _Climber:
    """One local search: opportunistic pattern search from a founding trial.

    Moves around the family's best one at a time; when one improves, a new sweep starts
    around it; a sweep without improvement halves the step, down to ``_MIN_STEP``.
    """

    family: int
    step: float = 1.0
    center: FitParams | None = None
    moves: list[FitParams] = field(default_factory=list)
    done: bool = False

    def propose(
        self, best: FitParams, rng: np.random.Generator, options: TuneOptions, seen: set[FitParams]
    ) -> FitParams | None:
        if best != self.center:
            self.center = best
            self.moves = self._sweep(best, rng, options)
        while True:
            while self.moves:
                move = self.moves.pop()
                if move not in seen:
                    return move
            self.step /= 2
            if self.step < _MIN_STEP:
                self.done = True
                return None
            self.moves = self._sweep(best, rng, options)

    def _sweep(
        self, best: FitParams, rng: np.random.Generator, options: TuneOptions
    ) -> list[FitParams]:
        moves = neighbours(best, self.step, options)
        return [moves[i] for i in rng.permutation(len(moves))]


class _Search:
    """The base parameters, random candidates while exploring, then the best ones' climbers."""

    def __init__(self, options: TuneOptions) -> None:
        self.options = options
        self.explore = max(1, round(options.trials * _EXPLORE_SHARE))
        self.rng = np.random.default_rng(options.seed)
        self.climbers: list[_Climber] | None = None
        self.turn = 0

    def propose(self, trials: list[Trial]) -> tuple[FitParams, int]:
        """The next candidate and the family it belongs to; the base parameters come first."""
        number = len(trials)
        if number == 0:
            return self.options.base, 0
        seen = {t.params for t in trials}
        if number >= self.explore and self.climbers is None:
            fitted = sorted((t for t in trials if t.error is None), key=lambda t: -t.score)
            self.climbers = [_Climber(t.number) for t in fitted[:_STARTS]]
        for _ in range(len(self.climbers or ())):
            assert self.climbers is not None
            climber = self.climbers[self.turn % len(self.climbers)]
            self.turn += 1
            if climber.done:
                continue
            family = [t for t in trials if t.family == climber.family and t.error is None]
            best = max(family, key=lambda t: t.score).params
            move = climber.propose(best, self.rng, self.options, seen)
            if move is not None:
                return move, climber.family
        # Exploring, or every climber has converged: a fresh random candidate.
        for _ in range(10):  # a repeat teaches nothing: draw again
            params = sample_params(self.rng, self.options)
            if params not in seen:
                break
        return params, number


def _carve_folds(data: TrainingData, options: TuneOptions) -> list[_Fold]:
    """One validation carve per fold, seeded ``seed``, ``seed + 1``, ...

    Raises:
        DataError: a carve leaves nothing to fit or nothing to validate on.
    """
    folds = [
        _fold(data, options.validation_fraction, options.seed + i) for i in range(options.folds)
    ]
    if any(f.fit.nnz == 0 or len(f.users) == 0 for f in folds):
        raise DataError(
            "interactions: too few pairs per user to carve out a validation part and still fit"
        )
    return folds


def _describe_folds(folds: list[_Fold], data: TrainingData, options: TuneOptions) -> dict[str, Any]:
    """The result's ``validation`` section: how the folds were carved and their sizes."""
    return {
        "fraction": options.validation_fraction,
        "folds": options.folds,
        "seed": options.seed,
        "fit_pairs": [int(f.fit.nnz) for f in folds],
        "validation_pairs": [len(f.relevant_items) for f in folds],
        "validation_users": [len(f.users) for f in folds],
        "data_fingerprint": data.fingerprint(),
        "metric": f"{options.metric}@{options.k}",
    }


def _run_trial(
    number: int, params: FitParams, family: int, folds: list[_Fold], options: TuneOptions
) -> Trial:
    """Fit and score ``params`` on every fold; the trial's metrics are the folds' mean."""
    start = time.perf_counter()
    try:
        per_fold = [validation_score(params, f, options.k) for f in folds]
    except (ModelFitError, FloatingPointError, np.linalg.LinAlgError) as exc:
        # A diverging candidate (BPR at a high learning rate: NaN factors) is a bad
        # candidate, not a failed search.
        return Trial(number, params, -math.inf, {}, time.perf_counter() - start, family, str(exc))
    metrics = {m: float(np.mean([p[m] for p in per_fold])) for m in per_fold[0]}
    seconds = time.perf_counter() - start
    return Trial(number, params, metrics[options.metric], metrics, seconds, family)


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
    folds = _carve_folds(data, options)
    validation = _describe_folds(folds, data, options)
    options = replace(options, base=replace(options.base, seed=options.seed))
    search = _Search(options)
    trials: list[Trial] = []
    best: Trial | None = None
    stopped_by = "trials"
    bar = tqdm(total=options.trials, desc="tune", disable=not progress)
    for number in range(options.trials):
        elapsed = time.perf_counter() - start
        if number and options.time_budget is not None and elapsed > options.time_budget:
            stopped_by = "time_budget"
            break
        params, family = search.propose(trials)
        trial = _run_trial(number, params, family, folds, options)
        trials.append(trial)
        if best is None or trial.score > best.score:
            best = trial
        bar.update(1)
        bar.set_postfix({options.metric: f"{best.score:.4f}"})
        if on_trial is not None:
            on_trial(trial, best)
    bar.close()
    assert best is not None  # the first trial always runs
    if best.error is not None:
        raise DataError(f"tune: every trial failed to fit (first: {best.error})")
    return TuneResult(best, trials, validation, time.perf_counter() - start, stopped_by)
