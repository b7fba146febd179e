"""``recsvc``: run the server, ask a running one (readable tables for people), or check
and search an audit trail."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from datetime import timezone
from pathlib import Path

import grpc

from recsvc.commands import run_main
from recsvc.settings import SETTINGS, ServerSettings

__all__ = ["main"]


def _channel(args: argparse.Namespace) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if args.tls_ca or args.tls_cert:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None,
            private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
        return grpc.secure_channel(args.target, creds, options=options)
    return grpc.insecure_channel(args.target, options=options)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.token_file:
        return [("authorization", f"Bearer {Path(args.token_file).read_text().strip()}")]
    return []


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _stub(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from recsvc.v1 import recommender_pb2_grpc

    return recommender_pb2_grpc.RecommenderStub(_channel(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from recsvc.serving.server import serve_forever

    return serve_forever(ServerSettings.from_args(args))


def _cmd_recommend(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    resp = _stub(args).Recommend(
        pb.RecommendRequest(
            user_id=args.user or "",
            k=args.k,
            recent_item_ids=args.recent or [],
            exclude_item_ids=args.exclude or [],
            explain=args.explain,
        ),
        metadata=_metadata(args),
        timeout=args.timeout,
    )
    print(
        f"model {resp.model_version}  source {pb.Source.Name(resp.source)}  "
        f"id {resp.recommendation_id}"
    )
    rows = [
        (i + 1, it.item_id, f"{it.score:.4f}", ", ".join(c.item_id for c in it.because))
        for i, it in enumerate(resp.items)
    ]
    print(_table(("#", "item_id", "score", "because" if args.explain else ""), rows))
    return 0


def _cmd_similar(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    resp = _stub(args).SimilarItems(
        pb.SimilarItemsRequest(item_id=args.item, k=args.k, user_id=args.user or ""),
        metadata=_metadata(args),
        timeout=args.timeout,
    )
    print(f"model {resp.model_version}")
    print(
        _table(
            ("#", "item_id", "similarity"),
            [(i + 1, it.item_id, f"{it.score:.4f}") for i, it in enumerate(resp.items)],
        )
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from recsvc.v1 import recommender_pb2 as pb

    info = _stub(args).GetModelInfo(
        pb.GetModelInfoRequest(), metadata=_metadata(args), timeout=args.timeout
    )
    rows = [
        ("version", info.version),
        ("created_at", info.created_at.ToDatetime(timezone.utc).isoformat()),
        ("algorithm", info.algorithm),
        ("users", f"{info.n_users:,}"),
        ("items", f"{info.n_items:,}"),
        ("factors", info.factors),
        ("item index", info.item_index),
        ("user index", info.user_index),
        ("rule: suitability", info.rules.suitability),
        ("rule: active only", info.rules.active_only),
        ("rule: exclude interacted", info.rules.exclude_interacted),
        ("rule: marketing consent", info.rules.marketing_consent),
    ]
    print(_table(("field", "value"), rows))
    return 0


def _cmd_target(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from recsvc.audience_file import audience_meta, write_audience
    from recsvc.model.queries import TargetQuery
    from recsvc.model.targeting import ExclusionCounts
    from recsvc.v1 import recommender_pb2 as pb

    query = TargetQuery(  # checked here too, so a typo fails before the call
        item_ids=tuple(args.item),
        audience_size=args.size,
        min_score=args.min_score,
        include_holders=args.include_holders,
    )
    request = pb.TargetUsersRequest(
        item_ids=query.item_ids,
        audience_size=query.audience_size,
        include_holders=query.include_holders,
    )
    if query.min_score is not None:
        request.min_score = query.min_score
    ids: list[str] = []
    scores: list[float] = []
    version, excluded, eligible, approximate = "", ExclusionCounts(), 0, False
    for msg in _stub(args).TargetUsers(request, metadata=_metadata(args), timeout=args.timeout):
        ids.extend(u.user_id for u in msg.users)
        scores.extend(u.score for u in msg.users)
        version = msg.model_version or version
        if msg.HasField("excluded"):
            counts = {f.name: getattr(msg.excluded, f.name) for f in fields(ExclusionCounts)}
            excluded = ExclusionCounts(**counts)
            eligible, approximate = msg.eligible_users, msg.approximate
    table = pa.table(
        {"user_id": pa.array(ids, pa.string()), "score": pa.array(scores, pa.float32())}
    )
    meta = audience_meta(version, query, eligible, excluded, approximate, f"rpc {args.target}")
    sidecar = write_audience(Path(args.out), table, meta)
    print(f"wrote {len(ids):,} customers to {args.out} (model {version}); sidecar {sidecar}")
    print(json.dumps(meta["excluded"]))
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from recsvc.audit import verify

    expect = None
    if args.head:
        seq, _, digest = args.head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise ValueError(f"--head {args.head!r}: expected SEQ:HASH (64 hex digits)")
        expect = (int(seq), digest)
    report = verify(Path(args.dir), expect)
    print(report)
    return 0 if report.ok else 1


def _cmd_audit_find(args: argparse.Namespace) -> int:
    from recsvc.audit import find, parse_time
    from recsvc.logs import Pseudonymizer

    subject = None
    if args.user is not None:
        key = SETTINGS["pseudonym_key"]
        secret = key.resolve(None, os.environ)
        if secret is None:
            raise ValueError(f"--user needs the server's pseudonym key in {key.variable}")
        subject = Pseudonymizer(secret)(args.user)
    since = parse_time(args.since) if args.since else None
    found = 0
    for record in find(
        Path(args.dir), subject=subject, recommendation_id=args.recommendation_id, since=since
    ):
        print(json.dumps(record, separators=(",", ":")))
        found += 1
    print(f"{found} records", file=sys.stderr)
    return 0


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:50051", help="server host:port")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    p.add_argument("--token-file", help="bearer token file")
    p.add_argument("--tls-ca", help="CA certificate to trust (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the newest valid bundle over gRPC")
    ServerSettings.add_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("recommend", help="suggestions for a customer")
    _client_args(p)
    p.add_argument("--user", help="customer id")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--recent", action="append", help="recently seen item (repeatable)")
    p.add_argument("--exclude", action="append", help="item to leave out (repeatable)")
    p.add_argument("--explain", action="store_true")
    p.set_defaults(func=_cmd_recommend)

    p = sub.add_parser("similar", help="products similar to a product")
    _client_args(p)
    p.add_argument("--item", required=True)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--user", help="apply this customer's rules")
    p.set_defaults(func=_cmd_similar)

    p = sub.add_parser("info", help="the served model")
    _client_args(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("target", help="campaign audience to Parquet")
    _client_args(p)
    p.add_argument("--item", action="append", required=True, help="product (repeatable)")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--min-score", type=float)
    p.add_argument("--include-holders", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_target)

    p = sub.add_parser("audit", help="check or search an audit trail (--audit-dir)")
    audit = p.add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("verify", help="check the whole hash chain; name the first break")
    p.add_argument("dir", help="the audit folder")
    p.add_argument("--head", help="SEQ:HASH of a head kept elsewhere: the trail must hold it")
    p.set_defaults(func=_cmd_audit_verify)
    p = audit.add_parser("find", help="print a customer's or an answer's records")
    p.add_argument("dir", help="the audit folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--user", help="customer id (pseudonymized with RECSVC_PSEUDONYM_KEY)")
    which.add_argument("--recommendation-id", help="an answer's recommendation_id")
    p.add_argument("--since", help="only records from this ISO 8601 time on (UTC unless given)")
    p.set_defaults(func=_cmd_audit_find)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except grpc.RpcError as exc:
        print(f"recsvc: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
