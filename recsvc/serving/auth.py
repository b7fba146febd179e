"""Bearer-token authentication as a server interceptor.

Every RPC must carry ``authorization: Bearer <token>``; health checks stay open
so load balancers and orchestrators can probe without a secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

__all__ = ["BearerTokenInterceptor", "read_token"]

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(path: Path) -> bytes:
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ValueError(f"{path}: token must be at least 16 characters")
    return token.encode()


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


if TYPE_CHECKING:  # the stubs make handlers generic; grpc's runtime classes are not
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects RPCs without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    def _ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)  # constant time
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = handler_call_details.method
        if method.startswith(_OPEN_PREFIXES) or self._ok(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_stream is not None:

            async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await _deny(request, context)
                yield  # pragma: no cover - abort raises first

            return grpc.unary_stream_rpc_method_handler(
                deny_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:

            async def deny_bidi(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await _deny(None, context)
                yield  # pragma: no cover

            return grpc.stream_stream_rpc_method_handler(
                deny_bidi,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
