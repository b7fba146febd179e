"""Trial-load a bundle in a child process before the server trusts it.

Native readers (FAISS, Arrow, NumPy) trust their input; a crafted file could
crash the process that parses it. The server therefore verifies checksums, then
lets a throwaway process parse and warm the bundle; only if that exits cleanly
does the server load the bundle itself.

A child pays ~1 s of imports before it can parse anything, so after each trial
:class:`TrialRunner` starts the next child ahead of time, waiting on stdin for a folder
to try (the first trial, at server start, pays the start-up; call ``prestart`` to
overlap it with other work).
Each child tries one folder and exits: a process that parsed bad input is not reused.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from recsvc.errors import BundleError, RecsvcError

__all__ = ["TrialRunner"]

_OK = 0
_REJECTED = 3


class TrialRunner:
    """Runs trial loads in pre-started child processes."""

    def __init__(self, no_consent_data: bool = False, timeout: float = 600.0) -> None:
        self._cmd = [sys.executable, "-m", "recsvc.serving.trial"]
        if no_consent_data:
            self._cmd.append("--no-consent-data")
        self._timeout = timeout
        self._lock = threading.Lock()
        self._next: subprocess.Popen[str] | None = None

    def _spawn(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self._cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def prestart(self) -> None:
        """Start the next child now, so a later trial skips its start-up."""
        with self._lock:
            if self._next is None or self._next.poll() is not None:
                self._next = self._spawn()

    def close(self) -> None:
        with self._lock:
            if self._next is not None:
                self._next.kill()
                self._next.communicate()  # reaps the child and closes its pipes
                self._next = None

    def trial(self, folder: Path) -> None:
        """Raise BundleError unless a child loads and warms ``folder`` cleanly."""
        with self._lock:
            proc = self._next if self._next is not None and self._next.poll() is None else None
            self._next = None
        proc = proc or self._spawn()
        try:
            _, stderr = proc.communicate(str(folder) + "\n", timeout=self._timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            raise BundleError(f"{folder.name}: trial load took over {self._timeout:.0f}s") from exc
        finally:
            self.prestart()
        if proc.returncode == _OK:
            return
        lines = stderr.strip().splitlines()
        if proc.returncode == _REJECTED and lines:
            raise BundleError(lines[-1])
        raise BundleError(f"{folder.name}: trial load died (exit {proc.returncode})")


def _main(argv: list[str]) -> int:
    from recsvc.serving.store import (
        load_served_model,  # the imports are the slow part: do them first
    )

    line = sys.stdin.readline().strip()
    if not line:
        return _OK  # the server went away before asking anything
    try:
        load_served_model(Path(line), no_consent_data="--no-consent-data" in argv, verify=False)
    except RecsvcError as exc:
        print(str(exc), file=sys.stderr)
        return _REJECTED
    return _OK


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
