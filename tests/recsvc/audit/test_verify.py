"""verify names the first record edited, removed, inserted or reordered, each by its kind."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.audit import AuditLog, verify
from recsvc.audit.record import segments
from recsvc.audit.verify import Torn, verify_chains
from recsvc.cli import main as recsvc_main
from tests.recsvc.audit.helpers import an_answer

Trail = list[tuple[str, list[bytes]]]
"""A trail in memory: each segment's name and its lines (newlines kept)."""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs of a writer, 30 answers each, in segments of about six records."""
    folder = tmp_path_factory.mktemp("trail")
    for run in range(2):
        with AuditLog(folder, rotate_bytes=5000) as trail:
            for i in range(30):
                trail.append(an_answer(run * 100 + i))
    return folder


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "audit"
    shutil.copytree(pristine, copy)
    return copy


def _read(folder: Path) -> Trail:
    return [(p.name, p.read_bytes().splitlines(keepends=True)) for p in segments(folder)]


def _write(folder: Path, trail: Trail) -> None:
    for name, lines in trail:
        (folder / name).write_bytes(b"".join(lines))


def _flat(trail: Trail) -> list[tuple[int, int]]:
    """(segment index, line index) of every record, in order."""
    return [(s, i) for s, (_, lines) in enumerate(trail) for i in range(len(lines))]


def _where(trail: Trail, at: tuple[int, int]) -> tuple[str, int]:
    return trail[at[0]][0], at[1] + 1


def _problem(folder: Path) -> tuple[str, str, int]:
    report = verify(folder)
    assert report.problem is not None, f"not caught: {report}"
    return report.problem.kind, report.problem.segment, report.problem.line


def _detail(folder: Path) -> str:
    problem = verify(folder).problem
    assert problem is not None
    return problem.detail


def _seq(line: bytes) -> int:
    return int(json.loads(line)["seq"])


def _rehashed(line: bytes) -> bytes:
    """A record line with its hash recomputed, as a careful forger would."""
    record = json.loads(line)
    body = line[: line.rindex(b',"hash":')] + b"}"
    record["hash"] = hashlib.sha256(body).hexdigest()
    return body[:-1] + f',"hash":"{record["hash"]}"}}\n'.encode()


def test_an_untouched_trail_passes_across_rotations_and_a_restart(folder: Path) -> None:
    report = verify(folder)
    assert report.ok and report.problem is None, str(report)
    assert report.records == 62 and report.segments >= 10 and report.torn == ()
    assert str(report).endswith("OK")


def test_an_edited_byte_is_named(folder: Path) -> None:
    trail = _read(folder)
    s, i = 2, 3
    line = trail[s][1][i]
    trail[s][1][i] = line.replace(b'"tolerance":3', b'"tolerance":5')
    assert trail[s][1][i] != line
    _write(folder, trail)
    assert _problem(folder) == ("edited", *_where(trail, (s, i)))
    assert _detail(folder) == "not a record matching its hash"


def test_a_record_edited_with_its_hash_recomputed_is_named(folder: Path) -> None:
    trail = _read(folder)
    s, i = 3, 2
    trail[s][1][i] = _rehashed(trail[s][1][i].replace(b'"basis":"bundle"', b'"basis":"live"'))
    _write(folder, trail)
    assert _problem(folder) == ("edited", *_where(trail, (s, i)))
    after = _seq(trail[s][1][i + 1])
    assert _detail(folder) == (
        f"rewritten with its hash recomputed: record {after} (line {i + 2} of {trail[s][0]}) "
        "links to another hash"
    )


def test_a_removed_record_is_named(folder: Path) -> None:
    trail = _read(folder)
    s, i = 2, 3
    gone = _seq(trail[s][1].pop(i))
    _write(folder, trail)
    kind, segment, line = _problem(folder)
    assert (kind, segment, line) == ("removed", *_where(trail, (s, i)))
    assert _detail(folder) == f"record {gone} missing before record {gone + 1}"


def test_a_removed_segment_is_named(folder: Path) -> None:
    trail = _read(folder)
    (folder / trail[4][0]).unlink()
    assert _problem(folder) == ("removed", trail[5][0], 1)
    first, last = _seq(trail[4][1][0]), _seq(trail[4][1][-1])
    assert last > first
    assert _detail(folder) == f"records {first}..{last} missing before record {last + 1}"


def test_an_inserted_record_is_named(folder: Path) -> None:
    trail = _read(folder)
    copy = trail[1][1][2]
    trail[3][1].insert(1, copy)  # an old record again, later on
    _write(folder, trail)
    assert _problem(folder) == ("inserted", trail[3][0], 2)
    assert _detail(folder) == f"record {_seq(copy)} again, after record {_seq(trail[3][1][0])}"


def test_an_inserted_forgery_with_a_valid_hash_and_link_is_named(folder: Path) -> None:
    trail = _read(folder)
    genuine = trail[2][1][2]
    forged = _rehashed(genuine.replace(b'"SAV-000000"', b'"LOAN-000666"'))
    trail[2][1].insert(2, forged)  # same number, same link back: only the chain can tell
    _write(folder, trail)
    assert _problem(folder) == ("inserted", trail[2][0], 3)
    assert _detail(folder) == f"a second record {_seq(genuine)}, off the chain"


