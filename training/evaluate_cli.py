"""``recsvc-eval``: offline evaluation through the serving path, with baselines.

Example::

    recsvc-eval --interactions var/sample/interactions.parquet \\
        --items var/sample/items.parquet --users var/sample/users.parquet \\
        --split stratified:0.25 --seed 1 -k 5,10,20 --report var/eval

Exit status: 0 when every figure was produced, the model broke no rule and (with
``--endpoint``) the server agreed with the in-process figure; 1 when a rule was broken
or they disagreed; 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from recsvc.commands import run_main
from recsvc.errors import RecsvcError
from training.baselines import BASELINES
from training.cli import (
    add_data_args,
    add_fit_args,
    data_config_from_args,
    fit_params_from_args,
    progress_bars,
)
from training.evaluate import EvalOptions, evaluate
from training.report import baseline_notes, machine, markdown_table, write_report
from training.splits import SplitSpec, make_split, write_split

__all__ = ["build_parser", "main", "parse_ks"]

log = logging.getLogger("recsvc.eval")


def parse_ks(values: Sequence[str] | None) -> tuple[int, ...]:
    """``["5,10", "20"]`` -> ``(5, 10, 20)``; default ``(10,)``."""
    if not values:
        return (10,)
    try:
        ks = {int(part) for v in values for part in v.split(",") if part.strip()}
    except ValueError as exc:
        raise RecsvcError(f"-k: {values} is not a list of whole numbers") from exc
    return tuple(sorted(ks))


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise RecsvcError(
            f"--baselines: unknown {', '.join(unknown)} (expected {', '.join(BASELINES)} or none)"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsvc-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(p)
    add_fit_args(p)
    p.add_argument(
        "--split",
        required=True,
        help="stratified[:FRACTION] | time[:CUTOFF] | last[:N] | replay:DIR (see training.splits)",
    )
    p.add_argument(
        "-k", "--k", action="append", help="cut-off(s), e.g. -k 10 or -k 1,5,10,20 (default 10)"
    )
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated, from {', '.join(BASELINES)}; or none",
    )
    p.add_argument(
        "--bundle",
        type=Path,
        help="evaluate this bundle (or a models folder's LATEST) instead of training one; "
        "it must have been trained on the split's train part",
    )
    p.add_argument(
        "--endpoint",
        help="host:port of a server serving --bundle: ask it over gRPC and check it agrees",
    )
    p.add_argument("--report", required=True, type=Path, help="output folder")
    p.add_argument(
        "--split-only",
        action="store_true",
        help="write the split to REPORT/split and stop (to tune on its train part first)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _evaluate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    quiet = args.quiet

    def stage(message: str) -> None:
        if not quiet:
            print(f"recsvc-eval: {message}", file=sys.stderr)

    seed = args.seed if args.seed is not None else 0
    params = fit_params_from_args(args)
    options = EvalOptions(
        ks=parse_ks(args.k),
        baselines=_baselines(args.baselines),
        seed=seed,
        endpoint=args.endpoint,
        progress=progress_bars(quiet),
    )
    start = time.perf_counter()
    split = make_split(args.interactions, SplitSpec.parse(args.split), seed)
    if args.split_only:
        paths = write_split(split, args.report / "split")
        print(f"wrote {paths['train']} and {paths['test']}: {split.meta}")
        return 0
    report = evaluate(
        split,
        args.report,
        params,
        options,
        items=args.items,
        users=args.users,
        data_config=data_config_from_args(args),
        bundle=args.bundle,
        on_stage=stage,
    )
    report["command"] = shlex.join(["recsvc-eval", *argv])
    report["created_at"] = datetime.now(timezone.utc).isoformat()
    report["machine"] = machine()
    report["seconds"]["total"] = round(time.perf_counter() - start, 3)
    paths = write_report(report, args.report)
    for k in report["ks"]:
        print(f"\nk = {k}\n{markdown_table(report['results'], k)}")
    for line in [*baseline_notes(report["results"]), *report["model_losses"]]:
        print(line)
    baselines = [r for r in report["results"] if not r["name"].startswith("model")]
    if baselines and report["results"][0]["name"] == "model" and not report["model_losses"]:
        print("the served model is ahead of every baseline on every metric")
    print(f"\nreport: {paths['markdown']} and {paths['json']}")
    status = 0
    for r in report["results"]:
        if r["name"].startswith("model") and r["violations"]["suitability"]:
            print(f"recsvc-eval: {r['name']} broke suitability", file=sys.stderr)
            status = 1
    agreement = report.get("endpoint_agreement")
    if agreement is not None:
        print(
            f"in-process vs endpoint: {'agree' if agreement['agree'] else 'DISAGREE'} "
            f"({agreement['users_with_different_lists']} of {agreement['users_compared']} "
            "users differ)"
        )
        if not agreement["agree"]:
            status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    errors = (RecsvcError, ValueError, OSError)  # bad input, unreadable or unwritable files
    return run_main(build_parser(), lambda args: _evaluate(args, argv), argv, errors)


if __name__ == "__main__":
    sys.exit(main())
