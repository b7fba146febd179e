"""The writer: the chain across rotations and restarts, fsync windows, failures, crashes."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import recsvc.audit.log
from recsvc.audit import AuditLog, read_records, verify
from recsvc.audit.record import GENESIS, encode_payload, segments
from recsvc.audit.verify import Torn
from recsvc.errors import AuditUnavailable
from tests.recsvc.audit.helpers import an_answer, answer_records, fill_disk

ROOT = Path(__file__).resolve().parents[3]


def test_records_chain_from_a_start_record(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as trail:
        assert [trail.append(an_answer(i)) for i in range(3)] == [1, 2, 3]
    records = list(read_records(tmp_path))
    assert [r["seq"] for r in records] == [0, 1, 2, 3]
    assert records[0]["kind"] == "start" and records[0]["prev"] == GENESIS
    assert records[0]["torn"] == []
    assert all(r["prev"] == p["hash"] for p, r in itertools.pairwise(records))
    assert records[1]["items"][0] == ["SAV-000000", 1.0] and records[1]["caller"] == "mobile-app"
    assert list(answer_records(tmp_path)) == [f"{i:032x}" for i in range(3)]
    assert len(segments(tmp_path)) == 1 and verify(tmp_path).head == (3, records[3]["hash"])


def test_the_chain_runs_on_across_rotations_and_restarts(tmp_path: Path) -> None:
    n = 0
    for _ in range(3):  # three runs of a server, each rotating several times
        with AuditLog(tmp_path, rotate_bytes=4000) as trail:
            for _ in range(20):
                trail.append(an_answer(n))
                n += 1
    report = verify(tmp_path)
    assert report.ok, str(report)
    assert report.records == 3 + n  # a start record a run
    assert report.segments == len(segments(tmp_path)) >= 3 * 4
    assert len(answer_records(tmp_path)) == n
    assert [r["seq"] for r in read_records(tmp_path)] == list(range(3 + n))


def test_a_segment_rotates_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(recsvc.audit.log.time, "monotonic", lambda: now[0])
    with AuditLog(tmp_path, rotate_seconds=60) as trail:
        trail.append(an_answer(0))
        now[0] += 59
        trail.append(an_answer(1))
        assert len(segments(tmp_path)) == 1
        now[0] += 1
        trail.append(an_answer(2))
        assert len(segments(tmp_path)) == 2
    assert verify(tmp_path).ok
    first = [json.loads(line)["seq"] for line in segments(tmp_path)[1].read_text().splitlines()]
    assert first == [3] and segments(tmp_path)[1].name.startswith("audit-000000000003-")


def test_concurrent_appends_each_get_one_place_in_the_chain(tmp_path: Path) -> None:
    with AuditLog(tmp_path, rotate_bytes=50_000) as trail:
        seqs: list[int] = []

        def work(base: int) -> None:
            seqs.extend(trail.append(an_answer(base + i)) for i in range(300))

        threads = [threading.Thread(target=work, args=(t * 1000,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(seqs) == list(range(1, 2401))
    assert len(answer_records(tmp_path)) == 2400


def _durable_sizes(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Each descriptor's size when it was last fsynced, as fsyncs happen."""
    sizes: dict[int, int] = {}
    real = os.fsync

    def fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        real(fd)
        sizes[fd] = max(size, sizes.get(fd, 0))

    monkeypatch.setattr(recsvc.audit.log.os, "fsync", fsync)
    return sizes


def test_group_mode_fsyncs_within_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable = _durable_sizes(monkeypatch)
    with AuditLog(tmp_path, sync="group") as trail:
        lags = []
        fd = trail._segment.fd
        for i in range(10):
            trail.append(an_answer(i))
            size, written = os.fstat(fd).st_size, time.monotonic()
            while durable.get(fd, 0) < size and time.monotonic() - written < 1:
                time.sleep(0.002)
            lags.append(time.monotonic() - written)
    # The window is the interval plus one fsync; give a busy machine some slack.
    assert max(lags) < recsvc.audit.FSYNC_INTERVAL + 0.15, lags
    assert max(lags) > 0.01  # appends did not wait for their fsync


