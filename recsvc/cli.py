"""``recsvc``: run the server, ask a running one (readable tables for people), or check
and search an audit trail."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from recsvc.commands import run_main
from recsvc.settings import SETTINGS, ServerSettings, parse_switch

# The client commands import recsvc_client on use: `recsvc serve` never needs it.
if TYPE_CHECKING:
    from recsvc_client import TLS, Recommendation, ServiceClient

__all__ = ["DEFAULT_SERVER", "main"]

DEFAULT_SERVER = "localhost:50051"
"""Where the client commands find the server unless ``--server`` or ``RECSVC_SERVER`` says."""

_ClientT = TypeVar("_ClientT", bound="ServiceClient")


def _tls(args: argparse.Namespace) -> TLS | None:
    from recsvc_client import TLS

    if args.tls_ca or args.tls_cert:
        return TLS.from_files(args.tls_ca, args.tls_cert, args.tls_key)
    return None


def _connect(args: argparse.Namespace, kind: type[_ClientT]) -> _ClientT:
    """A client of ``kind`` with the command's server, deadline, token and TLS flags."""
    tls = _tls(args)
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"--token-file: cannot read {args.token_file}: {exc.strerror}"
            ) from exc
    return kind(args.server, token=token, tls=tls, timeout=args.timeout)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_serve(args: argparse.Namespace) -> int:
    from recsvc.serving.server import serve_forever

    return serve_forever(ServerSettings.from_args(args))


def _print_ranked(rec: Recommendation, explain: bool = False) -> None:
    """A Recommend or RankItems answer: its model and source, then the items, best first."""
    source = rec.source.name if rec.source else ""
    print(f"model {rec.model_version}  source {source}  id {rec.recommendation_id}")
    if rec.unknown_recent_item_ids:  # on stderr: the table stays the first lines of stdout
        unknown = ", ".join(rec.unknown_recent_item_ids)
        print(
            f"recsvc: not in model {rec.model_version}, not folded in: {unknown}", file=sys.stderr
        )
    width = 4 if explain else 3  # no "because" column unless asked for
    rows = [
        (i + 1, it.item_id, f"{it.score:.4f}", ", ".join(c.item_id for c in it.because))[:width]
        for i, it in enumerate(rec.items)
    ]
    headers = ("#", "item_id", "score", "because")[:width]
    print(_table(headers, rows))


def _cmd_recommend(args: argparse.Namespace) -> int:
    from recsvc_client import RecommenderClient

    with _connect(args, RecommenderClient) as client:
        rec = client.recommend(
            args.user or "",
            args.k,
            recent_item_ids=args.recent or (),
            exclude_item_ids=args.exclude or (),
            explain=args.explain,
            include_interacted=args.include_interacted,
            min_sequence=args.min_sequence,
        )
    _print_ranked(rec, args.explain)
    return 0


_DROPPED = {
    "UNKNOWN_ITEM": "not in the model's catalogue",
    "INACTIVE": "an inactive product",
    "UNSUITABLE": "risk level above the customer's risk tolerance",
    "EXCLUSIVE_CATEGORY": "they hold another product of this exclusive category",
    "INTERACTED": "the customer has it already (--include-interacted shows it)",
}


def _cmd_rank(args: argparse.Namespace) -> int:
    from recsvc_client import RecommenderClient

    with _connect(args, RecommenderClient) as client:
        rec = client.rank_items(
            args.user or "",
            args.item,
            recent_item_ids=args.recent or (),
            include_interacted=args.include_interacted,
            min_sequence=args.min_sequence,
        )
    _print_ranked(rec)
    if rec.dropped:
        rows = [(d.item_id, d.reason.name, _DROPPED.get(d.reason.name, "")) for d in rec.dropped]
        print(f"\nleft out\n{_table(('item_id', 'reason', 'why'), rows)}")
    return 0


