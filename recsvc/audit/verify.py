"""Verifying an audit trail: one pass over the chain that names the first break.

Each record must match its own hash and continue the one before: the next ``seq``, and
a ``prev`` equal to the previous record's ``hash``. At the first record that does not,
the rest of the trail tells what happened:

- **edited**: a line that is not a record, or whose bytes do not match its hash (one
  byte is enough); or a record whose link back fails although the numbers run on (a
  record rewritten with its hash recomputed: the one before is named);
- **removed**: numbers are skipped and the missing record appears nowhere later;
- **reordered**: numbers are skipped and the missing record appears later (two records
  swapped, or one moved);
- **inserted**: a record whose number was seen already, or that stands in front of the
  genuine holder of its number, or that claims the same place as the record before it
  while the chain goes on from the other (a forgery with a valid hash and link).

A line cut short by a crash (no newline, at a segment's end) is part of no chain: it is
accepted where the next writer's start record names it, or at the very end of the
trail (a crash the next start will name, or a write in progress). Records removed from
the very end cannot be seen from the trail alone: compare its head with one kept
elsewhere (``expect``; the writer logs its head at each rotation and at close).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recsvc.audit.record import GENESIS, Line, RecordHead, chains, lines, parse_record, segments

__all__ = ["Problem", "Torn", "VerifyReport", "verify", "verify_chains"]


@dataclass(frozen=True)
class Problem:
    """The first break in a trail, and where it is."""

    kind: str
    """``edited``, ``removed``, ``inserted`` or ``reordered``."""
    segment: str
    line: int
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.segment} line {self.line}: {self.detail}"


@dataclass(frozen=True)
class Torn:
    """A line cut short by a crash: accepted, as it belongs to no chain."""

    segment: str
    bytes: int


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found."""

    segments: int
    records: int
    """Records checked good, up to the first problem."""
    head: tuple[int, str] | None
    """The last good record's seq and hash (None for an empty trail)."""
    torn: tuple[Torn, ...]
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        text = f"{self.records:,} records in {self.segments} segments"
        if self.head is not None:
            text += f"; head {self.head[0]} {self.head[1]}"
        for torn in self.torn:
            text += f"\ntorn line of {torn.bytes} bytes at the end of {torn.segment} (a crash)"
        return text + (f"\nFAILED: {self.problem}" if self.problem else "\nOK")


@dataclass(frozen=True)
class _Entry:
    line: Line
    head: RecordHead

    def problem(self, kind: str, detail: str) -> Problem:
        return Problem(kind, self.line.segment, self.line.number, detail)


def _heads(rest: Iterator[Line]) -> Iterator[RecordHead]:
    for line in rest:
        head = parse_record(line.data) if line.complete else None
        if head is not None:
            yield head


def _classify(good: _Entry | None, bad: _Entry, rest: Iterator[Line]) -> Problem:
    """Why ``bad`` does not follow ``good``, judged from the rest of the trail."""
    seq, prev = (good.head.seq + 1, good.head.hash) if good else (0, GENESIS)
    r = bad.head
    if r.seq < seq:
        if good is not None and (r.seq, r.prev) == (good.head.seq, good.head.prev):
            # Two records claim one place; the genuine one is the one the chain goes on from.
            after = next(_heads(rest), None)
            on_chain = after is not None and after.prev == r.hash and r.hash != good.head.hash
            intruder = good if on_chain else bad
            return intruder.problem("inserted", f"a second record {r.seq}, off the chain")
        return bad.problem("inserted", f"record {r.seq} again, after record {seq - 1}")
    if r.seq == seq:
        if any((h.seq, h.prev) == (seq, prev) for h in _heads(rest)):
            return bad.problem("inserted", f"a record {seq} in front of the genuine one")
        if good is None:
            return bad.problem("edited", "record 0 does not link to the start of the chain")
        return good.problem(
            "edited",
            f"rewritten with its hash recomputed: record {seq} (line {bad.line.number} of "
            f"{bad.line.segment}) links to another hash",
        )
    later = [h for h in _heads(rest) if h.seq in (seq, r.seq)]
    if not any((h.seq, h.prev) == (seq, prev) for h in later):
        missing = f"record {seq}" if r.seq == seq + 1 else f"records {seq}..{r.seq - 1}"
        return bad.problem("removed", f"{missing} missing before record {r.seq}")
    if any(h.seq == r.seq for h in later):
        return bad.problem("inserted", f"a record {r.seq} where record {seq} belongs")
    return bad.problem("reordered", f"record {r.seq} comes before record {seq}")


def _torn(line: Line) -> Torn:
    return Torn(line.segment, len(line.data))


def _declared(entry: _Entry) -> list[Torn]:
    """The cut-short lines a start record names (none for any other record)."""
    if entry.head.kind != "start":
        return []
    return [Torn(t["segment"], t["bytes"]) for t in json.loads(entry.line.data)["torn"]]


def verify(folder: Path, expect: tuple[int, str] | None = None) -> VerifyReport:
    """Check a whole trail, in one pass up to the first problem.

    Args:
        folder: the trail's folder.
        expect: a head kept elsewhere, ``(seq, hash)``: the trail must still hold that
            record unchanged, so records removed from its end are seen too.
    """
    paths = segments(folder)
    stream = lines(paths)
    good: _Entry | None = None
    expected: _Entry | None = None
    count = 0
    torn: list[Torn] = []
    pending: list[Line] = []  # cut-short lines, which the next start record must name
    problem: Problem | None = None
    for line in stream:
        if not line.complete:
            pending.append(line)
            continue
        head = parse_record(line.data)
        if head is None:
            problem = Problem("edited", line.segment, line.number, "not a record matching its hash")
            break
        entry = _Entry(line, head)
        if _declared(entry) != [_torn(p) for p in pending]:
            if pending:
                cut = pending[0]
                problem = Problem("edited", cut.segment, cut.number, "cut short, named by no start")
            else:
                problem = entry.problem("edited", "a start naming cut-short lines not there")
            break
        torn += map(_torn, pending)
        pending = []
        seq, prev = (good.head.seq + 1, good.head.hash) if good else (0, GENESIS)
        if (head.seq, head.prev) != (seq, prev):
            problem = _classify(good, entry, stream)
            break
        good = entry
        count += 1
        if expect is not None and head.seq == expect[0]:
            expected = entry
    torn += map(_torn, pending)  # at the very end: a crash not yet named, or a write under way
    if problem is None and expect is not None:
        if good is None or expected is None:
            problem = Problem(
                "removed",
                good.line.segment if good else "",
                good.line.number if good else 0,
                f"the trail ends at record {good.head.seq if good else -1}, "
                f"before the expected head {expect[0]}",
            )
        elif expected.head.hash != expect[1]:
            problem = expected.problem("edited", "not the hash of the expected head")
    end = (good.head.seq, good.head.hash) if good else None
    return VerifyReport(len(paths), count, end, tuple(torn), problem)


def verify_chains(folder: Path, expect: tuple[int, str] | None = None) -> dict[str, VerifyReport]:
    """:func:`verify` each chain of a trail: the folder's own, and one per ``worker-N``
    folder (``recsvc serve --workers N``), by the chain's folder relative to ``folder``.

    Raises:
        ValueError: ``expect`` given for a trail of several chains (a head is one chain's).
    """
    found = chains(folder)
    if expect is not None and len(found) > 1:
        raise ValueError(
            f"{folder} holds {len(found)} chains, one a worker: a head is one chain's, "
            f"so verify that chain's folder (e.g. {found[-1]}) with it"
        )
    return {p.relative_to(folder).as_posix(): verify(p, expect) for p in found}
