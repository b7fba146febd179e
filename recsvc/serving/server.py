"""The server process: gRPC server, health, reflection, hot reload and shutdown.

``create_server`` is separate from ``serve`` so tests bind port 0 and talk to a
real server over a real channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recsvc.audit import AuditLog
from recsvc.audit.record import worker_folder
from recsvc.logs import Pseudonymizer, configure_logging
from recsvc.model.bundle import LATEST, list_versions
from recsvc.model.contact import load_policy
from recsvc.serving.auth import BearerTokenInterceptor, load_tokens
from recsvc.serving.drain import DrainGate
from recsvc.serving.live import StateFollower
from recsvc.serving.metrics import MULTIPROCESS_DIR, Metrics, SharedMetrics
from recsvc.serving.service import RecommenderService
from recsvc.serving.store import ModelStore
from recsvc.serving.updates import UpdatesService
from recsvc.serving.writer import StateWriter
from recsvc.settings import ServerSettings
from recsvc.state import open_store
from recsvc.v1 import recommender_pb2 as _pb
from recsvc.v1 import recommender_pb2_grpc as _pb_grpc
from recsvc.v1 import updates_pb2 as _updates_pb
from recsvc.v1 import updates_pb2_grpc as _updates_grpc

__all__ = ["RunningServer", "create_server", "serve", "serve_forever"]

log = logging.getLogger(__name__)
SERVICE_NAME = _pb.DESCRIPTOR.services_by_name["Recommender"].full_name
UPDATES_NAME = _updates_pb.DESCRIPTOR.services_by_name["Updates"].full_name


@dataclass
class RunningServer:
    """A started server and what tests and ``serve`` need to drive it."""

    server: grpc.aio.Server
    port: int
    store: ModelStore
    health: health.aio.HealthServicer  # type: ignore[name-defined]  # stubs predate grpc.aio
    settings: ServerSettings
    service: RecommenderService
    gate: DrainGate
    follower: StateFollower | None = None
    """With ``--state``: keeps the served overlay current with the state store."""
    audit: AuditLog | None = None
    """With ``--audit-dir``: every answer's record, written before the answer is sent."""
    metrics: Metrics | None = None
    """With ``--metrics-port``: this server's Prometheus metrics."""
    _reload_task: asyncio.Task[None] | None = None
    _no_model: str = ""

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def refresh(self) -> bool:
        """Look at LATEST once (in a thread: loading must not block the event loop)."""
        swapped = await asyncio.to_thread(self.store.refresh)
        await self.set_serving(self.serviceable)
        reason = "" if self.store.version is not None else _why_no_model(self.settings.models)
        if reason and reason != self._no_model:  # once, and again only if the reason changes
            log.warning(
                "no model to serve yet; looking again every poll",
                extra={"reason": reason, "poll_interval": self.settings.poll_interval},
            )
        self._no_model = reason
        if self.metrics is not None:
            self.metrics.sample()
        return swapped

    @property
    def serviceable(self) -> bool:
        """A model is loaded and, with an audit trail, the trail can still be written."""
        audited = self.audit is None or self.audit.healthy
        return self.store.version is not None and audited

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("reload failed")
            await asyncio.sleep(self.settings.poll_interval)

    def start_polling(self) -> None:
        self._reload_task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING; take in every call that has reached the
        server; refuse later ones (UNAVAILABLE) and stop listening; let the calls taken
        in finish. All within ``grace`` seconds (``settings.grace_seconds`` by default).
        """
        grace = self.settings.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        start = loop.time()
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
        await self.health.enter_graceful_shutdown()
        # Taking in is quick (it waits for a lull, not for work); the cap leaves at
        # least half the grace period for the calls taken in to finish.
        await self.gate.take_in(until=start + grace / 2)
        # The released calls run once this coroutine yields, and server.stop yields only
        # after gRPC has stopped taking calls; one matched in between is refused, not lost.
        self.gate.refuse()
        await self.server.stop(max(0.0, start + grace - loop.time()))
        self.store.close()
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
            self.follower.state.close()
        if self.audit is not None:
            self.audit.close()
        if self.metrics is not None:
            self.metrics.close()


def _why_no_model(models: Path) -> str:
    """Why a models folder gives nothing to serve, for the log."""
    if not models.exists():
        return f"{models} does not exist (is --models right?)"
    if not models.is_dir():
        return f"{models} is not a folder"
    if not (models / LATEST).exists() and not list_versions(models):
        return f"{models} holds no {LATEST} and no version: publish one (recsvc-train fit)"
    return f"no version in {models} could be loaded (see the errors logged)"


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    if settings.tls_client_ca is not None:
        return grpc.ssl_server_credentials(
            pair, root_certificates=settings.tls_client_ca.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


async def create_server(settings: ServerSettings, reuse_port: bool = False) -> RunningServer:
    """Build and start a server (health NOT_SERVING until a model loads)."""
    # One query at a time per request: FAISS's OpenMP threads only fight the event loop.
    faiss.omp_set_num_threads(1)
    pseudonym = Pseudonymizer(settings.pseudonym_key)
    follower: StateFollower | None = None
    store = ModelStore(
        settings.models,
        no_consent_data=settings.no_consent_data,
        trial_in_child=settings.trial_in_child,
        exclusive_categories=settings.exclusive_categories,
        contact_policy=load_policy(settings.contact_policy),
    )
    if settings.state is not None:
        # Opened here, in the serving process: a store is never shared across a fork.
        follower = StateFollower(store, open_store(settings.state, pseudonym), pseudonym)
        store.attach = follower.attach
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    gate = DrainGate()
    interceptors: list[Any] = [gate]  # first, so it sees every call
    tokens = load_tokens(settings.auth_tokens, settings.auth_token_file)
    if tokens:
        interceptors.append(BearerTokenInterceptor(tokens))
    metrics = Metrics(store, follower) if settings.metrics_port is not None else None
    if metrics is not None:  # ahead of the gate: the calls it refuses are counted too
        interceptors.insert(0, metrics.interceptor)
    server = grpc.aio.server(
        options=options,
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    loop = asyncio.get_running_loop()
    running_ref: list[RunningServer] = []

    def audit_failed(_exc: Exception) -> None:
        # From the writer's thread: the health change belongs to the event loop.
        if running_ref:
            asyncio.run_coroutine_threadsafe(running_ref[0].set_serving(False), loop)

    audit = None
    if settings.audit_dir is not None:
        audit = AuditLog(
            settings.audit_dir, settings.audit_sync, on_failure=audit_failed, observer=metrics
        )
    service = RecommenderService(store, pseudonym, live=follower is not None, audit=audit)
    _pb_grpc.add_RecommenderServicer_to_server(service, server)
    writer = None
    if follower is not None:
        writer = StateWriter(
            follower.state, settings.models, follower.event_types, follower.catalogue
        )
    _updates_grpc.add_UpdatesServicer_to_server(UpdatesService(writer), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, UPDATES_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    creds = _credentials(settings)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    await server.start()
    running = RunningServer(
        server, port, store, health_servicer, settings, service, gate, follower, audit, metrics
    )
    running_ref.append(running)
    await running.set_serving(False)
    if follower is not None:
        follower.start()
    if metrics is not None:  # a worker's figures go to the folder its parent serves
        shared = MULTIPROCESS_DIR in os.environ
        metrics.start(settings.host, None if shared else settings.metrics_port)
    return running


async def serve(settings: ServerSettings, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight RPCs and stop."""
    running = await create_server(settings, reuse_port)
    where = {"address": f"{settings.host}:{running.port}", "models": str(settings.models)}
    if running.metrics is not None and running.metrics.port is not None:
        where["metrics"] = f"http://{settings.host}:{running.metrics.port}/metrics"
    log.info("listening", extra=where)
    running.start_polling()  # its first look at LATEST is now, guarded like every later one
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await running.stop()


