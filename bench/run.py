"""``make bench``: serving, index quality, training, targeting and the live state, in one table.

    python -m bench.run             # the full run; bundles are cached under var/bench
    python -m bench.run --quick     # CI smoke: one tiny bundle, a fraction of a second a cell
    python -m bench.run --only serving,quality
    python -m bench.run --only live   # writes, their spread to other servers, the overlay

Progress goes to stderr; the table (Markdown) to stdout and ``ROOT/report.md``,
every figure to ``ROOT/results.json``. Servers, load clients, fits and the
targeting run are child processes; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.bundles import BundleSpec, build_record, ensure_bundle, ensure_sample, run_measured
from bench.live import LiveFigures, LivePlan, measure_live
from bench.quality import QualityRow, index_quality
from bench.report import Row, machine, met, render
from bench.serving import (
    Cell,
    LoadSpec,
    Server,
    answers,
    free_port,
    launch,
    measure_cells,
    overlap,
    paired_ratios,
    wait_ready,
    write_users,
)
from bench.training import compare_training
from recsvc.model.bundle import read_manifest

__all__ = ["FULL", "QUICK", "SECTIONS", "Plan", "main"]

SECTIONS = ("serving", "costs", "workers", "quality", "training", "targeting", "live")


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    serving: tuple[BundleSpec, ...]
    concurrency: tuple[int, ...]
    load: LoadSpec
    workers: BundleSpec
    """The bundle served by 1 and then 2 worker processes."""
    workers_concurrency: tuple[int, ...]
    quality: tuple[BundleSpec, ...]
    quality_kinds: tuple[str, ...]
    quality_queries: int
    training: BundleSpec
    targeting: BundleSpec
    targeting_size: int
    load_users: int
    """Distinct customers the load client cycles through."""
    live: LivePlan
    goal_items: tuple[int, int] = (100_000, 1_000_000)
    """Bundle sizes the goals speak of: (ceiling and p99 goals, naive and recall goals)."""
    costs_rounds: int = 11
    """Interleaved rounds of the costs section: its ratios are the median round's."""


FULL = Plan(
    serving=(
        BundleSpec(50_000, 10_000),
        BundleSpec(100_000, 100_000),
        BundleSpec(200_000, 1_000_000),
    ),
    concurrency=(1, 8, 32),
    load=LoadSpec(seconds=2.0, warmup=0.5, max_requests=200_000, rounds=2),
    workers=BundleSpec(100_000, 100_000),
    workers_concurrency=(8, 32),
    quality=(BundleSpec(100_000, 100_000), BundleSpec(200_000, 1_000_000)),
    quality_kinds=("hnsw", "ivf", "flat"),
    quality_queries=500,
    training=BundleSpec(100_000, 100_000),
    targeting=BundleSpec(1_000_000, 100_000),
    targeting_size=10_000,
    load_users=5000,
    live=LivePlan(
        bundle=BundleSpec(100_000, 100_000),
        changed=100_000,
        seconds=5.0,
        threads=4,
        samples=200,
        load=LoadSpec(seconds=2.0, warmup=0.5, max_requests=200_000, rounds=3),
    ),
)

