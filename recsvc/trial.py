"""Trial-load a bundle in a child process: ``python -m recsvc.trial FOLDER``.

Native readers (FAISS, Arrow, NumPy) trust their input; a crafted file could
crash the process that parses it. The server therefore verifies checksums, then
lets this throwaway process parse and warm the bundle first; only if it exits
cleanly does the server load the bundle itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from recsvc.errors import BundleError, RecsvcError

__all__ = ["trial_load"]

_OK = 0
_REJECTED = 3


def trial_load(folder: Path, consent_required: bool = True, timeout: float = 600.0) -> None:
    """Raise BundleError unless a child process loads and warms ``folder`` cleanly."""
    cmd = [sys.executable, "-m", "recsvc.trial", str(folder)]
    if not consent_required:
        cmd.append("--no-consent-data")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BundleError(f"{folder.name}: trial load took over {timeout:.0f}s") from exc
    if proc.returncode == _OK:
        return
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == _REJECTED and lines:
        raise BundleError(lines[-1])
    raise BundleError(f"{folder.name}: trial load died (exit {proc.returncode})")


def _main(argv: list[str]) -> int:
    from recsvc.store import load_served_model

    folder = Path(argv[0])
    try:
        load_served_model(folder, consent_required="--no-consent-data" not in argv, verify=False)
    except RecsvcError as exc:
        print(str(exc), file=sys.stderr)
        return _REJECTED
    return _OK


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
