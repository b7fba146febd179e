"""What ``recsvc-train`` prints: bars on a terminal, plain lines in a log; short audiences."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main

SMALL = ["--users", "300", "--items", "40"]


def _train(*argv: str, stderr: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=stderr,
        check=True,
        timeout=300,
    )


def test_into_a_log_progress_is_plain_lines(tmp_path: Path) -> None:
    sample, models = tmp_path / "sample", tmp_path / "models"
    log = _train("sample-data", "--out", str(sample), *SMALL, stderr=subprocess.PIPE).stderr
    data = [f"--{t}={sample / t}.parquet" for t in ("interactions", "items", "users")]
    log += _train("fit", *data, "--models", str(models), stderr=subprocess.PIPE).stderr
    assert b"\r" not in log  # a bar redraws itself with carriage returns
    lines = [line for line in log.decode().splitlines() if line.startswith("recsvc-train: ")]
    assert [line.split()[1] for line in lines] == ["writing", "loading", "fitting", "building"]
    quiet = _train("-q", "fit", *data, "--models", str(models), stderr=subprocess.PIPE).stderr
    assert b"recsvc-train:" not in quiet and b"\r" not in quiet


def test_on_a_terminal_the_bars_show(tmp_path: Path) -> None:
    main_fd, terminal = pty.openpty()
    try:
        _train("sample-data", "--out", str(tmp_path), *SMALL, stderr=terminal)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main_fd)
    assert b"\r" in shown and b"recsvc-train: writing" in shown


def test_an_offline_audience_smaller_than_asked_says_why(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "aud.parquet"
    argv = ["-q", "audience", "--models", str(models_dir), "--item", "CC-000001"]
    assert main([*argv, "--size", "100000", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "not the 100,000 asked for" in said and "without marketing consent" in said
    assert main([*argv, "--size", "2", "--out", str(out)]) == 0
    assert "asked for" not in capsys.readouterr().out
