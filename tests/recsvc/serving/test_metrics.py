"""Prometheus metrics: a real server, real calls, then a scrape of ``/metrics`` over HTTP."""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import LATEST, read_latest
from recsvc.serving.metrics import REQUEST_BUCKETS
from recsvc.state import open_store
from recsvc.state.base import ProductUpdate
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc, updates_pb2_grpc
from recsvc.v1 import updates_pb2 as upb
from tests.conftest import ServerThread, eventually, serve_process, settings_for, wait_serving
from tests.postgres import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample ``/metrics`` shows, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def metered(models_copy: Path) -> Iterator[ServerThread]:
    s = ServerThread(
        settings_for(models_copy, host="127.0.0.1", metrics_port=0, trial_in_child=False)
    )
    yield s
    s.stop()


def _metrics_port(s: ServerThread) -> int:
    assert s.running.metrics is not None and s.running.metrics.port is not None
    return s.running.metrics.port


def test_a_scrape_after_real_calls_finds_their_counts_and_latencies(
    metered: ServerThread,
) -> None:
    stub = metered.stub
    for _ in range(7):
        stub.Recommend(pb.RecommendRequest(user_id="C00000004", k=3), timeout=10)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            stub.Recommend(pb.RecommendRequest(user_id="C00000004", k=9999), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        stub.SimilarItems(pb.SimilarItemsRequest(item_id="no-such-item"), timeout=10)
    item = metered.running.store.current().recommender.bundle.items.ids[0]
    answers = list(stub.TargetUsers(pb.TargetUsersRequest(item_ids=[item], audience_size=5)))
    assert answers

    port = _metrics_port(metered)
    svc = "recsvc.v1.Recommender"
    hist = {"service": svc, "method": "Recommend"}
    # An aborted call is counted once its handler unwinds, a moment after the client hears.
    eventually(lambda: value(scrape(port), "recsvc_request_seconds_count", **hist) == 9)
    got = scrape(port)
    requests = "recsvc_requests_total"
    assert value(got, requests, service=svc, method="Recommend", code="OK") == 7
    assert value(got, requests, service=svc, method="Recommend", code="INVALID_ARGUMENT") == 2
    assert value(got, requests, service=svc, method="SimilarItems", code="NOT_FOUND") == 1
    assert value(got, requests, service=svc, method="TargetUsers", code="OK") == 1
    # The histogram holds every Recommend call, in cumulative buckets up to +Inf.
    counts = [
        value(got, "recsvc_request_seconds_bucket", **hist, le=str(b)) for b in REQUEST_BUCKETS
    ]
    inf = value(got, "recsvc_request_seconds_bucket", **hist, le="+Inf")
    assert counts == sorted(counts) and inf == 9  # type: ignore[type-var]
    assert 0 < value(got, "recsvc_request_seconds_sum", **hist) < 9  # type: ignore[operator]
    assert value(got, "recsvc_requests_in_flight") == 0


def test_the_served_model_its_age_and_reload_outcomes(
    metered: ServerThread, models_copy: Path
) -> None:
    port = _metrics_port(metered)
    good = read_latest(models_copy)
    assert good is not None
    got = scrape(port)
    assert value(got, "recsvc_model_info", version=good) == 1
    assert value(got, "recsvc_model_reloads_total", outcome="loaded") == 1
    age = value(got, "recsvc_model_age_seconds")
    created = value(got, "recsvc_model_created_timestamp_seconds")
    assert age is not None and created is not None and abs(time.time() - created - age) < 5

    (models_copy / LATEST).write_text("not a version\n")  # defective: rejected for good
    metered.call(metered.running.refresh())
    (models_copy / LATEST).unlink()
    (models_copy / LATEST).mkdir()  # cannot be read: retried
    metered.call(metered.running.refresh())

    def counted() -> bool:
        got = scrape(port)
        return (
            value(got, "recsvc_model_reloads_total", outcome="rejected") == 1
            and value(got, "recsvc_model_reloads_total", outcome="unreadable") == 1
        )

    eventually(counted)
    assert value(scrape(port), "recsvc_model_info", version=good) == 1  # still serving it


def test_a_new_version_replaces_the_old_one_in_model_info(
    metered: ServerThread, models_copy: Path
) -> None:
    old = read_latest(models_copy)
    assert old is not None
    new = "v99990101-000000-000001"
    shutil.copytree(models_copy / old, models_copy / new)
    manifest = models_copy / new / "manifest.json"
    manifest.write_text(manifest.read_text().replace(old, new))
    (models_copy / LATEST).write_text(new + "\n")
    assert metered.call(metered.running.refresh())
    port = _metrics_port(metered)
    eventually(lambda: value(scrape(port), "recsvc_model_info", version=new) == 1)
    got = scrape(port)
    assert value(got, "recsvc_model_info", version=old) is None
    assert value(got, "recsvc_model_reloads_total", outcome="loaded") == 2


def test_state_sequence_overlay_size_and_apply_lag(models_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    live = ServerThread(
        settings_for(models_dir, host="127.0.0.1", metrics_port=0, state=url, pseudonym_key=b"k")
    )
    try:
        port = _metrics_port(live)
        updates = updates_pb2_grpc.UpdatesStub(live.channel)
        item = live.running.store.current().recommender.bundle.items.ids[0]
        events = [
            upb.Event(event_id=f"e{i}", user_id=f"C0000000{i}", item_id=item, type="purchase")
            for i in range(1, 4)
        ]
        done = updates.RecordEvents(upb.RecordEventsRequest(events=events), timeout=10)
        updates.ForgetCustomer(upb.ForgetCustomerRequest(user_id="C00000009"), timeout=10)
        sequence = done.sequence + 1

        def applied() -> bool:
            got = scrape(port)
            return value(got, "recsvc_state_sequence", kind="applied") == sequence

        eventually(applied)
        got = scrape(port)
        assert value(got, "recsvc_state_sequence", kind="committed") == sequence
        assert value(got, "recsvc_overlay_size", kind="customers") == 3
        assert value(got, "recsvc_overlay_size", kind="erased") == 1
        assert value(got, "recsvc_state_apply_lag_seconds") == 0
    finally:
        live.stop()


def test_the_apply_lag_grows_while_commits_wait(models_copy: Path, tmp_path: Path) -> None:
    """A server with no model yet cannot apply what the store commits: the lag says so."""
    url = f"sqlite:///{tmp_path}/state.db"
    version = read_latest(models_copy)
    (models_copy / LATEST).unlink()
    settings = settings_for(
        models_copy, host="127.0.0.1", metrics_port=0, state=url, pseudonym_key=b"k"
    )
    waiting = ServerThread(settings, load=False)
    try:
        with open_store(url, Pseudonymizer(b"k")) as store:
            store.update_products([ProductUpdate("CC-000001", active=False)])
        port = _metrics_port(waiting)

        def lagging() -> bool:
            got = scrape(port)
            lag = value(got, "recsvc_state_apply_lag_seconds")
            return value(got, "recsvc_state_sequence", kind="committed") == 1 and bool(
                lag and lag > 1
            )

        eventually(lagging)
        assert value(scrape(port), "recsvc_model_info", version=str(version)) is None
    finally:
        waiting.stop()


def test_the_audit_hook_counts_records_and_times_fsyncs(metered: ServerThread) -> None:
    metrics = metered.running.metrics
    assert metrics is not None
    metrics.audit_written()
    metrics.audit_written(2)
    metrics.audit_fsynced(0.003)
    got = scrape(_metrics_port(metered))
    assert value(got, "recsvc_audit_records_total") == 3
    assert value(got, "recsvc_audit_fsync_seconds_count") == 1
    assert value(got, "recsvc_audit_fsync_seconds_bucket", le="0.005") == 1
    assert value(got, "recsvc_audit_fsync_seconds_bucket", le="0.002") == 0


def test_calls_refused_before_the_servicer_are_counted(models_dir: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token-of-at-least-16-chars\n")
    s = ServerThread(
        settings_for(
            models_dir,
            host="127.0.0.1",
            metrics_port=0,
            auth_token_file=token,
            trial_in_child=False,
        )
    )
    try:
        with pytest.raises(grpc.RpcError) as err:
            s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        port = _metrics_port(s)
        labels = {"service": "recsvc.v1.Recommender", "method": "GetModelInfo"}
        refused = {**labels, "code": "UNAUTHENTICATED"}
        eventually(lambda: value(scrape(port), "recsvc_requests_total", **refused) == 1)
    finally:
        s.stop()


@pytest.mark.slow
def test_one_scrape_sees_every_worker(models_dir: Path) -> None:
    port, metrics_port = free_port(), free_port()
    proc = serve_process(models_dir, port, "--workers", "2", "--metrics-port", str(metrics_port))
    try:
        wait_serving(port)
        # A new connection each time: the kernel spreads them over both workers.
        local = [("grpc.use_local_subchannel_pool", 1)]
        pids: set[str] = set()
        calls = 0
        deadline = time.monotonic() + 60
        # Until both workers report their model and some calls were answered (a worker
        # still loading refuses them, so both can report before any call succeeded).
        while (len(pids) < 2 or calls < 4) and time.monotonic() < deadline:
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=local) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                try:
                    stub.Recommend(pb.RecommendRequest(user_id="C00000001"), timeout=5)
                    calls += 1
                except grpc.RpcError:
                    time.sleep(0.1)  # a worker still loading answers UNAVAILABLE
            got = scrape(metrics_port)
            pids = {dict(labels)["pid"] for name, labels in got if name == "recsvc_model_info"}
        assert len(pids) == 2, "both workers report their model"
        assert calls >= 4, "the workers answered"
        got = scrape(metrics_port)
        labels = {"service": "recsvc.v1.Recommender", "method": "Recommend", "code": "OK"}
        assert value(got, "recsvc_requests_total", **labels) == calls  # summed over both
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_served_audit_trail_moves_the_audit_counters(models_dir: Path, tmp_path: Path) -> None:
    s = ServerThread(
        settings_for(models_dir, host="127.0.0.1", metrics_port=0, audit_dir=tmp_path / "audit")
    )
    try:
        port = _metrics_port(s)
        before = scrape(port)
        assert value(before, "recsvc_audit_records_total") == 0
        assert (value(before, "recsvc_audit_fsync_seconds_count") or 0) >= 1  # the start record
        for _ in range(6):
            s.stub.Recommend(pb.RecommendRequest(user_id="C00000004", k=3), timeout=10)
        eventually(lambda: value(scrape(port), "recsvc_audit_records_total") == 6)
        after = scrape(port)
        fsyncs = value(after, "recsvc_audit_fsync_seconds_count") or 0
        assert fsyncs > (value(before, "recsvc_audit_fsync_seconds_count") or 0)
        assert (value(after, "recsvc_audit_fsync_seconds_sum") or 0) > 0
    finally:
        s.stop()
