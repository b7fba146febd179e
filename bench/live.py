"""The live state's cost: writes, how fast they take effect, and what the overlay costs serving.

Four measurements over one bundle; the first two on fresh state stores, the others on
one store filled with one event for each of ``changed`` customers (half the bundle's
own, half new) before any server opens it:

- **throughput**: events a second through ``record_events`` in this process, then
  through ``RecordEvents`` on a ``recsvc serve --state`` (batches from several client
  threads, for a fixed time), on a SQLite file and on PostgreSQL;
- **propagation**: two servers over one state; a purchase acknowledged by one, then
  the other polled (``GetModelInfo.state_sequence``) until it has applied it; each
  sample is checked once more with ``Recommend`` (the purchased item has left the
  customer's answer). Once more at the end, written in process, on the server that
  holds the filled store's overlay;
- **overlay serving**: ``Recommend`` QPS of a server over the filled store against a
  server without state, measured side by side as the serving section measures;
- **overlay cost**: in a fresh process (``python -m bench.live overlay``), the
  anonymous memory the same changes add when applied to the bundle's overlay, the
  time that takes, the cost of applying one more commit over it, and the CPU of
  ``Recommender.recommend`` for the load's customers with that overlay and without
  (a steadier figure than QPS on a shared machine).

PostgreSQL runs in a throwaway cluster (``bench.postgres``); without server
binaries its figures are left out, saying why. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import faiss
import grpc
import numpy as np
import pyarrow.parquet as pq

from bench.bundles import BundleSpec, ensure_bundle, latest_bundle
from bench.postgres import NoCluster, throwaway_cluster
from bench.serving import Cell, LoadSpec, Server, launch, measure_cells, wait_ready, write_users
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import load_bundle, read_manifest
from recsvc.model.manifest import FILES
from recsvc.model.overlay import Overlay, apply
from recsvc.model.queries import RecommendQuery
from recsvc.model.ranking import Recommender
from recsvc.state import Changes, Event, StateStore, open_store
from recsvc.v1 import recommender_pb2 as _rec
from recsvc.v1 import recommender_pb2_grpc as _rec_grpc
from recsvc.v1 import updates_pb2 as _upd
from recsvc.v1 import updates_pb2_grpc as _upd_grpc

__all__ = [
    "LiveFigures",
    "LivePlan",
    "OverlayCost",
    "OverlayServing",
    "Propagation",
    "Throughput",
    "main",
    "measure_live",
    "overlay_cost",
]

_PREFILL_BATCH = 1000
"""Events per transaction when filling a store before a server starts."""
_POLL = 0.001
"""Seconds between two looks at the other server's state sequence."""

_Writer = Callable[[list[Event]], tuple[int, int]]
"""Records a batch; returns (events recorded, the sequence that includes them)."""


@dataclass(frozen=True)
class LivePlan:
    """What the live section measures."""

    bundle: BundleSpec
    changed: int
    """Customers with a change in the overlay (serving and memory)."""
    seconds: float
    """Measured seconds of each throughput run."""
    threads: int
    """Client threads writing at once."""
    samples: int
    """Acknowledged writes timed to their effect on the other server, per backend."""
    load: LoadSpec
    """The Recommend load on the servers with and without the overlay."""
    batch: int = 100


@dataclass(frozen=True)
class Throughput:
    """Events a second recorded by one writing path on one backend."""

    backend: str
    path: str
    """``store`` (``record_events`` in process) or ``grpc`` (``RecordEvents``)."""
    threads: int
    batch: int
    events: int
    seconds: float
    events_per_s: float
    p50_ms: float
    """Per batch, from send to acknowledgement."""
    p99_ms: float


@dataclass(frozen=True)
class Propagation:
    """From one server's acknowledgement to another server having applied the write."""

    backend: str
    via: str
    """Who acknowledged: ``grpc`` (RecordEvents on a first server) or ``store`` (in process)."""
    changed: int
    """Customers already in the reading server's overlay."""
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    ack_p50_ms: float
    """The write itself (one event), send to acknowledgement."""
    excluded: int
    """Samples whose purchased item the other server no longer recommends."""


