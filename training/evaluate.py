"""Offline evaluation through the serving path: split, train, rank as served, measure.

The model is trained on the train part by the project's own trainer, published as a
bundle, loaded by ``recsvc.model.bundle.load_bundle`` and asked through
``recsvc.model.ranking.Recommender.recommend``, the code behind the ``Recommend`` RPC: the
rules, the exclusion of training items and the FAISS index all apply, so the offline
figure is the online one. ``rank_endpoint`` asks a running server over gRPC instead;
for the same bundle the two must agree. Baselines are ranked on the same split under
the same rules (``training.baselines``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from recsvc.errors import BundleError, DataError, InvalidArgument, RecsvcError
from recsvc.model.bundle import Bundle, load_bundle, read_latest
from recsvc.model.manifest import MANIFEST
from recsvc.model.queries import MAX_K, RecommendQuery
from recsvc.model.ranking import Recommender
from training.baselines import BASELINES, check_ease_items, choose_ease_lambda, rank_baseline
from training.data import DataConfig, TrainingData, load_training_data
from training.fit import FitParams, fit_checked
from training.metrics import suitability_violations, summarize
from training.publish import publish
from training.scoring import Eligibility
from training.splits import Split, write_split

__all__ = [
    "ENDPOINT_WINDOW",
    "EvalOptions",
    "Holdout",
    "Lists",
    "Result",
    "agreement",
    "evaluate",
    "holdout",
    "rank_endpoint",
    "rank_in_process",
    "resolve_bundle",
    "score",
]

log = logging.getLogger(__name__)

ENDPOINT_WINDOW = 32
"""Recommend RPCs kept in flight at once against an endpoint."""


@dataclass(frozen=True)
class EvalOptions:
    """What ``evaluate`` runs besides the model.

    Example:
        >>> EvalOptions(ks=(5, 10), baselines=("popularity",), endpoint="localhost:50051")
    """

    ks: tuple[int, ...] = (10,)
    baselines: tuple[str, ...] = BASELINES
    seed: int = 0
    """Seeds the random baseline and EASE's validation carve (the split and the model
    have their own)."""
    endpoint: str | None = None
    """host:port of a server serving the evaluated bundle; its figure is checked against ours."""
    progress: bool = True


@dataclass
class Holdout:
    """The users to ask and their relevant items, in the training data's numbering."""

    user_ids: list[str]
    user_rows: np.ndarray  # training user row, -1 for a user unknown to training
    relevant_users: np.ndarray  # position in user_ids of each relevant pair
    relevant_items: np.ndarray  # catalogue row of each relevant pair
    dropped_unknown_items: int  # test pairs naming an item outside the catalogue


@dataclass
class Lists:
    """Ranked lists for every test user: catalogue rows, -1 padded, and how they were made."""

    rows: np.ndarray
    seconds: float
    sources: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # users whose request was refused (an id the API rejects)
    ids: list[list[str]] | None = None  # as returned, for agreement checks


@dataclass
class Result:
    """One recommender's figures on the test set."""

    name: str
    metrics: dict[str, dict[int, float]]
    violations: dict[str, int]
    seconds: float
    sources: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    params: dict[str, Any] | None = None
    """How a baseline was configured, where it chose something (EASE's lambda)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "metrics": {
                m: {str(k): v for k, v in by_k.items()} for m, by_k in self.metrics.items()
            },
            "violations": self.violations,
            "seconds": round(self.seconds, 3),
            "sources": self.sources,
            "request_errors": self.errors,
        }


def holdout(test: pa.Table, data: TrainingData) -> Holdout:
    """Map the split's relevant pairs onto the training data's users and catalogue."""
    items = data.items.indices_arrow(test.column("item_id"))
    known = items >= 0
    users = test.column("user_id").cast(pa.string()).combine_chunks()
    unique = pc.unique(users).sort()
    positions = np.asarray(pc.index_in(users, value_set=unique).to_numpy(zero_copy_only=False))
    return Holdout(
        user_ids=unique.to_pylist(),
        user_rows=data.users.indices_arrow(unique),
        relevant_users=positions[known].astype(np.int64),
        relevant_items=items[known],
        dropped_unknown_items=int((~known).sum()),
    )


def resolve_bundle(path: Path) -> Path:
    """A bundle folder, or the one a models folder's LATEST names."""
    if (path / MANIFEST).is_file():
        return path
    version = read_latest(path)
    if version is None:
        raise BundleError(f"{path}: neither a bundle (no {MANIFEST}) nor a models folder")
    return path / version


def _rows(ids: Sequence[str], data: TrainingData, k: int) -> np.ndarray:
    out = np.full(k, -1, dtype=np.int64)
    found = data.items.indices(ids[:k])
    out[: len(found)] = found
    return out


