"""The trial child: one JSON line in, its exit status the verdict.

A child that dies, and one the store never loads after, are in ``test_store``.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsvc.errors import BundleError
from recsvc.model.bundle import load_bundle, read_latest
from recsvc.model.manifest import FILES
from recsvc.serving import trial
from recsvc.serving.trial import TrialRequest, TrialRunner


def test_a_request_is_one_json_line_that_reads_back() -> None:
    request = TrialRequest(Path("models/v 1/\u00fc\n"), no_consent_data=True)
    line = request.to_line()
    assert line.endswith("\n") and line.count("\n") == 1
    assert TrialRequest.from_line(line) == request


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("models/v1 --no-consent-data", "Expecting value"),  # the old bare string
        ('["models/v1", false]', "exactly"),
        ('{"folder": "models/v1"}', "exactly"),
        ('{"folder": "m", "no_consent_data": false, "verify": false}', "exactly"),
        ('{"folder": "", "no_consent_data": false}', "^folder must be a non-empty string$"),
        ('{"folder": 7, "no_consent_data": false}', "^folder must be a non-empty string$"),
        ('{"folder": "m", "no_consent_data": "false"}', "^no_consent_data must be true or false$"),
        ('{"folder": "m", "no_consent_data": 0}', "^no_consent_data must be true or false$"),
    ],
)
def test_a_malformed_request_is_refused(line: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrialRequest.from_line(line)


def test_the_child_refuses_a_malformed_request(bundle_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-m", "recsvc.serving.trial"],
        input=f"{bundle_path}\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 2 and "bad trial request" in child.stderr


def test_a_good_version_passes(bundle_path: Path) -> None:
    runner = TrialRunner()
    try:
        runner.trial(bundle_path)
        runner.trial(bundle_path)  # the second from the child started ahead
    finally:
        runner.close()


def test_a_closed_runner_still_trials_in_a_fresh_child(bundle_path: Path) -> None:
    runner = TrialRunner()
    try:
        runner.prestart()
        runner.close()
        runner.trial(bundle_path)
        runner.close()
        runner.close()  # closing twice is harmless
        runner.trial(bundle_path)
    finally:
        runner.close()


def test_prestart_keeps_one_child_waiting_and_replaces_it_if_it_died(bundle_path: Path) -> None:
    runner = TrialRunner()
    try:
        runner.prestart()
        waiting = runner._next
        assert waiting is not None and waiting.poll() is None
        runner.prestart()
        assert runner._next is waiting  # not a second child
        waiting.kill()
        waiting.wait()
        runner.prestart()
        assert runner._next is not waiting and runner._next.poll() is None
    finally:
        runner.close()


def test_a_trial_does_not_use_a_waiting_child_that_died(bundle_path: Path) -> None:
    runner = TrialRunner()
    try:
        runner.prestart()
        assert runner._next is not None
        runner._next.kill()
        runner._next.wait()
        runner.trial(bundle_path)  # in a fresh child: not "trial load died"
    finally:
        runner.close()


def test_what_a_child_prints_never_reaches_the_servers_output(
    bundle_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A library in the child that prints (here at start-up) must not write into the
    # server's stdout, which may carry its own output.
    (tmp_path / "sitecustomize.py").write_text("print('child noise')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner = TrialRunner()
    try:
        runner.trial(bundle_path)
    finally:
        runner.close()
    assert "child noise" not in capfd.readouterr().out


def test_a_child_that_dies_is_reported_as_died_whatever_it_printed_first(
    bundle_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a child that exits with the rejected status speaks for the version; the last
    # words of one that crashed are not a verdict.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal, sys\nsys.stderr.write('some last words\\n')\nsys.stderr.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner = TrialRunner()
    try:
        with pytest.raises(BundleError) as err:
            runner.trial(bundle_path)
    finally:
        runner.close()
    assert str(err.value) == f"{bundle_path.name}: trial load died (exit -9)"


def test_a_child_that_takes_too_long_is_a_rejection(bundle_path: Path) -> None:
    runner = TrialRunner(timeout=0.01)
    try:
        with pytest.raises(BundleError, match="trial load took over"):
            runner.trial(bundle_path)
    finally:
        runner.close()


def _child_verdict(monkeypatch: pytest.MonkeyPatch, stdin: str) -> int:
    """The trial child's verdict on ``stdin``, in this process (what the child runs)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return trial._main()


def test_the_child_passes_a_good_version_and_rejects_a_bad_one_with_its_reason(
    bundle_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _child_verdict(monkeypatch, TrialRequest(bundle_path).to_line()) == 0
    assert capsys.readouterr().err == ""
    missing = tmp_path / "v0"
    assert _child_verdict(monkeypatch, TrialRequest(missing).to_line()) == 3
    assert capsys.readouterr().err.splitlines()[-1] == "v0: no such bundle folder"


def test_the_child_names_what_is_wrong_with_a_malformed_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _child_verdict(monkeypatch, '{"folder": ""}\n') == 2
    assert capsys.readouterr().err == (
        "bad trial request: expected an object with exactly folder and no_consent_data\n"
    )


def test_a_child_asked_nothing_exits_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server closed the pipe (or sent a blank line) before asking: not a verdict.
    for stdin in ("", "\n", "  \n"):
        assert _child_verdict(monkeypatch, stdin) == 0
    assert capsys.readouterr().err == ""


def test_the_child_parses_without_hashing_again_what_the_server_verified(
    models_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server checks every checksum before it asks; hashing each file again in the
    # child would double a version's load time. A file changed after publishing (still
    # a valid array) shows it: only a check of the checksums would notice.
    folder = models_copy / str(read_latest(models_copy))
    factors = np.load(folder / FILES.item_factors, allow_pickle=False)
    np.save(folder / FILES.item_factors, factors * np.float32(2))
    with pytest.raises(BundleError, match="fails its sha256 check"):
        load_bundle(folder)
    assert _child_verdict(monkeypatch, TrialRequest(folder).to_line()) == 0
    assert capsys.readouterr().err == ""
