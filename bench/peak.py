"""Run a command and report its peak memory, where ``/usr/bin/time`` is missing.

``python -m bench.peak CMD ...`` runs CMD, then writes ``BENCH_MAXRSS_KB=N`` as
the last line of stderr and exits with CMD's status. The point of a separate
small process: Linux starts a child's peak-RSS count from its parent's at
fork, so a large parent (the benchmark, holding a bundle) would inflate it.
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["MARKER", "main"]

MARKER = "BENCH_MAXRSS_KB="


def main() -> int:
    proc = subprocess.Popen(sys.argv[1:])
    _, status, usage = os.wait4(proc.pid, 0)
    print(f"{MARKER}{usage.ru_maxrss}", file=sys.stderr, flush=True)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    raise SystemExit(main())
