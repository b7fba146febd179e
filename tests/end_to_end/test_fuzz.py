"""Fuzzing every RPC of a real server: odd and invalid input never yields UNKNOWN
or INTERNAL; invalid fields are named; oversized messages are RESOURCE_EXHAUSTED."""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.v1 import recommender_pb2 as pb
from tests.conftest import ServerThread

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# Protobuf strings must be valid UTF-8, so surrogates cannot be sent at all.
_chars = st.characters(blacklist_categories=("Cs",))
real_ids = st.one_of(
    st.integers(0, 1600).map(lambda n: f"C{n:08d}"),
    st.sampled_from(["CUR", "SAV", "CC", "MF", "ETF", "PL", "TD"]).flatmap(
        lambda p: st.integers(1, 12).map(lambda n: f"{p}-{n:06d}")
    ),
)
odd_text = st.one_of(
    real_ids,
    real_ids,
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
    st.text(_chars, max_size=40),
    st.text(_chars, min_size=250, max_size=300),
    st.sampled_from(
        ["", " ", "C00000001", "CC-000001", "\x00", "a\tb", "ü🙂", "\u202e", "x" * 256, "x" * 257]
    ),
)
odd_ids = st.one_of(st.lists(real_ids, max_size=8), st.lists(odd_text, max_size=8))
int32 = st.one_of(st.integers(0, 500), st.integers(0, 500), st.integers(-(2**31), 2**31 - 1))
TALLY: Counter[str] = Counter()


def _call(fn, request) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    try:
        result = fn(request, timeout=10)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details()  # type: ignore[attr-defined]


def _bad_id(value: str, required: bool = True) -> bool:
    if not value:
        return required
    return len(value) > 256 or any(unicodedata.category(c) in ("Cc", "Cs") for c in value)


def _bad_list(values: Sequence[str], name: str, limit: int = 1000) -> set[str]:
    if len(values) > limit:
        return {name}
    return {f"{name}[{i}]" for i, v in enumerate(values) if _bad_id(v)}


def _invalid_fields(method: str, r) -> set[str]:  # type: ignore[no-untyped-def]
    """Every field ``r`` gets wrong, as the server must name it (naming any one will do).

    The API's documented limits, stated again here: ids of 1-256 characters without
    control characters, k 0 (the default) to 500, lists of at most 1,000 (RankItems: 500
    candidates), audiences of 1 to 10,000,000, a min_score that is a number.
    """
    bad: set[str] = set()
    if method in ("Recommend", "SimilarItems", "RankItems") and _bad_id(r.user_id, False):
        bad.add("user_id")
    if method in ("Recommend", "SimilarItems"):
        if r.k != 0 and not 1 <= r.k <= 500:
            bad.add("k")
        bad |= _bad_list(r.exclude_item_ids, "exclude_item_ids")
    if method in ("Recommend", "RankItems"):
        bad |= _bad_list(r.recent_item_ids, "recent_item_ids")
    if method == "Recommend" and not r.user_id and not r.recent_item_ids:
        bad.add("user_id")
    if method == "SimilarItems" and _bad_id(r.item_id):
        bad.add("item_id")
    if method in ("RankItems", "TargetUsers"):
        limit = 500 if method == "RankItems" else 1000
        bad |= _bad_list(r.item_ids, "item_ids", limit) if r.item_ids else {"item_ids"}
    if method == "TargetUsers":
        if not 1 <= r.audience_size <= 10_000_000:
            bad.add("audience_size")
        if r.HasField("min_score") and math.isnan(r.min_score):
            bad.add("min_score")
    return bad


def _check(method: str, request, code: grpc.StatusCode, details: str) -> None:  # type: ignore[no-untyped-def]
    """The status the request deserves: INVALID_ARGUMENT naming a bad field, iff one is bad."""
    TALLY[code.name] += 1
    assert code in ALLOWED, (code, details)
    bad = _invalid_fields(method, request)
    if bad:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, bad)
        assert details.split(":", 1)[0] in bad, (details, bad)
    else:
        assert code != grpc.StatusCode.INVALID_ARGUMENT, details


requests = st.one_of(
    st.builds(
        lambda u, k, ex, rc, e, inc: (
            "Recommend",
            pb.RecommendRequest(
                user_id=u,
                k=k,
                exclude_item_ids=ex,
                recent_item_ids=rc,
                explain=e,
                include_interacted=inc,
            ),
        ),
        odd_text,
        int32,
        odd_ids,
        odd_ids,
        st.booleans(),
        st.booleans(),
    ),
    st.builds(
        lambda i, k, u, ex: (
            "SimilarItems",
            pb.SimilarItemsRequest(item_id=i, k=k, user_id=u, exclude_item_ids=ex),
        ),
        odd_text,
        int32,
        odd_text,
        odd_ids,
    ),
    st.builds(
        lambda u, ids, rc: (
            "RankItems",
            pb.RankItemsRequest(user_id=u, item_ids=ids, recent_item_ids=rc),
        ),
        odd_text,
        odd_ids,
        odd_ids,
    ),
    st.builds(
        lambda ids, n, ms, h: (
            "TargetUsers",
            pb.TargetUsersRequest(
                item_ids=ids,
                audience_size=n,
                include_holders=h,
                **({} if ms is None else {"min_score": ms}),
            ),
        ),
        odd_ids,
        st.one_of(st.integers(1, 3000), st.integers(-(2**63), 2**63 - 1)),
        st.one_of(st.none(), st.floats(width=32)),
        st.booleans(),
    ),
    st.just(("GetModelInfo", pb.GetModelInfoRequest())),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_fuzzed_requests_get_only_expected_codes(server: ServerThread, req) -> None:  # type: ignore[no-untyped-def]
    method, request = req
    _check(method, request, *_call(getattr(server.stub, method), request))


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        (
            "Recommend",
            pb.RecommendRequest(user_id="u", exclude_item_ids=["x"] * 1001),
            "exclude_item_ids",
        ),
        (
            "Recommend",
            pb.RecommendRequest(user_id="u", recent_item_ids=["CC-000001"] * 1001),
            "recent_item_ids",
        ),
        (
            "RankItems",
            pb.RankItemsRequest(user_id="u", item_ids=[f"i{n}" for n in range(501)]),
            "item_ids",
        ),
        ("TargetUsers", pb.TargetUsersRequest(item_ids=["x"] * 1001, audience_size=5), "item_ids"),
        (
            "TargetUsers",
            pb.TargetUsersRequest(item_ids=["x"], audience_size=2**62),
            "audience_size",
        ),
        (
            "TargetUsers",
            pb.TargetUsersRequest(item_ids=["x"], audience_size=5, min_score=float("nan")),
            "min_score",
        ),
        ("Recommend", pb.RecommendRequest(user_id="u", k=2**31 - 1), "k"),
    ],
)
def test_huge_inputs_are_invalid_and_named(
    server: ServerThread, method: str, request_, field: str
) -> None:  # type: ignore[no-untyped-def]
    code, details = _call(getattr(server.stub, method), request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    TALLY[code.name] += 1


def test_oversized_messages_are_resource_exhausted(server: ServerThread) -> None:
    big = pb.RecommendRequest(user_id="u", exclude_item_ids=["x" * 250] * 20_000)  # ~5 MB
    code, _ = _call(server.stub.Recommend, big)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_is_healthy_after_the_fuzzing(server: ServerThread) -> None:
    status = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert server.stub.Recommend(pb.RecommendRequest(user_id="C00000001"), timeout=5).items
    print(f"\nfuzz tally: {dict(TALLY)} total={sum(TALLY.values())}")
