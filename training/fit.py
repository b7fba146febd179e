"""Fitting collaborative-filtering embeddings with implicit (ALS or BPR)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from recsvc.errors import DataError, FitError

__all__ = [
    "FitParams",
    "FittedModel",
    "apply_weighting",
    "check_converged",
    "fit_checked",
    "fit_model",
]

log = logging.getLogger(__name__)

_WEIGHTINGS = ("raw", "log", "bm25")
# The defaults' evidence is in docs/EVALUATION.md ("Defaults and the tuner").
_ALPHA_PER_ROOT_USER = 0.5  # ALS: alpha = 0.5 * sqrt(users)
_RIDGE_PER_LOG_FREQUENCY = 1.5  # ALS: regularization = alpha * 1.5 * ln(1 + pairs per item)
_BPR_REGULARIZATION = 0.05


@dataclass(frozen=True)
class FitParams:
    """Model hyper-parameters; ``fit --params FILE.json`` holds the same keys.

    Example:
        >>> FitParams(algorithm="bpr", factors=128, learning_rate=0.05)
    """

    algorithm: str = "als"
    """``als`` (implicit's AlternatingLeastSquares) or ``bpr``."""
    factors: int = 64
    iterations: int = 15
    regularization: float | None = None
    """None: scaled to the data when fitting. ALS: alpha * 1.5 * ln(1 + pairs per item),
    the ridge along which the two trade off rising with item frequency; BPR: 0.05."""
    alpha: float | None = None
    """ALS confidence scale: confidence = alpha * weighted strength. None: 0.5 *
    sqrt(users with interactions) (the unobserved pairs' relative weight, 1 / alpha,
    falling as users grow), or the given regularization over the ridge's ratio."""
    learning_rate: float = 0.05
    """BPR only."""
    weighting: str = "log"
    """How strengths are transformed before fitting: raw, log (log1p) or bm25."""
    bm25_k1: float = 100.0
    bm25_b: float = 0.8
    seed: int = 0
    threads: int = 0
    """Fitting threads (0: all cores). BPR is only bit-for-bit reproducible with 1."""
    item_index: str = "auto"
    user_index: str = "auto"
    exact_max: int = 20_000
    """Exact (flat) indexes up to this many vectors; HNSW above, unless set explicitly."""

    def __post_init__(self) -> None:
        if self.algorithm not in ("als", "bpr"):
            raise ValueError(f"algorithm must be als or bpr, not {self.algorithm!r}")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(_WEIGHTINGS)}")
        if self.factors < 1 or self.iterations < 1:
            raise ValueError("factors and iterations must be at least 1")
        regularization = 0.0 if self.regularization is None else self.regularization
        alpha = 1.0 if self.alpha is None else self.alpha
        if regularization < 0 or alpha <= 0 or self.learning_rate <= 0:
            raise ValueError("regularization must be >= 0; alpha and learning_rate > 0")

    def resolved(self, user_items: sp.csr_matrix) -> FitParams:
        """These parameters with the data-scaled defaults filled in for ``user_items``."""
        if self.regularization is not None and self.alpha is not None:
            return self
        x = user_items.tocsr()
        users = max(int(np.count_nonzero(np.diff(x.indptr))), 1)
        items = max(int(np.count_nonzero(np.bincount(x.indices, minlength=x.shape[1]))), 1)
        ridge = _RIDGE_PER_LOG_FREQUENCY * math.log1p(x.nnz / items)
        alpha = self.alpha
        if alpha is None:
            if self.algorithm == "als" and self.regularization is not None:
                alpha = self.regularization / ridge if self.regularization > 0 else 1.0
            else:  # for BPR alpha is unused: the ALS value keeps the params complete
                alpha = _ALPHA_PER_ROOT_USER * math.sqrt(users)
            alpha = max(round(alpha, 3), 1e-3)
        regularization = self.regularization
        if regularization is None:
            regularization = _BPR_REGULARIZATION if self.algorithm == "bpr" else alpha * ridge
            regularization = round(regularization, 3)
        return replace(self, regularization=regularization, alpha=alpha)

    @classmethod
    def from_json(cls, path: Path, **overrides: Any) -> FitParams:
        """Read a params file; explicit ``overrides`` (non-None) win."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"params {path}: cannot read JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise DataError(f"params {path}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"params {path}: unknown keys {', '.join(unknown)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FittedModel:
    params: FitParams
    user_factors: np.ndarray  # float32, users x dim
    item_factors: np.ndarray  # float32, items x dim
    confidence: sp.csr_matrix  # weighted strengths the model was fit on (before alpha)
    seconds: float


def apply_weighting(user_items: sp.csr_matrix, params: FitParams) -> sp.csr_matrix:
    """Transform strengths as ``params.weighting`` says; float32 CSR out."""
    x = user_items.astype(np.float32).tocsr()
    if params.weighting == "log":
        x.data = np.log1p(x.data)
    elif params.weighting == "bm25":
        from implicit.nearest_neighbours import bm25_weight

        x = bm25_weight(x, K1=params.bm25_k1, B=params.bm25_b).tocsr().astype(np.float32)
    return x


def fit_model(user_items: sp.csr_matrix, params: FitParams, progress: bool = True) -> FittedModel:
    """Fit implicit on ``user_items`` (users x items strengths).

    The model's ``params`` are ``params`` resolved for the data (no defaults left unset).
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    if user_items.nnz == 0:
        raise DataError("interactions: nothing to fit (no interactions left)")
    params = params.resolved(user_items)
    confidence = apply_weighting(user_items, params)
    start = time.perf_counter()
    model: Any
    # implicit's own kernels are parallel; a multi-threaded BLAS underneath only contends
    # (implicit checks this when a model is built, so the limit covers construction too).
    limits = threadpool_limits(1, "blas")
    if params.algorithm == "als":
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.seed,
            num_threads=params.threads,
            calculate_training_loss=False,
        )
    else:
        model = BayesianPersonalizedRanking(
            factors=params.factors,
            learning_rate=params.learning_rate,
            regularization=params.regularization,
            iterations=params.iterations,
            random_state=params.seed,
            num_threads=params.threads,
        )
    try:
        model.fit(confidence, show_progress=progress)
    finally:
        limits.restore_original_limits()
    seconds = time.perf_counter() - start
    log.info("fitted %s in %.2fs", params.algorithm, seconds)
    return FittedModel(
        params=params,
        user_factors=np.ascontiguousarray(model.user_factors, dtype=np.float32),
        item_factors=np.ascontiguousarray(model.item_factors, dtype=np.float32),
        confidence=confidence,
        seconds=seconds,
    )


