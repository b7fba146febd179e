"""The channel both clients share: TLS, bearer token, a deadline on every call, retries.

Retries are gRPC's own (a service config on the channel), on UNAVAILABLE only, and
only for calls that are safe to repeat: every Recommender call, and the Updates
calls that are idempotent (RecordEvents by event id, UpdateCustomers and
UpdateProducts set the same values again, GetErasureReceipt reads). ForgetCustomer
is never retried: a second attempt would issue a second receipt.

The deadline covers the call with all its attempts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import grpc

from recsvc_client.errors import error_for

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "RETRIED",
    "TLS",
    "Retries",
    "ServiceClient",
    "service_config",
]

DEFAULT_TIMEOUT = 5.0
# (service, method) pairs retried on UNAVAILABLE; a None method means every method.
RETRIED: tuple[tuple[str, str | None], ...] = (
    ("recsvc.v1.Recommender", None),
    ("recsvc.v1.Updates", "RecordEvents"),
    ("recsvc.v1.Updates", "UpdateCustomers"),
    ("recsvc.v1.Updates", "UpdateProducts"),
    ("recsvc.v1.Updates", "GetErasureReceipt"),
)
# gRPC caps a retry policy at 5 attempts (more are silently cut to 5).
_MAX_ATTEMPTS = 5
# gRPC's default is 4 MiB; a server run with a larger --max-message-bytes may send more.
_MAX_RECEIVE = 64 * 1024 * 1024

_Self = TypeVar("_Self", bound="ServiceClient")


@dataclass(frozen=True)
class TLS:
    """TLS for the channel; with ``certificate_chain`` and ``private_key``, mutual TLS.

    ``TLS()`` trusts the system's roots; ``TLS.from_files(ca="ca.pem")`` a private CA;
    ``TLS.from_files(ca="ca.pem", cert="client.pem", key="client.key")`` shows the
    server a client certificate too.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("tls: a client certificate needs its private key, and the reverse")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
    ) -> TLS:
        """TLS from PEM files: the CA to trust (None: the system's), a client cert and key."""
        return cls(_read(ca, "ca"), _read(cert, "cert"), _read(key, "key"))

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these settings describe."""
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def _read(path: str | Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls {name}: cannot read {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class Retries:
    """gRPC's retry policy for the calls that are safe to repeat, on UNAVAILABLE.

    The defaults try a call up to 4 times, waiting a random time up to 0.1 s, 0.2 s,
    then 0.4 s between attempts (exponential backoff with jitter, capped at
    ``max_backoff``), all within the call's deadline. ``Retries(max_attempts=1)``
    turns retries off.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= _MAX_ATTEMPTS:
            raise ValueError(
                f"retries: max_attempts must be between 1 and {_MAX_ATTEMPTS}, "
                f"got {self.max_attempts}"
            )
        for name in ("initial_backoff", "max_backoff", "backoff_multiplier"):
            if not getattr(self, name) > 0:
                raise ValueError(f"retries: {name} must be > 0, got {getattr(self, name)}")


DEFAULT_RETRIES = Retries()


def service_config(retries: Retries) -> str:
    """The channel's service config (JSON): ``retries`` for every method in RETRIED."""
    if retries.max_attempts == 1:
        return json.dumps({})
    names = [
        {"service": service} if method is None else {"service": service, "method": method}
        for service, method in RETRIED
    ]
    policy = {
        "maxAttempts": retries.max_attempts,
        "initialBackoff": f"{retries.initial_backoff:.3f}s",
        "maxBackoff": f"{retries.max_backoff:.3f}s",
        "backoffMultiplier": retries.backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


class ServiceClient:
    """A channel to a recsvc server with the client's defaults; the base of both clients.

    Args:
        target: ``host:port`` of the server.
        token: bearer token sent with every call (servers run with ``--auth-token-file``).
        tls: TLS settings; None for a plaintext channel.
        timeout: the deadline of every call, in seconds.
        retries: the retry policy of the calls that are safe to repeat.
        options: further gRPC channel options, e.g. ``[("grpc.lb_policy_name", "round_robin")]``.

    Use it as a context manager, or call ``close()``.
    """

    _stub_type: ClassVar[type[Any]]
    """The generated stub of the client's service."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: Retries = DEFAULT_RETRIES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {timeout}")
        if token is not None and (not token or token != token.strip() or "\n" in token):
            raise ValueError("token: must be non-empty, without surrounding space or newlines")
        channel_options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(retries)),
            ("grpc.max_receive_message_length", _MAX_RECEIVE),
            *options,
        ]
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, tls.credentials(), options=channel_options)
        self._stub = self._stub_type(self._channel)
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        """One unary call with the deadline and token; gRPC's errors become ours."""
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_for(exc) from exc

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        """The messages of one server-streaming call, with the deadline and token."""
        try:
            yield from method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_for(exc) from exc
