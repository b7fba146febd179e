"""For tests of code that audits its answers: the records of a trail, and a full disk.

``an_answer(n)`` is a realistic answer payload; ``answer_records(folder)`` checks the
trail's whole chain and gives each answer's record by recommendation id, failing on a
second record for one answer; ``fill_disk(folder)`` makes the open segment's every
later write fail with ENOSPC, from the kernel itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recsvc.audit import answer_payload, read_records, verify_chains

__all__ = ["an_answer", "answer_records", "fill_disk"]


def an_answer(n: int, subject: str = "u_0123456789abcdef") -> dict[str, Any]:
    """A Recommend answer's payload, the ``n``-th (its recommendation id says which)."""
    return answer_payload(
        recommendation_id=f"{n:032x}",
        method="Recommend",
        caller="mobile-app",
        subject=subject,
        model_version="v20261128-051200-123456",
        state_sequence=n,
        source="PERSONALIZED",
        tolerance=3,
        basis="bundle",
        removed={"unsuitable": 4, "inactive": 1, "held": 2, "excluded": 0},
        items=[(f"SAV-{i:06d}", 1.0 / (i + 1)) for i in range(10)],
    )


def answer_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Every answer record of a trail whose every chain verifies, by ``recommendation_id``."""
    for chain, report in verify_chains(folder).items():
        assert report.ok, f"{chain}: {report}"
    records: dict[str, dict[str, Any]] = {}
    for record in read_records(folder):
        if record["kind"] == "answer":
            rid = record["recommendation_id"]
            assert rid not in records, f"two audit records for answer {rid}"
            records[rid] = record
    return records


def fill_disk(folder: Path) -> int:
    """Put ``/dev/full`` under every descriptor this process holds on a segment in
    ``folder``: writes then fail with ENOSPC and fsyncs with EINVAL, and the files on
    disk stay as they were. Returns how many descriptors it replaced."""
    full = os.open("/dev/full", os.O_WRONLY)
    replaced = 0
    try:
        for name in os.listdir("/proc/self/fd"):
            try:
                target = Path(os.readlink(f"/proc/self/fd/{name}"))
            except OSError:  # closed since the listing
                continue
            if target.parent == folder.resolve() and target.suffix == ".jsonl":
                os.dup2(full, int(name))
                replaced += 1
    finally:
        os.close(full)
    return replaced
