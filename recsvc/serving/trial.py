"""Trial-load a bundle in a child process before the server trusts it.

Native readers (FAISS, Arrow, NumPy) trust their input; a crafted file could
crash the process that parses it. The server therefore verifies checksums, then
lets a throwaway process parse and warm the bundle; only if that exits cleanly
does the server load the bundle itself.

The server asks with one JSON line on the child's stdin (a :class:`TrialRequest`);
the child answers with its exit status, and on rejection the reason as the last
line of its stderr.

A child pays ~1 s of imports before it can parse anything, so after each trial
:class:`TrialRunner` starts the next child ahead of time, waiting on stdin for a folder
to try (the first trial, at server start, pays the start-up; call ``prestart`` to
overlap it with other work).
Each child tries one folder and exits: a process that parsed bad input is not reused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from recsvc.errors import BundleError, RecsvcError
from recsvc.serving.servable import load_served_model

__all__ = ["TrialRequest", "TrialRunner"]

_OK = 0
_BAD_REQUEST = 2
_REJECTED = 3


@dataclass(frozen=True)
class TrialRequest:
    """What the server asks a trial child: the folder to load, and how.

    Example:
        >>> TrialRequest(Path("models/v1")).to_line()
        '{"folder": "models/v1", "no_consent_data": false}\\n'
    """

    folder: Path
    no_consent_data: bool = False

    def to_line(self) -> str:
        fields = {"folder": str(self.folder), "no_consent_data": self.no_consent_data}
        return json.dumps(fields) + "\n"

    @classmethod
    def from_line(cls, line: str) -> TrialRequest:
        """Parse and check one line written by ``to_line``.

        Raises:
            ValueError: not exactly such an object.
        """
        obj = json.loads(line)  # JSONDecodeError is a ValueError
        if not isinstance(obj, dict) or set(obj) != {"folder", "no_consent_data"}:
            raise ValueError("expected an object with exactly folder and no_consent_data")
        folder, no_consent_data = obj["folder"], obj["no_consent_data"]
        if not isinstance(folder, str) or not folder:
            raise ValueError("folder must be a non-empty string")
        if not isinstance(no_consent_data, bool):
            raise ValueError("no_consent_data must be true or false")
        return cls(Path(folder), no_consent_data)


class TrialRunner:
    """Runs trial loads in pre-started child processes."""

    def __init__(self, no_consent_data: bool = False, timeout: float = 600.0) -> None:
        self._no_consent_data = no_consent_data
        self._timeout = timeout
        self._lock = threading.Lock()
        self._next: subprocess.Popen[str] | None = None

    def _spawn(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "recsvc.serving.trial"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def prestart(self) -> None:
        """Start the next child now, so a later trial skips its start-up."""
        with self._lock:
            if self._next is not None and self._next.poll() is not None:
                _reap(self._next)
                self._next = None
            if self._next is None:
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
            proc, self._next = self._next, None
        if proc is not None and proc.poll() is not None:
            _reap(proc)
            proc = None
        proc = proc or self._spawn()
        request = TrialRequest(folder, self._no_consent_data).to_line()
        try:
            _, stderr = proc.communicate(request, timeout=self._timeout)
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


def _reap(proc: subprocess.Popen[str]) -> None:
    """Close the pipes of a child that died waiting (the pipes would leak otherwise)."""
    proc.communicate()


def _main() -> int:
    """The child: one request from stdin; the exit status is the verdict."""
    line = sys.stdin.readline()
    if not line.strip():
        return _OK  # the server went away before asking anything
    try:
        request = TrialRequest.from_line(line)
    except ValueError as exc:
        print(f"bad trial request: {exc}", file=sys.stderr)
        return _BAD_REQUEST
    try:
        load_served_model(request.folder, request.no_consent_data, verify=False)
    except RecsvcError as exc:
        print(str(exc), file=sys.stderr)
        return _REJECTED
    return _OK


if __name__ == "__main__":
    sys.exit(_main())