@dataclass(frozen=True)
class OverlayCost:
    """What applying the changes of ``customers`` customers to a bundle's overlay costs."""

    customers: int
    events: int
    read_s: float
    """Reading the changes from the store (``changes_since``)."""
    context_bytes: int
    """The empty overlay: what every overlay of this bundle shares (its weighting)."""
    build_s: float
    overlay_bytes: int
    """Anonymous memory the changes added (RssAnon before and after, collected)."""
    apply_one_ms: float
    """One more commit (one event, one customer) applied over the full overlay: median."""
    changed_us: tuple[float, float]
    """CPU microseconds a ``Recommender.recommend`` call takes for the load's customers
    with a live record, without the overlay and with it (medians, see ``_ranking_us``)."""
    unchanged_us: tuple[float, float]
    """The same for the load's other customers."""

    @property
    def bytes_per_customer(self) -> float:
        return self.overlay_bytes / max(1, self.customers)


@dataclass(frozen=True)
class OverlayServing:
    """Recommend with ``changed`` customers in a server's overlay against a server without."""

    changed: int
    load_share: float
    """Share of the load's customers with a record in the overlay."""
    load_s: tuple[float, float]
    """Start-up load of the version (server without state, with): the overlay is built here."""
    rss_bytes: tuple[int, int]
    """Resident memory once serving (without, with)."""
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class LiveFigures:
    """The live section's figures; ``postgres`` says why PostgreSQL was left out, if it was."""

    throughput: tuple[Throughput, ...]
    propagation: tuple[Propagation, ...]
    serving: OverlayServing
    overlay: OverlayCost
    postgres: str = ""


def _ids(models: Path, file: str, column: str) -> list[str]:
    ids = pq.read_table(latest_bundle(models) / file, columns=[column]).column(0)
    return [str(x) for x in ids.to_pylist()]


@dataclass(frozen=True)
class _Catalogue:
    """The bundle's ids and the event types writes use."""

    users: list[str]
    items: list[str]
    view: str
    """The lightest weighted event type."""
    purchase: str
    """A held event type."""

    @classmethod
    def of(cls, models: Path) -> _Catalogue:
        events = read_manifest(latest_bundle(models)).events
        return cls(
            users=_ids(models, FILES.users, "user_id"),
            items=_ids(models, FILES.items, "item_id"),
            view=min(events.weights, key=lambda t: events.weights[t]),
            purchase=events.held[0],
        )

    def events(self, tag: str, n: int, rng: np.random.Generator) -> list[Event]:
        """``n`` views by random customers of random products; ids ``tag-0`` ..."""
        now = datetime.now(timezone.utc)
        users = rng.integers(len(self.users), size=n)
        items = rng.integers(len(self.items), size=n)
        return [
            Event(f"{tag}-{k}", self.users[u], self.items[i], self.view, now)
            for k, (u, i) in enumerate(zip(users.tolist(), items.tolist(), strict=True))
        ]


def _request(events: list[Event]) -> _upd.RecordEventsRequest:
    """The gRPC batch; no time, so the server stamps its receive time."""
    return _upd.RecordEventsRequest(
        events=[
            _upd.Event(event_id=e.event_id, user_id=e.user_id, item_id=e.item_id, type=e.type)
            for e in events
        ]
    )


def _percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 2)


def _drive(
    writers: list[_Writer],
    catalogue: _Catalogue,
    batch: int,
    seconds: float,
) -> tuple[int, float, list[float]]:
    """Each writer in its own thread, batch after batch for ``seconds`` after one warm-up batch.

    Returns:
        Events recorded in the measured window, its length, and every batch's latency.
    """
    start: list[float] = []
    ready = threading.Barrier(len(writers), action=lambda: start.append(time.perf_counter()))
    recorded = [0] * len(writers)
    latencies: list[list[float]] = [[] for _ in writers]
    failures: list[BaseException] = []

    def run(i: int) -> None:
        rng = np.random.default_rng(i)
        write = writers[i]
        try:
            write(catalogue.events(f"w{i}", batch, rng))
            ready.wait()
            n = 0
            while time.perf_counter() < start[0] + seconds:
                events = catalogue.events(f"t{i}-{n}", batch, rng)
                t0 = time.perf_counter()
                recorded[i] += write(events)[0]
                latencies[i].append(time.perf_counter() - t0)
                n += 1
        except BaseException as exc:
            failures.append(exc)
            ready.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"a writer failed: {failures[0]!r}") from failures[0]
    elapsed = time.perf_counter() - start[0]
    return sum(recorded), elapsed, [x for lat in latencies for x in lat]


