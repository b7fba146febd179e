"""Evaluation reports: ``report.json`` (everything), ``report.md`` (tables), plots.

Plots need the optional ``plots`` extra (matplotlib); without it they are skipped and
the report says so.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.metrics import METRICS

__all__ = [
    "HEADLINE",
    "QUALITY",
    "baseline_notes",
    "cpu_model",
    "machine",
    "markdown_table",
    "memory_gib",
    "model_losses",
    "plot_metrics",
    "write_report",
]

HEADLINE = ("map", "ndcg", "precision", "recall")
"""The four metrics of the published MovieLens table, in its column order."""

QUALITY = ("precision", "recall", "ndcg", "map", "hit_rate", "mrr")
"""The metrics where higher is better for the user (not coverage or novelty)."""

_TITLES = {
    "precision": "Precision",
    "recall": "Recall",
    "ndcg": "nDCG",
    "map": "MAP",
    "hit_rate": "Hit rate",
    "mrr": "MRR",
    "coverage": "Coverage",
    "novelty": "Novelty",
}


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo``; None where it does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def memory_gib() -> float | None:
    """Total memory in GiB from ``/proc/meminfo``; None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def machine() -> dict[str, Any]:
    """What ran the evaluation: CPU, cores, memory, Python and library versions."""
    import implicit
    import numpy

    memory = memory_gib()
    return {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": None if memory is None else round(memory, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "implicit": implicit.__version__,
        "numpy": numpy.__version__,
    }


def markdown_table(
    results: Sequence[dict[str, Any]], k: int, metrics: Sequence[str] = METRICS
) -> str:
    """One row per result, one column per metric at ``k``."""
    head = ["", *(f"{_TITLES[m]}@{k}" for m in metrics), "suitability violations"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [f"{r['metrics'][m][str(k)]:.4f}" for m in metrics]
        lines.append(
            f"| {r['name']} | " + " | ".join(cells) + f" | {r['violations']['suitability']} |"
        )
    return "\n".join(lines)


def model_losses(report: dict[str, Any]) -> list[str]:
    """One line per (k, metric) where a baseline beats the served model, else none.

    The served model is the ``model`` result; every result not named ``model...`` is a
    baseline. Only the :data:`QUALITY` metrics count.
    """
    results = report["results"]
    model = next((r for r in results if r["name"] == "model"), None)
    if model is None:
        return []
    baselines = [r for r in results if not r["name"].startswith("model")]
    lines = []
    for k in report["ks"]:
        for m in QUALITY:
            ours = model["metrics"][m][str(k)]
            better = sorted(
                (r for r in baselines if r["metrics"][m][str(k)] > ours),
                key=lambda r: -r["metrics"][m][str(k)],
            )
            if better:
                theirs = ", ".join(f"{r['name']} {r['metrics'][m][str(k)]:.4f}" for r in better)
                lines.append(
                    f"the served model loses on {_TITLES[m]}@{k}: {ours:.4f} against {theirs}"
                )
    return lines


def baseline_notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """What a baseline chose (EASE's lambda), one line each."""
    lines = []
    for r in results:
        params = r.get("params")
        if r["name"] == "ease" and params:
            by_lambda = sorted(params["by_lambda"].items(), key=lambda kv: float(kv[0]))
            tried = ", ".join(f"{lam} {v:.4f}" for lam, v in by_lambda)
            edge = " (still at the edge of the range)" if params["at_edge"] else ""
            validated = params.get("validated_lambda", params["lambda"])
            refit = ""
            if validated != params["lambda"]:
                refit = (
                    f" ({validated:g} on validation, times the {params['refit_share']:.0%} of "
                    "the pairs it fitted on)"
                )
            lines.append(
                f"ease: lambda {params['lambda']:g}{refit}{edge}, chosen by "
                f"{params['chosen_by']} (tried: {tried})"
            )
    return lines


def plot_metrics(report: dict[str, Any], folder: Path) -> list[Path] | str:
    """One PNG per metric against k, a line per result; a note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'recsvc[plots]')"
    folder.mkdir(parents=True, exist_ok=True)
    ks = report["ks"]
    paths = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in report["results"]:
            values = [r["metrics"][metric][str(k)] for k in ks]
            ax.plot(ks, values, marker="o", label=r["name"])
        ax.set_xlabel("k")
        ax.set_ylabel(_TITLES[metric])
        ax.set_title(f"{_TITLES[metric]} at k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = folder / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _markdown(report: dict[str, Any], plots: list[Path] | str) -> str:
    data, split = report["data"], report["split"]
    lines = [
        "# Evaluation report",
        "",
        f"- split: `{split.get('spec')}`, seed {split.get('seed')}; "
        f"{data['train_pairs']:,} training pairs, {data['test_pairs']:,} test pairs "
        f"over {data['test_users']:,} users "
        f"({data['test_users_unknown_to_training']:,} unknown to training)",
        f"- model: bundle `{report['bundle']['version']}`, {report['bundle']['algorithm']}, "
        f"params `{json.dumps(report['bundle']['params'], sort_keys=True)}`",
        f"- command: `{report.get('command', '')}`",
        f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores",
    ]
    lines += [f"- {note}" for note in baseline_notes(report["results"])]
    agreement = report.get("endpoint_agreement")
    if agreement:
        verdict = "agree" if agreement["agree"] else "DISAGREE"
        lines.append(
            f"- in-process and endpoint {verdict}: {agreement['users_with_different_lists']} of "
            f"{agreement['users_compared']} users got different lists, largest metric gap "
            f"{agreement['max_metric_difference']:.2e}"
        )
    if any(not r["name"].startswith("model") for r in report["results"]):
        losses = [f"- {line}" for line in model_losses(report)]
        lines += ["", "## Where a baseline beats the served model", ""]
        lines += losses or ["Nowhere: the served model is ahead of every baseline on every metric."]
    for k in report["ks"]:
        lines += ["", f"## At k = {k}", "", markdown_table(report["results"], k)]
    lines += ["", "Definitions: docs/EVALUATION.md.", ""]
    if isinstance(plots, str):
        lines.append(plots)
    else:
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_metrics(report, folder / "plots")
    report["plots"] = plots if isinstance(plots, str) else [str(p) for p in plots]
    report["model_losses"] = model_losses(report)
    paths = {"json": folder / "report.json", "markdown": folder / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    paths["markdown"].write_text(_markdown(report, plots), encoding="utf-8")
    return paths