def _renumbered(line: bytes, seq: int) -> bytes:
    """A record given another number, its hash recomputed: its link back stays wrong."""
    own = json.loads(line)["seq"]
    return _rehashed(line.replace(b'"seq":%d,' % own, b'"seq":%d,' % seq, 1))


def test_a_record_in_front_of_the_genuine_one_is_named(folder: Path) -> None:
    trail = _read(folder)
    genuine = json.loads(trail[2][1][2])["seq"]
    trail[2][1].insert(2, _renumbered(trail[2][1][1], genuine))
    _write(folder, trail)
    assert _problem(folder) == ("inserted", trail[2][0], 3)
    assert _detail(folder) == f"a record {genuine} in front of the genuine one"


def test_a_removed_record_is_named_even_with_a_look_alike_later(folder: Path) -> None:
    trail = _read(folder)
    gone = json.loads(trail[2][1].pop(3))["seq"]
    trail[5][1].insert(0, _renumbered(trail[4][1][1], gone))  # its number, not its link
    _write(folder, trail)
    assert _problem(folder) == ("removed", trail[2][0], 4)
    assert _detail(folder) == f"record {gone} missing before record {gone + 1}"


def test_two_swapped_records_are_named(folder: Path) -> None:
    trail = _read(folder)
    lines = trail[2][1]
    lines[1], lines[2] = lines[2], lines[1]
    _write(folder, trail)
    assert _problem(folder) == ("reordered", trail[2][0], 2)
    first, second = _seq(lines[2]), _seq(lines[1])
    assert _detail(folder) == f"record {second} comes before record {first}"


def test_records_swapped_across_segments_are_named(folder: Path) -> None:
    trail = _read(folder)
    trail[2][1][-1], trail[3][1][0] = trail[3][1][0], trail[2][1][-1]
    _write(folder, trail)
    assert _problem(folder) == ("reordered", trail[2][0], len(trail[2][1]))
    early, late = _seq(trail[3][1][0]), _seq(trail[2][1][-1])
    assert _detail(folder) == f"record {late} comes before record {early}"


def test_records_removed_from_the_end_are_seen_against_a_head_kept_elsewhere(
    folder: Path,
) -> None:
    report = verify(folder)
    assert report.head is not None
    trail = _read(folder)
    del trail[-1][1][-1]
    _write(folder, trail)
    assert verify(folder).ok  # the trail alone cannot tell
    problem = verify(folder, expect=report.head).problem
    assert problem is not None and problem.kind == "removed"
    end = report.head[0] - 1
    assert (problem.segment, problem.line) == (trail[-1][0], len(trail[-1][1]))
    assert problem.detail == f"the trail ends at record {end}, before the expected head {end + 1}"
    wrong = verify(folder, expect=(end, "0" * 64)).problem
    assert wrong is not None
    assert (wrong.kind, wrong.segment, wrong.line) == ("edited", trail[-1][0], len(trail[-1][1]))
    assert wrong.detail == "not the hash of the expected head"
    # An empty trail holds no head at all.
    empty = folder / "empty"
    empty.mkdir()
    nothing = verify(empty, expect=(0, report.head[1])).problem
    assert nothing is not None
    assert (nothing.kind, nothing.segment, nothing.line) == ("removed", "", 0)
    assert nothing.detail == "the trail ends at record -1, before the expected head 0"


def test_record_0_linked_elsewhere_is_named(folder: Path) -> None:
    trail = _read(folder)
    first = trail[0][1][0]
    assert _seq(first) == 0
    trail[0][1][0] = _rehashed(first.replace(b'"prev":"' + b"0" * 64, b'"prev":"' + b"1" * 64))
    assert trail[0][1][0] != first
    _write(folder, trail)
    assert _problem(folder) == ("edited", trail[0][0], 1)
    assert _detail(folder) == "record 0 does not link to the start of the chain"


def test_a_later_number_where_a_record_belongs_is_named_inserted(folder: Path) -> None:
    trail = _read(folder)
    here = _seq(trail[2][1][1])
    ahead = _seq(trail[3][1][1])  # a number the trail also holds, further on
    trail[2][1].insert(1, _renumbered(trail[2][1][0], ahead))
    _write(folder, trail)
    assert _problem(folder) == ("inserted", trail[2][0], 2)
    assert _detail(folder) == f"a record {ahead} where record {here} belongs"


def test_a_line_cut_short_is_accepted_only_where_a_start_names_it(folder: Path) -> None:
    trail = _read(folder)
    last = trail[-1][1]
    last[-1] = last[-1][:50]  # a crash mid-write, at the very end
    _write(folder, trail)
    report = verify(folder)
    assert report.ok and len(report.torn) == 1 and report.torn[0].bytes == 50
    trail = _read(folder)
    trail[2][1][-1] = trail[2][1][-1][:50]  # the same in the middle: no start names it
    _write(folder, trail)
    assert _problem(folder) == ("edited", trail[2][0], len(trail[2][1]))
    assert _detail(folder) == "cut short, named by no start"


