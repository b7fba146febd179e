"""MovieLens-100K: the default tune against tuned EASE and the published table.

``make reproduce-ml100k``. The protocol: a per-user stratified random 75/25 split
(a user keeps round(0.75 n) ratings, halves to even, as Microsoft Recommenders'
``python_stratified_split`` does), every rating a relevant interaction, items seen in
training excluded, k = 10. For each seed (1, 2, 3) this runs the project's own
commands, exactly as an analyst would:

1. ``recsvc-train import-movielens`` (once, into a scratch folder: the data's licence
   forbids redistributing it, so it never enters the repository);
2. ``recsvc-eval --split stratified:0.25 --seed S --split-only``;
3. ``recsvc-train tune`` on that split's train part only (its own validation carve),
   with no ``--trials``: whatever the default search does;
4. ``recsvc-eval --split replay:... --params <tuned>``: fit, publish, rank every test
   user through ``Recommender.recommend``, and the baselines (popularity, item-kNN,
   EASE with its lambda chosen on the tuner's validation carve of the train part, random);
5. ``recsvc serve`` on the bundle in its own process, then ``recsvc-eval --bundle
   --endpoint``: the same users over gRPC, checked to agree with step 4.

Then it prints every seed's figures, and their means with the range over the seeds
(min-max) beside every figure, beside the published rows. Those are weak bars: each is
one split, without a spread, BiVAE's and BPR's a per-item one (``filter_by="item"``,
seed 42, from their benchmark notebook), SAR's a per-user one (seed 42); untuned EASE
is level with the best of them (docs/EVALUATION.md). The bar is tuned EASE.

``python -m bench.ml100k --data ../shared/datasets/ml-100k [--work var/ml100k] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.serving import free_port
from training import cli as train_cli
from training import evaluate_cli
from training.report import HEADLINE, machine

__all__ = ["PUBLISHED", "PUBLISHED_SPLITS", "main", "per_seed_table", "run", "serving", "table"]

PUBLISHED: dict[str, dict[str, float]] = {
    "BiVAE (published)": {"map": 0.146, "ndcg": 0.475, "precision": 0.412, "recall": 0.219},
    "BPR (published)": {"map": 0.132, "ndcg": 0.442, "precision": 0.388, "recall": 0.213},
    "SAR (published)": {"map": 0.111, "ndcg": 0.382, "precision": 0.331, "recall": 0.176},
}
"""Microsoft Recommenders' MovieLens-100K table (MAP, nDCG@10, Precision@10, Recall@10)."""

PUBLISHED_SPLITS = {
    "BiVAE (published)": 'per-item stratified (filter_by="item"), seed 42, one split',
    "BPR (published)": 'per-item stratified (filter_by="item"), seed 42, one split',
    "SAR (published)": "per-user stratified, seed 42, one split",
}
"""Which split each published row came from: not ours (per-user) for BiVAE and BPR."""

MODEL = "recsvc, tuned (in-process)"
ENDPOINT = "recsvc, tuned (--endpoint)"
EASE = "baseline: ease (tuned lambda)"

_K = 10
_TITLES = {"map": "MAP", "ndcg": "nDCG@10", "precision": "Precision@10", "recall": "Recall@10"}