def test_group_fsyncs_start_an_interval_apart_while_records_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable = _durable_sizes(monkeypatch)
    starts: list[float] = []
    counted = recsvc.audit.log.os.fsync

    def fsync(fd: int) -> None:
        starts.append(time.monotonic())
        counted(fd)
        time.sleep(0.15)  # a slow disk: the next start is still an interval after this one

    monkeypatch.setattr(recsvc.audit.log.os, "fsync", fsync)
    with AuditLog(tmp_path, fsync_interval=0.2) as trail:
        begin = time.monotonic()
        n = 0
        while time.monotonic() - begin < 2.0:  # records waiting all the time
            trail.append(an_answer(n))
            n += 1
            time.sleep(0.005)
        in_window = [t for t in starts if begin < t < begin + 2.0]
    assert durable  # fsyncs did happen, of the segment
    assert 8 <= len(in_window) <= 11, len(in_window)  # one start every 0.2 s: 10


def test_always_mode_returns_only_once_its_record_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable = _durable_sizes(monkeypatch)
    late: list[int] = []
    with AuditLog(tmp_path, sync="always") as trail:
        fd = trail._segment.fd
        path = trail._segment.path

        def work(base: int) -> None:
            for i in range(50):
                seq = trail.append(an_answer(base + i))
                if f'"seq":{seq},'.encode() not in path.read_bytes()[: durable[fd]]:
                    late.append(seq)

        threads = [threading.Thread(target=work, args=(t * 100,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert late == []
    assert len(answer_records(tmp_path)) == 200


def test_always_mode_from_the_event_loop(tmp_path: Path) -> None:
    import asyncio

    async def main() -> list[int]:
        with AuditLog(tmp_path, sync="always") as trail:
            return await asyncio.gather(*(trail.append_async(an_answer(i)) for i in range(20)))

    assert sorted(asyncio.run(main())) == list(range(1, 21))
    assert len(answer_records(tmp_path)) == 20


def test_a_full_disk_stops_every_answer_and_leaves_the_trail_verifiable(tmp_path: Path) -> None:
    failures: list[AuditUnavailable] = []
    trail = AuditLog(tmp_path, on_failure=failures.append)
    try:
        trail.append(an_answer(0))
        assert trail.healthy and fill_disk(tmp_path) == 1
        with pytest.raises(AuditUnavailable, match="No space left"):
            trail.append(an_answer(1))
        assert not trail.healthy and len(failures) == 1
        with pytest.raises(AuditUnavailable):
            trail.append(an_answer(2))  # no retry into a broken segment
        assert len(failures) == 1  # announced once
    finally:
        trail.close()
    assert list(answer_records(tmp_path)) == [f"{0:032x}"]
    with AuditLog(tmp_path) as again:  # the disk has room again: a new run continues
        again.append(an_answer(3))
    assert list(answer_records(tmp_path)) == [f"{0:032x}", f"{3:032x}"]


def test_an_io_error_on_fsync_stops_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[AuditUnavailable] = []
    trail = AuditLog(tmp_path, sync="always", on_failure=failures.append)
    real = os.fsync

    def eio(fd: int) -> None:
        if fd == trail._segment.fd:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(recsvc.audit.log.os, "fsync", eio)
    try:
        with pytest.raises(AuditUnavailable):
            trail.append(an_answer(0))  # written, but never acknowledged
        assert not trail.healthy and len(failures) == 1
        assert "Input/output error" in str(failures[0])
        with pytest.raises(AuditUnavailable):
            trail.append(an_answer(1))
    finally:
        trail.close()
    monkeypatch.undo()
    assert verify(tmp_path).ok


def test_failures_met_at_once_are_announced_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher's fsync and an append's write both fail: one announcement."""
    failures: list[AuditUnavailable] = []
    in_fsync, announced = threading.Event(), threading.Event()

    def announce(failure: AuditUnavailable) -> None:
        failures.append(failure)
        announced.set()

    trail = AuditLog(tmp_path, fsync_interval=0.01, on_failure=announce)
    real_write, real_fsync = os.write, os.fsync
    segment = trail._segment.fd

    def fsync(fd: int) -> None:
        if fd != segment:
            return real_fsync(fd)
        in_fsync.set()
        announced.wait(5)  # fails only once the append's failure is announced
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def write(fd: int, data: bytes) -> int:
        if fd == segment and in_fsync.is_set():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(recsvc.audit.log.os, "fsync", fsync)
    monkeypatch.setattr(recsvc.audit.log.os, "write", write)
    try:
        trail.append(an_answer(0))
        assert in_fsync.wait(5)
        with pytest.raises(AuditUnavailable):
            trail.append(an_answer(1))
        trail._flusher.join(5)
        assert not trail._flusher.is_alive()
        assert len(failures) == 1
    finally:
        monkeypatch.undo()
        trail.close()


def test_a_short_write_leaves_a_torn_line_the_next_start_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = AuditLog(tmp_path)
    real = os.write

    def half(fd: int, data: bytes) -> int:
        if fd == trail._segment.fd:
            return real(fd, data[: len(data) // 2])
        return real(fd, data)

    trail.append(an_answer(0))
    monkeypatch.setattr(recsvc.audit.log.os, "write", half)
    with pytest.raises(AuditUnavailable, match="short write"):
        trail.append(an_answer(1))
    monkeypatch.undo()
    trail.close()
    report = verify(tmp_path)
    assert report.ok and report.torn == (Torn(segments(tmp_path)[0].name, report.torn[0].bytes),)
    with AuditLog(tmp_path) as again:
        again.append(an_answer(2))
    report = verify(tmp_path)
    assert report.ok, str(report)
    starts = [r for r in read_records(tmp_path) if r["kind"] == "start"]
    assert starts[1]["torn"] == [
        {"segment": segments(tmp_path)[0].name, "bytes": report.torn[0].bytes}
    ]
    assert list(answer_records(tmp_path)) == [f"{0:032x}", f"{2:032x}"]
    assert starts[1]["seq"] == 2  # the cut-short record's number is given again


def test_one_writer_per_folder(tmp_path: Path) -> None:
    with AuditLog(tmp_path), pytest.raises(AuditUnavailable, match="another process"):
        AuditLog(tmp_path)
    AuditLog(tmp_path).close()  # free once the first is closed


def test_a_closed_trail_takes_no_records(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path)
    trail.close()
    assert not trail.healthy
    with pytest.raises(AuditUnavailable, match="closed"):
        trail.append(an_answer(0))


def test_a_trail_ending_in_a_bad_record_is_not_continued(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as trail:
        trail.append(an_answer(0))
    segment = segments(tmp_path)[0]
    segment.write_bytes(segment.read_bytes().replace(b'"Recommend"', b'"Recommenc"'))
    with pytest.raises(AuditUnavailable, match=f"{segment.name}: the last complete record"):
        AuditLog(tmp_path)


def test_bad_payloads_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as trail:
        with pytest.raises(ValueError, match="may not set seq"):
            trail.append({"seq": 7})
        with pytest.raises(ValueError, match="Out of range float"):
            trail.append({"score": float("nan")})
        assert trail.healthy
    assert verify(tmp_path).records == 1


_CHILD = """
import sys
from pathlib import Path
from recsvc.audit import AuditLog
from tests.recsvc.audit.helpers import an_answer
trail = AuditLog(Path(sys.argv[1]), rotate_bytes=20_000)
n = 0
while True:
    seq = trail.append(an_answer(n))
    print(seq, flush=True)  # acknowledged: an answer would be sent now
    n += 1
"""


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_record(tmp_path: Path) -> None:
    for run in range(2):
        with subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdout is not None
            acked = [int(child.stdout.readline()) for _ in range(500 + run * 300)]
            child.send_signal(signal.SIGKILL)
            acked += [int(line) for line in child.stdout.read().split()]
        report = verify(tmp_path)
        assert report.ok, str(report)
        on_disk = {r["seq"] for r in read_records(tmp_path) if r["kind"] == "answer"}
        assert set(acked) <= on_disk
    assert report.segments > 2


class _Heard:
    """An observer that keeps what the trail told it."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.fsyncs: list[float] = []

    def audit_written(self, records: int = 1) -> None:
        self.written.append(records)

    def audit_fsynced(self, seconds: float) -> None:
        self.fsyncs.append(seconds)


def test_the_observer_hears_every_record_and_every_fsync(tmp_path: Path) -> None:
    heard = _Heard()
    with AuditLog(tmp_path, fsync_interval=0.01, observer=heard) as trail:
        assert heard.fsyncs and not heard.written  # the start record, fsynced at once
        for i in range(5):
            trail.append(an_answer(i))
        deadline = time.monotonic() + 5
        while sum(heard.written) < 5:  # counted by the fsync thread, not the request
            assert time.monotonic() < deadline, "records never reported"
            time.sleep(0.005)
        during = len(heard.fsyncs)
        assert during >= 2 and all(s >= 0 for s in heard.fsyncs)
        for i in range(5, 8):
            trail.append(an_answer(i))
    assert sum(heard.written) == 8  # close reports what the last fsync had not
    assert len(heard.fsyncs) > during  # and its own fsync


def test_encoded_members_go_in_as_they_are_and_nothing_else_does(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as trail:
        trail.append(encode_payload(an_answer(1)))
        with pytest.raises(ValueError, match="JSON object"):
            trail.append('"method":"Recommend"')  # type: ignore[arg-type]
    assert list(answer_records(tmp_path)) == [f"{1:032x}"]