def test_a_line_cut_short_and_named_by_the_next_start_is_accepted_and_reported(
    folder: Path,
) -> None:
    trail = _read(folder)
    name, last = trail[-1][0], trail[-1][1]
    last[-1] = last[-1][:50]  # a crash mid-write ...
    _write(folder, trail)
    with AuditLog(folder) as log:  # ... then the next run, whose start record names it
        for i in range(3):
            log.append(an_answer(500 + i))
    report = verify(folder)
    assert report.ok and report.torn == (Torn(name, 50),), str(report)
    assert report.head is not None
    text = str(report)
    assert text.startswith(f"{report.records:,} records in {report.segments} segments; ")
    assert f"; head {report.head[0]} {report.head[1]}\n" in text
    assert f"\ntorn line of 50 bytes at the end of {name} (a crash)\n" in text
    assert text.endswith("\nOK")


def test_a_start_naming_cut_short_lines_not_there_is_named(folder: Path) -> None:
    trail = _read(folder)
    at = next(
        (s, i)
        for s, (_, lines) in enumerate(trail)
        for i, line in enumerate(lines)
        if json.loads(line)["kind"] == "start" and _seq(line) > 0
    )
    s, i = at
    start = trail[s][1][i]
    trail[s][1][i] = _rehashed(
        start.replace(b'"torn":[]', b'"torn":[{"bytes":9,"segment":"audit-x.jsonl"}]')
    )
    assert trail[s][1][i] != start
    _write(folder, trail)
    assert _problem(folder) == ("edited", *_where(trail, at))
    assert _detail(folder) == "a start naming cut-short lines not there"


def test_verify_chains_checks_each_workers_chain_and_a_head_only_alone(
    pristine: Path, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    shutil.copytree(pristine, one)
    head = verify(one).head
    assert head is not None
    assert verify_chains(one, expect=head)["."].ok
    assert verify_chains(one, expect=(head[0] + 1, head[1]))["."].problem is not None
    many = tmp_path / "many"
    for worker in (0, 1, 2):
        shutil.copytree(pristine, many / f"worker-{worker}")
    reports = verify_chains(many)
    assert list(reports) == ["worker-0", "worker-1", "worker-2"]
    assert all(r.ok for r in reports.values())
    with pytest.raises(ValueError) as err:
        verify_chains(many, expect=head)
    assert str(err.value) == (
        f"{many} holds 3 chains, one a worker: a head is one chain's, so verify that "
        f"chain's folder (e.g. {many / 'worker-2'}) with it"
    )


_TAMPERS = ("edit", "remove", "insert", "swap")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(tamper=st.sampled_from(_TAMPERS), data=st.data())
def test_any_one_tamper_anywhere_is_named_by_kind_and_place(
    pristine: Path, tmp_path: Path, tamper: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        folder = Path(scratch) / "audit"
        shutil.copytree(pristine, folder)
        _tamper_and_check(folder, tamper, data)


def _tamper_and_check(folder: Path, tamper: str, data: st.DataObject) -> None:
    trail = _read(folder)
    every = _flat(trail)
    # Removing the last record needs a head kept elsewhere; a swap takes the next one too.
    at = data.draw(st.sampled_from(every[:-1] if tamper in ("remove", "swap") else every))
    s, i = at
    lines = trail[s][1]
    if tamper == "edit":
        pos = data.draw(st.integers(0, len(lines[i]) - 2))
        byte = data.draw(st.integers(32, 126).filter(lambda b: b != lines[i][pos]))
        lines[i] = lines[i][:pos] + bytes([byte]) + lines[i][pos + 1 :]
        expected = ("edited", at)
    elif tamper == "remove":
        del lines[i]
        nxt = (s, i) if i < len(lines) else (s + 1, 0)
        expected = ("removed", nxt)
    elif tamper == "insert":
        source = data.draw(st.sampled_from(every))
        lines.insert(i, trail[source[0]][1][source[1]])
        expected = ("inserted", (s, i + 1) if source == (s, i) else at)
    else:
        t, j = every[every.index(at) + 1]
        lines[i], trail[t][1][j] = trail[t][1][j], lines[i]
        expected = ("reordered", at)
    _write(folder, trail)
    kind, where = expected
    assert _problem(folder) == (kind, *_where(trail, where))


def test_the_cli_exits_1_and_names_the_break(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert recsvc_main(["audit", "verify", str(folder)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    trail = _read(folder)
    del trail[1][1][1]
    _write(folder, trail)
    assert recsvc_main(["audit", "verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED: removed: {trail[1][0]} line 2: record" in out
    assert recsvc_main(["audit", "verify", str(folder), "--head", "12:abc"]) == 2
    assert "expected SEQ:HASH" in capsys.readouterr().err
