"""The people's client prints readable tables and fails with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.cli import main
from tests.conftest import ServerThread


def test_recommend_similar_info_tables(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"localhost:{server.running.port}"
    assert (
        main(["recommend", "--target", target, "--user", "C00000004", "-k", "3", "--explain"]) == 0
    )
    out = capsys.readouterr().out
    assert "source PERSONALIZED" in out and "because" in out and len(out.splitlines()) == 6
    assert main(["recommend", "--target", target, "--recent", "CC-000001", "-k", "2"]) == 0
    assert "source FOLD_IN" in capsys.readouterr().out
    assert main(["similar", "--target", target, "--item", "CC-000001", "-k", "4"]) == 0
    assert "similarity" in capsys.readouterr().out
    assert main(["info", "--target", target]) == 0
    assert "rule: suitability" in capsys.readouterr().out


def test_errors_are_reported_not_raised(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"localhost:{server.running.port}"
    assert main(["similar", "--target", target, "--item", "no-such-item"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["recommend", "--target", target, "-k", "9999", "--user", "u"]) == 1
    assert "INVALID_ARGUMENT: k:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"],
        ["--auth-token-file", "/no/token"],
        ["--workers", "0", "--port", "7000"],
        ["--workers", "2", "--port", "0"],
    ],
)
def test_serve_refuses_bad_settings_before_starting(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--models", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recsvc: error: ") and flags[0] in err