QUICK = Plan(
    serving=(BundleSpec(2000, 300),),
    concurrency=(1, 4),
    load=LoadSpec(seconds=0.4, warmup=0.1, max_requests=20_000),
    workers=BundleSpec(2000, 300),
    workers_concurrency=(4,),
    quality=(BundleSpec(2000, 300),),
    quality_kinds=("hnsw", "ivf", "flat"),
    quality_queries=100,
    training=BundleSpec(2000, 300),
    targeting=BundleSpec(2000, 300),
    targeting_size=100,
    load_users=300,
    live=LivePlan(
        bundle=BundleSpec(2000, 300),
        changed=200,
        seconds=0.3,
        threads=2,
        samples=5,
        load=LoadSpec(seconds=0.4, warmup=0.1, max_requests=20_000),
    ),
    goal_items=(0, 0),  # the smoke run judges no goal
    costs_rounds=1,
)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ms(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _cell(c: Cell) -> str:
    cpu = (
        f", server {c.server_cpu_us:,.0f} us CPU/req" if c.server_cpu_us == c.server_cpu_us else ""
    )
    return f"{c.qps:,.0f} QPS, p50 {_ms(c.p50_ms)} ms, p99 {_ms(c.p99_ms)} ms{cpu}"


# --- serving -------------------------------------------------------------------------------


def _serving(plan: Plan, root: Path, sections: set[str], results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    logs = root / "logs"
    empty = launch("empty", None, logs)
    try:
        wait_ready([empty])
        specs = list(plan.serving)
        if "serving" not in sections:
            specs = [plan.workers]
        for spec in specs:
            rows += _serving_bundle(plan, root, spec, empty, sections, results)
    finally:
        empty.stop()
    return rows


def _serving_bundle(
    plan: Plan,
    root: Path,
    spec: BundleSpec,
    empty: Server,
    sections: set[str],
    results: dict[str, Any],
) -> list[Row]:
    models = ensure_bundle(root, spec, _log)
    users_file = root / "users" / f"{spec.key}.txt"
    users = write_users(models, users_file, plan.load_users)
    _log(f"serving {spec.label} ({spec.key})")
    recsvc = launch("recsvc", models, root / "logs")
    naive = launch("naive", models, root / "logs")
    rows: list[Row] = []
    try:
        wait_ready([recsvc, naive])
        agreement = overlap(*_personalized(recsvc, naive, users[:100]))
        if "serving" in sections:
            cells = measure_cells(
                [empty, recsvc, naive], users_file, list(plan.concurrency), plan.load, _log
            )
            results.setdefault("serving", []).append(
                {
                    "bundle": asdict(spec),
                    "agreement": agreement,
                    "cells": [asdict(c) for c in cells],
                }
            )
            rows += _serving_rows(plan, spec, cells, agreement)
        if "costs" in sections and spec == plan.workers:
            rows += _costs(plan, root, spec, models, recsvc, users_file, results)
        if "workers" in sections and spec == plan.workers:
            rows += _workers(plan, root, spec, models, recsvc, empty, users_file, results)
    finally:
        recsvc.stop()
        naive.stop()
    return rows


def _costs(
    plan: Plan,
    root: Path,
    spec: BundleSpec,
    models: Path,
    recsvc: Server,
    users_file: Path,
    results: dict[str, Any],
) -> list[Row]:
    """What the audit trail and the metrics cost on the serving path: QPS on against off."""
    trail = root / "audit" / spec.key
    shutil.rmtree(trail, ignore_errors=True)
    key = {"RECSVC_PSEUDONYM_KEY": "bench-audit-key"}
    audited = launch(
        "recsvc",
        models,
        root / "logs",
        env={**key, "RECSVC_AUDIT_DIR": str(trail)},
        name="recsvc+audit",
    )
    metered = launch(
        "recsvc",
        models,
        root / "logs",
        env={"RECSVC_METRICS_PORT": str(free_port())},
        name="recsvc+metrics",
    )
    top = max(plan.concurrency)
    load = replace(plan.load, rounds=plan.costs_rounds)
    try:
        wait_ready([audited, metered])
        rounds = measure_cells(
            [recsvc, audited, metered], users_file, [top], load, _log, every_round=True
        )
    finally:
        audited.stop()
        metered.stop()
    best: dict[str, Cell] = {}
    for c in rounds:
        if c.server not in best or c.qps > best[c.server].qps:
            best[c.server] = c
    off, on_audit, on_metrics = best["recsvc"], best["recsvc+audit"], best["recsvc+metrics"]
    segments = sorted(trail.glob("*.jsonl"))
    trail_bytes = sum(f.stat().st_size for f in segments)
    records = sum(f.read_bytes().count(b'"kind":"answer"') for f in segments)
    per_answer = trail_bytes / max(1, records)
    audit_ratios = paired_ratios(rounds, "recsvc+audit", "recsvc")
    metrics_ratios = paired_ratios(rounds, "recsvc+metrics", "recsvc")
    audit_ratio, metrics_ratio = statistics.median(audit_ratios), statistics.median(metrics_ratios)
    cpu = {c.round: c.server_cpu_us for c in rounds if c.server == "recsvc"}
    audit_cpu = statistics.median(
        c.server_cpu_us - cpu[c.round] for c in rounds if c.server == "recsvc+audit"
    )
    results["costs"] = {
        "bundle": asdict(spec),
        "cells": [asdict(c) for c in rounds],
        "audit_ratios": [round(r, 3) for r in audit_ratios],
        "metrics_ratios": [round(r, 3) for r in metrics_ratios],
        "audit_server_cpu_us_added": round(audit_cpu, 1),
        "audit_bytes_per_answer": round(per_answer, 1),
        "audit_records": records,
    }

    def spread(ratios: list[float]) -> str:
        if len(ratios) < 2:
            return "1 round"
        return f"median of {len(ratios)} interleaved rounds, {min(ratios):.2f}-{max(ratios):.2f}"

    return [
        Row(
            "costs",
            f"{spec.label}, c={top}, --audit-dir",
            _cell(on_audit),
            f"off: {_cell(off)}; {per_answer:,.0f} bytes of trail an answer; "
            f"server CPU {audit_cpu:+,.0f} us/req (median round)",
            f"{audit_ratio:.2f}x off ({spread(audit_ratios)})",
            f">= 0.90x off: {met(audit_ratio >= 0.90)}",
        ),
        Row(
            "costs",
            f"{spec.label}, c={top}, --metrics-port",
            _cell(on_metrics),
            f"off: {_cell(off)}",
            f"{metrics_ratio:.2f}x off ({spread(metrics_ratios)})",
            f">= 0.97x off: {met(metrics_ratio >= 0.97)}",
        ),
    ]


def _personalized(
    recsvc: Server, naive: Server, users: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Both servers' answers for customers with an embedding (naive has no popular fallback)."""
    ours, exact = answers(recsvc, users, 10), answers(naive, users, 10)
    keep = [i for i, (source, _) in enumerate(ours) if source == "PERSONALIZED"]
    return [ours[i][1] for i in keep], [exact[i][1] for i in keep]


def _serving_rows(plan: Plan, spec: BundleSpec, cells: list[Cell], agreement: float) -> list[Row]:
    rows = []
    by = {(c.server, c.concurrency): c for c in cells}
    top = max(plan.concurrency)
    for c in plan.concurrency:
        ours, ceiling, naive = by[("recsvc", c)], by[("empty", c)], by[("naive", c)]
        goals = []
        if spec.items == plan.goal_items[0] and c == top:
            goals.append(f">= 0.70x ceiling: {met(ours.qps >= 0.7 * ceiling.qps)}")
            goals.append(f"p99 < 15 ms: {met(ours.p99_ms < 15)}")
        if spec.items == plan.goal_items[1]:
            goals.append(f">= 5x naive: {met(ours.qps >= 5 * naive.qps)}")
        rows.append(
            Row(
                "serving",
                f"{spec.label}, c={c}",
                _cell(ours),
                f"ceiling {_cell(ceiling)}; naive {_cell(naive)}",
                f"{ours.qps / ceiling.qps:.2f}x ceiling, {ours.qps / naive.qps:.1f}x naive",
                "; ".join(goals),
            )
        )
    rows[0] = Row(
        rows[0].section,
        rows[0].case,
        rows[0].figure,
        rows[0].against + f"; top-10 overlap with naive (exact) {agreement:.3f}",
        rows[0].ratio,
        rows[0].goal,
    )
    return rows


def _workers(
    plan: Plan,
    root: Path,
    spec: BundleSpec,
    models: Path,
    one: Server,
    empty: Server,
    users_file: Path,
    results: dict[str, Any],
) -> list[Row]:
    """recsvc with 1 and 2 workers, and the empty handler with 2 (the 2-process ceiling)."""
    _log(f"workers: 1 against 2 on {spec.label}")
    two = launch("recsvc", models, root / "logs", workers=2)
    empty_two = launch("empty", None, root / "logs", workers=2)
    try:
        wait_ready([two, empty_two])
        cells = measure_cells(
            [one, two, empty, empty_two],
            users_file,
            list(plan.workers_concurrency),
            plan.load,
            _log,
        )
    finally:
        two.stop()
        empty_two.stop()
    results["workers"] = {"bundle": asdict(spec), "cells": [asdict(c) for c in cells]}
    by = {(c.server, c.concurrency): c for c in cells}
    rows = []
    for c in plan.workers_concurrency:
        a, b = by[(one.name, c)], by[(two.name, c)]
        ceiling = by[(empty_two.name, c)]
        rows.append(
            Row(
                "workers",
                f"{spec.label}, c={c}, --workers 2",
                _cell(b),
                f"--workers 1: {_cell(a)}; empty handler x2: {_cell(ceiling)}",
                f"{b.qps / a.qps:.2f}x 1 worker, {b.qps / ceiling.qps:.2f}x 2-worker ceiling",
                "shows 1 -> 2 scaling",
            )
        )
    return rows


# --- index quality ---------------------------------------------------------------------------


def _quality(plan: Plan, root: Path, results: dict[str, Any]) -> list[Row]:
    rows = []
    out: list[QualityRow] = []
    for spec in plan.quality:
        models = ensure_bundle(root, spec, _log)
        _log(f"index quality over {spec.label}")
        got = index_quality(
            models, list(plan.quality_kinds), plan.quality_queries, root / "indexes", spec.key, _log
        )
        out += got
        served_kind = read_manifest(models / _latest(models)).indexes.items.kind
        flat = next((r for r in got if r.kind == "flat"), None)
        for r in got:
            goal = ""
            if spec.items == plan.goal_items[1] and r.kind == served_kind:
                goal = f"served index recall@10 >= 0.95: {met(r.recall >= 0.95)}"
            speedup = (
                f"{flat.p50_ms / r.p50_ms:.0f}x faster than flat" if flat and r is not flat else ""
            )
            rows.append(
                Row(
                    "index",
                    f"{spec.label}, {r.kind}{' (served)' if r.kind == served_kind else ''}"
                    f" [{r.params}]",
                    f"recall@10 {r.recall:.3f}, p50 {_ms(r.p50_ms)} ms, p99 {_ms(r.p99_ms)} ms",
                    "exact scan under the same rules"
                    + (f"; built in {r.build_s:.0f} s" if r.build_s else ""),
                    speedup,
                    goal,
                )
            )
    results["quality"] = [asdict(r) for r in out]
    return rows


def _latest(models: Path) -> str:
    return (models / "LATEST").read_text().strip()


# --- training --------------------------------------------------------------------------------


def _training(plan: Plan, root: Path, results: dict[str, Any]) -> list[Row]:
    spec = plan.training
    sample = ensure_sample(root, spec, _log)
    _log(f"training: fit end to end against bare implicit + FAISS ({spec.sample_key})")
    r = compare_training(sample, spec, root / "work")
    e, b = r.e2e_phases, r.bare_phases
    results["training"] = {
        "spec": asdict(spec),
        "e2e": {"seconds": r.e2e.seconds, "max_rss": r.e2e.max_rss_bytes, **e},
        "bare": {"seconds": r.bare.seconds, "max_rss": r.bare.max_rss_bytes, **b},
    }
    size = f"{spec.users:,} users x {spec.label}"
    return [
        Row(
            "training",
            f"fit end to end, {size} ({int(e['pairs']):,} pairs)",
            f"{r.e2e.seconds:.1f} s, peak {r.e2e.max_rss_bytes / 2**20:,.0f} MiB "
            f"(load {e['load_s']:.1f}, fit {e['fit_s']:.1f}, index+publish {e['publish_s']:.1f} s)",
            f"bare implicit + FAISS {r.bare.seconds:.1f} s, peak "
            f"{r.bare.max_rss_bytes / 2**20:,.0f} MiB (fit {b['fit_s']:.1f}, "
            f"index {b['index_s']:.1f} s)",
            f"{r.ratio:.2f}x time, {r.e2e.max_rss_bytes / r.bare.max_rss_bytes:.2f}x memory",
            f"<= 1.3x bare: {met(r.ratio <= 1.3)}",
        ),
        Row(
            "training",
            "Parquet ingest (read, check, weight, merge pairs)",
            f"{r.ingest_rows_per_s:,.0f} rows/s",
            f"{int(e['rows_read']):,} rows in {e['load_s']:.2f} s",
        ),
    ]


def _scale(plan: Plan, root: Path, results: dict[str, Any]) -> list[Row]:
    """The targeting bundle's own build, as recorded when it was built."""
    record = build_record(root, plan.targeting)
    if not record or "fit" not in record:
        return []
    results["scale"] = record
    rows = []
    for step, what in (("sample", "sample-data"), ("fit", "fit end to end")):
        if step in record:
            s = record[step]
            rows.append(
                Row(
                    "training at scale",
                    f"{what}, {plan.targeting.users:,} users x {plan.targeting.items:,} items",
                    f"{s['seconds']:.0f} s, peak {s['max_rss_mib']:,.0f} MiB",
                    f"built {s['when']}, load average {s['load_average'][0]:.1f}",
                )
            )
    return rows


# --- targeting -------------------------------------------------------------------------------


def _targeting(plan: Plan, root: Path, models: Path | None, results: dict[str, Any]) -> list[Row]:
    models = models or ensure_bundle(root, plan.targeting, _log)
    _log(f"targeting over {models}")
    cmd = [
        sys.executable,
        "-m",
        "bench.targeting",
        "--models",
        str(models),
        "--size",
        str(plan.targeting_size),
    ]
    result = run_measured(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"targeting failed:\n{result.stderr[-2000:]}")
    t = json.loads(result.stdout.strip().splitlines()[-1])
    results["targeting"] = {**t, "max_rss": result.max_rss_bytes}
    small, full = max(t["small_s"]), max(t["full_s"])
    base = f"{t['users']:,} users x {t['items']:,} items"
    big = t["users"] >= 1_000_000
    return [
        Row(
            "targeting",
            f"{t['size']:,}-customer audience, 1 product, {base}",
            f"{small:.3f} s (slowest of {len(t['small_s'])} products)",
            f"served {t['small_path']}; through the user {t['user_index']} index "
            f"{max(t['small_index_s']):.3f} s, holding "
            f"{min(t['small_overlap']):.2f}-{max(t['small_overlap']):.2f} of the exact audience",
            "",
            f"< 1 s: {met(small < 1)}" if big else "",
        ),
        Row(
            "targeting",
            f"full ranked audience, 1 product, {base}",
            f"{full:.2f} s (slowest of {len(t['full_s'])}; "
            f"{min(t['full_rows']):,}-{max(t['full_rows']):,} eligible)",
            "blocked matrix products",
            "",
            f"< 10 s: {met(full < 10)}" if big else "",
        ),
        Row(
            "targeting",
            f"top-1,000 audience of every product (--all-items), {base}",
            f"{t['each_ms']:.1f} ms a product (first {t['each_products']} products)",
            f"one product at a time (Targeter.target): {t['one_ms']:.0f} ms a product",
            "",
            "",
        ),
    ]


# --- live state ------------------------------------------------------------------------------


def _live(plan: Plan, root: Path, results: dict[str, Any]) -> list[Row]:
    live = plan.live
    f = measure_live(live, root, list(plan.concurrency), plan.load_users, _log)
    results["live"] = {
        "bundle": asdict(live.bundle),
        **asdict(f),
        "overlay": {**asdict(f.overlay), "bytes_per_customer": round(f.overlay.bytes_per_customer)},
    }
    judge = live.bundle.items == plan.goal_items[0]
    return _write_rows(f, judge) + _overlay_rows(plan, f, judge)


_BACKENDS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def _write_rows(f: LiveFigures, judge: bool) -> list[Row]:
    rows = []
    rates = {(r.backend, r.path): r for r in f.throughput}
    for backend, name in _BACKENDS.items():
        if (backend, "grpc") not in rates:
            continue
        served, alone = rates[(backend, "grpc")], rates[(backend, "store")]
        rows.append(
            Row(
                "live",
                f"RecordEvents, {name}, batches of {served.batch}, {served.threads} threads",
                f"{served.events_per_s:,.0f} events/s (batch p50 {_ms(served.p50_ms)} ms, "
                f"p99 {_ms(served.p99_ms)} ms)",
                f"record_events in process {alone.events_per_s:,.0f} events/s "
                f"(p99 {_ms(alone.p99_ms)} ms)",
                f"{served.events_per_s / alone.events_per_s:.2f}x in process",
            )
        )
    for p in f.propagation:
        overlay = f", {p.changed:,} changed customers in its overlay" if p.changed else ""
        writer = "by a first server" if p.via == "grpc" else "in process"
        rows.append(
            Row(
                "live",
                f"acknowledgement to effect on another server, {_BACKENDS[p.backend]}{overlay}",
                f"p50 {_ms(p.p50_ms)} ms, p99 {_ms(p.p99_ms)} ms (max {_ms(p.max_ms)} ms, "
                f"{p.samples} writes)",
                f"write acknowledged {writer} in p50 {_ms(p.ack_p50_ms)} ms; the purchased "
                f"item left the other server's answer in {p.excluded} of {p.samples}",
                "",
                f"p99 < 1 s: {met(p.p99_ms < 1000)}" if judge else "",
            )
        )
    if f.postgres:
        rows.append(Row("live", "PostgreSQL", f"not measured: {f.postgres}"))
    return rows


def _overlay_rows(plan: Plan, f: LiveFigures, judge: bool) -> list[Row]:
    s, m = f.serving, f.overlay
    by = {(c.server, c.concurrency): c for c in s.cells}
    top = max(plan.concurrency)
    rows = []
    for c in plan.concurrency:
        live, plain = by[("recsvc+live", c)], by[("recsvc", c)]
        ratio = live.qps / plain.qps
        rows.append(
            Row(
                "live",
                f"{plan.live.bundle.label}, {s.changed:,} changed customers in the overlay, c={c}",
                _cell(live),
                f"no state: {_cell(plain)}",
                f"{ratio:.2f}x no state",
                f">= 0.95x no state: {met(ratio >= 0.95)}" if judge and c == top else "",
            )
        )
    plain_load, live_load = s.load_s
    rows[0] = replace(
        rows[0],
        against=rows[0].against + f"; {s.load_share:.0%} of the load's customers changed; "
        f"version loaded in {live_load:.1f} s with the overlay, {plain_load:.1f} s without",
    )
    (changed_without, changed_with), (other_without, other_with) = m.changed_us, m.unchanged_us
    rows.append(
        Row(
            "live",
            f"Recommender.recommend in process, {m.customers:,} changed customers in the overlay",
            f"{changed_with:,.0f} us CPU a call for a changed customer, "
            f"{other_with:,.0f} us for the others",
            f"no overlay: {changed_without:,.0f} and {other_without:,.0f} us (the load's "
            "customers; each chunk of 25 timed without, with, with, without)",
            f"{changed_without / changed_with:.2f}x and {other_without / other_with:.2f}x "
            "the calls a second",
        )
    )
    mib = 2**20
    rows.append(
        Row(
            "live",
            f"overlay memory, {m.customers:,} changed customers ({m.events:,} events)",
            f"{m.bytes_per_customer:,.0f} bytes a customer ({m.overlay_bytes / mib:,.0f} MiB)",
            f"built in {m.build_s:.1f} s in one process (changes read in {m.read_s:.1f} s), "
            f"plus {m.context_bytes / mib:,.0f} MiB per bundle; one more commit over it "
            f"{_ms(m.apply_one_ms)} ms; server resident {s.rss_bytes[1] / mib:,.0f} MiB "
            f"against {s.rss_bytes[0] / mib:,.0f} MiB without state",
        )
    )
    return rows


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="CI smoke: tiny bundle, short cells")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--root", type=Path, help="cache and output folder (default var/bench)")
    p.add_argument("--seconds", type=float, help="measured seconds per serving cell")
    p.add_argument("--targeting-models", type=Path, help="an existing models folder to target over")
    p.add_argument(
        "--training",
        metavar="USERSxITEMS",
        help="sample size for the training section, e.g. 1000000x100000",
    )
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds:
        live = replace(plan.live, load=replace(plan.live.load, seconds=args.seconds))
        plan = replace(plan, load=replace(plan.load, seconds=args.seconds), live=live)
    if args.training:
        users, _, items = args.training.lower().partition("x")
        plan = replace(plan, training=BundleSpec(int(users), int(items)))
    sections = set(SECTIONS if not args.only else args.only.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {', '.join(sorted(unknown))}")
    root = args.root or Path("var/bench") / ("quick" if args.quick else "")
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    host = machine()
    command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    _log(host)
    results: dict[str, Any] = {"machine": host, "command": command.strip()}
    rows: list[Row] = []
    if sections & {"serving", "costs", "workers"}:
        rows += _serving(plan, root, sections, results)
    if "quality" in sections:
        rows += _quality(plan, root, results)
    if "training" in sections:
        rows += _training(plan, root, results)
    if "targeting" in sections:
        rows += _targeting(plan, root, args.targeting_models, results)
        rows += _scale(plan, root, results)
    if "live" in sections:
        rows += _live(plan, root, results)
    elapsed = time.perf_counter() - started
    results["seconds"] = round(elapsed, 1)
    table = render(rows)
    footer = f"Machine: {host}.\nCommand: `{command.strip()}`, {elapsed / 60:.1f} min."
    (root / "report.md").write_text(table + "\n\n" + footer + "\n", encoding="utf-8")
    (root / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(table)
    print()
    print(footer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
