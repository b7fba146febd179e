"""Training cost: ``fit`` end to end against bare implicit plus a FAISS build.

Both run in their own child process, one after the other, so each has the
machine to itself and its peak memory is its own (``wait4``):

- ``e2e``: what ``recsvc-train fit`` runs: read and check the Parquet data,
  weight, fit, build both indexes, publish the bundle (hashes, fsyncs, rename);
- ``bare``: the same confidence matrix (read from that bundle, so the input is
  identical), implicit's ``fit`` with the same parameters, and FAISS indexes of
  the same kind and parameters over the item and user factors, nothing else.

``python -m bench.training e2e --sample DIR --models DIR`` and
``python -m bench.training bare --bundle DIR`` print one JSON object each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bundles import BundleSpec, Measured, run_measured

__all__ = ["TrainingResult", "compare_training", "main"]


@dataclass(frozen=True)
class TrainingResult:
    e2e: Measured
    bare: Measured
    e2e_phases: dict[str, Any]
    bare_phases: dict[str, Any]

    @property
    def ratio(self) -> float:
        return self.e2e.seconds / self.bare.seconds

    @property
    def ingest_rows_per_s(self) -> float:
        return self.e2e_phases["rows_read"] / max(1e-9, self.e2e_phases["load_s"])


def _e2e(args: argparse.Namespace) -> dict[str, Any]:
    from training.data import load_training_data
    from training.fit import FitParams, fit_model
    from training.publish import publish

    sample = Path(args.sample)
    t0 = time.perf_counter()
    data = load_training_data(
        sample / "interactions.parquet", sample / "items.parquet", sample / "users.parquet"
    )
    t1 = time.perf_counter()
    params = FitParams(factors=args.factors, iterations=args.iterations, seed=args.seed)
    model = fit_model(data.user_items, params, progress=False)
    t2 = time.perf_counter()
    folder = publish(Path(args.models), data, model)
    t3 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "fit_s": t2 - t1,
        "publish_s": t3 - t2,
        "rows_read": float(data.report.rows_read),
        "pairs": float(data.user_items.nnz),
        "bundle": str(folder),
    }


def _bare(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import numpy as np
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from recsvc.model.bundle import read_manifest
    from recsvc.model.manifest import FILES

    folder = Path(args.bundle)
    manifest = read_manifest(folder)
    t0 = time.perf_counter()
    confidence = sp.csr_matrix(
        (
            np.load(folder / FILES.data),
            np.load(folder / FILES.indices),
            np.load(folder / FILES.indptr),
        ),
        shape=(manifest.counts.users, manifest.counts.items),
    )
    t1 = time.perf_counter()
    p = manifest.params
    with threadpool_limits(1, "blas"):  # implicit's advice, as fit follows it
        model = AlternatingLeastSquares(
            factors=p["factors"],
            regularization=p["regularization"],
            alpha=p["alpha"],
            iterations=p["iterations"],
            random_state=p["seed"],
            calculate_training_loss=False,
        )
        model.fit(confidence, show_progress=False)
    t2 = time.perf_counter()
    specs = manifest.indexes
    for spec, factors in ((specs.items, model.item_factors), (specs.users, model.user_factors)):
        x = np.ascontiguousarray(factors, dtype=np.float32)
        if spec.kind == "hnsw":
            index = faiss.IndexHNSWFlat(x.shape[1], spec.params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = spec.params["efConstruction"]
        elif spec.kind == "ivf":
            quantizer = faiss.IndexFlatIP(x.shape[1])
            index = faiss.IndexIVFFlat(
                quantizer, x.shape[1], spec.params["nlist"], faiss.METRIC_INNER_PRODUCT
            )
            index.train(x)
        else:
            index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "fit_s": t2 - t1, "index_s": t3 - t2}


def _child(cmd: list[str]) -> tuple[Measured, dict[str, Any]]:
    result = run_measured(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:5])} failed:\n{result.stderr[-2000:]}")
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def compare_training(sample: Path, spec: BundleSpec, work: Path) -> TrainingResult:
    """Run ``e2e`` then ``bare`` on ``sample`` and return both measurements."""
    models = work / "training-models"
    shutil.rmtree(models, ignore_errors=True)
    try:
        e2e, e2e_phases = _child(
            [
                *(sys.executable, "-m", "bench.training", "e2e"),
                *("--sample", str(sample), "--models", str(models)),
                *spec.fit_options,
            ]
        )
        bundle = str(e2e_phases.pop("bundle"))
        bare, bare_phases = _child(
            [sys.executable, "-m", "bench.training", "bare", "--bundle", bundle]
        )
    finally:
        shutil.rmtree(models, ignore_errors=True)
    return TrainingResult(e2e, bare, e2e_phases, bare_phases)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("e2e", help="load, weight, fit, index, publish")
    e.add_argument("--sample", required=True)
    e.add_argument("--models", required=True)
    e.add_argument("--factors", type=int, default=64)
    e.add_argument("--iterations", type=int, default=15)
    e.add_argument("--seed", type=int, default=7)
    b = sub.add_parser("bare", help="implicit fit + FAISS build on a bundle's matrix")
    b.add_argument("--bundle", required=True)
    args = p.parse_args(argv)
    out = _e2e(args) if args.command == "e2e" else _bare(args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