def _stop_when_orphaned(parent: int, every: float = 0.5) -> None:
    """Drain and stop this worker, as on SIGTERM, once ``parent`` (the ``serve`` process
    that watches the workers) is gone: killed with SIGKILL it cannot stop them, and a
    worker left alone would go on answering on the shared port unwatched."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        log.error("the serve process is gone; stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _worker_settings(settings: ServerSettings, worker: int) -> ServerSettings:
    """A worker's settings: its own audit chain (one writer a folder), the rest shared."""
    if settings.audit_dir is None:
        return settings
    return replace(settings, audit_dir=worker_folder(settings.audit_dir, worker))


def _worker(settings: ServerSettings, parent: int) -> None:
    configure_logging(settings.log_level)
    _stop_when_orphaned(parent)
    asyncio.run(serve(settings, reuse_port=True))


def serve_forever(settings: ServerSettings) -> int:
    """``recsvc serve``: one process, or ``workers`` processes sharing the port.

    Returns the exit status: 0, or 1 when a worker exited with an error.
    """
    if settings.workers == 1:
        asyncio.run(serve(settings))
        return 0
    # One port for every worker's metrics, from the parent; made before the workers start.
    shared = None
    if settings.metrics_port is not None:
        shared = SharedMetrics(settings.host, settings.metrics_port)
        log.info("metrics", extra={"url": f"http://{settings.host}:{shared.port}/metrics"})
    try:
        return _run_workers(settings, shared)
    finally:
        if shared is not None:
            shared.close()


def _run_workers(settings: ServerSettings, shared: SharedMetrics | None) -> int:
    # gRPC must not be started before fork: use spawn, as gRPC's multiprocessing example warns.
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(_worker_settings(settings, i), os.getpid()))
        for i in range(settings.workers)
    ]
    for p in procs:
        p.start()

    stopping = False

    def stop_all() -> None:
        for p in procs:  # each worker drains on SIGTERM
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()

    def forward(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_all()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed: list[int] = []
    running = list(procs)
    while running:
        # The first worker to exit wakes us: a crash is seen at once, not after the others.
        done = set(multiprocessing.connection.wait([p.sentinel for p in running]))
        for p in [p for p in running if p.sentinel in done]:
            p.join()
            running.remove(p)
            if shared is not None and p.pid is not None:
                shared.worker_exited(p.pid)
            # SIGTERM from us (a worker still importing has no handler yet) is a clean stop.
            clean = p.exitcode == 0 or (stopping and p.exitcode == -signal.SIGTERM)
            if not clean:
                failed.append(int(p.exitcode or 0))
                if not stopping:
                    log.error("worker exited; stopping the others", extra={"exit_code": p.exitcode})
                    stopping = True
                    stop_all()
    return 1 if failed else 0
