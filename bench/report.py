"""The one table a benchmark run prints, and the machine it ran on."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from importlib.metadata import version

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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine() -> str:
    """One line: CPU, cores, memory, load, and the versions that shape the figures."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    libs = ", ".join(
        f"{name} {version(name)}" for name in ("grpcio", "faiss-cpu", "implicit", "numpy")
    )
    return (
        f"{_cpu_model()}, {os.cpu_count()} cores, {_memory_gib():.0f} GiB, "
        f"load average {load} at start; Python {platform.python_version()}, {libs}"
    )