@contextlib.contextmanager
def serving(models: Path, timeout: float = 60.0) -> Iterator[str]:
    """``recsvc serve`` on ``models`` in its own process; yields host:port once SERVING."""
    port = free_port()
    exe = Path(sys.executable).with_name("recsvc")
    command = [str(exe), "serve", "--models", str(models), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"recsvc serve exited with status {proc.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"recsvc serve on {address} not SERVING after {timeout}s")
                time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _step(log: list[str], program: str, argv: list[str]) -> None:
    """Run one of the project's commands in this process; stop on failure."""
    line = shlex.join([program, *argv])
    log.append(line)
    print(f"\n$ {line}", flush=True)
    main = train_cli.main if program == "recsvc-train" else evaluate_cli.main
    status = main(argv)
    if status != 0:
        raise SystemExit(f"{program} failed with status {status}")


def _figures(report: dict[str, Any], name: str) -> dict[str, float]:
    result = next(r for r in report["results"] if r["name"] == name)
    return {m: result["metrics"][m][str(_K)] for m in HEADLINE}


def _spread(figures: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, min and max over the seeds of each headline metric."""
    return {
        stat: {m: float(fn([f[m] for f in figures])) for m in HEADLINE}
        for stat, fn in (("mean", np.mean), ("min", np.min), ("max", np.max))
    }


def _row_name(result: str) -> str:
    return EASE if result == "ease" else f"baseline: {result}"


def run(
    data: Path,
    work: Path,
    seeds: Sequence[int],
    trials: int | None = None,
    time_budget: float | None = None,
) -> dict[str, Any]:
    """Import, then split, tune, evaluate and check the endpoint for every seed.

    ``trials`` and ``time_budget`` None: ``tune`` runs as its defaults say.
    """
    start = time.perf_counter()
    commands: list[str] = []
    tables = work / "data"
    _step(commands, "recsvc-train", ["-q", "import-movielens", str(data), "--out", str(tables)])
    catalogue = ["--items", str(tables / "items.parquet"), "--users", str(tables / "users.parquet")]
    inputs = ["--interactions", str(tables / "interactions.parquet"), *catalogue]
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        folder = work / f"seed{seed}"
        s = str(seed)
        _step(commands, "recsvc-eval", [*inputs, "--split", "stratified:0.25", "--seed", s,
                                        "--split-only", "--report", str(folder), "-q"])  # fmt: skip
        # Tuning reads the split's train part, never the test part.
        train = str(folder / "split" / "train.parquet")
        tune = ["-q", "tune", "--interactions", train, *catalogue, "--seed", s]
        if trials is not None:
            tune += ["--trials", str(trials)]
        if time_budget is not None:
            tune += ["--time-budget", str(time_budget)]
        tune_start = time.perf_counter()
        _step(commands, "recsvc-train", [*tune, "--out", str(folder / "params.json")])
        tune_seconds = time.perf_counter() - tune_start
        replay = ["--split", f"replay:{folder / 'split'}", "--seed", s, "-k", str(_K), "-q"]
        _step(commands, "recsvc-eval", [*inputs, *replay, "--params", str(folder / "params.json"),
                                        "--report", str(folder)])  # fmt: skip
        with serving(folder / "models") as address:
            _step(commands, "recsvc-eval", [*inputs, *replay, "--bundle", str(folder / "models"),
                                            "--endpoint", address, "--baselines", "none",
                                            "--report", str(folder / "endpoint")])  # fmt: skip
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        remote = json.loads((folder / "endpoint" / "report.json").read_text(encoding="utf-8"))
        ease = next((r["params"] for r in report["results"] if r["name"] == "ease"), None)
        search = json.loads((folder / "params.tune.json").read_text(encoding="utf-8"))
        per_seed[seed] = {
            "params": json.loads((folder / "params.json").read_text(encoding="utf-8")),
            "tune_seconds": round(tune_seconds, 1),
            # A search the time budget stopped depends on this machine's speed.
            "tune_trials": len(search["trials"]),
            "tune_stopped_by": search["stopped_by"],
            "results": {r["name"]: _figures(report, r["name"]) for r in report["results"]},
            "endpoint": _figures(remote, "model@endpoint"),
            "agreement": remote["endpoint_agreement"],
            "violations": report["results"][0]["violations"],
            "ease_lambda": None if ease is None else ease["lambda"],
            "model_losses": report["model_losses"],
        }

    rows = {
        MODEL: _spread([per_seed[s]["results"]["model"] for s in seeds]),
        ENDPOINT: _spread([per_seed[s]["endpoint"] for s in seeds]),
    }
    for name in per_seed[seeds[0]]["results"]:
        if name != "model":
            rows[_row_name(name)] = _spread([per_seed[s]["results"][name] for s in seeds])
    ours = rows[MODEL]["mean"]
    beaten = {row: all(ours[m] > theirs[m] for m in HEADLINE) for row, theirs in PUBLISHED.items()}
    against_ease = {m: ours[m] > rows[EASE]["mean"][m] for m in HEADLINE} if EASE in rows else None
    return {
        "seeds": list(seeds),
        "trials": trials,
        "time_budget": time_budget,
        "spread": "min-max over the seeds",
        "rows": rows,
        "means": {name: r["mean"] for name, r in rows.items()},
        "per_seed": per_seed,
        "agree": all(per_seed[s]["agreement"]["agree"] for s in seeds),
        "beats_tuned_ease": against_ease,
        "beats_every_published_row": all(beaten.values()),
        "beaten": beaten,
        "commands": commands,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def _cell(stats: dict[str, dict[str, float]], m: str, seeds: int) -> str:
    mean = f"{stats['mean'][m]:.4f}"
    return mean if seeds == 1 else f"{mean} ({stats['min'][m]:.4f}-{stats['max'][m]:.4f})"


def table(result: dict[str, Any]) -> str:
    """The means with their seed range beside the published rows, as Markdown."""
    n = len(result["seeds"])
    head = ["mean (min-max over seeds)" if n > 1 else "", *(_TITLES[m] for m in HEADLINE), "split"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = f"per-user stratified, seeds {', '.join(map(str, result['seeds']))}"
    for name, stats in result["rows"].items():
        cells = [_cell(stats, m, n) for m in HEADLINE]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ours} |")
    for name, values in PUBLISHED.items():
        cells = [f"{values[m]:.3f}" for m in HEADLINE]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {PUBLISHED_SPLITS[name]} |")
    return "\n".join(lines)


def _describe_params(params: dict[str, Any]) -> str:
    """The searched values of a tuned ``FitParams`` JSON, e.g. ``als, 169 factors, ...``."""
    parts = [str(params.get("algorithm", "?"))]
    for key in ("factors", "iterations", "regularization", "alpha", "learning_rate"):
        if key in params and (key != "learning_rate" or params.get("algorithm") == "bpr"):
            value = params[key]
            parts.append(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
    if "weighting" in params:
        parts.append(f"{params['weighting']} weighting")
    return ", ".join(parts)


_STOPS = {
    "converged": "converged",
    "trials": "all trials run",
    "time_budget": "stopped by the time budget, not converged",
}


def per_seed_table(result: dict[str, Any]) -> str:
    """Every seed's figures: the served model and each baseline, and what was chosen."""
    head = ["seed", "", *(_TITLES[m] for m in HEADLINE), "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed in result["seeds"]:
        run_ = result["per_seed"][seed]
        for name, figures in run_["results"].items():
            if name == "model":
                label, chosen = "recsvc, tuned", _describe_params(run_["params"])
                stop = _STOPS.get(run_["tune_stopped_by"], run_["tune_stopped_by"])
                chosen += (
                    f" (tune {run_['tune_seconds']:.0f} s, {run_['tune_trials']} trials, {stop})"
                )
            else:
                label, chosen = name, ""
                if name == "ease" and run_["ease_lambda"] is not None:
                    chosen = f"lambda {run_['ease_lambda']:g}"
            cells = [f"{figures[m]:.4f}" for m in HEADLINE]
            lines.append(f"| {seed} | {label} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ml100k", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with u.data, u.item, u.user"
    )
    parser.add_argument("--work", type=Path, default=Path("var/ml100k"), help="scratch folder")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--trials", type=int, help="tune trials per seed (default: as tune's defaults say)"
    )
    parser.add_argument("--time-budget", type=float, help="tune seconds per seed")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 1, 4 trials")
    args = parser.parse_args(argv)
    if not (args.data / "u.data").is_file():
        print(f"bench.ml100k: {args.data}/u.data not found (set ML100K=DIR)", file=sys.stderr)
        return 2
    seeds = [1] if args.quick else [int(s) for s in args.seeds.split(",")]
    trials = 4 if args.quick else args.trials
    result = run(args.data, args.work, seeds, trials, args.time_budget)
    (args.work / "ml100k.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    text = table(result)
    by_seed = per_seed_table(result)
    how = "default tune" if trials is None else f"tune --trials {trials}"
    title = f"MovieLens-100K, k = {_K}, {how}, seeds {', '.join(map(str, seeds))}"
    (args.work / "ml100k.md").write_text(f"{title}\n\n{text}\n\n{by_seed}\n", encoding="utf-8")
    m = result["machine"]
    print(f"\nMovieLens-100K, k = {_K}, {how}, per seed:\n")
    print(by_seed)
    print(f"\nMean over seeds {', '.join(map(str, seeds))}", end="")
    print(" (in brackets: min-max over the seeds):\n" if len(seeds) > 1 else ":\n")
    print(text)
    print(
        "\nThe published rows are one split each, without a spread, BiVAE's and BPR's per item,"
        "\nnot per user as ours: a weak bar. The bar is tuned EASE on the same splits."
    )
    against = result["beats_tuned_ease"]
    if against is not None:
        lost = [_TITLES[k] for k, won in against.items() if not won]
        verdict = "yes" if not lost else f"no (not on {', '.join(lost)})"
        print(f"\nthe default tune beats tuned EASE in the mean on all four metrics: {verdict}")
    print(
        f"in-process and --endpoint figures {'agree' if result['agree'] else 'DISAGREE'}; "
        f"beats every published row on all four metrics: "
        f"{'yes' if result['beats_every_published_row'] else 'no'}"
    )
    print(f"wall time {result['wall_seconds']:.0f}s on {m['cpu']}, {m['cores']} cores")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
