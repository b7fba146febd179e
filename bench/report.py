"""The one table a benchmark run prints, and the machine it ran on."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from importlib.metadata import version

from training.report import cpu_model, memory_gib

__all__ = ["Row", "machine", "met", "render"]


@dataclass(frozen=True)
class Row:
    """One line of the table; every field is already text."""

    section: str
    case: str
    figure: str
    against: str = ""
    ratio: str = ""
    goal: str = ""


_HEAD = ("section", "case", "figure", "against", "ratio", "goal")


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(rows: list[Row]) -> str:
    """A Markdown table (pastes into docs/BENCHMARKS.md as it is)."""
    cells = [list(_HEAD)] + [
        [r.section, r.case, r.figure, r.against or "", r.ratio or "", r.goal or ""] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEAD))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
        if n == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def machine() -> str:
    """One line: CPU, cores, memory, load, and the versions that shape the figures."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    libs = ", ".join(
        f"{name} {version(name)}" for name in ("grpcio", "faiss-cpu", "implicit", "numpy")
    )
    cpu = cpu_model() or platform.processor() or "unknown CPU"
    memory = memory_gib()
    return (
        f"{cpu}, {os.cpu_count()} cores, {math.nan if memory is None else memory:.0f} GiB, "
        f"load average {load} at start; Python {platform.python_version()}, {libs}"
    )