def _throughput(
    backend: str,
    path: str,
    writers: list[_Writer],
    catalogue: _Catalogue,
    plan: LivePlan,
) -> Throughput:
    events, elapsed, latencies = _drive(writers, catalogue, plan.batch, plan.seconds)
    return Throughput(
        backend=backend,
        path=path,
        threads=len(writers),
        batch=plan.batch,
        events=events,
        seconds=round(elapsed, 3),
        events_per_s=round(events / elapsed, 1),
        p50_ms=_percentile_ms(latencies, 50),
        p99_ms=_percentile_ms(latencies, 99),
    )


def _store_writer(store: StateStore) -> _Writer:
    def write(events: list[Event]) -> tuple[int, int]:
        r = store.record_events(events)
        return r.recorded, r.sequence

    return write


def _grpc_writer(target: str, opened: contextlib.ExitStack) -> _Writer:
    stub = _upd_grpc.UpdatesStub(opened.enter_context(grpc.insecure_channel(target)))

    def write(events: list[Event]) -> tuple[int, int]:
        r = stub.RecordEvents(_request(events), timeout=60)
        return r.recorded, r.sequence

    return write


def _propagation(
    backend: str,
    via: str,
    write: _Writer,
    reader: Server,
    users: list[str],
    catalogue: _Catalogue,
    changed: int = 0,
) -> Propagation:
    """Purchases acknowledged by ``write``, timed until ``reader`` has applied them."""
    effect, ack, excluded = [], [], 0
    with grpc.insecure_channel(reader.target) as channel:
        reads = _rec_grpc.RecommenderStub(channel)
        for n, user in enumerate(users):
            ask = _rec.RecommendRequest(user_id=user, k=10)
            top = reads.Recommend(ask, timeout=30).items[0].item_id
            now = datetime.now(timezone.utc)
            event = Event(f"p-{n}", user, top, catalogue.purchase, now)
            t0 = time.perf_counter()
            _, sequence = write([event])
            t1 = time.perf_counter()
            while reads.GetModelInfo(_rec.GetModelInfoRequest()).state_sequence < sequence:
                time.sleep(_POLL)
            t2 = time.perf_counter()
            ack.append(t1 - t0)
            effect.append(t2 - t1)
            after = reads.Recommend(ask, timeout=30).items
            excluded += all(item.item_id != top for item in after)
    return Propagation(
        backend=backend,
        via=via,
        changed=changed,
        samples=len(effect),
        p50_ms=_percentile_ms(effect, 50),
        p99_ms=_percentile_ms(effect, 99),
        max_ms=round(max(effect) * 1000, 2),
        ack_p50_ms=_percentile_ms(ack, 50),
        excluded=excluded,
    )


def _state_env(url: str, key: str) -> dict[str, str]:
    """The environment of ``recsvc serve --state URL`` (the key comes from the environment)."""
    return {"RECSVC_STATE": url, "RECSVC_PSEUDONYM_KEY": key}


@contextlib.contextmanager
def _servers(models: Path, logs: Path, envs: list[dict[str, str]]) -> Iterator[list[Server]]:
    """A ``recsvc serve`` process for each environment, started at once, stopped on exit."""
    servers = [launch("recsvc", models, logs, env=env) for env in envs]
    try:
        wait_ready(servers)
        yield servers
    finally:
        for s in servers:
            s.stop()


def _backend(
    backend: str,
    new_url: Callable[[], str],
    models: Path,
    work: Path,
    key: str,
    catalogue: _Catalogue,
    users: list[str],
    plan: LivePlan,
    log: Callable[[str], None],
) -> tuple[list[Throughput], Propagation]:
    logs = work / "logs"
    pseudonymize = Pseudonymizer(key.encode())
    log(f"live {backend}: record_events in process, {plan.threads} threads")
    with open_store(new_url(), pseudonymize) as store:
        writers = [_store_writer(store) for _ in range(plan.threads)]
        rates = [_throughput(backend, "store", writers, catalogue, plan)]

    def created() -> str:
        # Made here, before the servers start: several recsvc processes opening one fresh
        # PostgreSQL database at once can collide in its schema set-up (42P07).
        url = new_url()
        open_store(url, pseudonymize).close()
        return url

    # One server writes to a store of its own, two more share another; all start at once.
    writing, shared = _state_env(created(), key), _state_env(created(), key)
    with _servers(models, logs, [writing, shared, shared]) as (server, a, b):
        log(f"live {backend}: RecordEvents on recsvc serve --state, {plan.threads} threads")
        with contextlib.ExitStack() as opened:
            writers = [_grpc_writer(server.target, opened) for _ in range(plan.threads)]
            rates.append(_throughput(backend, "grpc", writers, catalogue, plan))
        server.stop()  # its follower may still be applying the writes: not on this CPU now
        log(f"live {backend}: acknowledgement to effect on a second server")
        with contextlib.ExitStack() as opened:
            write = _grpc_writer(a.target, opened)
            spread = _propagation(backend, "grpc", write, b, users[: plan.samples], catalogue)
    for r in rates:
        log(f"  {r.path:>5}: {r.events_per_s:,.0f} events/s, batch p99 {r.p99_ms} ms")
    log(f"  effect p50 {spread.p50_ms} ms, p99 {spread.p99_ms} ms")
    return rates, spread


