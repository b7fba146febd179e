"""The server process: health, reflection, hot reload, start-up fallback, graceful stop."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsvc.model.bundle import read_latest
from recsvc.v1 import recommender_pb2 as pb
from tests.conftest import PARAMS, ServerThread, health_status, rpc_code, settings_for
from training.data import TrainingData
from training.fit import fit_model
from training.publish import publish, write_latest


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
        assert health_status(s.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        code = rpc_code(s.stub.Recommend, pb.RecommendRequest(user_id="u"))
        assert code == grpc.StatusCode.UNAVAILABLE
        s.start_polling()
        publish(models, training_data, fit_model(training_data.user_items, PARAMS, progress=False))
        deadline = time.time() + 20
        while (
            health_status(s.channel) != health_pb2.HealthCheckResponse.SERVING
            and time.time() < deadline
        ):
            time.sleep(0.05)
        assert (
            health_status(s.channel, "recsvc.v1.Recommender")
            == health_pb2.HealthCheckResponse.SERVING
        )
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
        assert health_status(s.channel) == health_pb2.HealthCheckResponse.SERVING
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
        code = rpc_code(s.stub.GetModelInfo, pb.GetModelInfoRequest())
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        watcher.close()
        s.stop()
