"""Sample banks and model bundles for the benchmarks, built once and cached.

A bundle is keyed by everything that shapes it (users, items, seed, factors,
iterations), so a rerun with the same parameters reuses it and a changed
parameter builds a new one. Both steps run the real command-line tools in a
child process: the harness stays small, and the fit is the one users run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.peak import MARKER
from recsvc.model.bundle import read_latest

__all__ = [
    "BundleSpec",
    "Measured",
    "build_record",
    "ensure_bundle",
    "ensure_sample",
    "fit_command",
    "latest_bundle",
    "run_measured",
]


@dataclass(frozen=True)
class BundleSpec:
    """One benchmark bundle.

    Example:
        >>> BundleSpec(users=100_000, items=100_000).key
        'u100000-i100000-s7-f64-it15'
    """

    users: int
    items: int
    seed: int = 7
    factors: int = 64
    iterations: int = 15

    @property
    def key(self) -> str:
        return f"u{self.users}-i{self.items}-s{self.seed}-f{self.factors}-it{self.iterations}"

    @property
    def sample_key(self) -> str:
        return f"u{self.users}-i{self.items}-s{self.seed}"

    @property
    def label(self) -> str:
        return f"{_short(self.items)} items"

    @property
    def fit_options(self) -> list[str]:
        """The training options of ``recsvc-train fit`` (and ``bench.training e2e``)."""
        return [
            *("--factors", str(self.factors)),
            *("--iterations", str(self.iterations)),
            *("--seed", str(self.seed)),
        ]


def _short(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}K"
    return str(n)


@dataclass(frozen=True)
class Measured:
    """A finished child process: exit status, wall seconds, peak resident memory."""

    returncode: int
    seconds: float
    max_rss_bytes: int
    stdout: str
    stderr: str


def latest_bundle(models: Path) -> Path:
    """The folder of the version ``models/LATEST`` names; exits naming ``models`` without one."""
    version = read_latest(models)
    if version is None:
        raise SystemExit(f"no LATEST under {models}")
    return models / version


def run_measured(cmd: list[str]) -> Measured:
    """Run ``cmd`` to completion, timing it and reading its own peak RSS.

    The peak comes from ``/usr/bin/time`` (or ``bench.peak``), a small process
    between us and the command: Linux seeds a child's peak-RSS count with its
    parent's size at fork, and this process may hold a bundle.
    """
    timer = ["/usr/bin/time", "-f", f"{MARKER}%M"] if Path("/usr/bin/time").exists() else None
    wrapper = timer or [sys.executable, "-m", "bench.peak"]
    start = time.perf_counter()
    out = subprocess.run([*wrapper, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = out.stderr.rstrip("\n").split("\n")
    peak_kib = 0
    if lines and lines[-1].startswith(MARKER):
        peak_kib = int(lines.pop()[len(MARKER) :])
    # /usr/bin/time prefixes a note when the command fails; keep the status, drop the note.
    lines = [line for line in lines if not line.startswith("Command exited with non-zero")]
    return Measured(out.returncode, seconds, peak_kib * 1024, out.stdout, "\n".join(lines))


def _tool(name: str) -> str:
    """A console script from the running interpreter's environment."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def build_record(root: Path, spec: BundleSpec) -> dict[str, Any] | None:
    """How long building ``spec``'s sample and bundle took, and their peak memory."""
    path = root / "models" / f"{spec.key}.build.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _record(root: Path, spec: BundleSpec, step: str, result: Measured) -> None:
    path = root / "models" / f"{spec.key}.build.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.is_file() else {"spec": asdict(spec)}
    record[step] = {
        "seconds": round(result.seconds, 2),
        "max_rss_mib": round(result.max_rss_bytes / 2**20, 1),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "output": result.stdout.strip().splitlines()[-6:],
    }
    path.write_text(json.dumps(record, indent=2))


def ensure_sample(root: Path, spec: BundleSpec, log: Log = _quiet) -> Path:
    """The sample bank for ``spec`` under ``root/samples``, generated if absent."""
    out = root / "samples" / spec.sample_key
    if (out / "interactions.parquet").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    cmd = [
        _tool("recsvc-train"),
        "-q",
        "sample-data",
        "--out",
        str(tmp),
        "--users",
        str(spec.users),
        "--items",
        str(spec.items),
        "--seed",
        str(spec.seed),
    ]
    log(f"building sample {spec.sample_key}")
    result = run_measured(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"sample-data failed for {spec.sample_key}:\n{result.stderr[-2000:]}")
    _record(root, spec, "sample", result)
    tmp.rename(out)
    return out


def fit_command(sample: Path, models: Path, spec: BundleSpec) -> list[str]:
    """``recsvc-train fit`` for a sample, as a user would run it."""
    return [
        _tool("recsvc-train"),
        "-q",
        "fit",
        "--interactions",
        str(sample / "interactions.parquet"),
        "--items",
        str(sample / "items.parquet"),
        "--users",
        str(sample / "users.parquet"),
        "--models",
        str(models),
        *spec.fit_options,
    ]


def ensure_bundle(root: Path, spec: BundleSpec, log: Log = _quiet) -> Path:
    """A models folder (with LATEST) for ``spec`` under ``root/models``, fitted if absent."""
    models = root / "models" / spec.key
    if read_latest(models) is not None:
        return models
    sample = ensure_sample(root, spec, log)
    log(f"fitting bundle {spec.key}")
    result = run_measured(fit_command(sample, models, spec))
    if result.returncode != 0:
        raise RuntimeError(f"fit failed for {spec.key}:\n{result.stderr[-2000:]}")
    _record(root, spec, "fit", result)
    return models
