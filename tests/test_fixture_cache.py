"""The kept fixtures: built once by the original code, shared after, private under a mutant."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixture_cache import ENV, kept


class Builds:
    """A build step that counts its calls and leaves a file behind."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out: Path) -> None:
        self.calls += 1
        (out / "made").write_text(str(self.calls))


def _fresh(tmp_path: Path) -> Path:
    out = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    out.mkdir()
    return out


def test_without_the_variable_each_session_builds_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    build = Builds()
    first = kept("sample", build, lambda: _fresh(tmp_path))
    second = kept("sample", build, lambda: _fresh(tmp_path))
    assert build.calls == 2 and first != second


def test_with_the_variable_the_original_code_builds_once_and_every_session_shares_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("MUTANT_UNDER_TEST", "stats")
    build = Builds()
    first = kept("models", build, lambda: _fresh(tmp_path))
    monkeypatch.setenv("MUTANT_UNDER_TEST", "recsvc.model.bundle.x_sha256_file__mutmut_1")
    second = kept("models", build, lambda: _fresh(tmp_path))
    assert build.calls == 1 and first == second
    assert first.is_relative_to(tmp_path / "cache") and (first / "made").read_text() == "1"
    assert [p.name for p in first.parent.iterdir()] == ["models"]  # no partial entry left


def test_a_mutant_finding_no_entry_builds_a_private_copy_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("MUTANT_UNDER_TEST", "recsvc.model.bundle.x_sha256_file__mutmut_1")
    build = Builds()
    out = kept("models", build, lambda: _fresh(tmp_path))
    assert build.calls == 1 and not out.is_relative_to(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*"))


def test_a_failed_build_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("MUTANT_UNDER_TEST", "")

    def broken(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        kept("models", broken, lambda: _fresh(tmp_path))
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    build = Builds()
    kept("models", build, lambda: _fresh(tmp_path))
    assert build.calls == 1
