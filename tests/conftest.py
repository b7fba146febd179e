"""Shared fixtures: a seeded sample bank, a published bundle, real servers on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import Phase, settings

from recsvc.model.bundle import load_bundle, read_latest
from recsvc.model.ranking import Recommender
from recsvc.serving.server import RunningServer, create_server
from recsvc.settings import ServerSettings
from recsvc.v1 import recommender_pb2_grpc
from tests.fixture_cache import kept
from tests.postgres import pg_cluster  # noqa: F401  (one throwaway cluster a session)
from training.data import TrainingData, load_training_data
from training.fit import FitParams, fit_model
from training.publish import publish
from training.sample import SampleSpec, write_sample

# Under mutation testing (`make mutation` sets RECSVC_TEST_MUTATION) a property test
# stops at its first failing example: shrinking it, which only makes the report
# readable, took minutes a mutant and ended many in mutmut's timeout.
settings.register_profile(
    "mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], print_blob=False
)
if os.environ.get("RECSVC_TEST_MUTATION"):
    settings.load_profile("mutation")

SAMPLE = SampleSpec(users=1500, items=120, seed=7)
PARAMS = FitParams(factors=16, iterations=8, seed=3)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample bank's Parquet files; treat as read-only."""
    return kept(
        "sample",
        lambda out: write_sample(out, SAMPLE, progress=False),
        lambda: tmp_path_factory.mktemp("sample"),
    )


@pytest.fixture(scope="session")
def training_data(sample_dir: Path) -> TrainingData:
    return load_training_data(
        sample_dir / "interactions.parquet",
        sample_dir / "items.parquet",
        sample_dir / "users.parquet",
    )


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A models folder with one published version; treat as read-only."""

    def build(models: Path) -> None:
        data: TrainingData = request.getfixturevalue("training_data")
        publish(models, data, fit_model(data.user_items, PARAMS, progress=False))

    return kept("models", build, lambda: tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def bundle_path(models_dir: Path) -> Path:
    version = read_latest(models_dir)
    assert version is not None
    return models_dir / version


@pytest.fixture(scope="session")
def recommender(bundle_path: Path) -> Recommender:
    return Recommender(load_bundle(bundle_path))


@pytest.fixture
def models_copy(tmp_path: Path, models_dir: Path) -> Path:
    """A writable copy of the models folder, for tests that publish or corrupt."""
    dst = tmp_path / "models"
    shutil.copytree(models_dir, dst)
    return dst


# The classic hostile pickle (calls os.system("true") when unpickled), as raw bytes.
_HOSTILE_PICKLE = b"cos\nsystem\n(S'true'\ntR."


def write_pickled_npy(path: Path) -> None:
    """An .npy file whose object array holds a pickle, written without pickling anything."""
    with path.open("wb") as f:
        header = {"descr": "|O", "fortran_order": False, "shape": (1,)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(_HOSTILE_PICKLE)


class ServerThread:
    """A real server in a background event loop, for synchronous tests."""

    def __init__(self, settings: ServerSettings, load: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(create_server(settings))
        if load:
            self.call(self.running.refresh())
        self.channel = grpc.insecure_channel(f"localhost:{self.running.port}")
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def start_polling(self) -> None:
        self.loop.call_soon_threadsafe(self.running.start_polling)

    def stop(self, grace: float = 0.5) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.call(self.running.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()  # its self-pipe sockets too (ResourceWarning otherwise)


def settings_for(models: Path, **kw: object) -> ServerSettings:
    base = ServerSettings(models=models, port=0, poll_interval=0.2, pseudonym_key=b"test-key")
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(models_dir: Path) -> Iterator[ServerThread]:
    s = ServerThread(settings_for(models_dir))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def stub(server: ServerThread) -> recommender_pb2_grpc.RecommenderStub:
    return server.stub


def serve_process(
    models_dir: Path, port: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`recsvc serve` in its own process on 127.0.0.1:port, quiet."""
    argv = ["serve", "--models", str(models_dir), "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(
        [sys.executable, "-m", "recsvc.cli", *argv, *extra],
        env={**os.environ, "RECSVC_LOG_LEVEL": "WARNING", **(env or {})},
        stderr=subprocess.DEVNULL,
    )


def wait_serving(port: int, timeout: float = 60) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != 1:
            assert time.monotonic() < deadline, "never SERVING"
            time.sleep(0.05)


# Channels share connections to one target unless told not to: a new connection, a new
# source port (so SO_REUSEPORT may hand it to another worker).
NEW_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def serving_on_a_new_connection(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=NEW_CONNECTION) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        return bool(status == health_pb2.HealthCheckResponse.SERVING)


def rpc_code(call, request) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status code ``call(request)`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.code()  # type: ignore[no-any-return]


def health_status(channel: grpc.Channel, service: str = "") -> int:
    """What ``grpc.health.v1.Health/Check`` says of ``service``."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status  # type: ignore[no-any-return]


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check`` holds (polled every 50 ms); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)
