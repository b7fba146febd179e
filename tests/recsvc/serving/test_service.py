"""A real server on port 0: every RPC, every rule, error codes, health, hot reload."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from recsvc.model.queries import RankQuery
from recsvc.model.ranking import Recommender
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc
from tests.conftest import rpc_code
from tests.rules_oracle import Oracle


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


def _details(call, request) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.details()  # type: ignore[no-any-return]


def test_every_rule_over_every_customer_through_grpc(
    stub: recommender_pb2_grpc.RecommenderStub, oracle: Oracle, recommender
) -> None:  # type: ignore[no-untyped-def]
    for user_id in [*recommender.bundle.users.ids, "stranger"]:
        resp = stub.Recommend(pb.RecommendRequest(user_id=user_id, k=12), timeout=10)
        ids = [it.item_id for it in resp.items]
        assert all(oracle.allowed(user_id, i) for i in ids), user_id
        assert len(ids) == min(12, oracle.n_allowed(user_id))
        assert resp.model_version == recommender.version and len(resp.recommendation_id) == 32
        ranked = stub.RankItems(
            pb.RankItemsRequest(user_id=user_id, item_ids=recommender.bundle.items.ids[:80]),
            timeout=10,
        )
        assert all(oracle.allowed(user_id, it.item_id) for it in ranked.items)
    for item_id in recommender.bundle.items.ids[::7]:
        sim = stub.SimilarItems(
            pb.SimilarItemsRequest(item_id=item_id, k=15, user_id="C00000003"), timeout=10
        )
        assert all(oracle.allowed("C00000003", it.item_id) for it in sim.items)


def test_sources_and_explain(stub: recommender_pb2_grpc.RecommenderStub, recommender) -> None:  # type: ignore[no-untyped-def]
    b = recommender.bundle
    known = next(u for i, u in enumerate(b.users.ids) if len(b.user_item_rows(i)) > 2)
    r = stub.Recommend(pb.RecommendRequest(user_id=known, k=3, explain=True), timeout=5)
    assert r.source == pb.PERSONALIZED and all(len(it.because) > 0 for it in r.items)
    r = stub.Recommend(pb.RecommendRequest(recent_item_ids=["CC-000001"], k=3), timeout=5)
    assert r.source == pb.FOLD_IN
    r = stub.Recommend(pb.RecommendRequest(user_id="stranger", k=3), timeout=5)
    assert r.source == pb.POPULAR and len(r.items) == 3
    ids = {
        stub.Recommend(pb.RecommendRequest(user_id=known), timeout=5).recommendation_id
        for _ in range(3)
    }
    assert len(ids) == 3


def test_unknown_recent_items_and_dropped_candidates_are_answered(
    stub: recommender_pb2_grpc.RecommenderStub, recommender: Recommender
) -> None:
    r = stub.Recommend(pb.RecommendRequest(recent_item_ids=["nope", "gone"], k=3), timeout=5)
    assert r.source == pb.POPULAR and list(r.unknown_recent_item_ids) == ["nope", "gone"]
    r = stub.Recommend(pb.RecommendRequest(recent_item_ids=["CC-000001", "nope"]), timeout=5)
    assert r.source == pb.FOLD_IN and list(r.unknown_recent_item_ids) == ["nope"]
    user, candidates = "C00000004", ["ghost", *recommender.bundle.items.ids]
    want = recommender.rank_items(RankQuery(user_id=user, item_ids=tuple(candidates)))
    got = stub.RankItems(
        pb.RankItemsRequest(user_id=user, item_ids=candidates, recent_item_ids=["nope"]),
        timeout=5,
    )
    assert [(d.item_id, pb.DropReason.Name(d.reason)) for d in got.dropped] == [
        (d.item_id, d.reason.name) for d in want.dropped
    ]
    assert {pb.DropReason.Name(d.reason) for d in got.dropped} >= {"UNKNOWN_ITEM", "UNSUITABLE"}
    assert list(got.unknown_recent_item_ids) == ["nope"]


def test_model_info(stub: recommender_pb2_grpc.RecommenderStub, recommender) -> None:  # type: ignore[no-untyped-def]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.version == recommender.version
    assert (info.n_users, info.n_items, info.factors, info.algorithm) == (1500, 120, 16, "als")
    assert info.rules.suitability and info.rules.active_only and info.rules.marketing_consent
    assert info.created_at.seconds > 0


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Recommend", pb.RecommendRequest(user_id="u", k=501), "k"),
        ("Recommend", pb.RecommendRequest(user_id="u", k=-3), "k"),
        ("Recommend", pb.RecommendRequest(), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="x" * 257), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="a\nb"), "user_id"),
        (
            "Recommend",
            pb.RecommendRequest(user_id="u", exclude_item_ids=["x"] * 1001),
            "exclude_item_ids",
        ),
        ("Recommend", pb.RecommendRequest(user_id="u", recent_item_ids=[""]), "recent_item_ids[0]"),
        ("SimilarItems", pb.SimilarItemsRequest(), "item_id"),
        ("SimilarItems", pb.SimilarItemsRequest(item_id="CC-000001", k=9999), "k"),
        ("RankItems", pb.RankItemsRequest(user_id="u"), "item_ids"),
        ("RankItems", pb.RankItemsRequest(user_id="u", item_ids=["a"] * 501), "item_ids"),
        ("RankItems", pb.RankItemsRequest(user_id="\x07", item_ids=["a"]), "user_id"),
    ],
)
def test_invalid_argument_names_the_field(
    stub: recommender_pb2_grpc.RecommenderStub,
    method: str,
    request_,
    field: str,  # type: ignore[no-untyped-def]
) -> None:
    call = getattr(stub, method)
    assert rpc_code(call, request_) == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(call, request_).startswith(field + ":")


def test_unknown_item_is_not_found(stub: recommender_pb2_grpc.RecommenderStub) -> None:
    assert (
        rpc_code(stub.SimilarItems, pb.SimilarItemsRequest(item_id="nope"))
        == grpc.StatusCode.NOT_FOUND
    )
