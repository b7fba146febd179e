"""A real server with ``--audit-dir``: one record per answer, written before it is sent."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.audit import audience_sha256, find, read_records
from recsvc.cli import main as cli_main
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import load_bundle
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from tests.conftest import NEW_CONNECTION, ServerThread, serve_process, settings_for, wait_serving
from tests.postgres import free_port
from tests.recsvc.audit.helpers import answer_records, fill_disk

KEY = b"audit-served-key"


def test_every_answer_has_exactly_one_record_with_its_facts(
    models_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    b = load_bundle(bundle_path)
    trail = tmp_path / "audit"
    s = ServerThread(settings_for(models_dir, audit_dir=trail, pseudonym_key=KEY))
    try:
        user = b.users.ids[2]
        rec = s.stub.Recommend(pb.RecommendRequest(user_id=user, k=4), timeout=10)
        anon = s.stub.Recommend(pb.RecommendRequest(k=3, recent_item_ids=[b.items.ids[0]]))
        similar = s.stub.SimilarItems(
            pb.SimilarItemsRequest(item_id=b.items.ids[1], k=3, user_id=user), timeout=10
        )
        ranked = s.stub.RankItems(
            pb.RankItemsRequest(user_id=user, item_ids=list(b.items.ids[:20])), timeout=10
        )
        target = pb.TargetUsersRequest(
            item_ids=[b.items.ids[0]], audience_size=30, campaign_id="spring", channel="email"
        )
        messages = list(s.stub.TargetUsers(target, timeout=10))
    finally:
        s.stop()
    records = answer_records(trail)
    answers = {
        rec.recommendation_id: ("Recommend", rec),
        anon.recommendation_id: ("Recommend", anon),
        similar.recommendation_id: ("SimilarItems", similar),
        ranked.recommendation_id: ("RankItems", ranked),
    }
    audience_id = messages[0].recommendation_id
    assert set(records) == {*answers, audience_id}
    subject = Pseudonymizer(KEY)(user)
    for rid, (method, answer) in answers.items():
        r = records[rid]
        assert r["method"] == method and r["model_version"] == answer.model_version
        assert r["items"] == [[it.item_id, pytest.approx(it.score)] for it in answer.items]
        assert r["caller"] is None and user not in str(r)
    assert records[rec.recommendation_id]["subject"] == subject
    assert records[rec.recommendation_id]["suitability"]["basis"] == "bundle"
    assert records[rec.recommendation_id]["source"] == "PERSONALIZED"
    assert records[anon.recommendation_id]["subject"] == "anonymous"
    assert records[anon.recommendation_id]["suitability"] == {"tolerance": 1, "basis": "default"}
    removed = records[rec.recommendation_id]["removed"]
    assert removed["interacted"] == len(b.user_item_rows(2))
    audience = records[audience_id]
    ids = [u.user_id for m in messages for u in m.users]
    assert audience["campaign_id"] == "spring" and audience["channel"] == "email"
    assert audience["audience_size"] == len(ids) == 30
    assert audience["audience_sha256"] == audience_sha256(ids)
    assert audience["excluded"]["no_consent"] == messages[-1].excluded.no_consent


def test_a_failed_trail_means_unavailable_and_not_serving(
    models_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    user = load_bundle(bundle_path).users.ids[5]
    trail = tmp_path / "audit"
    s = ServerThread(settings_for(models_dir, audit_dir=trail, pseudonym_key=KEY))
    try:
        ok = s.stub.Recommend(pb.RecommendRequest(user_id=user, k=2), timeout=10)
        assert fill_disk(trail) >= 1
        failed = 0
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as err:
                s.stub.Recommend(pb.RecommendRequest(user_id=user, k=2), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            failed += 1
        health = health_pb2_grpc.HealthStub(s.channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
            assert time.monotonic() < deadline, "health stayed SERVING with a failed trail"
            time.sleep(0.02)
        s.call(s.running.refresh())  # the reload poll must not turn it back to SERVING
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert failed == 5
    finally:
        s.stop()
    # Only the answer sent before the failure has a record: no unaudited OK went out.
    assert ok.recommendation_id in answer_records(trail)


def test_each_worker_writes_its_own_chain_and_the_trail_reads_as_one(
    models_dir: Path, bundle_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--workers 2 --audit-dir``: one chain a worker; verify checks both, find reads both."""
    user = load_bundle(bundle_path).users.ids[2]
    trail, port = tmp_path / "audit", free_port()
    env = {"RECSVC_PSEUDONYM_KEY": KEY.decode()}
    proc = serve_process(models_dir, port, "--workers", "2", "--audit-dir", str(trail), env=env)
    answered: list[str] = []
    try:
        wait_serving(port)
        deadline = time.monotonic() + 60
        # New connections until both workers have answered (SO_REUSEPORT spreads them).
        while _chains_with_answers(trail) < 2 or len(answered) < 8:
            assert time.monotonic() < deadline, answered
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=NEW_CONNECTION) as channel:
                stub = pb_grpc.RecommenderStub(channel)
                request = pb.RecommendRequest(user_id=user, k=3)
                try:
                    answered.append(stub.Recommend(request, timeout=10).recommendation_id)
                except grpc.RpcError as exc:  # the other worker may still be loading
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert sorted(p.name for p in trail.iterdir()) == ["worker-0", "worker-1"]
    records = answer_records(trail)  # both chains verify
    assert set(records) == set(answered)
    capsys.readouterr()
    assert cli_main(["audit", "verify", str(trail)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK") == 2 and "worker-0: " in out and "worker-1: " in out
    assert cli_main(["audit", "verify", str(trail), "--head", f"0:{'0' * 64}"]) == 2
    assert "holds 2 chains" in capsys.readouterr().err
    found = list(find(trail, subject=Pseudonymizer(KEY)(user)))
    assert [r["recommendation_id"] for r in found] == sorted(
        answered, key=lambda rid: records[rid]["time"]
    )


def _chains_with_answers(trail: Path) -> int:
    chains = trail.glob("worker-*")
    return sum(any(r["kind"] == "answer" for r in read_records(c)) for c in chains)
