"""The audit trail's writer: append-only segments, a hash chain, grouped fsyncs.

``append`` returns once its record is in the operating system (``write(2)``), so a
process killed with SIGKILL loses no record it acknowledged. A background thread
starts an fsync of what was written every ``FSYNC_INTERVAL`` (50 ms) while records
wait: on power failure the trail loses at most that window plus one fsync. With
``sync="always"``, ``append`` returns only once its record is fsynced (appends that
wait together share one fsync).

One writer at a time holds a folder (a lock on ``audit.lock`` in it). Segments are
created, appended to and closed, never rewritten. A writer opening a trail continues
the chain from the newest record on disk in a new segment, whose first record
(``kind: start``) names any segment a crash left cut short; ``verify`` accepts such a
torn last line only where a start record names it.

The first I/O error (a full disk, EIO on write or fsync) stops the writer for good:
every later ``append`` raises :class:`~recsvc.errors.AuditUnavailable`, ``healthy``
turns False and ``on_failure`` is called once, so the server can answer UNAVAILABLE
and report NOT_SERVING. A new writer (the process restarted) resumes the chain.

An ``observer`` (the server's metrics) hears of every fsync and its duration, and of
the answer records written, counted by the fsync thread at each fsync (and at close)
rather than by each ``append``, so the count costs the request path nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from recsvc.audit.record import (
    GENESIS,
    Members,
    encode_payload,
    encode_record,
    parse_record,
    segment_name,
    segments,
)
from recsvc.errors import AuditUnavailable
from recsvc.files import fsync_path

__all__ = ["FSYNC_INTERVAL", "SYNC_MODES", "AuditLog", "AuditObserver"]

log = logging.getLogger(__name__)

FSYNC_INTERVAL = 0.05
"""Seconds from one grouped fsync's start to the next while records wait: a record is on
disk within this and one fsync of its write (within 100 ms while an fsync takes under
50 ms), the most a power failure can lose."""
SYNC_MODES = ("group", "always")

_TAIL_BLOCK = 64 * 1024


class AuditObserver(Protocol):
    """What a trail reports as it goes (``recsvc.serving.metrics.Metrics`` is one)."""

    def audit_written(self, records: int = 1) -> None:
        """``records`` more answer records were written."""

    def audit_fsynced(self, seconds: float) -> None:
        """A segment was fsynced, taking ``seconds``."""


@dataclass
class _Segment:
    path: Path
    fd: int
    opened: float
    """``time.monotonic()`` at creation, for rotation by age."""
    size: int = 0
    closed: bool = False


@dataclass(frozen=True)
class _Tail:
    """Where a trail ends: the next record's number and link, and torn lines to declare."""

    seq: int = 0
    prev: str = GENESIS
    torn: tuple[dict[str, Any], ...] = ()


def _last_bytes(path: Path) -> bytes:
    """The end of a file: at least its last two newlines' worth, or all of it."""
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        data = b""
        while end > 0 and data.count(b"\n") < 2:
            start = max(0, end - _TAIL_BLOCK)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    return data


