"""Typed server settings, parsed once at start-up from flags and ``RECSVC_*``."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerSettings"]


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RECSVC_{name}", default)


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``recsvc serve`` needs; built once, passed down.

    Example:
        >>> ServerSettings(models=Path("var/models"), port=0, poll_interval=0.2)
    """

    models: Path
    """Bundle folder: ``<version>/`` subfolders and ``LATEST``."""
    host: str = "localhost"
    port: int = 50051
    """0 picks a free port (tests)."""
    poll_interval: float = 5.0
    """Seconds between looks at ``models/LATEST``."""
    workers: int = 1
    """Server processes sharing the port (SO_REUSEPORT)."""
    max_concurrent_rpcs: int = 256
    """Beyond this many RPCs in flight, new ones get RESOURCE_EXHAUSTED."""
    max_message_bytes: int = 4 * 1024 * 1024
    grace_seconds: float = 10.0
    """How long SIGTERM waits for in-flight RPCs."""
    pseudonym_key: bytes = b""
    """HMAC key for customer ids in logs; random per process when unset."""
    trial_in_child: bool = True
    """Parse each new bundle in a throwaway child process before loading it here."""
    no_consent_data: bool = False
    """Allow TargetUsers on data without a users table (no consent requirement)."""
    auth_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @classmethod
    def from_env(cls, models: Path | None = None, **overrides: object) -> ServerSettings:
        """Defaults, then ``RECSVC_*`` variables, then explicit (non-None) overrides."""
        values: dict[str, object] = {}
        env_models = _env("MODELS")
        if env_models:
            values["models"] = Path(env_models)
        for name, conv in (
            ("host", str),
            ("port", int),
            ("poll_interval", float),
            ("workers", int),
            ("max_concurrent_rpcs", int),
            ("grace_seconds", float),
        ):
            raw = _env(name.upper())
            if raw is not None:
                values[name] = conv(raw)
        for name in ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            raw = _env(name.upper())
            if raw:
                values[name] = Path(raw)
        key = _env("PSEUDONYM_KEY")
        values["pseudonym_key"] = key.encode() if key else secrets.token_bytes(32)
        if _env("NO_CONSENT_DATA", "") in ("1", "true", "yes"):
            values["no_consent_data"] = True
        if models is not None:
            values["models"] = models
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "models" not in values:
            raise ValueError("no model folder: pass --models or set RECSVC_MODELS")
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.poll_interval <= 0:
            raise ValueError("--poll-interval must be positive")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.workers > 1 and self.port == 0:
            raise ValueError("--workers above 1 need a fixed --port to share")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--auth-token-file", self.auth_token_file),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
