"""The benchmark harness end to end in its quick mode (what CI runs; no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_bench_prints_one_table_with_every_section(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    sections = {line.split("|")[1].strip() for line in table[2:]}
    assert {"serving", "workers", "index", "training", "targeting"} <= sections
    assert (tmp_path / "report.md").read_text().startswith("| section")
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["serving"][0]["cells"]
    assert {c["server"] for c in cells} == {"empty", "recsvc", "naive"}
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in cells)
    assert results["serving"][0]["agreement"] == pytest.approx(1.0)  # flat index: exact
    assert all(r["recall"] == pytest.approx(1.0) for r in results["quality"] if r["kind"] == "flat")
