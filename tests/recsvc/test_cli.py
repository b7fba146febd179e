"""The people's client prints readable tables and fails with a clear message."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsvc.cli import build_parser, main
from tests.conftest import ServerThread, settings_for
from tests.postgres import free_port


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


def test_a_because_column_only_with_explain(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    ask = ["recommend", "--server", f"localhost:{server.running.port}", "--user", "C00000004"]
    assert main([*ask, "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["#", "item_id", "score"]
    assert all(line == line.rstrip() for line in lines)  # no empty column at the end
    assert main([*ask, "-k", "3", "--explain"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["#", "item_id", "score", "because"]


def test_rank_says_why_each_candidate_is_left_out(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    b = server.running.store.current().recommender.bundle
    user = "C00000004"
    history = b.user_item_rows(b.users.index(user))
    had = b.items.ids[int(history[0])]
    ask = ["rank", "--server", f"localhost:{server.running.port}", "--user", user]
    items = [f"--item={i}" for i in (*b.items.ids, "ghost")]
    assert main([*ask, *items, "--recent", "nowhere"]) == 0
    captured = capsys.readouterr()
    ranked, _, left_out = captured.out.partition("\nleft out\n")
    why = {line.split()[0]: line.split()[1] for line in left_out.splitlines()[2:]}
    assert why["ghost"] == "UNKNOWN_ITEM" and why[had] == "INTERACTED"
    assert {"UNSUITABLE", "INACTIVE"} <= set(why.values())
    assert had not in ranked and "not folded in: nowhere" in captured.err
    assert main([*ask, *items, "--include-interacted"]) == 0
    ranked = capsys.readouterr().out.partition("\nleft out\n")[0]
    assert had in ranked


def test_unknown_recent_items_are_named_not_silently_dropped(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    ask = ["recommend", "--server", f"localhost:{server.running.port}", "--recent", "CC-9"]
    assert main(ask) == 0
    captured = capsys.readouterr()
    assert "source POPULAR" in captured.out
    assert "not folded in: CC-9" in captured.err


def test_every_client_command_names_its_server_the_same_way() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    asking = set()
    for name, command in commands.items():
        flags = {f for action in command._actions for f in action.option_strings}
        if "--token-file" in flags:  # a command that calls a server
            asking.add(name)
            assert "--server" in flags, name
            assert "--target" not in command.format_help(), name  # read as the product
    assert {"recommend", "rank", "similar", "info", "health", "target", "event"} <= asking
    for name in ("recommend", "similar"):
        help_text = commands[name].format_help()
        assert "how many products" in help_text
    assert "weighed most" in commands["recommend"].format_help()


def test_the_server_can_come_from_the_environment(
    server: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSVC_SERVER", f"localhost:{server.running.port}")
    assert main(["info"]) == 0
    assert "rule: suitability" in capsys.readouterr().out


def test_health_exits_0_only_once_serving(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--server", f"localhost:{server.running.port}"]) == 0
    assert capsys.readouterr().out.endswith(": SERVING\n")
    empty = ServerThread(settings_for(tmp_path, trial_in_child=False), load=False)
    try:
        waited = time.monotonic()
        assert main(["health", "--server", f"localhost:{empty.running.port}", "--wait", "1"]) == 1
        assert time.monotonic() - waited >= 1
        assert capsys.readouterr().out.endswith(": NOT_SERVING\n")
    finally:
        empty.stop()
    assert main(["health", "--server", f"127.0.0.1:{free_port()}"]) == 1
    assert ": UNAVAILABLE: " in capsys.readouterr().out


def test_target_says_why_the_audience_is_smaller_than_asked(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "aud.parquet"
    ask = ["target", "--server", f"localhost:{server.running.port}", "--item", "CC-000001"]
    assert main([*ask, "--size", "100000", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = pq.read_metadata(out).num_rows
    assert f"{n:,} customers, not the 100,000 asked for:" in lines[1]
    assert "without marketing consent" in lines[1] and "who hold one already" in lines[1]
    assert main([*ask, "--size", "3", "--out", str(out)]) == 0
    assert "asked for" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags",
    [
        ["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"],
        ["--auth-token-file", "/no/token"],
        ["--workers", "0", "--port", "7000"],
        ["--workers", "2", "--port", "0"],
        ["--metrics-port", "7000", "--port", "7000"],
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
