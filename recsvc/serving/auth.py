"""Bearer tokens with scopes, checked by a server interceptor.

Every RPC must carry ``authorization: Bearer <token>``; a missing or unknown token gets
UNAUTHENTICATED, a known one outside its scopes PERMISSION_DENIED. Each method needs
the scope :data:`METHOD_SCOPES` gives it; a method missing there is denied to every
token, so a new RPC is unreachable until it is given a scope. Health stays open so load
balancers and orchestrators can probe without a secret; reflection takes any valid
token. Handlers learn the caller's token name (never the token) from
:func:`current_caller`.

``--auth-tokens FILE`` names the tokens (JSON, readable by its owner only)::

    {"tokens": [{"name": "mobile-app", "token": "...", "scopes": ["recommend"]}]}

``--auth-token-file FILE`` holds one token with every scope.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
import inspect
import json
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

__all__ = [
    "METHOD_SCOPES",
    "MIN_TOKEN_LENGTH",
    "BearerTokenInterceptor",
    "Scope",
    "Token",
    "current_caller",
    "load_tokens",
    "read_token",
    "read_tokens",
]

MIN_TOKEN_LENGTH = 16


class Scope(str, enum.Enum):
    """What a token may call."""

    RECOMMEND = "recommend"
    TARGET = "target"
    EVENTS = "events"
    ERASE = "erase"
    AUDIT = "audit"
    """Reading audit records over RPC (no such RPC yet)."""


_R, _U = "/recsvc.v1.Recommender/", "/recsvc.v1.Updates/"
METHOD_SCOPES: Mapping[str, Scope] = MappingProxyType(
    {
        _R + "Recommend": Scope.RECOMMEND,
        _R + "SimilarItems": Scope.RECOMMEND,
        _R + "RankItems": Scope.RECOMMEND,
        _R + "GetModelInfo": Scope.RECOMMEND,
        _R + "TargetUsers": Scope.TARGET,
        _U + "RecordEvents": Scope.EVENTS,
        _U + "UpdateCustomers": Scope.EVENTS,
        _U + "UpdateProducts": Scope.EVENTS,
        _U + "ForgetCustomer": Scope.ERASE,
        _U + "GetErasureReceipt": Scope.ERASE,
    }
)
"""The scope each RPC needs, by full method name."""
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_ANY_TOKEN_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/",)
_TOKEN_FIELDS = {"name", "token", "scopes"}

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> str | None:
    """The name of the token the current RPC came with (None without auth)."""
    return _CALLER.get()


@dataclass(frozen=True)
class Token:
    """A named bearer token and what it may call."""

    name: str
    secret: bytes = field(repr=False)
    scopes: frozenset[Scope]


def _checked_secret(text: str, where: str) -> bytes:
    if len(text) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{where}: token must be at least {MIN_TOKEN_LENGTH} characters")
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError(f"{where}: token must be printable ASCII without spaces")
    return text.encode()


def read_token(path: Path) -> Token:
    """``--auth-token-file``: one token, every scope."""
    secret = _checked_secret(path.read_text(encoding="utf-8").strip(), str(path))
    return Token("auth-token-file", secret, frozenset(Scope))


def _read_entry(entry: object, where: str) -> Token:
    if not isinstance(entry, dict) or set(entry) != _TOKEN_FIELDS:
        raise ValueError(f"{where}: must be an object with exactly name, token and scopes")
    name, secret, scopes = entry["name"], entry["token"], entry["scopes"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.name: must be a non-empty string")
    if not isinstance(secret, str):
        raise ValueError(f"{where}.token: must be a string")
    if not isinstance(scopes, list) or not scopes:
        raise ValueError(f"{where}.scopes: must be a non-empty list")
    known = {s.value for s in Scope}
    unknown = [s for s in scopes if s not in known]
    if unknown:
        raise ValueError(
            f"{where}.scopes: unknown {unknown!r}; scopes are {', '.join(sorted(known))}"
        )
    return Token(name, _checked_secret(secret, f"{where}.token"), frozenset(map(Scope, scopes)))


def read_tokens(path: Path) -> tuple[Token, ...]:
    """``--auth-tokens``: named tokens with scopes, from a file only its owner can read.

    Raises:
        ValueError: naming the file (and the entry): readable by others, not JSON, a
            missing or unknown field, a token too short, an unknown scope, a name or a
            token given twice.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{path}: mode {mode:04o} lets other users read or change it; chmod 600 {path}"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries or set(document) != {"tokens"}:
        raise ValueError(f'{path}: must be {{"tokens": [...]}} with at least one token')
    tokens = tuple(_read_entry(e, f"{path}: tokens[{i}]") for i, e in enumerate(entries))
    for what, values in (("name", [t.name for t in tokens]), ("token", [t.secret for t in tokens])):
        if len(set(values)) != len(values):
            raise ValueError(f"{path}: the same {what} twice")
    return tokens


