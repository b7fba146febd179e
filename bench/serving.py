"""Serving benchmark: recsvc against the empty-handler ceiling and the naive path.

Each server is its own process (``recsvc serve``, or ``bench.servers`` for the
empty and naive ones), each load run is its own client process
(``bench.load``), all on 127.0.0.1. For every (bundle, concurrency) cell the
three servers are measured back to back, so the ratios compare runs seconds
apart on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.bundles import latest_bundle
from bench.servers import READY_LINE
from recsvc.model.manifest import FILES
from recsvc.v1 import recommender_pb2 as _pb
from recsvc.v1 import recommender_pb2_grpc as _pb_grpc

__all__ = [
    "Cell",
    "LoadSpec",
    "Server",
    "answers",
    "free_port",
    "launch",
    "measure_cells",
    "overlap",
    "paired_ratios",
    "wait_ready",
    "write_users",
]

# What each worker logs once it serves: recsvc's store, or bench.servers.
_READY_LINES = ("serving model version", READY_LINE)


def paired_ratios(cells: list[Cell], server: str, against: str) -> list[float]:
    """``server``'s QPS over ``against``'s, round by round (cells of one concurrency).

    Rounds run the servers back to back, so each ratio compares runs seconds apart:
    on a machine shared with other work their median is steadier than a ratio of
    bests, each of which may come from a quiet moment the other never had.
    """
    by_round: dict[int, dict[str, Cell]] = {}
    for c in cells:
        by_round.setdefault(c.round, {})[c.server] = c
    return [
        r[server].qps / r[against].qps
        for _, r in sorted(by_round.items())
        if server in r and against in r and r[against].qps > 0
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process on 127.0.0.1:``port``."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workers: int = 1

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_ready(server: Server, workers: int, timeout: float) -> None:
    """Health SERVING, and with several workers, every worker's model loaded."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                tail = server.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{server.name} exited during start-up:\n{tail}")
            with contextlib.suppress(grpc.RpcError):
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                text = server.log_path.read_text(errors="replace")
                loaded = workers <= 1 or sum(text.count(x) for x in _READY_LINES) >= workers
                if status == health_pb2.HealthCheckResponse.SERVING and loaded:
                    return
            time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s")


def launch(
    kind: str,
    models: Path | None,
    logs: Path,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
) -> Server:
    """Start ``recsvc`` (the service), ``empty`` or ``naive``; see ``wait_ready``.

    ``env`` adds to the server's environment (recsvc reads ``RECSVC_*`` settings there);
    ``name`` tells two servers of one kind apart in the results.
    """
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{kind}-w{workers}-{port}.log"
    if kind == "recsvc":
        assert models is not None
        cmd = [
            str(Path(sys.executable).with_name("recsvc")),
            "serve",
            "--models",
            str(models),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--poll-interval",
            "3600",
            "--workers",
            str(workers),
        ]
    else:
        cmd = [sys.executable, "-m", "bench.servers", "--kind", kind, "--port", str(port)]
        cmd += ["--workers", str(workers)]
        if models is not None:
            cmd += ["--models", str(models)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    name = name or (kind if workers == 1 else f"{kind} x{workers}")
    return Server(name, port, proc, log_path, workers)


def wait_ready(servers: list[Server], timeout: float = 900) -> None:
    """Wait for every server; stop them all if one fails."""
    try:
        for server in servers:
            _wait_ready(server, server.workers, timeout)
    except BaseException:
        for server in servers:
            server.stop()
        raise


def answers(server: Server, users: list[str], k: int) -> list[tuple[str, list[str]]]:
    """(source, item ids) per user from real calls: a broken server must not post a record."""
    out = []
    with grpc.insecure_channel(server.target) as channel:
        stub = _pb_grpc.RecommenderStub(channel)
        for user in users:
            resp = stub.Recommend(_pb.RecommendRequest(user_id=user, k=k), timeout=60)
            if len(resp.items) != k:
                raise RuntimeError(f"{server.name} answered {len(resp.items)} items, not {k}")
            out.append((_pb.Source.Name(resp.source), [it.item_id for it in resp.items]))
    return out


def overlap(served: list[list[str]], exact: list[list[str]]) -> float:
    """Mean share of the exact answer that the served answer holds."""
    shares = [len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(served, exact, strict=True)]
    return float(np.mean(shares)) if shares else float("nan")


def write_users(models: Path, out: Path, n: int, seed: int = 0) -> list[str]:
    """A seeded sample of the bundle's customers, one id a line, for the load client."""
    ids = pq.read_table(latest_bundle(models) / FILES.users, columns=["user_id"]).column(0)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ids), size=min(n, len(ids)), replace=False)
    users = [str(u) for u in ids.take(pick).to_pylist()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(users) + "\n", encoding="utf-8")
    return users


@dataclass(frozen=True)
class LoadSpec:
    seconds: float
    warmup: float
    max_requests: int
    k: int = 10
    channels: int = 0
    """Client connections; 0: one per concurrent caller, up to 16 (spreads over workers)."""
    rounds: int = 1
    """Runs per cell; the best (least disturbed by other work on the machine) is kept."""


@dataclass(frozen=True)
class Cell:
    """One load run's figures."""

    server: str
    concurrency: int
    qps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu_us: float
    client_cpu_us: float
    round: int = 0


def measure_cells(
    servers: list[Server],
    users_file: Path,
    concurrencies: list[int],
    spec: LoadSpec,
    log: Callable[[str], None],
    every_round: bool = False,
) -> list[Cell]:
    """One load client process: every server at every concurrency, servers interleaved.

    Returns the best round of each (server, concurrency) cell, or with ``every_round``
    every round's (to compare servers round by round: ``paired_ratios``).
    """
    cmd = [
        sys.executable,
        "-m",
        "bench.load",
        "--users",
        str(users_file),
        "-k",
        str(spec.k),
        "--concurrency",
        ",".join(str(c) for c in concurrencies),
        "--seconds",
        str(spec.seconds),
        "--warmup",
        str(spec.warmup),
        "--max-requests",
        str(spec.max_requests),
        "--channels",
        str(spec.channels),
        "--rounds",
        str(spec.rounds),
    ]
    for server in servers:
        cmd += ["--target", f"{server.name}={server.target}@{server.proc.pid}"]
    budget = len(servers) * len(concurrencies) * spec.rounds * (spec.seconds + spec.warmup + 30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cells = []
    assert proc.stdout is not None
    deadline = time.monotonic() + budget
    for line in proc.stdout:
        r = json.loads(line)
        cell = Cell(
            r["server"],
            r["concurrency"],
            r["qps"],
            r["p50_ms"],
            r["p99_ms"],
            r["requests"],
            r["errors"],
            r["server_cpu_us"],
            r["client_cpu_us"],
            r["round"],
        )
        log(
            f"  {cell.server:>10} c={cell.concurrency:<3} {cell.qps:>8,.0f} QPS  "
            f"p50 {cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
            f"CPU/request server {cell.server_cpu_us:5.0f} us, client {cell.client_cpu_us:4.0f} us"
            + (f"  {cell.errors} errors: {r['first_error']}" if cell.errors else "")
        )
        cells.append(cell)
        if time.monotonic() > deadline:
            proc.kill()
            break
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed:\n{err[-2000:]}")
    if every_round:
        return cells
    best: dict[tuple[str, int], Cell] = {}
    for cell in cells:
        key = (cell.server, cell.concurrency)
        if key not in best or cell.qps > best[key].qps:
            best[key] = cell
    return list(best.values())
