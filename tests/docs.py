"""Running the shell blocks of a Markdown page as a reader would, so the page cannot drift.

A page's ```sh blocks run in order in a scratch checkout (its own ``var/``, with this
checkout's ``.venv`` and ``deploy`` linked in), each under ``bash -euo pipefail``. A test
names every block by its first line: the ones it runs and, with a reason, the ones it
cannot; a block it does not know fails it, so a new block cannot go untested unnoticed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "Block", "run_block", "scratch_checkout", "sh_blocks"]

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One ```sh block: where it starts and what it says."""

    page: str
    line: int
    text: str

    @property
    def first(self) -> str:
        """Its first command line: what a test knows it by."""
        return next(line for line in self.text.splitlines() if line and line[0] != "#")

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.first}"


def sh_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page.name, text.count("\n", 0, m.start()) + 2, m[1]) for m in _FENCE.finditer(text)
    ]


def scratch_checkout(folder: Path) -> Path:
    """A folder that looks like a fresh checkout to the commands: ``.venv`` and ``deploy``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (".venv", "deploy"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run_block(
    block: Block,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    ports: Mapping[int, int] | None = None,
    timeout: float = 600,
) -> str:
    """Run ``block`` (each port of ``ports`` replaced by its value); its output, or a failure.

    What a block starts and leaves running is its own (a cluster outlives the block that
    starts it); if the block fails, everything it started is stopped with it.
    """
    text = block.text
    for old, new in (ports or {}).items():
        text = re.sub(rf"\b{old}\b", str(new), text)
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        _stop_session(proc)
        raise
    output = out.decode(errors="replace")
    if proc.returncode != 0:
        _stop_session(proc)
        raise AssertionError(f"{block} exited {proc.returncode}:\n{output[-4000:]}")
    return output


def _stop_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
