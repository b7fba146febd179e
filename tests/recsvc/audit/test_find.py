"""Reading a trail back: by customer (through the pseudonym key), by answer, by time."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from recsvc.audit import AuditLog, find, parse_time, read_records
from recsvc.cli import main as recsvc_main
from recsvc.logs import Pseudonymizer
from tests.recsvc.audit.helpers import an_answer

KEY = b"audit-test-key"
PSEUDONYM = Pseudonymizer(KEY)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    with AuditLog(tmp_path / "audit", rotate_bytes=3000) as trail:
        for n in range(12):
            trail.append(an_answer(n, subject=PSEUDONYM(f"C{n % 3:08d}")))
    return tmp_path / "audit"


def test_find_by_subject_and_by_recommendation_id(folder: Path) -> None:
    mine = list(find(folder, subject=PSEUDONYM("C00000001")))
    assert [r["recommendation_id"] for r in mine] == [f"{n:032x}" for n in (1, 4, 7, 10)]
    assert [r["seq"] for r in find(folder, recommendation_id=f"{5:032x}")] == [6]
    assert list(find(folder, subject=PSEUDONYM("C00000001"), recommendation_id=f"{5:032x}")) == []
    assert list(find(folder, subject=PSEUDONYM("C99999999"))) == []


def test_find_since_a_time(folder: Path) -> None:
    times = [r["time"] for r in read_records(folder) if r["kind"] == "answer"]
    since = datetime.fromisoformat(times[6])
    assert [r["time"] for r in find(folder, since=since)] == times[6:]
    later = since.astimezone(timezone(timedelta(hours=2)))  # the same instant, elsewhere
    assert [r["time"] for r in find(folder, since=later)] == times[6:]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28", datetime(2026, 11, 28, tzinfo=timezone.utc)),
        ("2026-11-28T05:12Z", datetime(2026, 11, 28, 5, 12, tzinfo=timezone.utc)),
        ("2026-11-28T07:12+02:00", datetime(2026, 11, 28, 5, 12, tzinfo=timezone.utc)),
    ],
)
def test_times_are_iso_8601_in_utc_unless_they_say(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


def test_the_cli_finds_a_customer_with_the_servers_key(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RECSVC_PSEUDONYM_KEY", raising=False)
    assert recsvc_main(["audit", "find", str(folder), "--user", "C00000002"]) == 2
    assert "RECSVC_PSEUDONYM_KEY" in capsys.readouterr().err
    monkeypatch.setenv("RECSVC_PSEUDONYM_KEY", KEY.decode())
    assert recsvc_main(["audit", "find", str(folder), "--user", "C00000002"]) == 0
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]
    assert [r["subject"] for r in records] == [PSEUDONYM("C00000002")] * 4
    assert "C00000002" not in out.out and out.err.strip() == "4 records"
    rid = f"{3:032x}"
    assert recsvc_main(["audit", "find", str(folder), "--recommendation-id", rid]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [4]
    args = ["audit", "find", str(folder), "--recommendation-id", rid, "--since", "soon"]
    assert recsvc_main(args) == 2
    assert "not an ISO 8601" in capsys.readouterr().err
