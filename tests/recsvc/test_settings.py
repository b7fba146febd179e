"""Settings: every one has a flag and a ``RECSVC_*`` variable; defaults < variables < flags."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from recsvc.cli import build_parser, main
from recsvc.settings import SETTINGS, ServerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
FIELDS = [f.name for f in fields(ServerSettings)]


@pytest.fixture(autouse=True)
def _no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in SETTINGS.values():
        monkeypatch.delenv(setting.variable, raising=False)


@dataclass(frozen=True)
class Case:
    """A variable's text and what it gives; a flag's values and what they give over it."""

    env: str
    value: object
    flag_args: list[str]
    flag_value: object
    under: str = ""
    """The variable's text the flag overrides, where not ``env`` (a switch's flag only flips)."""
    also: dict[str, str] = field(default_factory=dict)
    """Other variables the setting needs (a TLS key needs its certificate)."""


def _cases(d: Path) -> dict[str, Case]:
    cert, key, ca, other = (d / name for name in ("cert.pem", "key.pem", "ca.pem", "other"))
    for path in (cert, key, ca, other):
        path.write_text("-")
    pair = {"RECSVC_TLS_CERT": str(cert), "RECSVC_TLS_KEY": str(key)}
    tokens = {name: d / f"{name}.json" for name in ("tokens-env", "tokens-flag")}
    for name, path in tokens.items():
        entry = {"name": name, "token": f"{name}-0123456789abcdef", "scopes": ["recommend"]}
        path.write_text(json.dumps({"tokens": [entry]}))
        path.chmod(0o600)
    key_set = {"RECSVC_PSEUDONYM_KEY": "k"}
    return {
        "models": Case(str(d / "env"), d / "env", [str(d / "flag")], d / "flag"),
        "host": Case("0.0.0.0", "0.0.0.0", ["127.0.0.1"], "127.0.0.1"),
        "port": Case("6000", 6000, ["7000"], 7000),
        "poll_interval": Case("0.5", 0.5, ["2.5"], 2.5),
        "workers": Case("3", 3, ["4"], 4),
        "max_concurrent_rpcs": Case("16", 16, ["32"], 32),
        "max_message_bytes": Case("1024", 1024, ["2048"], 2048),
        "grace_seconds": Case("1.5", 1.5, ["3"], 3.0),
        "metrics_port": Case("9100", 9100, ["9200"], 9200),
        "pseudonym_key": Case("k-env", b"k-env", ["k-flag"], b"k-flag"),
        "trial_in_child": Case("no", False, [], False, under="yes"),
        "no_consent_data": Case("1", True, [], True, under="0"),
        "state": Case(
            "sqlite:///env.db",
            "sqlite:///env.db",
            ["sqlite:///flag.db"],
            "sqlite:///flag.db",
            also={"RECSVC_PSEUDONYM_KEY": "k"},
        ),
        "exclusive_categories": Case("mortgage, pension", ("mortgage", "pension"), ["none"], ()),
        "log_level": Case("debug", "DEBUG", ["warning"], "WARNING"),
        "contact_policy": Case(str(other), other, [str(ca)], ca),
        "auth_token_file": Case(str(other), other, [str(ca)], ca),
        "auth_tokens": Case(
            str(tokens["tokens-env"]),
            tokens["tokens-env"],
            [str(tokens["tokens-flag"])],
            tokens["tokens-flag"],
        ),
        "audit_dir": Case(str(d / "a"), d / "a", [str(d / "b")], d / "b", also=key_set),
        "audit_sync": Case("always", "always", ["group"], "group"),
        "tls_cert": Case(str(cert), cert, [str(other)], other, also={"RECSVC_TLS_KEY": str(key)}),
        "tls_key": Case(str(key), key, [str(other)], other, also={"RECSVC_TLS_CERT": str(cert)}),
        "tls_client_ca": Case(str(ca), ca, [str(other)], other, also=pair),
    }


def _serve(*flags: str) -> ServerSettings:
    """Settings as ``recsvc serve`` builds them from these flags and the environment."""
    return ServerSettings.from_args(build_parser().parse_args(["serve", *flags]))


def test_the_table_has_every_setting(tmp_path: Path) -> None:
    assert set(_cases(tmp_path)) == set(FIELDS) == set(SETTINGS)


@pytest.mark.parametrize("name", FIELDS)
def test_a_variable_sets_each_setting_and_its_flag_overrides_it(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case, setting = _cases(tmp_path)[name], SETTINGS[name]
    monkeypatch.setenv("RECSVC_MODELS", str(tmp_path))
    for variable, text in {**case.also, setting.variable: case.env}.items():
        monkeypatch.setenv(variable, text)
    got = getattr(_serve(), name)
    assert got == case.value != getattr(ServerSettings(models=tmp_path), name)
    monkeypatch.setenv(setting.variable, case.under or case.env)
    under = getattr(_serve(), name)
    assert getattr(_serve(setting.flag, *case.flag_args), name) == case.flag_value != under


def test_unset_or_empty_variables_leave_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSVC_PORT", "")
    got = _serve("--models", str(tmp_path))
    want = ServerSettings(models=tmp_path)
    for name in FIELDS:
        if name != "pseudonym_key":
            assert getattr(got, name) == getattr(want, name), name
    # Unset, the key is random per process: lines join only within one run.
    assert len(got.pseudonym_key) == 32
    assert got.pseudonym_key != _serve("--models", ".").pseudonym_key
    assert got.pseudonym_key.hex() not in repr(got)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECSVC_MODELS", str(tmp_path))
    monkeypatch.setenv("RECSVC_PORT", "6000")
    monkeypatch.setenv("RECSVC_PSEUDONYM_KEY", "k1")
    s = ServerSettings.from_env(port=7000)
    assert (s.models, s.port, s.pseudonym_key) == (tmp_path, 7000, b"k1")
    monkeypatch.delenv("RECSVC_MODELS")
    with pytest.raises(ValueError, match="no model folder"):
        ServerSettings.from_env()
    with pytest.raises(ValueError, match="fixed --port"):
        ServerSettings.from_env(models=tmp_path, workers=2, port=0)
    with pytest.raises(ValueError, match="go together"):
        ServerSettings.from_env(models=tmp_path, tls_cert=tmp_path / "c")


def test_audit_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--audit-dir needs a fixed --pseudonym-key"):
        ServerSettings.from_env(models=tmp_path, audit_dir=tmp_path / "audit")
    keyed = {"models": tmp_path, "pseudonym_key": b"k"}
    with pytest.raises(ValueError, match="not a folder"):
        ServerSettings.from_env(**keyed, audit_dir=Path(__file__))
    with pytest.raises(ValueError, match="group or always"):
        ServerSettings.from_env(**keyed, audit_sync="sometimes")


@pytest.mark.parametrize(
    ("variable", "text"),
    [("RECSVC_PORT", "http"), ("RECSVC_TRIAL_IN_CHILD", "maybe"), ("RECSVC_LOG_LEVEL", "loud")],
)
def test_a_bad_variable_is_refused_by_name(
    variable: str,
    text: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, text)
    assert main(["serve", "--models", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"recsvc: error: {variable}: ")


@pytest.mark.parametrize(("flag", "text"), [("--port", "http"), ("--log-level", "loud")])
def test_a_bad_flag_is_refused_by_name(
    flag: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", flag, text])
    assert exit_.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def test_the_readme_names_every_flag_and_variable() -> None:
    serving = re.search(r"^## Serving$(.*?)^## ", README.read_text(), re.M | re.S)
    assert serving is not None
    for setting in SETTINGS.values():
        assert f"`{setting.flag}" in serving[1] and f"`{setting.variable}`" in serving[1]


def test_a_state_store_needs_the_pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSVC_MODELS", "var/models")
    with pytest.raises(ValueError, match="--state needs RECSVC_PSEUDONYM_KEY"):
        _serve("--state", "sqlite:///state.db")
    monkeypatch.setenv("RECSVC_PSEUDONYM_KEY", "a key")
    assert _serve("--state", "sqlite:///state.db").pseudonym_key == b"a key"
