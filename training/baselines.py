"""Baselines scored on the same split, under the same rules as the model.

- ``popularity``: the items most training users interacted with;
- ``itemknn``: implicit's item-item ``BM25Recommender`` (100 neighbours), a user's
  score for an item being the sum of its similarities to the user's training items;
- ``ease``: Steck's EASE (2019, "Embarrassingly Shallow Autoencoders"): item-item
  weights ``B = I - P diag(1 / diag(P))`` with ``P = (X^T X + lambda I)^-1`` over the
  binary user x item matrix X, a user's scores ``x_u B``; the diagonal of B is zero, so
  an item never recommends itself. Lambda is chosen by :func:`choose_ease_lambda`;
- ``random``: a uniformly random order (seeded).

Every baseline excludes the user's training items and ineligible items exactly as the
service does (``training.scoring.Eligibility``); popularity answers users without
training history, as the service's ``POPULAR`` source does, except for ``random``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsvc.errors import DataError
from training.data import TrainingData
from training.metrics import summarize
from training.scoring import Eligibility
from training.tune import TuneOptions, carve_folds, refit_share

__all__ = [
    "BASELINES",
    "EASE_DEFAULT_LAMBDA",
    "EASE_GRID",
    "EASE_MAX_ITEMS",
    "ITEMKNN_NEIGHBOURS",
    "EaseChoice",
    "check_ease_items",
    "choose_ease_lambda",
    "ease_weights",
    "rank_baseline",
]

log = logging.getLogger(__name__)

BASELINES = ("popularity", "itemknn", "ease", "random")
ITEMKNN_NEIGHBOURS = 100

EASE_MAX_ITEMS = 20_000
"""EASE inverts a dense items x items matrix: 3.2 GB of float64 at this many products."""
EASE_DEFAULT_LAMBDA = 500.0
"""Lambda when none was chosen (Steck's ML-20M value is 500, as is the common default)."""
EASE_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
"""Lambdas tried first: half-decade steps; a best at either end widens the grid, and
the midpoints around the best refine it."""
_EASE_WIDEN = 6  # half-decades added at most beyond the grid, on the side of the best


def _binary(user_items: sp.csr_matrix) -> sp.csr_matrix:
    return (user_items.tocsr() > 0).astype(np.float64)


def check_ease_items(n_items: int) -> None:
    """Refuse EASE over more than :data:`EASE_MAX_ITEMS` items, naming the count.

    Raises:
        DataError: too many items.
    """
    if n_items > EASE_MAX_ITEMS:
        raise DataError(
            f"baseline ease: {n_items:,} products is above the {EASE_MAX_ITEMS:,} it allows "
            f"(it inverts a dense {n_items:,} x {n_items:,} matrix, "
            f"{n_items**2 * 8 / 2**30:.1f} GiB); leave ease out of --baselines"
        )


def _gram(x: sp.csr_matrix) -> np.ndarray:
    check_ease_items(x.shape[1])
    return np.asarray((x.T @ x).toarray(), dtype=np.float64)


def _weights_from_gram(gram: np.ndarray, lam: float) -> np.ndarray:
    if not lam > 0:
        raise ValueError(f"baseline ease: lambda must be above 0, got {lam}")
    regularized = gram.copy()
    regularized[np.diag_indices_from(regularized)] += lam
    p = np.linalg.inv(regularized)
    # B = I - P diag(1/diag(P)): column j of P over -P_jj, and a zero diagonal (exactly,
    # not 1 - P_jj / P_jj up to rounding).
    b = p / -np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def ease_weights(user_items: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's dense ``(n_items, n_items)`` item-item weights, over the binary matrix.

    Raises:
        DataError: more than :data:`EASE_MAX_ITEMS` items.
        ValueError: lambda not above 0.
    """
    return _weights_from_gram(_gram(_binary(user_items)), lam)


def _ease_scores(x: sp.csr_matrix, b: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A user's scores ``x_u B`` over binary rows ``x``."""
    return lambda users: np.asarray(x[users] @ b, dtype=np.float64)


def _ease(user_items: sp.csr_matrix, lam: float) -> Callable[[np.ndarray], np.ndarray]:
    x = _binary(user_items)
    return _ease_scores(x, _weights_from_gram(_gram(x), lam))


@dataclass(frozen=True)
class EaseChoice:
    """The lambda EASE was given, and the validation figure of every lambda tried."""

    lam: float
    """What EASE is fit with on all the data: ``validated`` times ``share``."""
    by_lambda: dict[float, float]
    """Validation metric per lambda, ascending."""
    metric: str
    """What was maximised, e.g. ``ndcg@10``."""
    at_edge: bool = False
    """The best is still the smallest or largest lambda after widening."""
    validation: dict[str, Any] = field(default_factory=dict)
    validated: float | None = None
    """The best lambda on the carve (None: ``lam`` itself)."""
    share: float = 1.0
    """The share of the pairs the carve fitted on."""

    @property
    def _carves(self) -> str:
        folds = int(self.validation.get("folds", 1))
        return "a validation carve" if folds == 1 else f"{folds} validation carves (the mean)"

    def to_json(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "validated_lambda": self.lam if self.validated is None else self.validated,
            "refit_share": self.share,
            "chosen_by": f"{self.metric} on {self._carves} of the train part",
            "by_lambda": {f"{lam:g}": score for lam, score in sorted(self.by_lambda.items())},
            "at_edge": self.at_edge,
            "validation": self.validation,
        }


def _half_decade(lam: float, up: bool) -> float:
    """The next value of the 1, 3, 10, 30, ... ladder above or below ``lam``."""
    step = round(2 * math.log10(lam)) + (1 if up else -1)  # 3 is about half a decade
    return float(f"{3 if step % 2 else 1}e{step // 2}")


def choose_ease_lambda(
    data: TrainingData,
    seed: int = 0,
    grid: Sequence[float] = EASE_GRID,
    options: TuneOptions | None = None,
) -> EaseChoice:
    """The lambda with the best validation figure, the tuner's carves of ``data`` held out.

    The carves, their fraction and the metric are the tuner's (``training.tune``; default
    nDCG@10 on 25% of each user's pairs, the mean over three carves seeded ``seed``,
    ``seed + 1``, ``seed + 2``), so EASE is chosen on what the served model is tuned
    on. A best at either end of ``grid`` widens it by half-decades (at most six), so the
    choice is never an artefact of the range; then the geometric midpoints between the
    best and its two neighbours are tried as well. The lambda for the fit on all of
    ``data`` is the best one times the carves' share of the pairs, as the tuner scales an
    ALS winner (``training.tune.for_refit``).

    Raises:
        DataError: too many items, or too few pairs per user to carve a validation part.
    """
    options = replace(options or TuneOptions(), seed=seed)
    check_ease_items(data.user_items.shape[1])
    try:
        folds = carve_folds(data, options)
    except DataError as exc:
        raise DataError(f"baseline ease: {exc} (for lambda)") from exc
    k = options.k
    carves = []
    for fold in folds:
        x = _binary(fold.fit)
        carves.append((fold, x, _gram(x)))

    def validate(lam: float) -> float:
        scores = []
        for fold, x, gram in carves:
            b = _weights_from_gram(gram, lam)
            rows = fold.eligibility.rank(fold.users, k, _ease_scores(x, b))
            figures = summarize(
                rows, fold.relevant_users, fold.relevant_items, (k,), fold.item_users, x.shape[0]
            )
            scores.append(float(figures[options.metric][k]))
        return float(np.mean(scores))

    tried = {float(lam): validate(float(lam)) for lam in grid}
    for _ in range(_EASE_WIDEN):
        best = max(sorted(tried), key=tried.__getitem__)
        if best not in (min(tried), max(tried)):
            break
        lam = _half_decade(best, up=best == max(tried))
        tried[lam] = validate(lam)
    best = max(sorted(tried), key=tried.__getitem__)
    at_edge = best in (min(tried), max(tried))
    if not at_edge:
        # Half a decade is coarse (nDCG moves by 1-3% between steps on ML-100K): try the
        # geometric midpoints between the best and its two neighbours too.
        ladder = sorted(tried)
        i = ladder.index(best)
        for other in (ladder[i - 1], ladder[i + 1]):
            lam = float(f"{math.sqrt(best * other):.3g}")
            tried[lam] = validate(lam)
        best = max(sorted(tried), key=tried.__getitem__)
    if at_edge:
        log.warning("baseline ease: best lambda %g is still at the edge of %s", best, sorted(tried))
    fit_pairs = [int(f.fit.nnz) for f in folds]
    validation = {
        "fraction": options.validation_fraction,
        "folds": options.folds,
        "seed": seed,
        "fit_pairs": fit_pairs,
        "validation_pairs": [len(f.relevant_items) for f in folds],
        "validation_users": [len(f.users) for f in folds],
    }
    metric = f"{options.metric}@{k}"
    share = refit_share(fit_pairs, data.user_items.nnz)
    lam = float(f"{best * share:.4g}")
    return EaseChoice(lam, dict(sorted(tried.items())), metric, at_edge, validation, best, share)


def _itemknn(user_items: sp.csr_matrix) -> Callable[[np.ndarray], np.ndarray]:
    from implicit.nearest_neighbours import BM25Recommender

    model = BM25Recommender(K=ITEMKNN_NEIGHBOURS, num_threads=1)
    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        # implicit's BM25Recommender hands its own COO weighting to a CSR-only fit.
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        model.fit(user_items.astype(np.float32).tocsr(), show_progress=False)
    similarity = model.similarity.tocsr()

    def scores(users: np.ndarray) -> np.ndarray:
        return np.asarray((user_items[users] @ similarity).todense(), dtype=np.float64)

    return scores


def _random(n_items: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)

    def scores(users: np.ndarray) -> np.ndarray:
        return rng.random((len(users), n_items))

    return scores


def rank_baseline(
    name: str,
    eligibility: Eligibility,
    users: np.ndarray,
    k: int,
    seed: int = 0,
    ease_lambda: float = EASE_DEFAULT_LAMBDA,
) -> np.ndarray:
    """Top-k item rows per user (training user rows, -1 for unknown), -1 padded.

    Raises:
        ValueError: an unknown baseline name.
        DataError: ``ease`` over more than :data:`EASE_MAX_ITEMS` items.
    """
    if name == "popularity":
        return eligibility.rank(users, k, None)
    if name == "itemknn":
        return eligibility.rank(users, k, _itemknn(eligibility.history))
    if name == "ease":
        return eligibility.rank(users, k, _ease(eligibility.history, ease_lambda))
    if name == "random":
        return eligibility.rank(users, k, _random(eligibility.n_items, seed), cold_popular=False)
    raise ValueError(f"baselines: unknown baseline {name!r} (expected {', '.join(BASELINES)})")
