"""The client's error tree: every failed call raises one of these, never ``grpc.RpcError``.

    RecsvcClientError          any other status (INTERNAL, UNKNOWN, ...); ``code``, ``details``
    ├── InvalidArgument        INVALID_ARGUMENT: a malformed field; details start with its name
    ├── NotFound               NOT_FOUND: an item (or receipt) the server does not have
    ├── FailedPrecondition     FAILED_PRECONDITION: valid, but the server's data cannot answer
    ├── ResourceExhausted      RESOURCE_EXHAUSTED: too many calls in flight, or too big a message
    ├── Unavailable            UNAVAILABLE: still unavailable after the automatic retries
    ├── DeadlineExceeded       DEADLINE_EXCEEDED: the client's deadline passed
    ├── Unauthenticated        UNAUTHENTICATED: a missing or wrong bearer token
    └── PermissionDenied       PERMISSION_DENIED

The ``grpc.RpcError`` is kept as ``__cause__``.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RecsvcClientError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "error_for",
]


class RecsvcClientError(Exception):
    """A call failed; ``code`` is its gRPC status, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(RecsvcClientError):
    """A request field is malformed; ``details`` starts with the field's name."""


class NotFound(RecsvcClientError):
    """A named item or receipt is not known to the server."""


class FailedPrecondition(RecsvcClientError):
    """The request is valid, but the server's data cannot answer it safely."""


class ResourceExhausted(RecsvcClientError):
    """The server is at its limit of calls in flight, or a message is too big."""


class Unavailable(RecsvcClientError):
    """The server cannot answer now (after the automatic retries, where the call has them)."""


class DeadlineExceeded(RecsvcClientError):
    """The deadline passed before the answer came."""


class Unauthenticated(RecsvcClientError):
    """The server wants a bearer token, and the call had none or a wrong one."""


class PermissionDenied(RecsvcClientError):
    """The caller is known but not allowed this call."""


_BY_CODE: dict[grpc.StatusCode, type[RecsvcClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def error_for(exc: grpc.RpcError) -> RecsvcClientError:
    """The client error for a failed call (the one place gRPC's errors are mapped)."""
    if isinstance(exc, grpc.Call):
        code, details = exc.code(), exc.details() or ""
    else:  # an RpcError that is not a call (gRPC raises none today): keep its text
        code, details = grpc.StatusCode.UNKNOWN, str(exc)
    return _BY_CODE.get(code, RecsvcClientError)(code, details)
