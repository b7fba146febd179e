"""The gRPC edge: protobuf in, domain objects to the data plane, protobuf out.

Errors become status codes here and only here (``status_for``); anything
unexpected is logged and answered INTERNAL with a generic message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from recsvc.audit import AuditLog, audience_payload, audience_sha256, encode_answer
from recsvc.errors import (
    AuditUnavailable,
    BundleError,
    DeadlineExpired,
    InvalidArgument,
    ModelUnavailable,
    NotFound,
    PreconditionFailed,
    RecsvcError,
    StateError,
    StateUnavailable,
)
from recsvc.logs import Pseudonymizer
from recsvc.model import ranking
from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery, TargetQuery
from recsvc.model.targeting import Audience
from recsvc.serving.auth import current_caller
from recsvc.serving.servable import ServedModel
from recsvc.serving.store import ModelStore
from recsvc.v1 import recommender_pb2 as _pb
from recsvc.v1 import recommender_pb2_grpc as _pb_grpc

__all__ = ["MIN_SEQUENCE_WAIT", "Context", "RecommenderService", "edge", "status_for"]

log = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[RecsvcError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (AuditUnavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BundleError, grpc.StatusCode.INTERNAL),
    (StateUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StateError, grpc.StatusCode.INTERNAL),
)
_AUDIENCE_BATCH = 5000
MIN_SEQUENCE_WAIT = 1.0
"""The longest a request with ``min_sequence`` waits for this server to apply it (seconds)."""
_SOURCE = {
    ranking.Source.PERSONALIZED: _pb.PERSONALIZED,
    ranking.Source.FOLD_IN: _pb.FOLD_IN,
    ranking.Source.POPULAR: _pb.POPULAR,
}
_DROP = {
    ranking.DropReason.UNKNOWN_ITEM: _pb.UNKNOWN_ITEM,
    ranking.DropReason.INACTIVE: _pb.INACTIVE,
    ranking.DropReason.UNSUITABLE: _pb.UNSUITABLE,
    ranking.DropReason.EXCLUSIVE_CATEGORY: _pb.EXCLUSIVE_CATEGORY,
    ranking.DropReason.INTERACTED: _pb.INTERACTED,
}

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, "internal error" if code == grpc.StatusCode.INTERNAL else str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


async def _abort(
    context: Context, exc: BaseException, method: str, stats: Counter[tuple[str, str]]
) -> None:
    code, message = status_for(exc)
    stats[method, code.name] += 1
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error", extra={"method": method}, exc_info=exc)
    await context.abort(code, message)


def _check_deadline(context: Context) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExpired("deadline expired before any work was done")


def edge(
    method: Callable[[Any, Any, Context], Awaitable[T]],
) -> Callable[[Any, Any, Context], Awaitable[T]]:
    """Unary methods: map every exception through ``status_for``."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> T:
        try:
            _check_deadline(context)
            response = await method(self, request, context)
        except Exception as exc:  # the one place that maps them all
            await _abort(context, exc, method.__name__, self.stats)
            raise AssertionError("unreachable") from exc  # abort always raises
        self.stats[method.__name__, "OK"] += 1
        return response

    return wrapper


Answer = TypeVar("Answer", _pb.RecommendResponse, _pb.SimilarItemsResponse, _pb.RankItemsResponse)


def _answer(response: Answer, result: ranking.Ranked) -> Answer:
    """Fill ``response`` with the ranked items, the model version and a fresh answer id."""
    add = response.items.add  # in place: a third of the cost of building item messages
    for it in result.items:
        if it.because:
            because = [_pb.Contribution(item_id=i, weight=w) for i, w in it.because]
            add(item_id=it.item_id, score=it.score, because=because)
        else:
            add(item_id=it.item_id, score=it.score)
    response.model_version = result.version
    response.recommendation_id = os.urandom(16).hex()  # 128 random bits (uuid4 has 122)
    response.state_sequence = result.sequence
    return response


