"""The benchmark harness end to end in its quick mode (what CI runs; no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(540)
def test_quick_bench_prints_one_table_with_every_section(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    sections = {line.split("|")[1].strip() for line in table[2:]}
    assert {"serving", "workers", "index", "training", "targeting", "live"} <= sections
    assert (tmp_path / "report.md").read_text().startswith("| section")
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["serving"][0]["cells"]
    assert {c["server"] for c in cells} == {"empty", "recsvc", "naive"}
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in cells)
    assert results["serving"][0]["agreement"] == pytest.approx(1.0)  # flat index: exact
    assert all(r["recall"] == pytest.approx(1.0) for r in results["quality"] if r["kind"] == "flat")
    live = results["live"]
    # Both writing paths on each backend (PostgreSQL unless the run says why not), and
    # every write took effect on the other server.
    backends = ("sqlite",) if live["postgres"] else ("sqlite", "postgresql")
    assert {(r["backend"], r["path"]) for r in live["throughput"]} == {
        (b, p) for b in backends for p in ("store", "grpc")
    }
    assert all(r["events"] > 0 for r in live["throughput"])
    assert [p["excluded"] for p in live["propagation"]] == [
        p["samples"] for p in live["propagation"]
    ]
    assert live["serving"]["changed"] == live["overlay"]["customers"] == 200
    assert {c["server"] for c in live["serving"]["cells"]} == {"recsvc", "recsvc+live"}
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in live["serving"]["cells"])
