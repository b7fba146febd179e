"""The audit trail: one hash-chained record per answer, append-only, verifiable.

``record`` (the format on disk, and the payload of each kind of answer), ``log`` (the
writer: segments, rotation, grouped fsyncs, failure), ``verify`` (one pass that names
the first record edited, removed, inserted or reordered) and ``find`` (reading records
back, by customer pseudonym or recommendation id).

Example::

    trail = AuditLog(Path("/var/lib/recsvc/audit"), on_failure=report_not_serving)
    trail.append(answer_payload(...))  # before the answer is sent; AuditUnavailable if not
    verify(Path("/var/lib/recsvc/audit")).ok
"""

from __future__ import annotations

from recsvc.audit.find import find, parse_time, read_records
from recsvc.audit.log import FSYNC_INTERVAL, SYNC_MODES, AuditLog
from recsvc.audit.record import answer_payload, audience_payload, audience_sha256
from recsvc.audit.verify import Problem, VerifyReport, verify, verify_chains

__all__ = [
    "FSYNC_INTERVAL",
    "SYNC_MODES",
    "AuditLog",
    "Problem",
    "VerifyReport",
    "answer_payload",
    "audience_payload",
    "audience_sha256",
    "find",
    "parse_time",
    "read_records",
    "verify",
    "verify_chains",
]
