"""Reference servers for the serving benchmark, on the same gRPC stack as recsvc.

- ``empty``: ``Recommend`` parses the request and returns an empty response; the
  ceiling any handler on this stack can reach.
- ``naive``: ``Recommend`` calls implicit's own brute-force ``model.recommend``
  with the customer's CSR row (``filter_already_liked_items``) and the bank's
  item rules and the customer's exclusive categories as ``filter_items``: the exact
  answer under the same rules.

Both are built like ``recsvc.serving.server.create_server``: a ``grpc.aio`` server with
the same options, health and reflection, the default event loop; one process, or
``--workers N`` spawned processes sharing the port, as ``recsvc serve`` does.

``python -m bench.servers --kind naive --models DIR --port P [--workers N]``
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import scipy.sparse as sp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bench.bundles import latest_bundle
from recsvc.model.bundle import load_bundle
from recsvc.settings import EXCLUSIVE_CATEGORIES, ServerSettings
from recsvc.v1 import recommender_pb2 as _pb
from recsvc.v1 import recommender_pb2_grpc as _pb_grpc

__all__ = ["READY_LINE", "EmptyService", "NaiveService", "main", "serve"]

READY_LINE = "bench server ready"

_SERVICE = _pb.DESCRIPTOR.services_by_name["Recommender"].full_name


class EmptyService(_pb_grpc.RecommenderServicer):
    """The ceiling: a unary handler that does nothing."""

    async def Recommend(self, request: Any, context: Any) -> _pb.RecommendResponse:
        return _pb.RecommendResponse()


class NaiveService(_pb_grpc.RecommenderServicer):
    """implicit's ``model.recommend`` per request, rules passed as ``filter_items``."""

    def __init__(self, models: Path) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        from recsvc.model.rules import ExclusiveCategories, ItemRules, user_tolerance

        b = load_bundle(latest_bundle(models))
        self.version = b.version
        self.user_index = b.users.index
        self.item_ids = b.items.ids
        rules = ItemRules.from_table(b.item_table, b.suitability)
        # Everything a customer of tolerance t may not see, as implicit's filter_items.
        self.filter_by_tolerance = [np.flatnonzero(~s.mask()) for s in rules.by_tolerance]
        self.tolerance = user_tolerance(b.user_table)
        self.bundle = b
        self.exclusive = ExclusiveCategories(b.categories, EXCLUSIVE_CATEGORIES)
        n_users, n_items = len(b.users), len(b.items)
        self.user_items = sp.csr_matrix(
            (b.data, b.indices, b.indptr), shape=(n_users, n_items), dtype=np.float32
        )
        # implicit's advice, and what recsvc does for FAISS: one BLAS thread per query.
        threadpool_limits(1, "blas")
        model = AlternatingLeastSquares(factors=b.manifest.dim, random_state=0)
        model.user_factors = b.user_index.vectors
        model.item_factors = b.item_index.vectors
        self.model = model

    async def Recommend(self, request: Any, context: Any) -> _pb.RecommendResponse:
        row = self.user_index(request.user_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown user")
        t = int(self.tolerance[row]) - 1
        b = self.bundle
        lo, hi = b.indptr[row], b.indptr[row + 1]
        closed = self.exclusive.held_categories(b.indices[lo:hi][b.held[lo:hi]])
        hidden = self.filter_by_tolerance[t]
        if closed:
            hidden = np.union1d(hidden, np.flatnonzero(b.categories.member(closed)))
        ids, scores = self.model.recommend(
            row,
            self.user_items[row],
            N=request.k or 10,
            filter_already_liked_items=True,
            filter_items=hidden,
        )
        return _pb.RecommendResponse(
            items=[
                _pb.ScoredItem(item_id=self.item_ids[i], score=float(s))
                for i, s in zip(ids, scores, strict=True)
            ],
            model_version=self.version,
            source=_pb.PERSONALIZED,
            recommendation_id=uuid.uuid4().hex,
        )


async def serve(
    servicer: _pb_grpc.RecommenderServicer, host: str, port: int, reuse_port: bool = False
) -> None:
    """Serve until SIGTERM, on the stack ``recsvc.serving.server.create_server`` builds."""
    settings = ServerSettings(models=Path("."), host=host, port=port)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    _pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", _SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(READY_LINE, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def _worker(kind: str, models: Path | None, host: str, port: int) -> None:
    if kind == "empty":
        servicer: _pb_grpc.RecommenderServicer = EmptyService()
    else:
        assert models is not None
        servicer = NaiveService(models)
    asyncio.run(serve(servicer, host, port, reuse_port=True))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.servers", description=__doc__)
    p.add_argument("--kind", choices=["empty", "naive"], required=True)
    p.add_argument("--models", type=Path, help="models folder (naive)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    args = p.parse_args(argv)
    if args.kind == "naive" and args.models is None:
        p.error("--kind naive needs --models")
    if args.workers == 1:
        servicer = EmptyService() if args.kind == "empty" else NaiveService(args.models)
        asyncio.run(serve(servicer, args.host, args.port))
        return 0
    # As recsvc.serving.server.serve_forever: spawned processes (gRPC must not fork), SO_REUSEPORT.
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(args.kind, args.models, args.host, args.port))
        for _ in range(args.workers)
    ]
    for proc in procs:
        proc.start()
    signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
