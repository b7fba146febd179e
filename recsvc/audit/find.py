"""Reading an audit trail back: every record, or one customer's, or one answer's.

Records name customers by keyed pseudonym only, so finding a customer's records takes
the server's pseudonym key (``recsvc audit find --user`` reads ``RECSVC_PSEUDONYM_KEY``).
Reading verifies nothing: ``recsvc audit verify`` does.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from recsvc.audit.record import Line, chains, lines, segments

__all__ = ["find", "parse_time", "read_records"]


def read_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of the trail (of every chain), oldest first, as JSON objects."""
    for line in _complete_lines(folder):
        yield json.loads(line.data)


def _complete_lines(folder: Path) -> Iterable[Line]:
    """Every complete line of every chain of the trail: each chain in order, the chains
    merged by record time (ISO 8601 in UTC, so it sorts as text)."""
    per_chain = [(line for line in lines(segments(c)) if line.complete) for c in chains(folder)]
    if len(per_chain) == 1:
        return per_chain[0]
    return heapq.merge(*per_chain, key=_time)


def _time(line: Line) -> str:
    start = line.data.find(b'"time":"') + 8
    return line.data[start : line.data.find(b'"', start)].decode()


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time (``2026-11-28``, ``2026-11-28T05:12Z``); UTC unless it says.

    Raises:
        ValueError: naming the text.
    """
    try:
        when = datetime.fromisoformat(text.strip().removesuffix("Z").removesuffix("z"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or time (2026-11-28T05:12Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def find(
    folder: Path,
    *,
    subject: str | None = None,
    recommendation_id: str | None = None,
    since: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The answer records with this subject (a pseudonym) and/or recommendation id,
    written at or after ``since``, oldest first."""
    wanted = {
        key: value
        for key, value in (("subject", subject), ("recommendation_id", recommendation_id))
        if value is not None
    }
    # A cheap look at the bytes first: json.loads only the lines that may match.
    needles = [f'"{key}":{json.dumps(value)}'.encode() for key, value in wanted.items()]
    start = since.astimezone(timezone.utc).isoformat(timespec="microseconds") if since else ""
    for line in _complete_lines(folder):
        if all(needle in line.data for needle in needles):
            record = json.loads(line.data)
            matches = all(record.get(key) == value for key, value in wanted.items())
            if matches and record["kind"] == "answer" and record["time"] >= start:
                yield record
