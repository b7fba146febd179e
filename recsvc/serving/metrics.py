"""Prometheus metrics: what every call did, which model serves, how current its state is.

``recsvc serve --metrics-port P`` serves them over HTTP at ``/metrics`` (on ``--host``),
exposed by prometheus_client. Three sources feed them:

- :class:`MetricsInterceptor`, the first server interceptor, counts and times every
  unary and server-streaming RPC: ``recsvc_requests_total{service, method, code}``,
  ``recsvc_request_seconds{service, method}`` (buckets for a 1-30 ms service) and
  ``recsvc_requests_in_flight``. A stream is timed to its last message.
- :meth:`Metrics.sample`, run every :data:`SAMPLE_INTERVAL` by a thread and after each
  look at ``LATEST``, reads the model store and the state follower:
  ``recsvc_model_info{version}`` (1 for the served one),
  ``recsvc_model_created_timestamp_seconds``, ``recsvc_model_age_seconds``,
  ``recsvc_model_reloads_total{outcome}`` (loaded, rejected, unreadable), and with
  ``--state`` ``recsvc_state_sequence{kind}`` (applied here, committed as last reported
  by the store), ``recsvc_state_apply_lag_seconds`` and ``recsvc_overlay_size{kind}``
  (customers, erased, products).
- The audit trail (``recsvc.audit.AuditLog``, its ``observer``) calls
  :meth:`Metrics.audit_written` with the answer records written since its last fsync,
  and :meth:`Metrics.audit_fsynced` with each fsync's duration:
  ``recsvc_audit_records_total`` and ``recsvc_audit_fsync_seconds``.

With ``--workers N`` every worker writes its figures into one folder (prometheus_client's
multiprocess mode) and the parent serves them all on the one port (:class:`SharedMetrics`):
counters and histograms are summed over the workers; in-flight is their sum; the model
and state gauges carry a ``pid`` label, one series per live worker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

if TYPE_CHECKING:
    from recsvc.serving.live import StateFollower
    from recsvc.serving.store import ModelStore

    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

__all__ = [
    "FSYNC_BUCKETS",
    "MULTIPROCESS_DIR",
    "REQUEST_BUCKETS",
    "SAMPLE_INTERVAL",
    "Metrics",
    "MetricsInterceptor",
    "SharedMetrics",
]

REQUEST_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
"""Latency buckets (seconds): fine from 0.5 to 30 ms, where a healthy server answers."""
FSYNC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
SAMPLE_INTERVAL = 1.0
"""Seconds between samples of the model store and the follower."""
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's switch to multiprocess mode, read once when it is first imported."""

_UNOBSERVED = ("/grpc.health.v1.Health/Watch",)  # a subscription held open, not a request
_RELOAD_OUTCOMES = ("loaded", "rejected", "unreadable")
Context = grpc.aio.ServicerContext[Any, Any]


def _multiprocess() -> bool:
    return MULTIPROCESS_DIR in os.environ