def rank_in_process(
    recommender: Recommender, test: Holdout, data: TrainingData, k: int, progress: bool = True
) -> Lists:
    """Ask ``recommender.recommend`` for every test user, as the Recommend RPC does."""
    start = time.perf_counter()
    rows = np.full((len(test.user_ids), k), -1, dtype=np.int64)
    ids: list[list[str]] = []
    sources: Counter[str] = Counter()
    errors = 0
    for i, user in enumerate(tqdm(test.user_ids, desc="in-process", disable=not progress)):
        try:
            ranked = recommender.recommend(RecommendQuery(user_id=user, k=k))
        except InvalidArgument:
            errors += 1
            ids.append([])
            continue
        got = [item.item_id for item in ranked.items]
        ids.append(got)
        rows[i] = _rows(got, data, k)
        sources[ranked.source.name] += 1
    return Lists(rows, time.perf_counter() - start, dict(sources), errors, ids)


def _rpc_failure(endpoint: str, exc: Any) -> RecsvcError:
    """The error for a call to ``endpoint`` that failed with ``exc`` (a ``grpc.RpcError``)."""
    return RecsvcError(f"endpoint {endpoint}: {exc.code().name} ({exc.details()})")


def rank_endpoint(
    endpoint: str,
    test: Holdout,
    data: TrainingData,
    k: int,
    expect_version: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Lists:
    """Ask a running server's ``Recommend`` RPC for every test user.

    Raises:
        RecsvcError: the endpoint cannot be reached, or serves another version than
            ``expect_version``.
    """
    import grpc

    from recsvc.v1 import recommender_pb2 as pb
    from recsvc.v1 import recommender_pb2_grpc as pb_grpc

    start = time.perf_counter()
    rows = np.full((len(test.user_ids), k), -1, dtype=np.int64)
    ids: list[list[str]] = [[] for _ in test.user_ids]
    sources: Counter[str] = Counter()
    errors = 0
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
        try:
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _rpc_failure(endpoint, exc) from exc
        if expect_version is not None and info.version != expect_version:
            raise RecsvcError(
                f"endpoint {endpoint}: serves model {info.version}, not the evaluated "
                f"bundle {expect_version}"
            )
        pending: list[tuple[int, Any]] = []

        def drain(until: int) -> None:
            nonlocal errors
            while len(pending) > until:
                i, future = pending.pop(0)
                try:
                    reply = future.result()
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        raise _rpc_failure(endpoint, exc) from exc
                    errors += 1
                    continue
                if reply.model_version != info.version:
                    raise RecsvcError(
                        f"endpoint {endpoint}: model changed from {info.version} to "
                        f"{reply.model_version} during the evaluation"
                    )
                got = [item.item_id for item in reply.items]
                ids[i] = got
                rows[i] = _rows(got, data, k)
                sources[pb.Source.Name(reply.source)] += 1

        for i, user in enumerate(tqdm(test.user_ids, desc="endpoint", disable=not progress)):
            request = pb.RecommendRequest(user_id=user, k=k)
            pending.append((i, stub.Recommend.future(request, timeout=timeout)))
            drain(ENDPOINT_WINDOW)
        drain(0)
    return Lists(rows, time.perf_counter() - start, dict(sources), errors, ids)


def _reference_rules(data: TrainingData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item risk, item active and user tolerance, read straight from the tables.

    Deliberately not ``recsvc.model.rules``: the violation counts check that code, so they
    restate the data contract's null semantics (risk 5, tolerance 1, inactive) here.
    """
    n_items, n_users = len(data.items), len(data.users)
    risk = np.zeros(n_items, dtype=np.int64)
    if data.has_risk_levels:
        col = data.item_table.column("risk_level").cast(pa.int64()).fill_null(5)
        risk = np.asarray(col.to_numpy(), dtype=np.int64)
    active = np.ones(n_items, dtype=bool)
    if "active" in data.item_table.column_names:
        col = data.item_table.column("active").fill_null(False)
        active = np.asarray(col.to_numpy(zero_copy_only=False), dtype=bool)
    tolerance = np.ones(n_users, dtype=np.int64)
    if "risk_tolerance" in data.user_table.column_names:
        col = data.user_table.column("risk_tolerance").cast(pa.int64()).fill_null(1)
        tolerance = np.asarray(col.to_numpy(), dtype=np.int64)
    return risk, active, tolerance


def score(name: str, lists: Lists, test: Holdout, data: TrainingData, ks: Sequence[int]) -> Result:
    """Every metric at every k, and the rule violations, for one recommender's lists."""
    item_users = np.bincount(data.user_items.indices, minlength=len(data.items))
    metrics = summarize(
        lists.rows, test.relevant_users, test.relevant_items, ks, item_users, len(data.users)
    )
    violations = _violations(lists, test, data)
    return Result(name, metrics, violations, lists.seconds, lists.sources, lists.errors)


def _violations(lists: Lists, test: Holdout, data: TrainingData) -> dict[str, int]:
    """Listed items a user may not be shown: unsuitable, inactive, or held in training."""
    risk, active, tolerance = _reference_rules(data)
    known = test.user_rows >= 0
    user_tol = np.ones(len(test.user_ids), dtype=np.int64)
    user_tol[known] = tolerance[test.user_rows[known]]
    filled = lists.rows >= 0
    return {
        "suitability": suitability_violations(lists.rows, risk, user_tol),
        "inactive": int((filled & ~active[np.where(filled, lists.rows, 0)]).sum()),
        "seen_in_training": _seen_in_training(lists.rows, test.user_rows, data),
    }


def _seen_in_training(rows: np.ndarray, user_rows: np.ndarray, data: TrainingData) -> int:
    """Listed items the user already has in the training data (unknown users have none)."""
    history = data.user_items.tocsr()
    n_items = len(data.items)
    owner = np.repeat(np.arange(history.shape[0], dtype=np.int64), np.diff(history.indptr))
    user_of_slot = user_rows[:, None]  # -1 for a user unknown to training
    slot_keys = np.where((rows >= 0) & (user_of_slot >= 0), user_of_slot * n_items + rows, -1)
    return int(np.isin(slot_keys, owner * n_items + history.indices).sum())


def agreement(a: Lists, b: Lists, ra: Result, rb: Result) -> dict[str, Any]:
    """Whether two runs returned the same lists and the same figures."""
    assert a.ids is not None and b.ids is not None
    differing = sum(x != y for x, y in zip(a.ids, b.ids, strict=True))
    gaps = [abs(ra.metrics[m][k] - rb.metrics[m][k]) for m in ra.metrics for k in ra.metrics[m]]
    return {
        "users_compared": len(a.ids),
        "users_with_different_lists": differing,
        "max_metric_difference": max(gaps, default=0.0),
        "agree": differing == 0 and max(gaps, default=0.0) == 0.0,
    }


def _checked_ks(options: EvalOptions, bundle: Path | None) -> tuple[int, ...]:
    """The ks, sorted; refuses one out of range, and an endpoint without its bundle."""
    ks = tuple(sorted(set(options.ks)))
    if not ks or ks[0] < 1 or ks[-1] > MAX_K:
        raise DataError(f"k: each k must be between 1 and {MAX_K}, got {list(options.ks)}")
    if options.endpoint and bundle is None:
        raise DataError(
            "--endpoint needs --bundle: the bundle the server serves, so its figure can be "
            "checked against the split and against the in-process one"
        )
    return ks


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time as ``seconds[name]``."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _write_split_once(split: Split, folder: Path) -> Path:
    """Write the split to ``folder``, unless it was replayed from there; returns ``folder``."""
    replayed = split.meta.get("replayed_from")
    if replayed is None or Path(replayed).resolve() != folder.resolve():
        write_split(split, folder)
    return folder


def _train(
    data: TrainingData, params: FitParams, models: Path, progress: bool, seconds: dict[str, float]
) -> Path:
    """Fit on the train part and publish the bundle under ``models``; returns its folder."""
    with _timed(seconds, "fit"):
        model = fit_checked(data.user_items, params, progress=progress)
    with _timed(seconds, "publish"):
        folder = publish(models, data, model, evaluation=True)
    return folder


def _load_trained_on(folder: Path, data: TrainingData) -> Bundle:
    """Load the bundle in ``folder``, refusing one trained on other data than ``data``."""
    loaded = load_bundle(folder)
    if loaded.manifest.data_fingerprint != data.fingerprint():
        raise BundleError(f"{folder}: {_other_data(loaded, data)}")
    return loaded


def _other_data(loaded: Bundle, data: TrainingData) -> str:
    """Why a bundle's data fingerprint differs: other tables given, else other interactions."""
    rules, counts = loaded.manifest.rules, loaded.manifest.counts
    if (counts.users, counts.items) == (len(data.users), len(data.items)):
        return (
            "was not trained on this split's train part (data fingerprint differs); "
            "evaluating it would count training items as hits"
        )
    missing = []
    if rules.users_table and not data.has_users_table:
        missing.append("--users")
    if (rules.risk_levels or rules.active_flag) and not (data.has_risk_levels or data.has_active):
        missing.append("--items")
    hint = " and ".join(missing) if missing else "the --items and --users it was trained with"
    return (
        f"trained on {counts.users:,} customers x {counts.items:,} products, but this run "
        f"reads {len(data.users):,} x {len(data.items):,}: give {hint}"
    )


def _score_baselines(
    test: Holdout,
    data: TrainingData,
    ks: tuple[int, ...],
    options: EvalOptions,
    stage: Callable[[str], None],
) -> list[Result]:
    """Rank and score every baseline of ``options`` on the same split, under the same rules.

    EASE's lambda is chosen first on the tuner's validation carve of the train part
    (seeded ``options.seed``), never on the test part.
    """
    eligibility = Eligibility.from_data(data)
    results = []
    for name in options.baselines:
        stage(f"baseline {name}")
        start = time.perf_counter()
        params: dict[str, Any] | None = None
        if name == "ease":
            choice = choose_ease_lambda(data, seed=options.seed)
            params = choice.to_json()
            stage(f"baseline ease: lambda {choice.lam:g} ({choice.metric} on validation)")
            rows = rank_baseline(name, eligibility, test.user_rows, ks[-1], ease_lambda=choice.lam)
        else:
            rows = rank_baseline(name, eligibility, test.user_rows, ks[-1], options.seed)
        result = score(name, Lists(rows, time.perf_counter() - start), test, data, ks)
        result.params = params
        results.append(result)
    return results


def _describe_bundle(folder: Path, loaded: Bundle) -> dict[str, Any]:
    """The report's ``bundle`` section: where it is, its version, how it was trained."""
    return {
        "path": str(folder),
        "version": loaded.version,
        "algorithm": loaded.manifest.algorithm,
        "params": dict(loaded.manifest.params),
    }


def _describe_data(data: TrainingData, test: Holdout) -> dict[str, Any]:
    """The report's ``data`` section: the sizes of both parts and what was dropped."""
    return {
        "train_users": len(data.users),
        "items": len(data.items),
        "train_pairs": int(data.user_items.nnz),
        "test_users": len(test.user_ids),
        # Users left with no relevant pair (all theirs named unknown items) are not averaged.
        "evaluated_users": int(np.unique(test.relevant_users).size),
        "test_users_unknown_to_training": int((test.user_rows < 0).sum()),
        "test_pairs": len(test.relevant_items),
        "test_pairs_dropped_unknown_item": test.dropped_unknown_items,
        "report": data.report.as_dict(),
    }


def evaluate(
    split: Split,
    report: Path,
    params: FitParams,
    options: EvalOptions,
    items: str | Path | None = None,
    users: str | Path | None = None,
    data_config: DataConfig | None = None,
    bundle: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one evaluation; returns the report (see ``training.report``).

    The split is written to ``report/split``, the trained bundle to ``report/models``
    (unless ``bundle`` names an existing one, which must have been trained on this
    split's train part).

    Raises:
        DataError, BundleError, RecsvcError: bad input, a bundle trained on other
            data, an endpoint that serves another model or disagrees.
    """
    ks = _checked_ks(options, bundle)
    stage = on_stage or (lambda _msg: None)
    seconds: dict[str, float] = {}
    split_dir = _write_split_once(split, report / "split")
    stage(f"split {split.meta.get('spec')}: {split.meta}")
    with _timed(seconds, "load"):
        data = load_training_data(split_dir / "train.parquet", items, users, data_config)
    test = holdout(split.test, data)
    if "ease" in options.baselines:
        check_ease_items(len(data.items))  # before training, not after
    if bundle is None:
        stage(f"fitting {params.algorithm} on {data.user_items.nnz:,} training pairs")
        folder = _train(data, params, report / "models", options.progress, seconds)
    else:
        folder = resolve_bundle(bundle)
    loaded = _load_trained_on(folder, data)
    stage(f"ranking {len(test.user_ids):,} test users with bundle {loaded.version}")
    lists = rank_in_process(Recommender(loaded), test, data, ks[-1], options.progress)
    results = [score("model", lists, test, data, ks)]
    checks: dict[str, Any] | None = None
    if options.endpoint:
        stage(f"asking {options.endpoint}")
        remote = rank_endpoint(
            options.endpoint, test, data, ks[-1], loaded.version, progress=options.progress
        )
        results.append(score("model@endpoint", remote, test, data, ks))
        checks = agreement(lists, remote, results[0], results[-1])
    results += _score_baselines(test, data, ks, options, stage)
    return {
        "ks": list(ks),
        "split": split.meta,
        "bundle": _describe_bundle(folder, loaded),
        "data": _describe_data(data, test),
        "results": [r.to_json() for r in results],
        "endpoint_agreement": checks,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