def _cmd_similar(args: argparse.Namespace) -> int:
    from recsvc_client import RecommenderClient

    with _connect(args, RecommenderClient) as client:
        rec = client.similar_items(args.item, args.k, user_id=args.user or "")
    print(f"model {rec.model_version}")
    print(
        _table(
            ("#", "item_id", "similarity"),
            [(i + 1, it.item_id, f"{it.score:.4f}") for i, it in enumerate(rec.items)],
        )
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from recsvc_client import RecommenderClient

    with _connect(args, RecommenderClient) as client:
        info = client.model_info()
    rows = [
        ("version", info.version),
        ("created_at", info.created_at.isoformat() if info.created_at else ""),
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
    from recsvc_client import RecommenderClient

    from recsvc.audience_file import audience_meta, shortfall, write_audience
    from recsvc.model.queries import TargetQuery
    from recsvc.model.targeting import ExclusionCounts

    query = TargetQuery(  # checked here too, so a typo fails before the call
        item_ids=tuple(args.item),
        audience_size=args.size,
        min_score=args.min_score,
        include_holders=args.include_holders,
    )
    with _connect(args, RecommenderClient) as client:
        audience = client.target_users(
            query.item_ids,
            query.audience_size,
            min_score=query.min_score,
            include_holders=query.include_holders,
            min_sequence=args.min_sequence,
        )
    table = pa.table(
        {
            "user_id": pa.array(audience.user_ids, pa.string()),
            "score": pa.array(audience.scores, pa.float32()),
        }
    )
    excluded = ExclusionCounts(**dataclasses.asdict(audience.excluded))
    meta = audience_meta(
        audience.model_version,
        query,
        audience.eligible_users,
        excluded,
        audience.approximate,
        f"rpc {args.server}",
    )
    sidecar = write_audience(Path(args.out), table, meta)
    wrote = f"wrote {table.num_rows:,} customers to {args.out}"
    print(f"{wrote} (model {audience.model_version}); sidecar {sidecar}")
    short = shortfall(query.audience_size, table.num_rows, audience.eligible_users, excluded)
    if short:
        print(short)
    print(json.dumps(meta["excluded"]))
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    """The server's health status (gRPC health checking); 0 only once it is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tls = _tls(args)
    channel = (
        grpc.secure_channel(args.server, tls.credentials())
        if tls is not None
        else grpc.insecure_channel(args.server)
    )
    request = health_pb2.HealthCheckRequest(service=args.service)
    until = time.monotonic() + args.wait
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(request, timeout=min(args.timeout, 5.0))
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:  # not listening yet, or stopping
                status = f"{exc.code().name}: {exc.details()}"
            if status == "SERVING" or time.monotonic() >= until:
                break
            time.sleep(0.2)
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else 1


def _cmd_event(args: argparse.Namespace) -> int:
    from recsvc_client import Event, UpdatesClient

    event_id = args.id or f"cli-{secrets.token_hex(8)}"
    event = Event(
        event_id,
        args.user,
        args.item,
        args.type,
        weight=args.weight,
        campaign_id=args.campaign or "",
        channel=args.channel or "",
    )
    with _connect(args, UpdatesClient) as client:
        done = client.record_events([event])
    state = "duplicate (recorded before)" if done.duplicates else f"recorded {done.recorded}"
    extra = " (a product the model does not know yet)" if done.unknown_items else ""
    if done.dropped_forgotten:
        state = "dropped: the customer was forgotten"
    print(f"event {event_id}: {state}{extra}; state sequence {done.sequence}")
    return 0


def _cmd_customer(args: argparse.Namespace) -> int:
    from recsvc_client import CustomerUpdate, UpdatesClient

    update = CustomerUpdate(args.user, args.risk_tolerance, args.consent)
    with _connect(args, UpdatesClient) as client:
        done = client.update_customers([update])
    print(f"updated {done.updated} customer(s); state sequence {done.sequence}")
    return 0


def _cmd_product(args: argparse.Namespace) -> int:
    from recsvc_client import ProductUpdate, UpdatesClient

    update = ProductUpdate(args.item, args.active, args.risk_level)
    with _connect(args, UpdatesClient) as client:
        done = client.update_products([update])
    print(f"updated {done.updated} product(s); state sequence {done.sequence}")
    return 0


def _print_receipt(receipt: object) -> None:
    fields = dataclasses.asdict(receipt)  # type: ignore[call-overload]
    rows = [(k, v.isoformat() if hasattr(v, "isoformat") else v) for k, v in fields.items()]
    print(_table(("field", "value"), rows))


def _cmd_forget(args: argparse.Namespace) -> int:
    from recsvc_client import UpdatesClient

    with _connect(args, UpdatesClient) as client:
        _print_receipt(client.forget_customer(args.user, args.reference or ""))
    return 0


def _cmd_receipt(args: argparse.Namespace) -> int:
    from recsvc_client import UpdatesClient

    with _connect(args, UpdatesClient) as client:
        _print_receipt(client.erasure_receipt(args.id))
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from recsvc.audit import verify_chains

    expect = None
    if args.head:
        seq, _, digest = args.head.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise ValueError(f"--head {args.head!r}: expected SEQ:HASH (64 hex digits)")
        expect = (int(seq), digest)
    reports = verify_chains(Path(args.dir), expect)
    for chain, report in reports.items():
        print(report if chain == "." else f"{chain}: {report}".replace("\n", f"\n{chain}: "))
    return 0 if all(r.ok for r in reports.values()) else 1


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


def _yes_no_flag(text: str) -> bool:
    try:
        return parse_switch(text)
    except ValueError as exc:  # argparse would say only "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("RECSVC_SERVER") or DEFAULT_SERVER,
        help=f"the server's host:port, or any gRPC target [RECSVC_SERVER; {DEFAULT_SERVER}]",
    )
    # The old name, kept working for scripts; it read as the product on `recsvc target`.
    p.add_argument("--target", dest="server", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    p.add_argument("--token-file", help="bearer token file")
    p.add_argument("--tls-ca", help="CA certificate to trust (enables TLS)")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")


def _ask(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``, a client command: a failed call is one line on stderr and status 1."""
    try:
        from recsvc_client import RecsvcClientError
    except ModuleNotFoundError as exc:
        if exc.name != "recsvc_client":
            raise
        raise ValueError(
            "the client commands need recsvc-client: pip install clients/python"
        ) from exc
    try:
        return run(args)
    except RecsvcClientError as exc:
        print(f"recsvc: {exc}", file=sys.stderr)
        return 1


def _client_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A command that asks a running server: the client flags, then ``run``'s own."""
    p = sub.add_parser(name, help=summary)
    _client_args(p)
    p.set_defaults(func=functools.partial(_ask, run))
    return p


_K_HELP = "how many products (default 10, at most 500)"
_RECENT_HELP = "an item the customer just saw, folded into their vector (repeatable)"
_INTERACTED_HELP = "allow products the customer already has or interacted with"
_SEQUENCE_HELP = "wait until the server has applied this state sequence (read your own write)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the newest valid bundle over gRPC")
    ServerSettings.add_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = _client_command(sub, "recommend", "suggestions for a customer", _cmd_recommend)
    p.add_argument("--user", help="customer id (none: anonymous, by --recent items)")
    p.add_argument("-k", type=int, default=10, help=_K_HELP)
    p.add_argument("--recent", action="append", help=_RECENT_HELP)
    p.add_argument("--exclude", action="append", help="item to leave out (repeatable)")
    p.add_argument(
        "--explain",
        action="store_true",
        help="show, for each product, the customer's own products that weighed most",
    )
    p.add_argument("--include-interacted", action="store_true", help=_INTERACTED_HELP)
    p.add_argument("--min-sequence", type=int, default=0, help=_SEQUENCE_HELP)

    p = _client_command(sub, "rank", "a candidate list in a customer's order", _cmd_rank)
    p.add_argument("--user", help="customer id (none: anonymous, by --recent items)")
    p.add_argument("--item", action="append", required=True, help="candidate (repeatable)")
    p.add_argument("--recent", action="append", help=_RECENT_HELP)
    p.add_argument("--include-interacted", action="store_true", help=_INTERACTED_HELP)
    p.add_argument("--min-sequence", type=int, default=0, help=_SEQUENCE_HELP)

    p = _client_command(sub, "similar", "products similar to a product", _cmd_similar)
    p.add_argument("--item", required=True)
    p.add_argument("-k", type=int, default=10, help=_K_HELP)
    p.add_argument("--user", help="apply this customer's rules")

    _client_command(sub, "info", "the served model", _cmd_info)

    p = _client_command(sub, "health", "exit 0 once the server is SERVING, else 1", _cmd_health)
    p.add_argument(
        "--wait", type=float, default=0.0, help="seconds to keep asking until SERVING (default 0)"
    )
    p.add_argument("--service", default="", help="a service's health (default: the server's)")

    p = _client_command(sub, "target", "campaign audience to Parquet", _cmd_target)
    p.add_argument("--item", action="append", required=True, help="product (repeatable)")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--min-score", type=float)
    p.add_argument("--include-holders", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--min-sequence", type=int, default=0, help=_SEQUENCE_HELP)

    p = _client_command(sub, "event", "record a customer event (purchase, close ...)", _cmd_event)
    p.add_argument("--user", required=True)
    p.add_argument("--item", required=True)
    p.add_argument("--type", required=True, help="view, click, apply, purchase, hold, close ...")
    p.add_argument("--id", help="idempotency key (default: a random one)")
    p.add_argument("--weight", type=float)
    p.add_argument("--campaign")
    p.add_argument("--channel", help="email, sms, push, call, app ...")

    p = _client_command(sub, "customer", "set a customer's tolerance or consent", _cmd_customer)
    p.add_argument("--user", required=True)
    p.add_argument("--risk-tolerance", type=int, help="1 (lowest) to 5")
    p.add_argument("--consent", type=_yes_no_flag, help="marketing consent: yes or no")

    p = _client_command(sub, "product", "withdraw a product or set its risk", _cmd_product)
    p.add_argument("--item", required=True)
    p.add_argument("--active", type=_yes_no_flag, help="yes or no")
    p.add_argument("--risk-level", type=int, help="1 (lowest) to 5")

    p = _client_command(sub, "forget", "erase a customer; prints the receipt", _cmd_forget)
    p.add_argument("--user", required=True)
    p.add_argument("--reference", help="the bank's case number")

    p = _client_command(sub, "receipt", "an erasure receipt again", _cmd_receipt)
    p.add_argument("--id", required=True, help="receipt id (r_...)")

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
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