class Metrics:
    """One server's metrics, in their own registry (tests run several servers a process).

    Args:
        store: the model store to sample.
        follower: the state follower (with ``--state``).
    """

    def __init__(self, store: ModelStore, follower: StateFollower | None = None) -> None:
        self._store = store
        self._follower = follower
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "recsvc_requests",
            "RPCs answered, by service, method and status code",
            ["service", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "recsvc_request_seconds",
            "Time from a call reaching the server to its answer (a stream: its last message)",
            ["service", "method"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "recsvc_requests_in_flight",
            "RPCs being answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_info = Gauge(
            "recsvc_model_info",
            "1 for the model version served",
            ["version"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_created = Gauge(
            "recsvc_model_created_timestamp_seconds",
            "When the served model was trained (Unix time)",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.model_age = Gauge(
            "recsvc_model_age_seconds",
            "Seconds since the served model was trained",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.reloads = Counter(
            "recsvc_model_reloads",
            "Versions looked at: loaded, rejected (defective, never tried again) or "
            "unreadable (an I/O error, retried)",
            ["outcome"],
            registry=r,
        )
        self.state_sequence = Gauge(
            "recsvc_state_sequence",
            "Live state sequence: applied by this server, and committed as the store last said",
            ["kind"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.state_lag = Gauge(
            "recsvc_state_apply_lag_seconds",
            "How long the oldest commit this server knows of has waited to be applied here",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.overlay_size = Gauge(
            "recsvc_overlay_size",
            "Live overlay: customers changed, customers erased, products changed",
            ["kind"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.audit_records = Counter("recsvc_audit_records", "Audit records written", registry=r)
        self.audit_fsync = Histogram(
            "recsvc_audit_fsync_seconds",
            "Duration of each fsync of the audit trail",
            buckets=FSYNC_BUCKETS,
            registry=r,
        )
        self.interceptor = MetricsInterceptor(self)
        self._version: str | None = None
        self._reloads = dict.fromkeys(_RELOAD_OUTCOMES, 0)
        self._sampling = threading.Lock()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._http: Any = None
        self.port: int | None = None
        """The HTTP port ``/metrics`` is served on, once started (None: not served here)."""

    def audit_written(self, records: int = 1) -> None:
        """The audit trail appended ``records`` records."""
        self.audit_records.inc(records)

    def audit_fsynced(self, seconds: float) -> None:
        """The audit trail fsynced its segment, taking ``seconds``."""
        self.audit_fsync.observe(seconds)

    def sample(self) -> None:
        """Read the model store and the follower into the gauges and reload counters."""
        with self._sampling:  # the sampler thread, and the server after each reload
            self._sample()

    def _sample(self) -> None:
        stats = self._store.stats
        for outcome in _RELOAD_OUTCOMES:
            count = getattr(stats, outcome)
            if count > self._reloads[outcome]:
                self.reloads.labels(outcome).inc(count - self._reloads[outcome])
                self._reloads[outcome] = count
        if self._follower is not None:
            self.state_sequence.labels("committed").set(self._follower.committed)
            self.state_lag.set(self._follower.lag_seconds())
        model = self._store.loaded()
        if model is None:
            return
        if model.version != self._version:
            if self._version is not None:
                self._retire(self._version)
            self.model_info.labels(model.version).set(1)
            self._version = model.version
        created = model.recommender.bundle.created_at.timestamp()
        self.model_created.set(created)
        self.model_age.set(max(0.0, time.time() - created))
        overlay = model.overlay
        if overlay is not None:
            self.overlay_size.labels("customers").set(len(overlay.users))
            self.overlay_size.labels("erased").set(len(overlay.erased))
            self.overlay_size.labels("products").set(overlay.products_changed)
            self.state_sequence.labels("applied").set(overlay.sequence)

    def _retire(self, version: str) -> None:
        """The old version's series: removed, or 0 where series cannot be removed."""
        if _multiprocess():  # prometheus_client keeps every series a worker wrote
            self.model_info.labels(version).set(0)
        else:
            self.model_info.remove(version)

    def _sample_forever(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def start(self, host: str, port: int | None) -> None:
        """Start sampling; serve ``/metrics`` on ``host:port`` unless ``port`` is None."""
        self.sample()
        self._sampler = threading.Thread(
            target=self._sample_forever, name="metrics-sampler", daemon=True
        )
        self._sampler.start()
        if port is not None:
            self._http, _ = start_http_server(port, host, self.registry)
            self.port = int(self._http.server_port)

    def close(self) -> None:
        """Stop sampling and serving."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times every call; install it first, so it sees every call."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # The same handler object comes back for a method on every call: wrap it once.
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNOBSERVED):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _observed(handler, method, self._metrics)
        if cached is None:  # a handler made for one call (a refusal) is not kept
            self._wrapped[method] = (handler, wrapped)
        return wrapped


def _observed(handler: _Handler, method: str, metrics: Metrics) -> _Handler:
    """``handler`` counted and timed; bidirectional and client streams pass unobserved."""
    service, _, name = method.lstrip("/").rpartition("/")
    latency = metrics.latency.labels(service, name)
    by_code: dict[str, Any] = {}
    in_flight = metrics.in_flight

    def done(context: Context, start: float, failed: bool) -> None:
        in_flight.dec()
        latency.observe(time.perf_counter() - start)
        status = context.code()
        code = status.name if status is not None else "UNKNOWN" if failed else "OK"
        counter = by_code.get(code)
        if counter is None:
            counter = by_code[code] = metrics.requests.labels(service, name, code)
        counter.inc()

    kw: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            in_flight.inc()
            start, failed = time.perf_counter(), True
            try:
                response = await uu(request, context)
                failed = False
                return response
            finally:
                done(context, start, failed)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            in_flight.inc()
            start, failed = time.perf_counter(), True
            try:
                async for response in us(request, context):
                    yield response
                failed = False
            finally:
                done(context, start, failed)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    return handler


class SharedMetrics:
    """With ``--workers N``: the workers' metrics in one folder, served by the parent.

    Made before the workers start: they inherit the folder through the environment,
    which prometheus_client reads when a worker first imports it.

    Args:
        host: the address to serve ``/metrics`` on.
        port: its port (0 picks a free one).
    """

    def __init__(self, host: str, port: int) -> None:
        self.path = tempfile.mkdtemp(prefix="recsvc-metrics-")
        os.environ[MULTIPROCESS_DIR] = self.path
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.path)  # type: ignore[no-untyped-call]
        self._http, _ = start_http_server(port, host, registry)
        self.port = int(self._http.server_port)

    def worker_exited(self, pid: int) -> None:
        """Drop a worker's live gauges (its counters keep counting in the sums)."""
        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        os.environ.pop(MULTIPROCESS_DIR, None)
        shutil.rmtree(self.path, ignore_errors=True)
