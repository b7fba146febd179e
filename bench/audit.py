"""What an audit record costs: appends a second and bytes a record, by sync mode.

    python -m bench.audit [--seconds S] [--threads 1,4] [--k 10] [--dir DIR]

Each cell appends Recommend-shaped records (``k`` items with scores) for ``S``
seconds from that many threads, building each payload as the service would, and
prints one Markdown table; the folder is a temporary one under ``--dir`` (default:
the system's), since fsync costs depend on the disk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from recsvc.audit import SYNC_MODES, AuditLog, answer_payload
from recsvc.audit.record import segments

__all__ = ["main", "measure"]


def _payload(n: int, k: int) -> dict[str, object]:
    return answer_payload(
        recommendation_id=os.urandom(16).hex(),
        method="Recommend",
        caller="mobile-app",
        subject=f"u_{n % 65536:016x}",
        model_version="v20261128-051200-123456",
        state_sequence=n,
        source="PERSONALIZED",
        tolerance=1 + n % 5,
        basis="bundle",
        removed={"unsuitable": 7, "inactive": 2, "held": 3, "excluded": 0},
        items=[(f"ETF-{(n + i) % 100_000:06d}", 1.0 / (i + 1.5)) for i in range(k)],
    )


def measure(folder: Path, sync: str, threads: int, seconds: float, k: int) -> dict[str, float]:
    """Appends for ``seconds`` from ``threads`` threads; records a second, us each, bytes each."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds
    with AuditLog(folder, sync=sync) as trail:

        def work(slot: int) -> None:
            n = 0
            while time.perf_counter() < stop:
                trail.append(_payload(n, k))
                n += 1
            counts[slot] = n

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
    total = sum(counts)
    size = sum(p.stat().st_size for p in segments(folder))
    return {
        "records_per_s": total / elapsed,
        "us_per_record": elapsed / total * 1e6 * threads,
        "bytes_per_record": size / (total + 1),  # and the start record
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--threads", default="1,4", help="comma-separated thread counts")
    parser.add_argument("--k", type=int, default=10, help="items a record")
    parser.add_argument("--dir", type=Path, default=None, help="where the trails go")
    args = parser.parse_args(argv)
    print("| sync | threads | records/s | us a record (thread time) | bytes a record |")
    print("| --- | --- | --- | --- | --- |")
    for sync in SYNC_MODES:
        for threads in map(int, args.threads.split(",")):
            with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
                r = measure(Path(scratch), sync, threads, args.seconds, args.k)
            print(
                f"| {sync} | {threads} | {r['records_per_s']:,.0f} | "
                f"{r['us_per_record']:.1f} | {r['bytes_per_record']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
