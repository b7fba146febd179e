"""Where the time of one ``Recommend`` goes, stage by stage, in one process.

``python -m bench.profile --models DIR`` runs the servicer's own ``Recommend``
(no network) over a pool of customers, then each stage on its own: protobuf
parsing, validation, user lookup, rules, FAISS search, result objects, the
response and its id. Figures are CPU microseconds per call (``thread_time``),
so other processes on the machine inflate them less than wall time would.
The gRPC transport's own share is measured by the serving benchmark instead
(the empty-handler server's CPU per request).

``--audit`` adds what the audit trail costs the handler: the handler with a trail
(in a temporary folder) against without, in interleaved blocks so that a machine
shared with other work moves both alike (the median block of each), and the record's
own stages: encoding it, and appending it (the hash chain and the ``write(2)``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "profile_recommend"]


class _Context:
    """Enough of ``grpc.aio.ServicerContext`` for a unary call that succeeds."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class _Store:
    def __init__(self, model: Any) -> None:
        self._model = model

    def current(self) -> Any:
        return self._model


def _cpu_us(fn: Callable[[int], object], n: int) -> float:
    for i in range(min(n, 500)):
        fn(i)
    start = time.thread_time()
    for i in range(n):
        fn(i)
    return (time.thread_time() - start) / n * 1e6


def profile_recommend(
    models: Path, pool: int, calls: int, seed: int = 0, audit: bool = False
) -> dict[str, float]:
    """CPU microseconds per call for the whole handler and for each stage (``audit``:
    and for the handler with an audit trail, and the record's stages)."""
    import faiss

    from bench.bundles import latest_bundle
    from recsvc.logs import Pseudonymizer
    from recsvc.model.queries import RecommendQuery
    from recsvc.serving.servable import load_served_model
    from recsvc.serving.service import RecommenderService
    from recsvc.v1 import recommender_pb2 as pb

    faiss.omp_set_num_threads(1)  # as the server runs it
    model = load_served_model(latest_bundle(models))
    rec = model.recommender
    b = rec.bundle
    rng = np.random.default_rng(seed)
    users = [b.users.ids[r] for r in rng.choice(len(b.users), min(pool, len(b.users)), False)]
    payloads = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in users]
    service = RecommenderService(_Store(model), Pseudonymizer(b"bench"))  # type: ignore[arg-type]
    ctx = _Context()
    n = len(users)

    async def handler_loop() -> float:
        start = time.thread_time()
        for i in range(calls):
            request = pb.RecommendRequest.FromString(payloads[i % n])
            response = await service.Recommend(request, ctx)  # type: ignore[arg-type]
            response.SerializeToString()
        return (time.thread_time() - start) / calls * 1e6

    asyncio.run(handler_loop())  # warm
    out: dict[str, float] = {"handler (parse + Recommend + serialize)": asyncio.run(handler_loop())}
    if audit:
        out.update(_audit_costs(service, model, users, payloads, calls))

    requests = [pb.RecommendRequest.FromString(p) for p in payloads]
    queries = [RecommendQuery(user_id=u, k=10) for u in users]
    resolved = [rec.resolve_user(u, ()) for u in users]
    allowed = [rec.item_rules.allowed(u.tolerance) for u in resolved]
    personal = [i for i, u in enumerate(resolved) if u.vector is not None]
    results = [rec.recommend(q) for q in queries]

    def search(i: int) -> object:
        j = personal[i % len(personal)]
        u = resolved[j]
        return b.item_index.search(u.vector, 10, allowed[j], u.history)

    def response(i: int) -> bytes:
        r = results[i % n]
        return pb.RecommendResponse(
            items=[pb.ScoredItem(item_id=it.item_id, score=it.score) for it in r.items],
            model_version=r.version,
            source=pb.PERSONALIZED,
        ).SerializeToString()

    stages: dict[str, Callable[[int], object]] = {
        "protobuf parse": lambda i: pb.RecommendRequest.FromString(payloads[i % n]),
        "validation (RecommendQuery)": lambda i: RecommendQuery(
            user_id=requests[i % n].user_id, k=requests[i % n].k
        ),
        "user lookup (vocabulary, tolerance, history)": lambda i: rec.resolve_user(
            users[i % n], ()
        ),
        "rules (shared allowed set)": lambda i: rec.item_rules.allowed(resolved[i % n].tolerance),
        "rules, per-request bitmap (AllowedSet.without, before)": lambda i: rec.item_rules.allowed(
            resolved[i % n].tolerance, resolved[i % n].history
        ),
        "FAISS search with rules and exclusions": search,
        "ranking.recommend, whole": lambda i: rec.recommend(queries[i % n]),
        "response objects + serialize": response,
        "uuid4().hex": lambda i: uuid.uuid4().hex,
    }
    for name, fn in stages.items():
        out[name] = _cpu_us(fn, calls)
    out["share of customers answered by search"] = len(personal) / n
    return out


