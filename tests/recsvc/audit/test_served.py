"""A real server with ``--audit-dir``: one record per answer, written before it is sent."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.audit import audience_sha256
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import load_bundle
from recsvc.v1 import recommender_pb2 as pb
from tests.conftest import ServerThread, settings_for
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