def _lock(folder: Path) -> int:
    """Hold the folder's lock (released when the descriptor closes, or the process ends)."""
    fd = os.open(folder / "audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise AuditUnavailable(f"{folder}: another process writes this audit trail") from exc
        raise
    return fd


def _read_tail(folder: Path) -> _Tail:
    """The last complete record on disk (nothing before it is verified), and the lines
    cut short after it, oldest first."""
    torn: list[dict[str, Any]] = []
    for path in reversed(segments(folder)):
        complete, newline, fragment = _last_bytes(path).rpartition(b"\n")
        if fragment:
            torn.insert(0, {"segment": path.name, "bytes": len(fragment)})
        if not newline:
            continue  # empty, or only a cut-short line: the last record is further back
        head = parse_record(complete.rpartition(b"\n")[2])
        if head is None:
            raise AuditUnavailable(
                f"{path}: the last complete record is not valid, so the chain cannot be "
                "continued; run `recsvc audit verify` on the folder"
            )
        return _Tail(head.seq + 1, head.hash, tuple(torn))
    return _Tail(torn=tuple(torn))


class AuditLog:
    """Appends audit records to a folder, one hash chain across its segments.

    Thread-safe: handlers on the event loop and in threads may append at once.

    Example:
        >>> import tempfile
        >>> with AuditLog(Path(tempfile.mkdtemp())) as trail:
        ...     trail.append({"method": "Recommend"})
        1

    Args:
        folder: where the segments go (created if missing).
        sync: ``group`` (fsync every ``fsync_interval`` while records wait) or ``always``
            (``append`` waits for its record's fsync).
        rotate_bytes: a segment grows to about this size, then a new one starts.
        rotate_seconds: or once it is this old, at its next record.
        fsync_interval: ``group``: seconds from one fsync's start to the next.
        on_failure: called once, from the thread that met the first I/O error.
        observer: told of records written and of each fsync (see the module).
    """

    def __init__(
        self,
        folder: Path,
        sync: str = "group",
        rotate_bytes: int = 256 * 1024 * 1024,
        rotate_seconds: float = 3600.0,
        fsync_interval: float = FSYNC_INTERVAL,
        on_failure: Callable[[AuditUnavailable], None] | None = None,
        observer: AuditObserver | None = None,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"audit sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
        if rotate_bytes <= 0 or rotate_seconds <= 0 or fsync_interval <= 0:
            raise ValueError("rotate_bytes, rotate_seconds and fsync_interval must be positive")
        self.folder = folder
        self.sync = sync
        self._rotate_bytes = rotate_bytes
        self._rotate_seconds = rotate_seconds
        self._interval = fsync_interval
        self._on_failure = on_failure
        self._observer = observer
        self._appended = 0  # answer records written; the fsync thread reports them
        self._reported = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the flusher waits here
        self._synced_cv = threading.Condition(self._lock)  # appenders waiting for an fsync
        self._sync_lock = threading.Lock()  # an fsync and a segment's close never overlap
        self._failure: AuditUnavailable | None = None
        self._closing = False
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._folder_lock = _lock(folder)
            try:
                self._start(_read_tail(folder))
            except BaseException:
                os.close(self._folder_lock)
                raise
        except OSError as exc:
            raise AuditUnavailable(f"{folder}: cannot open the audit trail: {exc}") from exc
        self._synced = self._seq - 1
        """The newest record known to be on disk."""
        self._flusher = threading.Thread(target=self._flush_loop, name="audit-fsync", daemon=True)
        self._flusher.start()

    @property
    def healthy(self) -> bool:
        """False once an I/O error stopped the writer (or it was closed)."""
        return self._failure is None and not self._closing

    def append(self, payload: Mapping[str, Any] | Members) -> int:
        """Write one answer's record; returns its ``seq``.

        ``payload`` is the record's payload, or its members already encoded
        (:func:`~recsvc.audit.record.encode_answer`, the serving path's cheaper form).

        Returns once the record is written to the operating system (``always``: and
        fsynced). From the event loop in ``always`` mode, await :meth:`append_async`.

        Raises:
            AuditUnavailable: the trail cannot be written; the answer must not be sent.
            ValueError: the payload is not a valid record payload (a bug in the caller).
        """
        # The costly part, outside the lock.
        members = payload if isinstance(payload, str) else encode_payload(payload)
        if not (members.startswith("{") and members.endswith("}")):
            raise ValueError("audit members must be a JSON object's text (encode_answer)")
        failed: AuditUnavailable | None = None
        with self._lock:
            if self._failure is not None:
                raise AuditUnavailable(str(self._failure)) from self._failure.__cause__
            if self._closing:
                raise AuditUnavailable("the audit trail is closed")
            try:
                if self._segment_due():
                    self._rotate()
                seq = self._write(members, "answer")
                self._appended += 1
            except OSError as exc:
                failed = self._fail_locked(exc)
            else:
                if self.sync == "always":
                    self._wake.notify()
                    while self._synced < seq and self._failure is None:
                        self._synced_cv.wait()
                    if self._synced < seq:
                        raise AuditUnavailable(str(self._failure)) from self._failure
        if failed is not None:
            self._notify(failed)
            raise failed
        return seq

    async def append_async(self, payload: Mapping[str, Any] | Members) -> int:
        """:meth:`append` for the event loop: an ``always`` fsync waits in a thread."""
        if self.sync == "always":
            return await asyncio.to_thread(self.append, payload)
        return self.append(payload)

    def close(self) -> None:
        """Fsync and close the current segment; later appends raise AuditUnavailable."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._flusher.join()
        failed = None
        with self._lock:
            segment = self._segment
            if not segment.closed:
                try:
                    self._close_segment(segment, fsync=self._failure is None)
                except OSError as exc:
                    failed = self._fail_locked(exc)
            if self._failure is None:
                self._synced = self._seq - 1
            self._synced_cv.notify_all()  # appenders waiting in "always" mode
        os.close(self._folder_lock)
        self._report()
        if failed is not None:
            self._notify(failed)
        log.info("audit trail closed", extra={"last_seq": self._seq - 1, "head": self._prev})

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self, tail: _Tail) -> None:
        """Continue the chain in a new segment, whose first record names the torn lines."""
        self._seq, self._prev = tail.seq, tail.prev
        self._segment = self._create_segment()
        try:
            self._write(encode_payload({"torn": list(tail.torn)}), "start")
            self._fsync(self._segment.fd)
        except BaseException:
            os.close(self._segment.fd)
            raise

    # From here to _fail_locked, with self._lock held.

    def _write(self, members: Members, kind: str) -> int:
        seq = self._seq
        line, digest = encode_record(seq, self._prev, datetime.now(timezone.utc), kind, members)
        written = os.write(self._segment.fd, line)
        self._segment.size += written
        if written != len(line):  # a full disk can take part of a line
            raise OSError(f"short write to {self._segment.path}: {written} of {len(line)} bytes")
        self._seq, self._prev = seq + 1, digest
        return seq

    def _segment_due(self) -> bool:
        segment = self._segment
        return (
            segment.size >= self._rotate_bytes
            or time.monotonic() - segment.opened >= self._rotate_seconds
        )

    def _create_segment(self) -> _Segment:
        path = self.folder / segment_name(self._seq, datetime.now(timezone.utc))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        fsync_path(self.folder)  # the new name survives a power failure
        return _Segment(path, fd, time.monotonic())

    def _close_segment(self, segment: _Segment, fsync: bool = True) -> None:
        with self._sync_lock:
            segment.closed = True
            try:
                if fsync:
                    self._fsync(segment.fd)
            finally:
                os.close(segment.fd)

    def _rotate(self) -> None:
        old = self._segment
        self._close_segment(old)
        self._synced = self._seq - 1
        self._synced_cv.notify_all()
        log.info(
            "audit segment closed",
            extra={"segment": old.path.name, "last_seq": self._seq - 1, "head": self._prev},
        )
        self._segment = self._create_segment()

    def _fail_locked(self, exc: OSError) -> AuditUnavailable | None:
        """Record the first failure; returns it for the caller to announce, else None."""
        if self._failure is not None:
            return None
        self._failure = AuditUnavailable(f"audit trail {self.folder}: {exc}")
        self._failure.__cause__ = exc
        self._synced_cv.notify_all()
        self._wake.notify()
        log.error("audit trail failed; no more answers", extra={"error": str(exc)})
        return self._failure

    def _fsync(self, fd: int) -> None:
        start = time.perf_counter()
        os.fsync(fd)
        if self._observer is not None:
            self._observer.audit_fsynced(time.perf_counter() - start)

    def _report(self) -> None:
        """Tell the observer of the records written since the last report."""
        appended = self._appended  # read once: appends may add to it meanwhile
        if self._observer is not None and appended > self._reported:
            self._observer.audit_written(appended - self._reported)
        self._reported = appended

    def _notify(self, failure: AuditUnavailable) -> None:
        if self._on_failure is not None:
            self._on_failure(failure)

    def _flush_loop(self) -> None:
        next_fsync = 0.0  # "group": when the next fsync may start
        while True:
            with self._lock:
                while self.healthy:
                    pending = self._synced < self._seq - 1
                    if self.sync == "always":
                        if pending:
                            break
                        self._wake.wait()
                        continue
                    # Start to start, so a record waits at most one interval and one fsync.
                    wait = next_fsync - time.monotonic()
                    if pending and wait <= 0:
                        break
                    self._wake.wait(wait if pending else self._interval)
                if not self.healthy:
                    return  # failed, or closing: close() does the last fsync
                target, segment = self._seq - 1, self._segment
            next_fsync = time.monotonic() + self._interval
            try:
                with self._sync_lock:
                    if not segment.closed:  # else a rotation fsynced it
                        self._fsync(segment.fd)
            except OSError as exc:
                with self._lock:
                    failed = self._fail_locked(exc)
                if failed is not None:
                    self._notify(failed)
                return
            with self._lock:
                self._synced = max(self._synced, target)
                self._synced_cv.notify_all()
            self._report()