def load_tokens(auth_tokens: Path | None, auth_token_file: Path | None) -> tuple[Token, ...]:
    """The tokens the settings name: none (no auth), one (``--auth-token-file``, every
    scope), or a file of named, scoped ones (``--auth-tokens``)."""
    if auth_tokens is not None:
        return read_tokens(auth_tokens)
    if auth_token_file is not None:
        return (read_token(auth_token_file),)
    return ()


if TYPE_CHECKING:  # the stubs make handlers generic; grpc's runtime classes are not
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

_KINDS: Mapping[str, Callable[..., Any]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _with_behavior(handler: _Handler, make: Callable[[Callable[..., Any]], Any]) -> _Handler:
    """``handler`` with its behavior replaced by ``make(behavior)``, whatever its kind."""
    kind = next(k for k in _KINDS if getattr(handler, k) is not None)
    return _KINDS[kind](
        make(getattr(handler, kind)),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _denied(code: grpc.StatusCode, message: str) -> Callable[[Callable[..., Any]], Any]:
    def make(behavior: Callable[..., Any]) -> Any:
        # A coroutine is a valid behavior of every kind in grpc.aio; abort always raises.
        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(code, message)

        return deny

    return make


def _as_caller(name: str) -> Callable[[Callable[..., Any]], Any]:
    """Run the behavior with :func:`current_caller` giving ``name``.

    Each RPC runs in a task (or an executor call) of its own, so setting the variable
    inside the behavior reaches exactly that RPC, and no reset is needed.
    """

    def make(behavior: Callable[..., Any]) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> Any:
                _CALLER.set(name)
                async for response in behavior(request, context):
                    yield response

            return stream
        if inspect.iscoroutinefunction(behavior):

            async def call(request: Any, context: Any) -> Any:
                _CALLER.set(name)
                return await behavior(request, context)

            return call

        def sync(request: Any, context: Any) -> Any:
            _CALLER.set(name)
            return behavior(request, context)

        return sync

    return make


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED without a known token, PERMISSION_DENIED outside its scopes."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        if not tokens:
            raise ValueError("no tokens")
        self._tokens = tuple((b"Bearer " + t.secret, t) for t in tokens)
        self._allowed: dict[tuple[str, str], _Handler] = {}  # wrapped once per method and token

    def _token(self, metadata: Any) -> Token | None:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                found = None
                for expected, token in self._tokens:  # every one, so time tells nothing
                    if hmac.compare_digest(got, expected):
                        found = token
                return found
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        token = self._token(handler_call_details.invocation_metadata)
        if token is None:
            message = "missing or invalid bearer token"
            return _with_behavior(handler, _denied(grpc.StatusCode.UNAUTHENTICATED, message))
        scope = METHOD_SCOPES.get(method)
        if scope not in token.scopes and not method.startswith(_ANY_TOKEN_PREFIXES):
            message = f"this call needs the {scope.value} scope" if scope else "no scope allows it"
            return _with_behavior(handler, _denied(grpc.StatusCode.PERMISSION_DENIED, message))
        key = (method, token.name)
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = _with_behavior(handler, _as_caller(token.name))
        return allowed
