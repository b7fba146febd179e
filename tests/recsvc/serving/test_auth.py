"""Least-privilege tokens: the token file, the scope of every RPC, the caller's name."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

import recsvc.serving.auth
from recsvc.serving.auth import (
    METHOD_SCOPES,
    BearerTokenInterceptor,
    Scope,
    Token,
    current_caller,
    load_tokens,
    read_token,
    read_tokens,
)
from recsvc.v1 import recommender_pb2, updates_pb2

SERVICES = [
    recommender_pb2.DESCRIPTOR.services_by_name["Recommender"],
    updates_pb2.DESCRIPTOR.services_by_name["Updates"],
]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}

# Written out here rather than read from the module: an RPC added to a .proto without a
# decision here fails the first test, and one reachable under the wrong scope the next.
EXPECTED_SCOPE = {
    "/recsvc.v1.Recommender/Recommend": "recommend",
    "/recsvc.v1.Recommender/SimilarItems": "recommend",
    "/recsvc.v1.Recommender/RankItems": "recommend",
    "/recsvc.v1.Recommender/GetModelInfo": "recommend",
    "/recsvc.v1.Recommender/TargetUsers": "target",
    "/recsvc.v1.Updates/RecordEvents": "events",
    "/recsvc.v1.Updates/UpdateCustomers": "events",
    "/recsvc.v1.Updates/UpdateProducts": "events",
    "/recsvc.v1.Updates/ForgetCustomer": "erase",
    "/recsvc.v1.Updates/GetErasureReceipt": "erase",
}
TOKENS = [Token(s.value, f"{s.value}-secret-0123456789".encode(), frozenset({s})) for s in Scope]
EVERYTHING = Token("ops", b"ops-secret-0123456789abc", frozenset(Scope))
UNLISTED = "/recsvc.v1.Unlisted/Anything"  # served, but in no scope table


def test_every_rpc_of_every_service_has_its_scope() -> None:
    assert set(METHODS) == set(EXPECTED_SCOPE)
    assert {m: s.value for m, s in METHOD_SCOPES.items()} == EXPECTED_SCOPE


def _handler(method: MethodDescriptor, sync: bool) -> grpc.RpcMethodHandler[Any, Any]:
    """Answers an empty response, and the caller's name in the trailing metadata (or
    "no request" when the interceptor did not hand the request on)."""
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)

    def tell(got: Any, context: Any) -> None:
        caller = current_caller() or "-" if isinstance(got, request) else "no request"
        context.set_trailing_metadata((("caller", caller),))

    async def unary(got: Any, context: Any) -> Any:
        await asyncio.sleep(0.01)  # concurrent calls overlap: each must see its own name
        tell(got, context)
        return response()

    def unary_sync(got: Any, context: Any) -> Any:
        tell(got, context)
        return response()

    async def stream(got: Any, context: Any) -> Any:
        tell(got, context)
        yield response()

    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, request.FromString, response.SerializeToString
        )
    return grpc.unary_unary_rpc_method_handler(
        unary_sync if sync else unary, request.FromString, response.SerializeToString
    )


async def _serve(tokens: list[Token]) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(tokens)])
    for service in SERVICES:  # Updates with plain functions, as a sync servicer has them
        handlers = {m.name: _handler(m, sync=service.name == "Updates") for m in service.methods}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
    unlisted = _handler(METHODS["/recsvc.v1.Recommender/GetModelInfo"], sync=False)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("recsvc.v1.Unlisted", {"Anything": unlisted}),)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    reflection.enable_server_reflection((reflection.SERVICE_NAME,), server)
    port = server.add_insecure_port("localhost:0")
    await server.start()
    return server, port


async def _call(
    channel: grpc.aio.Channel, path: str, secret: bytes | None
) -> tuple[grpc.StatusCode, str, str]:
    """Status code, details and the caller name the handler saw."""
    method = METHODS.get(path, METHODS["/recsvc.v1.Recommender/GetModelInfo"])
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    rpc: Callable[..., Any] = kind(
        path,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )
    metadata = (("authorization", "Bearer " + secret.decode()),) if secret else ()
    call = rpc(request(), metadata=metadata, timeout=10)
    try:
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError:
        pass
    caller = dict(await call.trailing_metadata() or ()).get("caller", "")
    return await call.code(), await call.details() or "", str(caller)


def test_every_rpc_against_every_scope() -> None:
    async def run() -> dict[tuple[str, str], tuple[grpc.StatusCode, str, str]]:
        server, port = await _serve([*TOKENS, EVERYTHING])
        try:
            async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
                cases = [(p, t) for p in [*METHODS, UNLISTED] for t in [*TOKENS, EVERYTHING]]
                got = await asyncio.gather(*(_call(channel, p, t.secret) for p, t in cases))
                return {(p, t.name): g for (p, t), g in zip(cases, got, strict=True)}
        finally:
            await server.stop(0)

    seen = asyncio.run(run())
    for (path, name), (code, details, caller) in seen.items():
        if path != UNLISTED and name in (EXPECTED_SCOPE[path], "ops"):
            assert (code, caller) == (grpc.StatusCode.OK, name), (path, name)
        elif path == UNLISTED:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (path, name)
            assert details == "no scope allows it"
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (path, name)
            assert details == f"this call needs the {EXPECTED_SCOPE[path]} scope"
            assert caller == "", "a denied call must never reach its handler"
    assert len(seen) == 11 * 6


def test_no_rpc_without_a_known_token_and_health_stays_open() -> None:
    async def run() -> None:
        server, port = await _serve(TOKENS)
        try:
            async with grpc.aio.insecure_channel(f"localhost:{port}") as channel:
                for path in [*METHODS, UNLISTED]:
                    for secret in (None, b"not-a-known-token-0123", EVERYTHING.secret):
                        code, details, _ = await _call(channel, path, secret)
                        assert code == grpc.StatusCode.UNAUTHENTICATED, (path, secret)
                        assert details == "missing or invalid bearer token"
                probe = health_pb2_grpc.HealthStub(channel)
                reply = await probe.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                ask = reflection_pb2.ServerReflectionRequest(list_services="")
                lookup = reflection_pb2_grpc.ServerReflectionStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    async for _ in lookup.ServerReflectionInfo(iter([ask]), timeout=5):
                        pass
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # Reflection takes any valid token, whatever its scopes.
                bearer = (("authorization", "Bearer " + TOKENS[-1].secret.decode()),)
                answers = lookup.ServerReflectionInfo(iter([ask]), metadata=bearer, timeout=5)
                assert [a.list_services_response.service async for a in answers]
        finally:
            await server.stop(0)

    asyncio.run(run())


def test_every_token_is_compared_so_timing_tells_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(recsvc.serving.auth.hmac, "compare_digest", counting)
    interceptor = BearerTokenInterceptor(TOKENS)
    for token in (TOKENS[0], TOKENS[-1]):
        compared.clear()
        header = [("authorization", "Bearer " + token.secret.decode())]
        assert interceptor._token(header) == token
        assert len(compared) == len(TOKENS)


def _token_file(tmp_path: Path, document: object, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    path.chmod(mode)
    return path


def _entry(**fields: object) -> dict[str, object]:
    return {"name": "mobile-app", "token": "m" * 16, "scopes": ["recommend"], **fields}


def test_a_token_file_gives_names_and_scopes(tmp_path: Path) -> None:
    document = {
        "tokens": [_entry(), _entry(name="crm", token="c" * 20, scopes=["target", "events"])]
    }
    tokens = read_tokens(_token_file(tmp_path, document))
    assert [(t.name, t.scopes) for t in tokens] == [
        ("mobile-app", {Scope.RECOMMEND}),
        ("crm", {Scope.TARGET, Scope.EVENTS}),
    ]
    assert "m" * 16 not in repr(tokens)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not JSON"),
        ([], 'must be {"tokens": \\[...\\]}'),
        ({"tokens": []}, "at least one token"),
        ({"tokens": [_entry()], "extra": 1}, 'must be {"tokens"'),
        ({"tokens": [_entry(token="short")]}, r"tokens\[0\].token: token must be at least 16"),
        ({"tokens": [_entry(token="with space 0123456789")]}, "printable ASCII without spaces"),
        ({"tokens": [_entry(token="é" * 16)]}, "printable ASCII"),
        ({"tokens": [_entry(scopes=["recommend", "admin"])]}, r"unknown \['admin'\]"),
        ({"tokens": [_entry(scopes=[])]}, r"tokens\[0\].scopes: must be a non-empty list"),
        ({"tokens": [_entry(name="")]}, r"tokens\[0\].name: must be a non-empty string"),
        ({"tokens": [_entry(token=12345678901234567)]}, "token: must be a string"),
        ({"tokens": [{"name": "x", "token": "x" * 16}]}, "exactly name, token and scopes"),
        ({"tokens": [_entry(), _entry(token="n" * 16)]}, "the same name twice"),
        ({"tokens": [_entry(), _entry(name="other")]}, "the same token twice"),
    ],
)
def test_a_bad_token_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, document: object, message: str
) -> None:
    path = _token_file(tmp_path, document)
    with pytest.raises(ValueError, match=message) as refused:
        read_tokens(path)
    assert str(refused.value).startswith(str(path))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_token_file_others_can_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = _token_file(tmp_path, {"tokens": [_entry()]}, mode)
    with pytest.raises(ValueError, match=f"mode {mode:04o} lets other users"):
        read_tokens(path)


def test_a_one_token_file_gives_every_scope_and_load_tokens_reads_either_kind(
    tmp_path: Path,
) -> None:
    one = tmp_path / "token"
    one.write_text("  s3cret-s3cret-s3cret\n", encoding="utf-8")
    one.chmod(0o600)
    token = read_token(one)
    assert (token.name, token.secret, token.scopes) == (
        "auth-token-file",
        b"s3cret-s3cret-s3cret",
        frozenset(Scope),
    )
    assert load_tokens(None, one) == (token,)
    many = _token_file(tmp_path, {"tokens": [_entry()]})
    assert load_tokens(many, one) == read_tokens(many)  # the scoped file wins
    assert load_tokens(None, None) == ()
    short = tmp_path / "short"
    short.write_text("short\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        read_token(short)
    assert str(err.value) == f"{short}: token must be at least 16 characters"
    with pytest.raises(ValueError) as err:
        BearerTokenInterceptor([])
    assert str(err.value) == "no tokens"


def test_an_unknown_scope_is_named_with_the_known_ones(tmp_path: Path) -> None:
    path = _token_file(tmp_path, {"tokens": [_entry(scopes=["admin"])]})
    with pytest.raises(ValueError) as err:
        read_tokens(path)
    assert str(err.value) == (
        f"{path}: tokens[0].scopes: unknown ['admin']; scopes are audit, erase, events, "
        "recommend, target"
    )