# The parameters that steer each algorithm's updates, named when its fit diverges.
_STEERING = {
    "als": ("factors", "iterations", "regularization", "alpha", "weighting"),
    "bpr": ("factors", "iterations", "learning_rate", "regularization", "weighting"),
}


def fit_checked(user_items: sp.csr_matrix, params: FitParams, progress: bool = True) -> FittedModel:
    """``fit_model``, refusing a fit that diverged: only finite factors go on to publish.

    Raises:
        FitError: the fit raised, or left factors that are not finite
            (``check_converged``); the message names the algorithm and its parameters.
    """
    from implicit.recommender_base import ModelFitError

    params = params.resolved(user_items)  # the message names the values fitted with
    try:
        model = fit_model(user_items, params, progress)
    except (ModelFitError, FloatingPointError, np.linalg.LinAlgError) as exc:
        raise _diverged(params, str(exc)) from exc
    check_converged(model)
    return model


def check_converged(model: FittedModel) -> None:
    """Refuse factors that are not all finite.

    implicit itself raises on NaN factors only: infinite ones it returns, and they
    would reach the indexes (and every score) as they are.

    Raises:
        FitError: naming how many users' and items' vectors are not finite.
    """
    bad_users = int(np.count_nonzero(~np.isfinite(model.user_factors).all(axis=1)))
    bad_items = int(np.count_nonzero(~np.isfinite(model.item_factors).all(axis=1)))
    if bad_users or bad_items:
        why = f"non-finite factors for {bad_users:,} users and {bad_items:,} items"
        raise _diverged(model.params, why)


def _diverged(params: FitParams, why: str) -> FitError:
    """The error for a diverged fit: the algorithm, its steering parameters, a remedy."""
    named = ", ".join(f"{k}={_show(getattr(params, k))}" for k in _STEERING[params.algorithm])
    if params.algorithm == "bpr":
        remedy = "a smaller learning_rate or a larger regularization"
    else:
        remedy = "a smaller alpha or a larger regularization"
        remedy += " or log weighting" if params.weighting == "raw" else ""
    return FitError(
        f"the {params.algorithm} fit diverged ({why}) with {named}: try {remedy}; "
        "nothing was published"
    )


def _show(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
