"""``RecommenderClient``: the read side of the service (``recsvc.v1.Recommender``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recsvc_client._proto import ids, recommender_pb2, recommender_pb2_grpc, to_datetime
from recsvc_client.answers import (
    ActiveRules,
    Audience,
    Contribution,
    Dropped,
    DropReason,
    ExclusionCounts,
    ModelInfo,
    Recommendation,
    ScoredItem,
    Source,
)
from recsvc_client.channel import ServiceClient

__all__ = ["RecommenderClient"]

_SOURCES = {source.value: source for source in Source}
_REASONS = {reason.value: reason for reason in DropReason}


class RecommenderClient(ServiceClient):
    """Recommendations, similar and ranked products, the model, campaign audiences.

    Every call is retried on UNAVAILABLE (see ``Retries``) and has the client's
    deadline; a failure raises a ``RecsvcClientError``. ``min_sequence`` (from an
    ``UpdatesClient`` answer) waits until the server has applied that write.
    """

    _stub_type = recommender_pb2_grpc.RecommenderStub

    def recommend(
        self,
        user_id: str = "",
        k: int = 10,
        *,
        recent_item_ids: Sequence[str] = (),
        exclude_item_ids: Sequence[str] = (),
        explain: bool = False,
        include_interacted: bool = False,
        min_sequence: int = 0,
    ) -> Recommendation:
        """Up to ``k`` products for a customer (no ``user_id``: anonymous, by recent items)."""
        request = recommender_pb2.RecommendRequest(
            user_id=user_id,
            k=k,
            recent_item_ids=ids(recent_item_ids, "recent_item_ids"),
            exclude_item_ids=ids(exclude_item_ids, "exclude_item_ids"),
            explain=explain,
            include_interacted=include_interacted,
            min_sequence=min_sequence,
        )
        resp: recommender_pb2.RecommendResponse = self._call(self._stub.Recommend, request)
        return _recommendation(
            resp,
            _SOURCES.get(resp.source, Source.UNSPECIFIED),
            unknown_recent_item_ids=tuple(resp.unknown_recent_item_ids),
        )

    def similar_items(
        self,
        item_id: str,
        k: int = 10,
        *,
        user_id: str = "",
        exclude_item_ids: Sequence[str] = (),
    ) -> Recommendation:
        """Up to ``k`` products like ``item_id``; a ``user_id`` applies that customer's rules."""
        request = recommender_pb2.SimilarItemsRequest(
            item_id=item_id,
            k=k,
            user_id=user_id,
            exclude_item_ids=ids(exclude_item_ids, "exclude_item_ids"),
        )
        resp: recommender_pb2.SimilarItemsResponse = self._call(self._stub.SimilarItems, request)
        return _recommendation(resp, None)

    def rank_items(
        self,
        user_id: str,
        item_ids: Sequence[str],
        *,
        recent_item_ids: Sequence[str] = (),
        include_interacted: bool = False,
        min_sequence: int = 0,
    ) -> Recommendation:
        """The eligible ``item_ids`` in the customer's personal order; see ``unknown_item_ids``."""
        request = recommender_pb2.RankItemsRequest(
            user_id=user_id,
            item_ids=ids(item_ids, "item_ids"),
            recent_item_ids=ids(recent_item_ids, "recent_item_ids"),
            include_interacted=include_interacted,
            min_sequence=min_sequence,
        )
        resp: recommender_pb2.RankItemsResponse = self._call(self._stub.RankItems, request)
        return _recommendation(
            resp,
            _SOURCES.get(resp.source, Source.UNSPECIFIED),
            unknown_item_ids=tuple(resp.unknown_item_ids),
            dropped=tuple(
                Dropped(d.item_id, _REASONS.get(d.reason, DropReason.UNSPECIFIED))
                for d in resp.dropped
            ),
            unknown_recent_item_ids=tuple(resp.unknown_recent_item_ids),
        )

    def model_info(self) -> ModelInfo:
        """The served model, its active rules and the state sequence it has applied."""
        info: recommender_pb2.ModelInfo = self._call(
            self._stub.GetModelInfo, recommender_pb2.GetModelInfoRequest()
        )
        rules = info.rules
        return ModelInfo(
            version=info.version,
            created_at=to_datetime(info, "created_at"),
            algorithm=info.algorithm,
            n_users=info.n_users,
            n_items=info.n_items,
            factors=info.factors,
            rules=ActiveRules(
                suitability=rules.suitability,
                active_only=rules.active_only,
                exclude_interacted=rules.exclude_interacted,
                marketing_consent=rules.marketing_consent,
            ),
            item_index=info.item_index,
            user_index=info.user_index,
            state_sequence=info.state_sequence,
            model_state_sequence=info.model_state_sequence,
        )

    def target_users(
        self,
        item_ids: Sequence[str],
        audience_size: int,
        *,
        min_score: float | None = None,
        include_holders: bool = False,
        min_sequence: int = 0,
    ) -> Audience:
        """The ``audience_size`` customers most likely to want ``item_ids`` (a campaign).

        Reads the whole stream; the deadline covers all of it, so give a client for
        large audiences a longer ``timeout``.
        """
        request = recommender_pb2.TargetUsersRequest(
            item_ids=ids(item_ids, "item_ids"),
            audience_size=audience_size,
            include_holders=include_holders,
            min_sequence=min_sequence,
        )
        if min_score is not None:
            request.min_score = min_score
        user_ids: list[str] = []
        scores: list[float] = []
        version, sequence, eligible, approximate = "", 0, 0, False
        excluded = ExclusionCounts()
        for msg in self._stream(self._stub.TargetUsers, request):
            user_ids.extend(u.user_id for u in msg.users)
            scores.extend(u.score for u in msg.users)
            version = msg.model_version or version  # on the first message only
            sequence = msg.state_sequence or sequence
            if msg.HasField("excluded"):  # the last message
                e = msg.excluded
                excluded = ExclusionCounts(
                    e.no_consent,
                    e.unsuitable,
                    e.holders,
                    e.below_min_score,
                    e.contact_capped,
                    e.declined_recently,
                )
                eligible, approximate = msg.eligible_users, msg.approximate
        return Audience(
            user_ids=tuple(user_ids),
            scores=tuple(scores),
            model_version=version,
            state_sequence=sequence,
            eligible_users=eligible,
            excluded=excluded,
            approximate=approximate,
        )


def _recommendation(
    resp: Any,
    source: Source | None,
    unknown_item_ids: tuple[str, ...] = (),
    dropped: tuple[Dropped, ...] = (),
    unknown_recent_item_ids: tuple[str, ...] = (),
) -> Recommendation:
    """A Recommendation from any of the three answers that carry scored items."""
    return Recommendation(
        items=tuple(
            ScoredItem(
                it.item_id,
                it.score,
                tuple(Contribution(c.item_id, c.weight) for c in it.because),
            )
            for it in resp.items
        ),
        model_version=resp.model_version,
        source=source,
        recommendation_id=resp.recommendation_id,
        state_sequence=resp.state_sequence,
        unknown_item_ids=unknown_item_ids,
        dropped=dropped,
        unknown_recent_item_ids=unknown_recent_item_ids,
    )
