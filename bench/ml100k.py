"""MovieLens-100K against the table Microsoft Recommenders publishes (``make reproduce-ml100k``).

Their protocol: a per-user stratified random 75/25 split, every rating a relevant
interaction, items seen in training excluded, k = 10. For each seed (1, 2, 3) this runs
the project's own commands, exactly as an analyst would:

1. ``recsvc-train import-movielens`` (once, into a scratch folder: the data's licence
   forbids redistributing it, so it never enters the repository);
2. ``recsvc-eval --split stratified:0.25 --seed S --split-only``;
3. ``recsvc-train tune`` on that split's train part only (its own validation carve);
4. ``recsvc-eval --split replay:... --params <tuned>``: fit, publish, rank every test
   user through ``Recommender.recommend``, and the baselines;
5. ``recsvc serve`` on the bundle in its own process, then ``recsvc-eval --bundle
   --endpoint``: the same users over gRPC, checked to agree with step 4.

Then it prints the means over the seeds beside the published rows.

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

__all__ = ["PUBLISHED", "main", "run", "serving", "table"]

PUBLISHED: dict[str, dict[str, float]] = {
    "BiVAE (published)": {"map": 0.146, "ndcg": 0.475, "precision": 0.412, "recall": 0.219},
    "BPR (published)": {"map": 0.132, "ndcg": 0.442, "precision": 0.388, "recall": 0.213},
    "SAR (published)": {"map": 0.111, "ndcg": 0.382, "precision": 0.331, "recall": 0.176},
}
"""Microsoft Recommenders' MovieLens-100K table (MAP, nDCG@10, Precision@10, Recall@10)."""

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


def run(
    data: Path, work: Path, seeds: Sequence[int], trials: int, time_budget: float | None
) -> dict[str, Any]:
    """Import, then split, tune, evaluate and check the endpoint for every seed."""
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
        tune += ["--trials", str(trials)]
        if time_budget is not None:
            tune += ["--time-budget", str(time_budget)]
        _step(commands, "recsvc-train", [*tune, "--out", str(folder / "params.json")])
        replay = ["--split", f"replay:{folder / 'split'}", "--seed", s, "-k", str(_K), "-q"]
        _step(commands, "recsvc-eval", [*inputs, *replay, "--params", str(folder / "params.json"),
                                        "--report", str(folder)])  # fmt: skip
        with serving(folder / "models") as address:
            _step(commands, "recsvc-eval", [*inputs, *replay, "--bundle", str(folder / "models"),
                                            "--endpoint", address, "--baselines", "none",
                                            "--report", str(folder / "endpoint")])  # fmt: skip
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        remote = json.loads((folder / "endpoint" / "report.json").read_text(encoding="utf-8"))
        per_seed[seed] = {
            "params": json.loads((folder / "params.json").read_text(encoding="utf-8")),
            "results": {r["name"]: _figures(report, r["name"]) for r in report["results"]},
            "endpoint": _figures(remote, "model@endpoint"),
            "agreement": remote["endpoint_agreement"],
            "violations": report["results"][0]["violations"],
        }

    def mean(figures: list[dict[str, float]]) -> dict[str, float]:
        return {m: float(np.mean([f[m] for f in figures])) for m in HEADLINE}

    means = {
        "recsvc, tuned (in-process)": mean([per_seed[s]["results"]["model"] for s in seeds]),
        "recsvc, tuned (--endpoint)": mean([per_seed[s]["endpoint"] for s in seeds]),
    }
    for name in per_seed[seeds[0]]["results"]:
        if name != "model":
            means[f"baseline: {name}"] = mean([per_seed[s]["results"][name] for s in seeds])
    ours = means["recsvc, tuned (in-process)"]
    beaten = {row: all(ours[m] > theirs[m] for m in HEADLINE) for row, theirs in PUBLISHED.items()}
    return {
        "seeds": list(seeds),
        "trials": trials,
        "time_budget": time_budget,
        "means": means,
        "per_seed": per_seed,
        "agree": all(per_seed[s]["agreement"]["agree"] for s in seeds),
        "beats_every_published_row": all(beaten.values()),
        "beaten": beaten,
        "commands": commands,
        "machine": machine(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def table(result: dict[str, Any]) -> str:
    """The means beside the published rows, as Markdown."""
    head = ["", *(_TITLES[m] for m in HEADLINE)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {**result["means"], **PUBLISHED}
    for name, values in rows.items():
        digits = 3 if name in PUBLISHED else 4
        cells = [f"{values[m]:.{digits}f}" for m in HEADLINE]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ml100k", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with u.data, u.item, u.user"
    )
    parser.add_argument("--work", type=Path, default=Path("var/ml100k"), help="scratch folder")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--trials", type=int, default=120, help="tune trials per seed")
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
    (args.work / "ml100k.md").write_text(text + "\n", encoding="utf-8")
    m = result["machine"]
    print(f"\nMovieLens-100K, k = {_K}, mean over seeds {', '.join(map(str, seeds))}:\n")
    print(text)
    print(
        f"\nin-process and --endpoint figures {'agree' if result['agree'] else 'DISAGREE'}; "
        f"beats every published row on all four metrics: "
        f"{'yes' if result['beats_every_published_row'] else 'no'}"
    )
    print(f"wall time {result['wall_seconds']:.0f}s on {m['cpu']}, {m['cores']} cores")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
