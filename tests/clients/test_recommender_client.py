"""RecommenderClient against a real server: the same answers the API gives, as dataclasses."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import grpc
import pytest
from recsvc_client import (
    Contribution,
    Dropped,
    DropReason,
    InvalidArgument,
    NotFound,
    RecommenderClient,
    RecsvcClientError,
    ScoredItem,
    Source,
    Unauthenticated,
    Unavailable,
)

from recsvc.v1 import recommender_pb2 as pb
from tests.conftest import ServerThread, settings_for

TOKEN = "client-token-for-tests-0123456789"


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[RecommenderClient]:
    with RecommenderClient(f"localhost:{server.running.port}") as c:
        yield c


def _items(resp: pb.RecommendResponse | pb.SimilarItemsResponse) -> tuple[ScoredItem, ...]:
    return tuple(
        ScoredItem(
            it.item_id, it.score, tuple(Contribution(c.item_id, c.weight) for c in it.because)
        )
        for it in resp.items
    )


def test_recommend_answers_what_the_api_answers(
    server: ServerThread, client: RecommenderClient
) -> None:
    rec = client.recommend("C00000004", 3, explain=True, exclude_item_ids=["CC-000001"])
    raw = server.stub.Recommend(
        pb.RecommendRequest(user_id="C00000004", k=3, explain=True, exclude_item_ids=["CC-000001"])
    )
    assert rec.items == _items(raw) and len(rec.items) == 3
    assert all(it.because for it in rec.items)
    assert rec.source is Source.PERSONALIZED
    assert (rec.model_version, rec.state_sequence) == (raw.model_version, raw.state_sequence)
    assert rec.recommendation_id and rec.unknown_item_ids == ()
    assert client.recommend(recent_item_ids=["CC-000001"], k=2).source is Source.FOLD_IN
    assert client.recommend("never-seen").source is Source.POPULAR


def test_similar_and_ranked_items(server: ServerThread, client: RecommenderClient) -> None:
    similar = client.similar_items("CC-000001", 4, user_id="C00000004")
    raw = server.stub.SimilarItems(
        pb.SimilarItemsRequest(item_id="CC-000001", k=4, user_id="C00000004")
    )
    assert similar.items == _items(raw) and similar.source is None
    candidates = [it.item_id for it in similar.items] + ["no-such-item"]
    ranked = client.rank_items("C00000004", candidates)
    raw_rank = server.stub.RankItems(pb.RankItemsRequest(user_id="C00000004", item_ids=candidates))
    assert ranked.items == _items(raw_rank)
    assert ranked.unknown_item_ids == ("no-such-item",)
    assert ranked.dropped == (Dropped("no-such-item", DropReason.UNKNOWN_ITEM),)
    assert ranked.source is Source.PERSONALIZED
    first40 = server.running.store.current().recommender.bundle.items.ids[:40]
    ranked = client.rank_items("C00000004", first40, recent_item_ids=["gone"])
    assert ranked.unknown_recent_item_ids == ("gone",)
    raw_rank = server.stub.RankItems(pb.RankItemsRequest(user_id="C00000004", item_ids=first40))
    assert [(d.item_id, d.reason.value) for d in ranked.dropped] == [
        (d.item_id, d.reason) for d in raw_rank.dropped
    ]
    assert client.recommend(recent_item_ids=["gone"]).unknown_recent_item_ids == ("gone",)


def test_model_info(server: ServerThread, client: RecommenderClient) -> None:
    info = client.model_info()
    raw = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.created_at == raw.created_at.ToDatetime(timezone.utc)
    assert info.created_at is not None and info.created_at.tzinfo is timezone.utc
    assert (info.version, info.algorithm, info.n_users, info.n_items, info.factors) == (
        raw.version,
        raw.algorithm,
        raw.n_users,
        raw.n_items,
        raw.factors,
    )
    assert (info.item_index, info.user_index) == (raw.item_index, raw.user_index)
    assert info.rules.suitability is raw.rules.suitability is True
    assert info.rules.marketing_consent is raw.rules.marketing_consent


def test_target_users_reads_the_whole_stream(
    server: ServerThread, client: RecommenderClient
) -> None:
    audience = client.target_users(["SAV-000002", "MF-000003"], 1200, min_score=-10.0)
    msgs = list(
        server.stub.TargetUsers(
            pb.TargetUsersRequest(
                item_ids=["SAV-000002", "MF-000003"], audience_size=1200, min_score=-10.0
            )
        )
    )
    assert audience.user_ids == tuple(u.user_id for m in msgs for u in m.users)
    assert audience.scores == tuple(u.score for m in msgs for u in m.users)
    assert len(audience.user_ids) > 0 and list(audience.scores) == sorted(
        audience.scores, reverse=True
    )
    last = msgs[-1]
    assert audience.model_version == msgs[0].model_version != ""
    assert audience.eligible_users == last.eligible_users > 0
    assert audience.excluded.no_consent == last.excluded.no_consent > 0
    assert audience.excluded.unsuitable == last.excluded.unsuitable
    assert audience.excluded.holders == last.excluded.holders
    assert audience.approximate is False


def test_errors_carry_the_code_and_the_servers_words(client: RecommenderClient) -> None:
    with pytest.raises(NotFound) as missing:
        client.similar_items("no-such-item")
    assert (
        missing.value.code is grpc.StatusCode.NOT_FOUND and "no-such-item" in missing.value.details
    )
    with pytest.raises(InvalidArgument, match=r"INVALID_ARGUMENT: k: must be between 1 and 500"):
        client.recommend("C00000004", k=9999)
    with pytest.raises(NotFound):
        client.target_users(["nope"], 5)
    assert issubclass(NotFound, RecsvcClientError)


def test_bearer_token(models_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    s = ServerThread(settings_for(models_dir, auth_token_file=token_file))
    target = f"localhost:{s.running.port}"
    try:
        with RecommenderClient(target) as anonymous, pytest.raises(Unauthenticated):
            anonymous.model_info()
        with (
            RecommenderClient(target, token="wrong-token-0123456789") as wrong,
            pytest.raises(Unauthenticated),
        ):
            wrong.model_info()
        with RecommenderClient(target, token=TOKEN) as good:
            assert good.model_info().version
    finally:
        s.stop()


def test_a_server_without_a_model_is_unavailable_after_the_retries(models_dir: Path) -> None:
    s = ServerThread(settings_for(models_dir), load=False)
    try:
        with RecommenderClient(f"localhost:{s.running.port}") as client, pytest.raises(Unavailable):
            client.recommend("C00000004")
    finally:
        s.stop()
