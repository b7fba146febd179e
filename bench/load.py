"""The load client: a separate process driving one server with unary calls.

``python -m bench.load --target empty=127.0.0.1:P1 --target recsvc=127.0.0.1:P2
--users FILE --concurrency 1,8,32 --seconds 3`` prints one JSON line per
(concurrency, server) cell: requests, errors, QPS, p50/p99 latency, and CPU per
request of the client and (given ``@PID``) of the server. Servers are
interleaved within each concurrency, so their figures are seconds apart.

Every server under test gets the same client: requests are serialized once up
front and responses are not parsed, so the client spends as little CPU per call
as grpc.aio allows and the servers are compared on what they do. Bounded in time
and in count, and loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from recsvc.v1 import recommender_pb2 as _pb

__all__ = ["RECOMMEND", "LoadResult", "main", "run_load"]

RECOMMEND = "/recsvc.v1.Recommender/Recommend"
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_MAX_REQUESTS = 1_000_000
_MAX_SECONDS = 120.0


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    qps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    server_cpu_us: float
    """Server CPU per request (all its processes and threads); NaN when unknown."""
    client_cpu_us: float
    """This client's CPU per request."""
    first_error: str = ""


def _check_target(target: str) -> None:
    host = target.rsplit(":", 1)[0]
    if host not in _LOOPBACK:
        raise SystemExit(f"bench.load only sends to loopback, not {host!r}")


def _process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its child processes so far (Linux /proc), 0 if unknown."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                total += sum(_process_cpu(int(c)) for c in f.read().split())
    except (OSError, IndexError, ValueError):
        pass
    return total


def _requests(users: Sequence[str], k: int) -> list[bytes]:
    return [_pb.RecommendRequest(user_id=u, k=k).SerializeToString() for u in users]


async def run_load(
    target: str,
    payloads: Sequence[bytes],
    concurrency: int,
    seconds: float,
    max_requests: int,
    warmup_seconds: float = 0.3,
    channels: int = 0,
    server_pid: int = 0,
) -> LoadResult:
    """Drive ``target`` with ``concurrency`` callers until ``seconds`` or ``max_requests``.

    Callers share ``channels`` connections (0: one per caller, at most 16). With
    ``recsvc serve --workers N`` the kernel spreads *connections* over the
    workers (SO_REUSEPORT), so one connection would load one worker only.
    """
    _check_target(target)
    seconds = min(seconds, _MAX_SECONDS)
    max_requests = min(max_requests, _MAX_REQUESTS)
    n_channels = channels or min(concurrency, 16)
    # A local subchannel pool gives each channel its own TCP connection.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n_channels)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in opened)), 30)
        # Bytes in, bytes out: no client-side protobuf work.
        calls = [ch.unary_unary(RECOMMEND) for ch in opened]
        latencies = np.empty(max_requests, dtype=np.int64)
        state = {"next": 0, "errors": 0, "first_error": ""}
        n_payloads = len(payloads)

        async def caller(start: int, deadline: float, record: bool) -> None:
            call = calls[start % n_channels]
            i = start
            while time.perf_counter() < deadline:
                slot = state["next"]
                if record:
                    if slot >= max_requests:
                        return
                    state["next"] = slot + 1
                t0 = time.perf_counter_ns()
                try:
                    await call(payloads[i % n_payloads], timeout=10)
                except grpc.aio.AioRpcError as exc:
                    state["errors"] += 1
                    if not state["first_error"]:
                        state["first_error"] = f"{exc.code().name}: {exc.details()}"
                if record:
                    latencies[slot] = time.perf_counter_ns() - t0
                i += concurrency

        # Warm-up (connection, server caches, both processes' first calls) is not measured.
        warm_end = time.perf_counter() + warmup_seconds
        await asyncio.gather(*(caller(c, warm_end, False) for c in range(concurrency)))
        state["errors"], state["first_error"] = 0, ""
        server0 = _process_cpu(server_pid) if server_pid else 0.0
        client0 = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(caller(c, start + seconds, True) for c in range(concurrency)))
        elapsed = time.perf_counter() - start
        client_cpu = time.process_time() - client0
        server_cpu = _process_cpu(server_pid) - server0 if server_pid else float("nan")
    finally:
        for ch in opened:
            await ch.close()
    n = int(state["next"])
    ms = latencies[:n] / 1e6
    return LoadResult(
        concurrency=concurrency,
        requests=n,
        errors=int(state["errors"]),
        seconds=round(elapsed, 3),
        qps=round(n / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=round(float(np.percentile(ms, 50)), 3) if n else float("nan"),
        p99_ms=round(float(np.percentile(ms, 99)), 3) if n else float("nan"),
        mean_ms=round(float(ms.mean()), 3) if n else float("nan"),
        server_cpu_us=round(server_cpu / n * 1e6, 1) if n else float("nan"),
        client_cpu_us=round(client_cpu / n * 1e6, 1) if n else float("nan"),
        first_error=str(state["first_error"]),
    )


async def _cells(args: argparse.Namespace, payloads: list[bytes]) -> None:
    """Every (concurrency, round, target) cell, targets interleaved within a round."""
    targets = []
    for spec in args.target:
        name, _, rest = spec.rpartition("=")
        address, _, pid = rest.partition("@")
        _check_target(address)
        targets.append((name or address, address, int(pid or 0)))
    for concurrency in args.concurrency:
        for round_ in range(args.rounds):
            for name, address, pid in targets:
                result = await run_load(
                    address,
                    payloads,
                    concurrency,
                    args.seconds,
                    args.max_requests,
                    args.warmup,
                    args.channels,
                    pid,
                )
                line = {"server": name, "round": round_, **asdict(result)}
                print(json.dumps(line), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.load", description=__doc__)
    p.add_argument(
        "--target",
        action="append",
        required=True,
        help="[NAME=]127.0.0.1:PORT[@SERVER_PID] (repeatable; the pid adds server CPU)",
    )
    p.add_argument("--users", type=Path, required=True, help="text file, one user id a line")
    p.add_argument("-k", type=int, default=10)
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[1],
        help="comma-separated, e.g. 1,8,32",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="per cell")
    p.add_argument("--max-requests", type=int, default=200_000, help="per cell")
    p.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds per cell")
    p.add_argument("--channels", type=int, default=0, help="connections (0: min(c, 16))")
    p.add_argument("--rounds", type=int, default=1, help="repeat each cell, servers interleaved")
    args = p.parse_args(argv)
    users = args.users.read_text(encoding="utf-8").split()
    asyncio.run(_cells(args, _requests(users, args.k)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
