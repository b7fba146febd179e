"""``recsvc-train``: sample data, fit and publish, tune, offline audiences, MovieLens import."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from recsvc.commands import run_main
from recsvc.errors import RecsvcError
from recsvc.logs import Pseudonymizer
from recsvc.state import StateStore, open_store
from training.data import DataConfig, TrainingData, load_training_data
from training.fit import FitParams, fit_checked
from training.publish import publish
from training.sample import SampleSpec, write_sample
from training.state import (
    FoldedState,
    complete_erasure,
    live_overlay,
    pseudonymizer_from_env,
    read_state,
)
from training.tune import DEFAULT_EXPLORE, DEFAULT_TIME_BUDGET, TuneOptions

__all__ = ["main", "progress_bars"]

log = logging.getLogger("recsvc.train")


def progress_bars(quiet: bool) -> bool:
    """Progress bars only on a terminal: in a log file their carriage returns garble it."""
    return not quiet and sys.stderr.isatty()


def _stage(args: argparse.Namespace, message: str) -> None:
    """One plain progress line on stderr (a terminal shows the bars too), unless ``-q``."""
    if not args.quiet:
        print(f"recsvc-train: {message}", file=sys.stderr, flush=True)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interactions", required=True, help="Parquet file, folder, glob or URI")
    p.add_argument("--items", help="items Parquet (category, risk_level, active, ...)")
    p.add_argument("--users", help="users Parquet (risk_tolerance, marketing_consent, ...)")
    p.add_argument("--half-life-days", type=float, help="time decay of event strength")
    p.add_argument(
        "--event-weights",
        type=json.loads,
        help='JSON object of event strengths, e.g. \'{"view": 1, "purchase": 10}\'',
    )
    p.add_argument(
        "--held-events",
        default="purchase,hold",
        help="comma-separated events that mean the customer holds the product",
    )


def add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=Path, help="JSON file of FitParams (e.g. from tune)")
    p.add_argument("--algorithm", choices=["als", "bpr"])
    p.add_argument("--factors", type=int)
    p.add_argument("--iterations", type=int)
    p.add_argument("--regularization", type=float)
    p.add_argument("--alpha", type=float)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--weighting", choices=["raw", "log", "bm25"])
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--item-index", choices=["auto", "flat", "hnsw", "ivf"])
    p.add_argument("--user-index", choices=["auto", "flat", "hnsw", "ivf"])
    p.add_argument("--exact-max", type=int)


_FIT_KEYS = [
    "algorithm",
    "factors",
    "iterations",
    "regularization",
    "alpha",
    "learning_rate",
    "weighting",
    "seed",
    "threads",
    "item_index",
    "user_index",
    "exact_max",
]


def fit_params_from_args(args: argparse.Namespace) -> FitParams:
    overrides = {k: getattr(args, k) for k in _FIT_KEYS}
    if args.params is not None:
        return FitParams.from_json(args.params, **overrides)
    return FitParams(**{k: v for k, v in overrides.items() if v is not None})


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    config = DataConfig(
        half_life_days=args.half_life_days,
        held_events=frozenset(e.strip() for e in args.held_events.split(",") if e.strip()),
    )
    if args.event_weights is not None:
        if not isinstance(args.event_weights, dict):
            raise RecsvcError("--event-weights must be a JSON object")
        config = DataConfig(
            event_weights={str(k): float(v) for k, v in args.event_weights.items()},
            held_events=config.held_events,
            half_life_days=config.half_life_days,
        )
    return config


def _cmd_sample(args: argparse.Namespace) -> int:
    spec = SampleSpec(users=args.users, items=args.items, seed=args.seed)
    _stage(args, f"writing {spec.users:,} customers and {spec.items:,} products to {args.out}")
    counts = write_sample(Path(args.out), spec, progress=progress_bars(args.quiet))
    print(
        f"wrote {counts['interactions']:,} interactions, {counts['users']:,} users, "
        f"{counts['items']:,} items to {args.out}"
    )
    return 0


@contextlib.contextmanager
def _state_store(url: str) -> Iterator[tuple[StateStore, Pseudonymizer]]:
    """The store ``--state`` names, with the servers' pseudonyms (the key is checked first)."""
    pseudonymize = pseudonymizer_from_env(os.environ)
    with open_store(url, pseudonymize) as store:
        yield store, pseudonymize