class RecommenderService(_pb_grpc.RecommenderServicer):
    """Thin servicer over :class:`recsvc.model.ranking.Recommender` and :class:`Targeter`."""

    def __init__(
        self,
        store: ModelStore,
        pseudonym: Pseudonymizer,
        live: bool = False,
        audit: AuditLog | None = None,
    ) -> None:
        """
        Args:
            store: the served model.
            pseudonym: customer ids in logs and audit records.
            live: a state store follows this server's model (``min_sequence`` can be met).
            audit: every answer's record is written here before the answer is sent.
        """
        self._store = store
        self._pseudonym = pseudonym
        self._live = live
        self._audit = audit
        self.stats: Counter[tuple[str, str]] = Counter()
        """Answers by (method, status code name), for tests and diagnostics."""

    async def _model(self, min_sequence: int, context: Context) -> ServedModel:
        """The served model, once it reflects ``min_sequence`` (read your own writes)."""
        if min_sequence < 0:
            raise InvalidArgument("min_sequence", f"must not be negative, got {min_sequence}")
        model = self._store.current()
        if min_sequence == 0 or model.sequence >= min_sequence:
            return model
        if not self._live:
            raise PreconditionFailed(
                "min_sequence: this server has no state store (start it with --state URL)"
            )
        remaining = context.time_remaining()
        end = time.monotonic() + min(MIN_SEQUENCE_WAIT, remaining or MIN_SEQUENCE_WAIT)
        while time.monotonic() < end:
            await asyncio.sleep(0.002)
            model = self._store.current()
            if model.sequence >= min_sequence:
                return model
        raise ModelUnavailable(
            f"min_sequence: this server has applied state sequence {model.sequence}, "
            f"not yet {min_sequence}; retry"
        )

    async def _record(
        self,
        method: str,
        response: Any,
        user_id: str,
        result: ranking.Ranked,
        include_interacted: bool = False,
    ) -> None:
        """The answer's audit record, written before the answer goes (none without audit)."""
        if self._audit is None:
            return
        basis = result.suitability
        assert basis is not None, "the recommender gives every answer its suitability basis"
        removed = basis.removed
        if include_interacted:
            removed = {**removed, "interacted": 0}
        members = encode_answer(
            recommendation_id=response.recommendation_id,
            method=method,
            caller=current_caller(),
            subject=self._pseudonym(user_id),
            model_version=result.version,
            state_sequence=result.sequence,
            source=result.source.name,
            tolerance=basis.tolerance,
            basis=basis.basis,
            removed=removed,
            items=[(it.item_id, it.score) for it in result.items],
        )
        await self._audit.append_async(members)

    def _log(self, method: str, user_id: str, **fields: object) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(method, extra={"user": self._pseudonym(user_id), **fields})

    @edge
    async def Recommend(
        self, request: _pb.RecommendRequest, context: Context
    ) -> _pb.RecommendResponse:
        query = RecommendQuery(
            user_id=request.user_id,
            k=request.k,
            exclude_item_ids=tuple(request.exclude_item_ids),
            recent_item_ids=tuple(request.recent_item_ids),
            explain=request.explain,
            include_interacted=request.include_interacted,
            max_per_category=request.max_per_category,
        )
        model = await self._model(request.min_sequence, context)
        result = model.recommender.recommend(query, model.overlay)
        self._log("Recommend", request.user_id, n=len(result.items), source=result.source.name)
        response = _pb.RecommendResponse(
            source=_SOURCE[result.source],
            unknown_recent_item_ids=model.recommender.unknown_items(query.recent_item_ids),
        )
        _answer(response, result)
        await self._record(
            "Recommend", response, request.user_id, result, request.include_interacted
        )
        return response

    @edge
    async def SimilarItems(
        self, request: _pb.SimilarItemsRequest, context: Context
    ) -> _pb.SimilarItemsResponse:
        query = SimilarQuery(
            item_id=request.item_id,
            k=request.k,
            user_id=request.user_id,
            exclude_item_ids=tuple(request.exclude_item_ids),
        )
        model = self._store.current()
        result = model.recommender.similar_items(query, model.overlay)
        response = _answer(_pb.SimilarItemsResponse(), result)
        await self._record("SimilarItems", response, request.user_id, result)
        return response

    @edge
    async def RankItems(
        self, request: _pb.RankItemsRequest, context: Context
    ) -> _pb.RankItemsResponse:
        query = RankQuery(
            user_id=request.user_id,
            item_ids=tuple(request.item_ids),
            recent_item_ids=tuple(request.recent_item_ids),
            include_interacted=request.include_interacted,
        )
        model = await self._model(request.min_sequence, context)
        result = model.recommender.rank_items(query, model.overlay)
        self._log("RankItems", request.user_id, n=len(result.items))
        response = _pb.RankItemsResponse(
            source=_SOURCE[result.source],
            unknown_item_ids=list(result.unknown_item_ids),
            dropped=[
                _pb.DroppedItem(item_id=d.item_id, reason=_DROP[d.reason]) for d in result.dropped
            ],
            unknown_recent_item_ids=model.recommender.unknown_items(query.recent_item_ids),
        )
        _answer(response, result)
        await self._record(
            "RankItems", response, request.user_id, result, request.include_interacted
        )
        return response

    @edge
    async def GetModelInfo(
        self, request: _pb.GetModelInfoRequest, context: Context
    ) -> _pb.ModelInfo:
        model = self._store.current()
        info = model.recommender.info()
        created = Timestamp()
        created.FromDatetime(info["created_at"])
        return _pb.ModelInfo(
            version=info["version"],
            created_at=created,
            algorithm=info["algorithm"],
            n_users=info["n_users"],
            n_items=info["n_items"],
            factors=info["factors"],
            rules=_pb.ActiveRules(
                suitability=info["suitability"],
                active_only=info["active_only"],
                exclude_interacted=True,
                marketing_consent=not model.targeter.no_consent_data,
            ),
            item_index=info["item_index"],
            user_index=info["user_index"],
            state_sequence=model.sequence,
            model_state_sequence=model.recommender.bundle.manifest.state_sequence,
        )

    async def TargetUsers(
        self, request: _pb.TargetUsersRequest, context: Context
    ) -> AsyncIterator[_pb.TargetUsersResponse]:
        try:
            _check_deadline(context)
            query = TargetQuery(
                item_ids=tuple(request.item_ids),
                audience_size=request.audience_size,
                min_score=request.min_score if request.HasField("min_score") else None,
                include_holders=request.include_holders,
            )
            model = await self._model(request.min_sequence, context)
            # Large audiences take a while: keep the event loop free for other RPCs.
            audience = await asyncio.to_thread(
                model.targeter.target, query, model.overlay, channel=request.channel
            )
            user_ids = model.targeter.bundle.users.ids
            recommendation_id = os.urandom(16).hex()
            if self._audit is not None:
                await self._audit.append_async(
                    self._audience_record(request, query, model, audience, recommendation_id)
                )
        except Exception as exc:
            await _abort(context, exc, "TargetUsers", self.stats)
            return
        self.stats["TargetUsers", "OK"] += 1
        first = True
        sent = 0
        for ids, scores in audience.batches(user_ids, _AUDIENCE_BATCH):
            msg = _pb.TargetUsersResponse(
                users=[
                    _pb.ScoredUser(user_id=u, score=float(s))
                    for u, s in zip(ids, scores, strict=True)
                ]
            )
            if first:
                msg.model_version = audience.version
                msg.state_sequence = audience.sequence
                msg.recommendation_id = recommendation_id
                first = False
            sent += len(ids)
            if sent == len(audience.rows):
                self._fill_counts(msg, audience)
            yield msg
        if first:  # an empty audience still reports version and counts
            msg = _pb.TargetUsersResponse(
                model_version=audience.version,
                state_sequence=audience.sequence,
                recommendation_id=recommendation_id,
            )
            self._fill_counts(msg, audience)
            yield msg

    @staticmethod
    def _audience_record(
        request: _pb.TargetUsersRequest,
        query: TargetQuery,
        model: ServedModel,
        audience: Audience,
        recommendation_id: str,
    ) -> dict[str, Any]:
        ids = audience.ids(model.targeter.bundle.users.ids)
        return audience_payload(
            recommendation_id=recommendation_id,
            caller=current_caller(),
            model_version=audience.version,
            state_sequence=audience.sequence,
            campaign_id=request.campaign_id,
            channel=request.channel,
            request={
                "item_ids": list(query.item_ids),
                "audience_size": query.audience_size,
                "min_score": query.min_score,
                "include_holders": query.include_holders,
            },
            consent=not model.targeter.no_consent_data,
            excluded=dataclasses.asdict(audience.excluded),
            audience_size=len(ids),
            audience_sha256=audience_sha256(ids),
        )

    @staticmethod
    def _fill_counts(msg: _pb.TargetUsersResponse, audience: Any) -> None:
        ex = audience.excluded
        msg.excluded.CopyFrom(
            _pb.ExclusionCounts(
                no_consent=ex.no_consent,
                unsuitable=ex.unsuitable,
                holders=ex.holders,
                below_min_score=ex.below_min_score,
                contact_capped=ex.contact_capped,
                declined_recently=ex.declined_recently,
            )
        )
        msg.eligible_users = audience.eligible
        msg.approximate = audience.indexed