def _prefill(url: str, key: str, catalogue: _Catalogue, changed: int) -> set[str]:
    """One view for each of ``changed`` customers, half the bundle's and half new ones."""
    rng = np.random.default_rng(12)
    known = min(changed // 2, len(catalogue.users))
    pick = rng.choice(len(catalogue.users), size=known, replace=False)
    users = [catalogue.users[i] for i in pick.tolist()]
    users += [f"live-{n:07d}" for n in range(changed - known)]
    events = catalogue.events("pre", changed, rng)
    events = [replace(e, user_id=u) for e, u in zip(events, users, strict=True)]
    with open_store(url, Pseudonymizer(key.encode())) as store:
        for i in range(0, len(events), _PREFILL_BATCH):
            store.record_events(events[i : i + _PREFILL_BATCH])
    return set(users)


def _load_seconds(server: Server) -> float:
    """What the server logged as its version's load time (the overlay is built in it)."""
    for line in server.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("msg") == "serving model version":
                return float(entry["load_seconds"])
    return float("nan")


def _rss(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from ``/proc/PID/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _serving(
    url: str,
    key: str,
    changed: set[str],
    models: Path,
    work: Path,
    users_file: Path,
    concurrency: list[int],
    catalogue: _Catalogue,
    plan: LivePlan,
    log: Callable[[str], None],
) -> tuple[OverlayServing, Propagation]:
    """Recommend side by side, then writes timed to their effect on the server with the overlay."""
    logs = work / "logs"
    load_users = users_file.read_text(encoding="utf-8").split()
    log(f"live: Recommend with {len(changed):,} changed customers in the overlay against none")
    with _servers(models, logs, [{}, _state_env(url, key)]) as (plain, live):
        live = replace(live, name="recsvc+live")
        rss = (_rss(plain.proc.pid), _rss(live.proc.pid))
        cells = measure_cells([plain, live], users_file, concurrency, plan.load, log)
        plain.stop()
        log(f"live: acknowledgement to effect on the server with {len(changed):,} changed")
        with open_store(url, Pseudonymizer(key.encode())) as store:
            spread = _propagation(
                "sqlite",
                "store",
                _store_writer(store),
                live,
                load_users[: plan.samples],
                catalogue,
                changed=len(changed),
            )
    serving = OverlayServing(
        changed=len(changed),
        load_share=round(sum(u in changed for u in load_users) / len(load_users), 3),
        load_s=(_load_seconds(plain), _load_seconds(live)),
        rss_bytes=rss,
        cells=tuple(cells),
    )
    return serving, spread


def measure_live(
    plan: LivePlan,
    root: Path,
    concurrency: list[int],
    load_users: int,
    log: Callable[[str], None],
) -> LiveFigures:
    """Every live figure over ``plan.bundle`` (built under ``root`` if absent).

    Args:
        plan: sizes and times.
        root: the benchmark folder; state stores and logs go to ``root/live``, emptied first.
        concurrency: the Recommend load's concurrencies (the serving section's).
        load_users: customers the Recommend load cycles through.
        log: progress lines.
    """
    models = ensure_bundle(root, plan.bundle, log)
    work = root / "live"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    users_file = root / "users" / f"{plan.bundle.key}.txt"
    users = write_users(models, users_file, load_users)
    catalogue = _Catalogue.of(models)
    key = secrets.token_hex(32)
    files = (f"sqlite:///{(work / f'state-{n}.db').resolve()}" for n in itertools.count())
    rates, spreads = [], []
    backends: list[tuple[str, Callable[[], str]]] = [("sqlite", lambda: next(files))]
    why_not_postgres = ""
    with contextlib.ExitStack() as running:
        try:
            cluster = running.enter_context(throwaway_cluster())
            backends.append(("postgresql", cluster.new_database))
        except NoCluster as exc:
            why_not_postgres = str(exc)
            log(f"live: PostgreSQL left out: {exc}")
        for backend, new_url in backends:
            r, s = _backend(backend, new_url, models, work, key, catalogue, users, plan, log)
            rates += r
            spreads.append(s)
    url = next(files)
    changed = _prefill(url, key, catalogue, plan.changed)
    log("live: overlay memory and ranking cost, in a fresh process")
    cmd = [sys.executable, "-m", "bench.live", "overlay", "--models", str(models)]
    cmd += ["--state", url, "--users", str(users_file)]
    child = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"bench.live overlay failed:\n{child.stderr[-2000:]}")
    fields = json.loads(child.stdout.strip().splitlines()[-1])
    cost = OverlayCost(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    # Then the servers, which write to the same store.
    serving, spread = _serving(
        url, key, changed, models, work, users_file, concurrency, catalogue, plan, log
    )
    spreads.append(spread)
    return LiveFigures(tuple(rates), tuple(spreads), serving, cost, why_not_postgres)


def overlay_cost(models: Path, url: str, users: list[str]) -> OverlayCost:
    """Apply every change in the store at ``url`` to the bundle's overlay, in this process.

    Args:
        models: the models folder.
        url: the state store.
        users: customers to rank with the overlay and without.
    """
    faiss.omp_set_num_threads(1)  # as the server runs it
    bundle = load_bundle(latest_bundle(models))
    recommender = Recommender(bundle)
    pseudonymize = Pseudonymizer(secrets.token_bytes(32))
    with open_store(url, pseudonymize) as store:
        t0 = time.perf_counter()
        changes = store.changes_since(bundle.manifest.state_sequence)
        read_s = time.perf_counter() - t0
    gc.collect()
    before = _rss_anon()
    base = recommender.overlay(pseudonymize)
    gc.collect()
    empty = _rss_anon()
    t0 = time.perf_counter()
    full = apply(base, changes)
    build_s = time.perf_counter() - t0
    gc.collect()
    after = _rss_anon()
    one = changes.events[0]
    sequence = full.sequence + 1
    more = Changes(
        sequence=sequence,
        events=(replace(one, event_id="one-more", sequence=sequence),),
        customers=(),
        products=(),
        erased=(),
    )
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        apply(full, more)
        times.append(time.perf_counter() - t0)
    queries = [RecommendQuery(user_id=u, k=10) for u in users]
    changed = [q for q in queries if q.user_id in full.users]
    unchanged = [q for q in queries if q.user_id not in full.users]
    return OverlayCost(
        customers=len(full.users),
        events=len(changes.events),
        read_s=round(read_s, 3),
        context_bytes=empty - before,
        build_s=round(build_s, 3),
        overlay_bytes=after - empty,
        apply_one_ms=round(statistics.median(times) * 1000, 2),
        changed_us=_ranking_us(recommender, changed, full),
        unchanged_us=_ranking_us(recommender, unchanged, full),
    )


def _ranking_us(
    recommender: Recommender, queries: list[RecommendQuery], overlay: Overlay, chunk: int = 25
) -> tuple[float, float]:
    """CPU microseconds per ``recommend`` call without ``overlay`` and with it.

    Each chunk of queries is timed without, with, with, without: on a shared machine,
    drift and other work then fall on both sides alike. Returns the medians over chunks.
    """

    def cpu_ns(part: list[RecommendQuery], o: Overlay | None) -> int:
        start = time.thread_time_ns()
        for q in part:
            recommender.recommend(q, o)
        return time.thread_time_ns() - start

    without, with_ = [], []
    for i in range(0, len(queries), chunk):
        part = queries[i : i + chunk]
        a, b = cpu_ns(part, None), cpu_ns(part, overlay)
        b, a = b + cpu_ns(part, overlay), a + cpu_ns(part, None)
        without.append(a / 2 / len(part) / 1000)
        with_.append(b / 2 / len(part) / 1000)
    if not without:
        return math.nan, math.nan
    return round(statistics.median(without), 1), round(statistics.median(with_), 1)


def _rss_anon() -> int:
    """This process's anonymous resident memory: the heap, not the mapped files."""
    return _rss(os.getpid(), "RssAnon")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.live", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overlay", help="the overlay cost figures, one JSON line")
    o.add_argument("--models", type=Path, required=True)
    o.add_argument("--state", required=True, help="a state store URL")
    o.add_argument("--users", type=Path, required=True, help="customers to rank, one a line")
    args = p.parse_args(argv)
    users = args.users.read_text(encoding="utf-8").split()
    print(json.dumps(asdict(overlay_cost(args.models, args.state, users))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
