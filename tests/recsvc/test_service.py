"""A real server on port 0: every RPC, every rule, error codes, health, hot reload."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsvc import errors
from recsvc.model.bundle import read_latest
from recsvc.serving.service import status_for
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc
from tests.conftest import PARAMS, ServerThread, settings_for
from tests.recsvc.rules_oracle import Oracle
from training.data import TrainingData
from training.fit import fit_model
from training.publish import publish, write_latest


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


def _code(call, request) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.code()  # type: ignore[no-any-return]


def _details(call, request) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.details()  # type: ignore[no-any-return]


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


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
    assert _code(call, request_) == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(call, request_).startswith(field + ":")


def test_unknown_item_is_not_found(stub: recommender_pb2_grpc.RecommenderStub) -> None:
    assert (
        _code(stub.SimilarItems, pb.SimilarItemsRequest(item_id="nope"))
        == grpc.StatusCode.NOT_FOUND
    )


def test_reflection_lists_the_services(server: ServerThread) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"recsvc.v1.Recommender", "grpc.health.v1.Health"} <= names


def test_no_model_is_unavailable_then_serving_after_publish(
    tmp_path: Path, training_data: TrainingData
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    s = ServerThread(settings_for(models), load=False)
    try:
        assert _health(s.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        code = _code(s.stub.Recommend, pb.RecommendRequest(user_id="u"))
        assert code == grpc.StatusCode.UNAVAILABLE
        s.start_polling()
        publish(models, training_data, fit_model(training_data.user_items, PARAMS, progress=False))
        deadline = time.time() + 20
        while (
            _health(s.channel) != health_pb2.HealthCheckResponse.SERVING and time.time() < deadline
        ):
            time.sleep(0.05)
        assert _health(s.channel, "recsvc.v1.Recommender") == health_pb2.HealthCheckResponse.SERVING
        assert s.stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=5).source == pb.POPULAR
    finally:
        s.stop()


def _wait_version(s: ServerThread, version: str, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).version == version:
            return True
        time.sleep(0.05)
    return False


def test_hot_reload_and_corrupt_versions_are_never_served(
    models_copy: Path, training_data: TrainingData, tmp_path: Path
) -> None:
    first = read_latest(models_copy)
    s = ServerThread(settings_for(models_copy))
    s.start_polling()
    try:
        assert _wait_version(s, first)  # type: ignore[arg-type]
        second = publish(
            models_copy, training_data, fit_model(training_data.user_items, PARAMS, progress=False)
        )
        assert _wait_version(s, second.name)
        # Publish the third elsewhere and corrupt it there, so it is already bad when
        # LATEST first names it: the poller can never catch it intact.
        staged = publish(
            tmp_path / "staging",
            training_data,
            fit_model(training_data.user_items, PARAMS, progress=False),
        )
        p = staged / "item_factors.npy"
        p.write_bytes(p.read_bytes()[:-8] + b"\x00" * 8)
        third = staged.rename(models_copy / staged.name)
        write_latest(models_copy, third.name)
        deadline = time.time() + 20
        while s.running.store.stats.rejected == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert s.running.store.stats.rejected == 1
        assert third.name in s.running.store.stats.rejected_versions
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).version == second.name
        assert _health(s.channel) == health_pb2.HealthCheckResponse.SERVING
        write_latest(models_copy, "v-does-not-exist")
        # Wait for the poller to have judged the new LATEST, not for a span of time: a
        # poller that never ran would otherwise pass too.
        deadline = time.time() + 20
        while "v-does-not-exist" not in s.running.store.stats.rejected_versions:
            assert time.time() < deadline, s.running.store.stats
            time.sleep(0.05)
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).version == second.name
    finally:
        s.stop()


def test_start_falls_back_to_newest_valid_version(
    models_copy: Path, training_data: TrainingData
) -> None:
    good = read_latest(models_copy)
    bad = publish(
        models_copy, training_data, fit_model(training_data.user_items, PARAMS, progress=False)
    )
    (bad / "users.faiss").write_bytes(b"garbage")
    s = ServerThread(settings_for(models_copy))
    try:
        assert s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).version == good
    finally:
        s.stop()


def test_graceful_stop_reports_not_serving_before_the_server_goes(models_dir: Path) -> None:
    s = ServerThread(settings_for(models_dir))
    s.start_polling()
    watcher = grpc.insecure_channel(f"localhost:{s.running.port}")
    try:
        # A Watch stream is an RPC in flight: it sees what health says while stop() drains.
        watch = health_pb2_grpc.HealthStub(watcher).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        s.call(s.running.stop(grace=0.5))  # the path `recsvc serve` takes on SIGTERM
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError):  # the server cut the stream when the grace ran out
            next(watch)
        code = _code(s.stub.GetModelInfo, pb.GetModelInfoRequest())
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        watcher.close()
        s.stop()


# The expected code of every class in the error tree, written out here rather than read
# from the service's table: a class added without a decision here fails the test below.
_EXPECTED_STATUS = {
    errors.RecsvcError: grpc.StatusCode.INTERNAL,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.BundleError: grpc.StatusCode.INTERNAL,
    errors.BundleUnreadable: grpc.StatusCode.INTERNAL,
    errors.DataError: grpc.StatusCode.INTERNAL,
    errors.StateError: grpc.StatusCode.INTERNAL,
    errors.StateUnavailable: grpc.StatusCode.UNAVAILABLE,
}
# Internal failures say nothing about themselves to the client.
_GENERIC = {grpc.StatusCode.INTERNAL}


def _error_tree(root: type[errors.RecsvcError]) -> list[type[errors.RecsvcError]]:
    return [root, *(c for sub in root.__subclasses__() for c in _error_tree(sub))]


def test_every_error_class_has_an_expected_status() -> None:
    assert set(_error_tree(errors.RecsvcError)) == set(_EXPECTED_STATUS)


def _instance(kind: type[BaseException]) -> BaseException:
    if kind is errors.InvalidArgument:
        return errors.InvalidArgument("k", "must be positive")
    return kind("some detail")


@pytest.mark.parametrize(
    "kind", [*_EXPECTED_STATUS, Exception, ValueError, KeyError], ids=lambda k: k.__name__
)
def test_status_for_every_error(kind: type[BaseException]) -> None:
    code, message = status_for(_instance(kind))
    expected = _EXPECTED_STATUS.get(kind, grpc.StatusCode.INTERNAL)  # type: ignore[call-overload]
    assert code == expected
    if expected in _GENERIC:
        assert message == "internal error"
    else:
        assert message == str(_instance(kind))
