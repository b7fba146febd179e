"""Hyper-parameter search on a validation split carved out of the training data only.

``tune`` is given training data (for an honest evaluation, the train part of a
split: it never sees the test part). It holds out a random share of each user's pairs
as validation (``training.splits.stratified_holdout``, the rounding of the evaluation
split), fits every candidate on the rest with the project's trainer, ranks the
validation users under the serving rules (``training.scoring``) and keeps the
candidate with the best validation metric. The winner is written as ``FitParams``
JSON for ``recsvc-train fit --params`` and ``recsvc-eval --params``.

The search: the default parameters first, then random candidates drawn from
:data:`SEARCH_SPACE`'s ranges; then the three best of those each found a local search,
and the three take turns. A local search is an opportunistic pattern search: it tries
each value of its best one step up and down (log units for log-scale values;
regularization and alpha also together, as they trade off), and the other weightings;
an improvement restarts the sweep around the new best, a sweep without one halves the
step. A local search is not held to the ranges random candidates come from: at a
range's edge it steps past it (widening the range) as far as the value's hard limits,
so a best at an edge is always one whose outer neighbour was tried and lost.

By default (no trial count) the search stops when every local search has converged
(a sweep at the smallest step without improvement), or at the time budget, whichever
is first. All is drawn from one seeded generator and every fit is seeded (BPR trials
fit on one thread, as multi-threaded BPR is Hogwild); ALS is reproducible at any thread
count. A search that converges is therefore reproducible: the same data and seed give
the same parameters. One stopped by the time budget depends on the machine's speed, and
says so.

The winner is validated fitting on a carve that holds a share s of the pairs (about 0.75)
but is then refit on all of them: :func:`for_refit` multiplies an ALS winner's alpha and
regularization by s for that fit (``TuneResult.refit``), since the values the carve
chooses are too strong for the larger data (docs/EVALUATION.md has the evidence).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from implicit.recommender_base import ModelFitError
from tqdm import tqdm

from recsvc.errors import DataError
from training.data import TrainingData
from training.fit import FitParams, fit_model
from training.metrics import METRICS, PER_USER, hit_matrix, summarize
from training.scoring import Eligibility
from training.splits import stratified_holdout

__all__ = [
    "DEFAULT_EXPLORE",
    "DEFAULT_TIME_BUDGET",
    "SEARCH_SPACE",
    "Fold",
    "Range",
    "Trial",
    "TuneOptions",
    "TuneResult",
    "carve_folds",
    "carve_validation",
    "for_refit",
    "neighbours",
    "refit_share",
    "sample_params",
    "search_space",
    "tune",
    "validation_score",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Range:
    """One searched value: where random candidates come from, and how far search may go.

    Example:
        >>> Range(1e-2, 300.0, log=True, floor=1e-6, ceiling=1e6)
    """

    low: float
    high: float
    """Random candidates are drawn between ``low`` and ``high``."""
    log: bool = False
    """Drawn log-uniformly, and stepped in log units."""
    integer: bool = False
    floor: float | None = None
    """The hard limits a local search may widen the range to (default: the range)."""
    ceiling: float | None = None

    @property
    def limits(self) -> tuple[float, float]:
        low = self.low if self.floor is None else self.floor
        high = self.high if self.ceiling is None else self.ceiling
        return low, high


_SHARED: dict[str, Range] = {
    "factors": Range(16, 256, log=True, integer=True, floor=4, ceiling=1024),
    "bm25_k1": Range(0.5, 200.0, log=True, floor=1e-2, ceiling=1e4),
    "bm25_b": Range(0.0, 1.0),
}
SEARCH_SPACE: dict[str, dict[str, Range]] = {
    "als": {
        **_SHARED,
        "regularization": Range(1e-2, 300.0, log=True, floor=1e-6, ceiling=1e6),
        "alpha": Range(0.1, 50.0, log=True, floor=1e-3, ceiling=1e4),
        "iterations": Range(5, 40, integer=True, floor=2, ceiling=100),
    },
    "bpr": {
        **_SHARED,
        "regularization": Range(1e-5, 0.1, log=True, floor=1e-8, ceiling=10.0),
        "learning_rate": Range(1e-3, 0.2, log=True, floor=1e-5, ceiling=1.0),
        "iterations": Range(50, 300, integer=True, floor=10, ceiling=1000),
    },
}
"""Per algorithm, the values searched and their ranges (local search may widen them)."""

DEFAULT_TIME_BUDGET = 900.0
"""Seconds: the default search stops at convergence, or here at the latest."""
DEFAULT_EXPLORE = 16
"""Random candidates before local search, when no trial count is given."""
_EXPLORE_SHARE = 0.3  # of an explicit trial count
_STARTS = 3  # local searches after exploring
_MIN_STEP = 0.2  # steps 1, 1/2, 1/4: a sweep at 1/4 without improvement converges


@dataclass(frozen=True)
class TuneOptions:
    """How to search.

    Example:
        >>> TuneOptions()  # until converged, at most DEFAULT_TIME_BUDGET seconds
        >>> TuneOptions(trials=60, time_budget=300, metric="ndcg", k=10)
    """

    trials: int | None = None
    """At most this many trials (converged searches then draw random candidates);
    None: stop when the search has converged."""
    time_budget: float | None = DEFAULT_TIME_BUDGET
    """Seconds; no new trial starts after it. None: no limit."""
    seed: int = 0
    """Seeds the validation carve, the search and every fit."""
    explore: int | None = None
    """Random candidates before local search (default: 30% of ``trials``, or
    :data:`DEFAULT_EXPLORE`)."""
    validation_fraction: float = 0.25
    folds: int = 3
    """Independent validation carves (seeds seed, seed+1, ...); the score is their mean.
    One carve lets a lucky candidate win: on ML-100K the one-carve winner scored 0.2715
    on its carve and 0.2659, 0.2645 on two others, where a candidate level with it on the
    first held 0.2723, 0.2679 (docs/EVALUATION.md)."""
    metric: str = "ndcg"
    k: int = 10
    algorithms: tuple[str, ...] = ("als", "bpr")
    weightings: tuple[str, ...] = ("raw", "log", "bm25")
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Replaces the ranges random candidates are drawn from (name: (low, high)), for
    every algorithm that searches the value; the hard limits stay."""
    base: FitParams = field(default_factory=FitParams)
    """Fields not searched (threads, indexes) come from here; so does the first trial."""

    def __post_init__(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        if self.explore is not None and self.explore < 1:
            raise ValueError(f"explore must be at least 1, got {self.explore}")
        if self.time_budget is not None and self.time_budget < 0:
            raise ValueError(f"time_budget must be at least 0, got {self.time_budget}")
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
        searched = {name for space in SEARCH_SPACE.values() for name in space}
        for name, (low, high) in self.ranges.items():
            if name not in searched:
                known = ", ".join(sorted(searched))
                raise ValueError(f"ranges: {name!r} is not a searched value ({known})")
            if not low <= high:
                raise ValueError(f"ranges: {name} low {low} is above high {high}")

    @property
    def explorers(self) -> int:
        """How many random candidates come before local search."""
        if self.explore is not None:
            return self.explore
        if self.trials is not None:
            return max(1, round(self.trials * _EXPLORE_SHARE))
        return DEFAULT_EXPLORE


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
    stderr: float | None = None
    """Standard error of the score over validation users (None for coverage, novelty)."""
    fold_scores: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        searched = {k: v for k, v in self.params.to_json().items() if k in _SEARCHED}
        return {
            "trial": self.number,
            "score": self.score if math.isfinite(self.score) else None,
            "stderr": self.stderr,
            "fold_scores": self.fold_scores,
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
    stopped_by: str
    """``converged``, ``trials`` or ``time_budget`` (then not reproducible: say so)."""
    widened: dict[str, float] = field(default_factory=dict)
    """The best's values outside the range random candidates came from."""
    at_limit: list[str] = field(default_factory=list)
    """The best's values at a hard limit, where search could not go further."""
    share: float = 1.0
    """The share of the data's pairs the validation carves fitted on (their mean)."""

    @property
    def refit(self) -> FitParams:
        """The winner's parameters for a fit on all the data: :func:`for_refit`."""
        return for_refit(self.best.params, self.share)

    @property
    def spread(self) -> dict[str, Any]:
        """How sure the winner is: its standard error, and the trials within it."""
        within = None
        if self.best.stderr is not None:
            floor = self.best.score - self.best.stderr
            within = sum(1 for t in self.trials if t.score >= floor)
        return {
            "stderr": self.best.stderr,
            "fold_scores": self.best.fold_scores,
            "trials_within_stderr": within,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best.to_json(),
            "spread": self.spread,
            "widened": self.widened,
            "at_limit": self.at_limit,
            "refit": {
                "share": self.share,
                "params": {k: v for k, v in self.refit.to_json().items() if k in _SEARCHED},
            },
            "trials": [t.to_json() for t in self.trials],
            "validation": self.validation,
            "seconds": round(self.seconds, 3),
            "stopped_by": self.stopped_by,
        }


_SEARCHED = {"algorithm", "weighting", *(n for space in SEARCH_SPACE.values() for n in space)}


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


def refit_share(fit_pairs: Sequence[int], all_pairs: int) -> float:
    """The share of ``all_pairs`` that validation carves of ``fit_pairs`` pairs fitted on."""
    if all_pairs <= 0 or not fit_pairs:
        return 1.0
    return float(np.mean(fit_pairs)) / all_pairs


def for_refit(params: FitParams, share: float) -> FitParams:
    """``params`` chosen fitting on a ``share`` of the pairs, for a fit on all of them.

    ALS: alpha and regularization times ``share`` (rounded to four significant figures);
    BPR, whose steps are per sampled pair, unchanged. On every data set and seed
    measured, the refit with the scaled values beat the one with the validated values
    (docs/EVALUATION.md, "Refitting the winner"); EASE's lambda is scaled the same way
    (``training.baselines.choose_ease_lambda``).

    Example:
        >>> p = for_refit(FitParams(algorithm="als", alpha=20.0, regularization=100.0), 0.75)
        >>> (p.alpha, p.regularization)
        (15.0, 75.0)
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if params.algorithm != "als" or params.alpha is None or params.regularization is None:
        return params  # unset values are the data-scaled defaults: resolved on all the data
    return replace(
        params,
        alpha=float(f"{params.alpha * share:.4g}"),
        regularization=float(f"{params.regularization * share:.4g}"),
    )


def search_space(algorithm: str, options: TuneOptions) -> dict[str, Range]:
    """``algorithm``'s searched values, with ``options.ranges`` applied."""
    space = dict(SEARCH_SPACE[algorithm])
    for name, (low, high) in options.ranges.items():
        if name in space:
            r = space[name]
            floor, ceiling = r.limits
            space[name] = replace(
                r, low=low, high=high, floor=min(floor, low), ceiling=max(ceiling, high)
            )
    return space


def _draw(rng: np.random.Generator, r: Range) -> Any:
    if r.log:
        value = math.exp(rng.uniform(math.log(r.low), math.log(r.high)))
    else:
        value = rng.uniform(r.low, r.high)
    return round(value) if r.integer else float(value)


def sample_params(rng: np.random.Generator, options: TuneOptions) -> FitParams:
    """A random candidate from the ranges (log-uniform for log-scale values)."""
    algorithm = str(rng.choice(options.algorithms))
    space = search_space(algorithm, options)
    values: dict[str, Any] = {name: _draw(rng, r) for name, r in space.items()}
    values["weighting"] = str(rng.choice(options.weightings))
    return replace(options.base, algorithm=algorithm, **values)


@dataclass
class Fold:
    """One validation carve: what candidates fit on, and the validation pairs to rank."""

    fit: sp.csr_matrix
    eligibility: Eligibility
    users: np.ndarray
    relevant_users: np.ndarray
    relevant_items: np.ndarray
    item_users: np.ndarray


def _fold(data: TrainingData, fraction: float, seed: int) -> Fold:
    fit, valid = carve_validation(data.user_items, fraction, seed)
    users = np.flatnonzero(np.diff(valid.indptr) > 0)
    sub = valid[users]
    relevant_users = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    return Fold(
        fit=fit,
        eligibility=Eligibility.from_data(data, history=fit),
        users=users,
        relevant_users=relevant_users,
        relevant_items=sub.indices.astype(np.int64),
        item_users=np.bincount(fit.indices, minlength=fit.shape[1]),
    )


def _ranked(params: FitParams, fold: Fold, k: int, progress: bool) -> np.ndarray:
    # Multi-threaded BPR is Hogwild (threads race on shared factors): one thread is
    # reproducible. ALS solves each row on its own and is reproducible at any count.
    fitted = replace(params, threads=1) if params.algorithm == "bpr" else params
    model = fit_model(fold.fit, fitted, progress=progress)
    user_factors, item_factors = model.user_factors, model.item_factors

    def scores(users: np.ndarray) -> np.ndarray:
        return np.asarray(user_factors[users] @ item_factors.T, dtype=np.float64)

    return fold.eligibility.rank(fold.users, k, scores)


def validation_score(
    params: FitParams, fold: Fold, k: int, progress: bool = False
) -> dict[str, float]:
    """Fit ``params`` on the fold's fit part; every metric at ``k`` on its validation part.

    Also ``<metric>_stderr`` for each per-user metric: its standard error over the
    validation users.
    """
    rows = _ranked(params, fold, k, progress)
    figures = summarize(
        rows, fold.relevant_users, fold.relevant_items, (k,), fold.item_users, fold.fit.shape[0]
    )
    out = {name: by_k[k] for name, by_k in figures.items()}
    hits = hit_matrix(rows, fold.relevant_users, fold.relevant_items)
    n_relevant = np.bincount(fold.relevant_users, minlength=len(rows))
    for name, per_user in PER_USER.items():
        values = per_user(hits, n_relevant, k)
        out[f"{name}_stderr"] = float(np.std(values) / math.sqrt(max(len(values), 1)))
    return out


def _moved(r: Range, current: float, sign: float, step: float) -> Any:
    """``current`` one ``step`` up or down, within the hard limits (past the range)."""
    low, high = r.limits
    if r.log:
        value = current * math.exp(sign * step)
    else:
        value = current + sign * step * 0.25 * (r.high - r.low)
    value = min(max(value, low), high)
    if r.integer:
        # A step too small to change an integer still moves it by one.
        value = round(value)
        if value == round(current):
            value = min(max(value + int(sign), math.ceil(low)), math.floor(high))
    return value if r.integer else float(value)


def neighbours(params: FitParams, step: float, options: TuneOptions) -> list[FitParams]:
    """Pattern-search moves around ``params``, within the values' hard limits.

    Each searched value once up and once down by ``step`` (log units for log-scale
    values, ``step / 4`` of the range for the others), past the range random candidates
    come from if need be; for ALS also regularization and alpha together, since they
    trade off along a ridge; and each other weighting.
    """
    space = search_space(params.algorithm, options)
    out: list[FitParams] = []
    # BM25's constants only matter under BM25 weighting.
    names = [n for n in space if params.weighting == "bm25" or not n.startswith("bm25")]
    groups = [[n] for n in names]
    if params.algorithm == "als":
        groups.append(["regularization", "alpha"])
    for group in groups:
        for sign in (1.0, -1.0):
            moved = {n: _moved(space[n], float(getattr(params, n)), sign, step) for n in group}
            candidate = replace(params, **moved)
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
        self.explore = options.explorers
        self.rng = np.random.default_rng(options.seed)
        self.climbers: list[_Climber] | None = None
        self.turn = 0

    @property
    def converged(self) -> bool:
        """Every local search has converged (or none could start)."""
        return self.climbers is not None and all(c.done for c in self.climbers)

    def propose(self, trials: list[Trial]) -> tuple[FitParams, int] | None:
        """The next candidate and the family it belongs to; the base parameters come first.

        None when the search has converged and no trial count asks for more.
        """
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
        if self.converged and self.options.trials is None:
            return None
        # Exploring, or every climber has converged: a fresh random candidate.
        for _ in range(10):  # a repeat teaches nothing: draw again
            params = sample_params(self.rng, self.options)
            if params not in seen:
                break
        return params, number


def carve_folds(data: TrainingData, options: TuneOptions) -> list[Fold]:
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


def _describe_folds(folds: list[Fold], data: TrainingData, options: TuneOptions) -> dict[str, Any]:
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
    number: int, params: FitParams, family: int, folds: list[Fold], options: TuneOptions
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
    stderrs = {m: metrics.pop(m) for m in list(metrics) if m.endswith("_stderr")}
    # The folds' mean has the folds' mean standard error over sqrt(folds) (carves overlap
    # in users, so this is optimistic for more than one fold).
    stderr = stderrs.get(f"{options.metric}_stderr")
    if stderr is not None:
        stderr /= math.sqrt(len(folds))
    seconds = time.perf_counter() - start
    return Trial(
        number,
        params,
        metrics[options.metric],
        metrics,
        seconds,
        family,
        stderr=stderr,
        fold_scores=[p[options.metric] for p in per_fold],
    )


def _beyond(best: FitParams, options: TuneOptions) -> tuple[dict[str, float], list[str]]:
    """The best's values outside their draw range, and those at a hard limit."""
    widened: dict[str, float] = {}
    at_limit: list[str] = []
    for name, r in search_space(best.algorithm, options).items():
        if name.startswith("bm25") and best.weighting != "bm25":
            continue
        value = float(getattr(best, name))
        if not r.low <= value <= r.high:
            widened[name] = value
        low, high = r.limits
        if (value <= low or value >= high) and (low, high) != (r.low, r.high):
            at_limit.append(name)
    return widened, at_limit


def tune(
    data: TrainingData,
    options: TuneOptions,
    progress: bool = True,
    on_trial: Callable[[Trial, Trial], None] | None = None,
) -> TuneResult:
    """Search until converged (or ``options.trials``, or the time budget); the best wins.

    Args:
        data: the training data; a validation part is carved out of it.
        options: the search.
        progress: a progress bar over trials.
        on_trial: called with (trial, best so far) after each trial.

    Raises:
        DataError: nothing left to validate on, or every trial failed to fit.
    """
    start = time.perf_counter()
    folds = carve_folds(data, options)
    validation = _describe_folds(folds, data, options)
    # The data-scaled defaults are filled in once, so the search moves from concrete values.
    base = replace(options.base, seed=options.seed).resolved(data.user_items)
    options = replace(options, base=base)
    search = _Search(options)
    trials: list[Trial] = []
    best: Trial | None = None
    stopped_by = "trials"
    bar = tqdm(total=options.trials, desc="tune", disable=not progress)
    while options.trials is None or len(trials) < options.trials:
        elapsed = time.perf_counter() - start
        if trials and options.time_budget is not None and elapsed > options.time_budget:
            stopped_by = "time_budget"
            break
        proposal = search.propose(trials)
        if proposal is None:
            stopped_by = "converged"
            break
        params, family = proposal
        trial = _run_trial(len(trials), params, family, folds, options)
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
    if stopped_by == "time_budget":
        log.warning(
            "tune: the time budget (%.0fs) stopped the search after %d trials, before it "
            "converged: the result depends on this machine's speed",
            options.time_budget,
            len(trials),
        )
    widened, at_limit = _beyond(best.params, options)
    seconds = time.perf_counter() - start
    share = refit_share(validation["fit_pairs"], data.user_items.nnz)
    return TuneResult(best, trials, validation, seconds, stopped_by, widened, at_limit, share)
