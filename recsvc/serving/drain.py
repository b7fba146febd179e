"""Draining on stop: take in every call that has reached the server, refuse later ones.

gRPC's core, when a server shuts down, cancels every call it has accepted but not
yet handed to the application: the client gets CANCELLED, and the grace period
never applies to it (grpc/grpc#41785). The asyncio server hands calls over one at a
time, between handlers, so under load several are always waiting there. So before
the server stops listening, :class:`DrainGate` holds each new call at the edge,
doing no work, while the event loop takes in the rest; a lull shows there are no
more. Then the held calls run, any later call gets UNAVAILABLE, and only then does
the server stop listening (``RunningServer.stop``). Health checks pass untouched,
so probes see NOT_SERVING.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

__all__ = ["DrainGate"]

_UNGATED = ("/grpc.health.v1.Health/",)
_TICK = 0.005
_QUIET_TICKS = 10
"""Ticks in a row that bring no new call: a lull of at least 50 ms. Counted in ticks,
not seconds, so a loop stalled for a while cannot pass for a quiet one."""

if TYPE_CHECKING:  # the stubs make handlers generic; grpc's runtime classes are not
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
Context = grpc.aio.ServicerContext[Any, Any]
_Before = Callable[[Context], Awaitable[None]]


class DrainGate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Open until :meth:`take_in`; then holds new calls; after :meth:`refuse`, lets the
    held ones run and answers any later one UNAVAILABLE."""

    def __init__(self) -> None:
        self._state = "open"
        self._released = asyncio.Event()
        self.held = 0
        """Calls held so far (tests and diagnostics)."""
        self.refused = 0

    async def take_in(self, until: float) -> None:
        """Hold new calls until a lull (or ``until``, in event-loop time)."""
        if self._state != "open":  # a second stop: what is held stays held, refused refused
            return
        loop = asyncio.get_running_loop()
        self._state = "holding"
        seen, calm = -1, 0
        while calm < _QUIET_TICKS and loop.time() < until:
            await asyncio.sleep(_TICK)
            calm = calm + 1 if self.held == seen else 0
            seen = self.held

    def refuse(self) -> None:
        """Let the held calls run; refuse every later one."""
        self._state = "refusing"
        self._released.set()

    async def _hold(self, context: Context) -> None:
        await self._released.wait()

    async def _refuse(self, context: Context) -> None:
        self.refused += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if self._state == "open" or handler is None:
            return handler
        if handler_call_details.method.startswith(_UNGATED):
            return handler
        # Decided now, as the call arrives: one held must run even if released later.
        if self._state == "holding":
            self.held += 1
            return _gated(handler, self._hold)
        return _gated(handler, self._refuse)


def _gated(handler: _Handler, before: _Before) -> _Handler:
    """``handler`` with ``before(context)`` awaited ahead of its own code."""
    kw: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            await before(context)
            return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await before(context)
            async for response in us(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        su: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            await before(context)
            return await su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    ss: Any = handler.stream_stream  # the stubs type these as synchronous

    async def stream_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        await before(context)
        async for response in ss(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
