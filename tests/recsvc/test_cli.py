"""The people's client prints readable tables and fails with a clear message."""

from __future__ import annotations

import sys
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--token-file", "/no/token"], "--token-file: cannot read /no/token"),
        (["--tls-ca", "/no/ca.pem"], "tls ca: cannot read /no/ca.pem"),
        (["--tls-cert", "{cert}"], "a client certificate needs its private key"),
    ],
)
def test_client_flags_are_checked_before_any_call(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not used")
    argv = ["info", "--target", "localhost:1", *(f.format(cert=cert) for f in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("recsvc: error: ") and message in err


def test_client_commands_say_what_to_install_without_the_client(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "recsvc_client", None)  # as if not installed
    assert main(["info", "--target", "localhost:1"]) == 2
    assert "need recsvc-client: pip install clients/python" in capsys.readouterr().err


def test_the_write_commands_change_what_the_server_answers(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import ServerThread, settings_for

    live = ServerThread(
        settings_for(models_dir, state=f"sqlite:///{tmp_path}/s.db", pseudonym_key=b"cli-key")
    )
    target = f"localhost:{live.running.port}"
    try:
        ask = ["--target", target]
        assert main(["recommend", *ask, "--user", "C00000004", "-k", "1"]) == 0
        first = capsys.readouterr().out.splitlines()[-1].split()[1]
        assert (
            main(
                [
                    "event",
                    *ask,
                    "--user",
                    "C00000004",
                    "--item",
                    first,
                    "--type",
                    "purchase",
                    "--id",
                    "cli-1",
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "event cli-1: recorded 1" in out
        sequence = out.rsplit("state sequence ", 1)[1].strip()
        assert (
            main(["recommend", *ask, "--user", "C00000004", "-k", "1", "--min-sequence", sequence])
            == 0
        )
        assert first not in capsys.readouterr().out
        assert (
            main(
                [
                    "event",
                    *ask,
                    "--user",
                    "C00000004",
                    "--item",
                    first,
                    "--type",
                    "purchase",
                    "--id",
                    "cli-1",
                ]
            )
            == 0
        )
        assert "duplicate" in capsys.readouterr().out
        assert main(["customer", *ask, "--user", "C00000004", "--consent", "no"]) == 0
        assert "updated 1 customer" in capsys.readouterr().out
        assert main(["product", *ask, "--item", first, "--active", "no"]) == 0
        assert "updated 1 product" in capsys.readouterr().out
        assert main(["forget", *ask, "--user", "C00000004", "--reference", "case-9"]) == 0
        receipt = capsys.readouterr().out
        assert "case-9" in receipt and "C00000004" not in receipt
        receipt_id = next(line.split()[1] for line in receipt.splitlines() if "receipt_id" in line)
        assert main(["receipt", *ask, "--id", receipt_id]) == 0
        assert receipt_id in capsys.readouterr().out
        assert main(["event", *ask, "--user", "u", "--item", "i", "--type", "teleport"]) == 1
        assert "events[0].type" in capsys.readouterr().err
    finally:
        live.stop()