def _cmd_fit(args: argparse.Namespace) -> int:
    if args.state is None:
        _fit(args, None)
        return 0
    # The store is opened twice rather than held open through a fit of many minutes.
    with _state_store(args.state) as (store, pseudonymize):
        state = read_state(store, pseudonymize)
    folder, data = _fit(args, state)
    with _state_store(args.state) as (store, _):
        erasure = complete_erasure(store, Path(args.models), folder.name, state)
    report = data.report
    print(
        f"  state: {report.state_events:,} events folded in, up to sequence {state.sequence}; "
        f"product updates ignored (not in the catalogue): {report.unknown_products}"
    )
    print(
        f"  erasure: {report.forgotten_customers} forgotten customers in the inputs, "
        f"{report.forgotten_rows:,} of their log rows dropped (the source logs still "
        "hold them: purging those is the bank's)"
    )
    deleted = ", ".join(erasure.versions_deleted) or "none"
    print(
        f"  deleted older versions holding a forgotten customer: {deleted}; "
        f"erasure receipts completed: {erasure.receipts_completed}"
    )
    return 0


def _fit(args: argparse.Namespace, state: FoldedState | None) -> tuple[Path, TrainingData]:
    """Load, fit and publish; print the summary. Returns the bundle folder and the data."""
    params = fit_params_from_args(args)
    t0 = time.perf_counter()
    _stage(args, f"loading {args.interactions}")
    data = load_training_data(
        args.interactions, args.items, args.users, data_config_from_args(args), state
    )
    t_load = time.perf_counter() - t0
    _stage(
        args,
        f"fitting {params.algorithm} ({params.factors} factors, {params.iterations} iterations) "
        f"on {data.user_items.nnz:,} pairs",
    )
    model = fit_checked(data.user_items, params, progress=progress_bars(args.quiet))
    t1 = time.perf_counter()
    _stage(args, f"building indexes and publishing to {args.models}")
    folder = publish(Path(args.models), data, model, keep=args.keep)
    t_publish = time.perf_counter() - t1
    report = data.report
    print(f"published {folder.name} to {args.models}")
    print(
        f"  {params.algorithm} factors={params.factors} iterations={params.iterations} "
        f"weighting={params.weighting} seed={params.seed}"
    )
    print(
        f"  {len(data.users):,} users x {len(data.items):,} items, "
        f"{data.user_items.nnz:,} pairs from {report.rows_read:,} rows"
    )
    print(
        f"  dropped: {report.null_ids} null ids, {report.unknown_items} unknown items; "
        f"merged {report.duplicates_merged:,} duplicate pairs; "
        f"{report.unknown_events} unknown events"
    )
    if data.has_users_table:
        print(
            f"  customers missing from the users table: {report.missing_customers:,} "
            "(kept, with risk tolerance 1 and no marketing consent)"
        )
    print(f"  load {t_load:.2f}s, fit {model.seconds:.2f}s, index+publish {t_publish:.2f}s")
    return folder, data