def _audit_costs(
    plain: Any, model: Any, users: list[str], payloads: list[bytes], calls: int
) -> dict[str, float]:
    """The handler with an audit trail against without, and the record's own stages."""
    from recsvc.audit import AuditLog, encode_answer
    from recsvc.logs import Pseudonymizer
    from recsvc.model.queries import RecommendQuery
    from recsvc.serving.service import RecommenderService
    from recsvc.v1 import recommender_pb2 as pb

    ctx = _Context()
    n = len(users)
    block = max(1, calls // 10)

    async def handler_block(service: Any, start: int) -> float:
        t0 = time.thread_time()
        for i in range(start, start + block):
            request = pb.RecommendRequest.FromString(payloads[i % n])
            response = await service.Recommend(request, ctx)
            response.SerializeToString()
        return (time.thread_time() - t0) / block * 1e6

    rec = model.recommender
    results = [rec.recommend(RecommendQuery(user_id=u, k=10), model.overlay) for u in users]
    pseudonym = Pseudonymizer(b"bench")

    def members(i: int) -> str:
        r = results[i % n]
        basis = r.suitability
        return encode_answer(
            recommendation_id=f"{i:032x}",
            method="Recommend",
            caller=None,
            subject=pseudonym(users[i % n]),
            model_version=r.version,
            state_sequence=r.sequence,
            source=r.source.name,
            tolerance=basis.tolerance,
            basis=basis.basis,
            removed=basis.removed,
            items=[(it.item_id, it.score) for it in r.items],
        )

    encoded = [members(i) for i in range(n)]
    with tempfile.TemporaryDirectory() as folder, AuditLog(Path(folder)) as trail:
        audited = RecommenderService(plain._store, pseudonym, audit=trail)
        off: list[float] = []
        on: list[float] = []

        async def interleaved() -> None:
            for b in range(12):  # the first two blocks of each warm up
                off.append(await handler_block(plain, b * block))
                on.append(await handler_block(audited, b * block))

        asyncio.run(interleaved())
        stages = {
            "audit: record built and encoded (pseudonym + encode_answer)": _cpu_us(members, calls),
            "audit: AuditLog.append (hash chain + write)": _cpu_us(
                lambda i: trail.append(encoded[i % n]), calls
            ),
        }
    handler_off, handler_on = statistics.median(off[2:]), statistics.median(on[2:])
    return {
        "handler, audit off (median of interleaved blocks)": handler_off,
        "handler, audit on (median of interleaved blocks)": handler_on,
        "handler, audit on - off": handler_on - handler_off,
        **stages,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.profile", description=__doc__)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--pool", type=int, default=5000, help="distinct customers")
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--audit", action="store_true", help="and what the audit trail costs")
    args = p.parse_args(argv)
    out = profile_recommend(args.models, args.pool, args.calls, audit=args.audit)
    if args.json:
        print(json.dumps(out))
    else:
        for name, value in out.items():
            print(f"{value:9.1f}  {name}" if value > 1 else f"{value:9.2f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