def _cmd_audience(args: argparse.Namespace) -> int:
    from recsvc.audience_file import shortfall
    from recsvc.model.contact import load_policy
    from recsvc.model.queries import TargetQuery
    from training.export import export_all_items, export_audience, open_targeter

    policy = load_policy(Path(args.contact_policy) if args.contact_policy else None)
    targeter = open_targeter(Path(args.models), args.no_consent_data, policy)
    overlay = None
    if args.state is not None:
        with _state_store(args.state) as (store, pseudonymize):
            overlay = live_overlay(targeter.bundle, store, pseudonymize)
    model = f"model {targeter.bundle.version}" + (
        f", state sequence {overlay.sequence}" if overlay is not None else ""
    )
    out = Path(args.out)
    bars = progress_bars(args.quiet)
    if args.all_items:
        _stage(args, f"the top {args.size:,} customers of every active product, to {out}/")
        rows = export_all_items(targeter, args.size, out, args.include_holders, bars, overlay)
        print(f"wrote {rows:,} rows for every active product to {out}/ ({model})")
        return 0
    if not args.item:
        raise RecsvcError("give --item (repeatable) or --all-items")
    query = TargetQuery(
        item_ids=tuple(args.item),
        audience_size=args.size,
        min_score=args.min_score,
        include_holders=args.include_holders,
    )
    audience, sidecar = export_audience(
        targeter, query, out, bars, overlay, channel=args.channel or ""
    )
    print(f"wrote {len(audience.rows):,} customers to {out} ({model}); sidecar {sidecar}")
    short = shortfall(query.audience_size, len(audience.rows), audience.eligible, audience.excluded)
    if short:
        print(short)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from training.tune import tune

    base = fit_params_from_args(args)
    options = TuneOptions(
        trials=args.trials,
        time_budget=args.time_budget if args.time_budget > 0 else None,
        seed=args.seed if args.seed is not None else 0,
        explore=args.explore,
        validation_fraction=args.validation_fraction,
        folds=args.folds,
        metric=args.metric,
        k=args.k,
        algorithms=tuple(a.strip() for a in args.algorithms.split(",") if a.strip()),
        weightings=tuple(w.strip() for w in args.weightings.split(",") if w.strip()),
        base=base,
    )
    data = load_training_data(
        args.interactions, args.items, args.users, data_config_from_args(args)
    )
    until = f"{options.trials} trials" if options.trials else "converged"
    budget = f", at most {options.time_budget:.0f}s" if options.time_budget is not None else ""
    _stage(args, f"searching on {data.user_items.nnz:,} pairs until {until}{budget}")
    result = tune(data, options, progress=progress_bars(args.quiet))
    # The winner is refit later on all the training data: its values for that fit, and
    # the caller's seed, not a trial's.
    best = replace(result.refit, seed=base.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(best.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log_path = out.with_name(out.stem + ".tune.json")
    log_path.write_text(
        json.dumps({"interactions": str(args.interactions), **result.to_json()}, indent=2),
        encoding="utf-8",
    )
    spread = result.spread
    sure = ""
    if spread["stderr"] is not None:
        users = sum(result.validation["validation_users"])
        sure = (
            f" ± {spread['stderr']:.4f} (standard error over {users:,} validation users; "
            f"{spread['trials_within_stderr']} trials within it)"
        )
    print(
        f"{len(result.trials)} trials in {result.seconds:.1f}s (stopped by {result.stopped_by}); "
        f"best validation {options.metric}@{options.k} = {result.best.score:.4f}{sure}"
    )
    if result.stopped_by == "time_budget":
        print(
            "  not converged: the time budget stopped the search, so a faster or slower "
            "machine may return other parameters (raise --time-budget)"
        )
    if result.widened:
        values = ", ".join(f"{k}={v:.4g}" for k, v in result.widened.items())
        print(f"  beyond the initial ranges (widened): {values}")
    if result.at_limit:
        print(f"  at the search's hard limit: {', '.join(result.at_limit)}")
    ranked = sorted(result.trials, key=lambda t: -t.score)[:5]
    for t in ranked:
        p = t.params
        print(
            f"  #{t.number:<3} {t.score:.4f}  {p.algorithm} factors={p.factors} "
            f"iterations={p.iterations} regularization={p.regularization:.4g} alpha={p.alpha:.4g} "
            f"weighting={p.weighting}"
        )
    if best.alpha != result.best.params.alpha:
        print(
            f"  for the fit on all {data.user_items.nnz:,} pairs (the carve fitted on "
            f"{result.share:.0%}): regularization={best.regularization:.4g} alpha={best.alpha:.4g}"
        )
    print(f"wrote {out} (trials: {log_path})")
    return 0


def _cmd_import_movielens(args: argparse.Namespace) -> int:
    from training.movielens import import_movielens

    counts = import_movielens(Path(args.path), Path(args.out), weight=args.weight)
    print(
        f"wrote {counts['interactions']:,} interactions, {counts['users']:,} users, "
        f"{counts['items']:,} items to {args.out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc-train", description=__doc__)
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress (bars show on a terminal only)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write a synthetic retail bank as Parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=SampleSpec.users)
    p.add_argument("--items", type=int, default=SampleSpec.items)
    p.add_argument("--seed", type=int, default=SampleSpec.seed)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("fit", help="fit embeddings, build indexes, publish a bundle")
    add_data_args(p)
    add_fit_args(p)
    p.add_argument("--models", required=True, help="bundle folder (DIR/<version>/, DIR/LATEST)")
    p.add_argument("--keep", type=int, default=5, help="versions to keep")
    p.add_argument(
        "--state",
        metavar="URL",
        help="fold in the live state store (sqlite:///PATH, postgresql://...): its events, "
        "updates and erasures; older versions holding a forgotten customer are deleted. "
        "Needs RECSVC_PSEUDONYM_KEY",
    )
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("audience", help="campaign audience from the latest bundle, offline")
    p.add_argument("--models", required=True)
    p.add_argument("--item", action="append", help="product (repeatable: one campaign)")
    p.add_argument("--all-items", action="store_true", help="top-N for every product, partitioned")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--min-score", type=float)
    p.add_argument("--include-holders", action="store_true")
    p.add_argument(
        "--no-consent-data",
        action="store_true",
        help="data without a users table carries no consent requirement",
    )
    p.add_argument(
        "--state",
        metavar="URL",
        help="answer through the live state store's changes since the bundle, as servers "
        "do (consent, tolerance, products, new customers, erasures). Needs RECSVC_PSEUDONYM_KEY",
    )
    p.add_argument(
        "--contact-policy",
        metavar="FILE",
        help="contact policy (JSON), as the server's; absent, "
        "its defaults. Contacts and declines come from --state",
    )
    p.add_argument("--channel", help="the campaign's channel, for its contact cap (with --item)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_audience)

    p = sub.add_parser(
        "tune",
        help="search fit parameters on a validation part carved out of the training data",
        description="Give it training data only (e.g. a split's train.parquet): the "
        "validation part is carved out of it, so the test part is never seen.",
    )
    add_data_args(p)
    add_fit_args(p)
    p.add_argument("--out", required=True, help="best FitParams JSON, for fit --params")
    p.add_argument(
        "--trials",
        type=int,
        help="at most this many trials (default: until the search has converged)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULT_TIME_BUDGET,
        help="seconds; no trial starts after it (default %(default)s; 0: no limit)",
    )
    p.add_argument(
        "--explore",
        type=int,
        help=f"random candidates before local search (default {DEFAULT_EXPLORE}, "
        "or 30%% of --trials)",
    )
    p.add_argument("--validation-fraction", type=float, default=0.25)
    p.add_argument(
        "--folds", type=int, default=TuneOptions().folds, help="validation carves to average over"
    )
    p.add_argument("--metric", default="ndcg", help="metric to maximize (see recsvc-eval)")
    p.add_argument("-k", type=int, default=10, help="its cut-off")
    p.add_argument("--algorithms", default="als,bpr", help="comma-separated: als, bpr")
    p.add_argument("--weightings", default="raw,log,bm25", help="comma-separated: raw, log, bm25")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser(
        "import-movielens",
        help="MovieLens-100K (u.data, u.item, u.user) to interactions/items/users Parquet",
    )
    p.add_argument("path", help="folder holding u.data, u.item, u.user")
    p.add_argument("--out", required=True, help="output folder (never inside the repository)")
    p.add_argument(
        "--weight",
        choices=["rating", "none"],
        default="rating",
        help="carry each rating as the interaction weight (default) or count 1 per rating",
    )
    p.set_defaults(func=_cmd_import_movielens)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), lambda args: args.func(args), argv)


if __name__ == "__main__":
    sys.exit(main())
