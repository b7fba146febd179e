"""Typed server settings, declared once.

Each :class:`ServerSettings` field declares its help and how text becomes its value;
its flag and its ``RECSVC_*`` variable follow from its name (``poll_interval``:
``--poll-interval`` and ``RECSVC_POLL_INTERVAL``). Defaults, then the environment,
then flags; an empty variable counts as unset.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from recsvc.audit.log import SYNC_MODES

__all__ = ["EXCLUSIVE_CATEGORIES", "SETTINGS", "ServerSettings", "Setting", "parse_switch"]

EXCLUSIVE_CATEGORIES = ("current_account", "mortgage", "pension")
"""The default exclusive categories (the sample bank's names): see ``exclusive_categories``."""

_PREFIX = "RECSVC_"


def parse_switch(text: str) -> bool:
    """A yes/no word (1, true, yes, on; 0, false, no, off) as a bool."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1, true, yes, on or 0, false, no, off; got {text!r}")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if not isinstance(logging.getLevelName(level), int):  # a known name maps to its number
        raise ValueError(f"{text!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


def _audit_sync(text: str) -> str:
    mode = text.strip().lower()
    if mode not in SYNC_MODES:
        raise ValueError(f"expected {' or '.join(SYNC_MODES)}, got {text!r}")
    return mode


def _names(text: str) -> tuple[str, ...]:
    """Names separated by commas, each once, in the order given; ``none`` for no names."""
    if text.strip().lower() == "none":
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",")))
    if "" in names:
        raise ValueError(f"expected names separated by commas, or none; got {text!r}")
    return names


def _declare(text: str, parse: Callable[[str], Any] = str) -> dict[str, Any]:
    """A field's metadata: its help, and how its flag's or variable's text is parsed."""
    return {"help": text, "parse": parse}


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``recsvc serve`` needs; built once, passed down.

    Example:
        >>> ServerSettings(models=Path("var/models"), port=0, poll_interval=0.2).port
        0
    """

    models: Path = field(metadata=_declare("bundle folder: <version>/ subfolders and LATEST", Path))
    host: str = field(default="localhost", metadata=_declare("address to listen on"))
    port: int = field(default=50051, metadata=_declare("port; 0 picks a free one", int))
    poll_interval: float = field(
        default=5.0, metadata=_declare("seconds between looks at MODELS/LATEST", float)
    )
    workers: int = field(
        default=1, metadata=_declare("server processes sharing the port (SO_REUSEPORT)", int)
    )
    max_concurrent_rpcs: int = field(
        default=256,
        metadata=_declare("RPCs in flight beyond which new ones get RESOURCE_EXHAUSTED", int),
    )
    max_message_bytes: int = field(
        default=4 * 1024 * 1024, metadata=_declare("largest message received or sent", int)
    )
    grace_seconds: float = field(
        default=10.0, metadata=_declare("how long SIGTERM waits for in-flight RPCs", float)
    )
    metrics_port: int | None = field(
        default=None,
        metadata=_declare(
            "serve Prometheus metrics over HTTP on this port, at /metrics on --host "
            "(0 picks a free one; with --workers, one port for all of them)",
            int,
        ),
    )
    pseudonym_key: bytes = field(
        default_factory=lambda: secrets.token_bytes(32),
        repr=False,
        metadata=_declare(
            "HMAC key for customer ids in logs, random per process when unset; prefer the "
            "variable, since a flag shows in process listings",
            str.encode,
        ),
    )
    trial_in_child: bool = field(
        default=True,
        metadata=_declare(
            "parse each new version in a throwaway child process before loading it here",
            parse_switch,
        ),
    )
    no_consent_data: bool = field(
        default=False,
        metadata=_declare(
            "allow TargetUsers on data without a users table (no consent requirement)", parse_switch
        ),
    )
    state: str | None = field(
        default=None,
        metadata=_declare(
            "live state store: sqlite:///PATH (embedded) or postgresql://... (shared by "
            "several servers); needs RECSVC_PSEUDONYM_KEY"
        ),
    )
    exclusive_categories: tuple[str, ...] = field(
        default=EXCLUSIVE_CATEGORIES,
        metadata=_declare(
            "product categories (comma-separated, or none) of which a customer who holds "
            "one product is offered no other",
            _names,
        ),
    )
    contact_policy: Path | None = field(
        default=None,
        metadata=_declare(
            "contact policy file (JSON): contact caps and "
            "decline cooldowns; absent, the documented defaults apply",
            Path,
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=_declare("DEBUG, INFO, WARNING, ERROR or CRITICAL", _log_level),
    )
    auth_token_file: Path | None = field(
        default=None, metadata=_declare("bearer token every RPC must carry (a file)", Path)
    )
    auth_tokens: Path | None = field(
        default=None,
        metadata=_declare("JSON file of named tokens, each with its scopes (owner-only)", Path),
    )
    audit_dir: Path | None = field(
        default=None,
        metadata=_declare("folder of the audit trail: one hash-chained record per answer", Path),
    )
    audit_sync: str = field(
        default="group",
        metadata=_declare(
            "group: fsync audit records in groups, each on disk within 100 ms; always: "
            "fsync each before its answer is sent",
            _audit_sync,
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=_declare("server certificate: serve TLS (with --tls-key)", Path)
    )
    tls_key: Path | None = field(default=None, metadata=_declare("server private key", Path))
    tls_client_ca: Path | None = field(
        default=None, metadata=_declare("CA that client certificates must chain to (mTLS)", Path)
    )

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """Give ``parser`` every setting's flag; a flag not given parses as None."""
        for setting in SETTINGS.values():
            setting.add_flag(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        """From flags that ``add_flags`` declared, over the environment."""
        return cls.from_env(**{name: getattr(args, name) for name in SETTINGS})

    @classmethod
    def from_env(cls, **given: object) -> ServerSettings:
        """Defaults, then ``RECSVC_*`` variables, then ``given`` values that are not None."""
        unknown = set(given) - set(SETTINGS)
        if unknown:
            raise TypeError(f"no such setting: {', '.join(sorted(unknown))}")
        values = {name: s.resolve(given.get(name), os.environ) for name, s in SETTINGS.items()}
        if values["models"] is None:
            raise ValueError("no model folder: pass --models or set RECSVC_MODELS")
        if values["state"] is not None and values["pseudonym_key"] is None:
            # Tombstones and receipts are keyed pseudonyms: a random key would orphan them.
            raise ValueError(
                "--state needs RECSVC_PSEUDONYM_KEY (the key of the erasure tombstones and "
                "receipts, the same on every server and across restarts)"
            )
        if values["audit_dir"] is not None and values["pseudonym_key"] is None:
            raise ValueError(
                "--audit-dir needs a fixed --pseudonym-key (RECSVC_PSEUDONYM_KEY): under a "
                "random key no one could find a customer's audit records"
            )
        settings = cls(**{k: v for k, v in values.items() if v is not None})
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
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be 0..65535, got {self.metrics_port}")
        if self.metrics_port == self.port != 0:
            raise ValueError(f"--metrics-port and --port must differ, both are {self.port}")
        _log_level(self.log_level)  # raises for a name given in code rather than parsed
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        files = ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "auth_tokens")
        for name in (*files, "contact_policy"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{SETTINGS[name].flag} {path}: no such file")
        if self.auth_tokens is not None:
            if self.auth_token_file is not None:
                raise ValueError("--auth-tokens and --auth-token-file: give one")
            from recsvc.serving.auth import read_tokens  # grpc, only where tokens are given

            read_tokens(self.auth_tokens)  # a bad file stops start-up here, not in a worker
        _audit_sync(self.audit_sync)
        if self.audit_dir is not None and self.audit_dir.exists() and not self.audit_dir.is_dir():
            raise ValueError(f"--audit-dir {self.audit_dir}: not a folder")


@dataclass(frozen=True)
class Setting:
    """One setting as the command line and the environment give it.

    Example:
        >>> s = SETTINGS["poll_interval"]
        >>> s.flag, s.variable, s.parse("2.5")
        ('--poll-interval', 'RECSVC_POLL_INTERVAL', 2.5)
    """

    name: str
    help: str
    parse: Callable[[str], Any]
    default: Any = None
    """None where the field has none (or a factory)."""

    @property
    def is_switch(self) -> bool:
        return self.parse is parse_switch

    @property
    def flag(self) -> str:
        """``--name``; for a switch on by default, ``--no-name`` (a switch's flag flips it)."""
        stem = self.name.replace("_", "-")
        return f"--no-{stem}" if self.is_switch and self.default else f"--{stem}"

    @property
    def variable(self) -> str:
        return _PREFIX + self.name.upper()

    def add_flag(self, parser: argparse.ArgumentParser) -> None:
        if self.is_switch:
            set_to = not self.default
            text = f"{'' if set_to else 'turn off: '}{self.help} [{self.variable}={int(set_to)}]"
            parser.add_argument(
                self.flag, dest=self.name, action="store_const", const=set_to, help=text
            )
        else:
            text = f"{self.help} [{self.variable}]"
            parser.add_argument(self.flag, dest=self.name, type=self._parse_flag, help=text)

    def _parse_flag(self, text: str) -> Any:
        try:
            return self.parse(text)
        except ValueError as exc:  # argparse would say only "invalid value"
            raise argparse.ArgumentTypeError(str(exc)) from exc

    def resolve(self, given: Any, environ: Mapping[str, str]) -> Any:
        """``given`` (a flag's value) unless None, else the variable's, else the default."""
        if given is not None:
            return given
        text = environ.get(self.variable, "")
        if not text:
            return self.default
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ValueError(f"{self.variable}: {exc}") from exc


SETTINGS: Mapping[str, Setting] = MappingProxyType(
    {
        f.name: Setting(
            f.name,
            f.metadata["help"],
            f.metadata["parse"],
            None if f.default is MISSING else f.default,
        )
        for f in fields(ServerSettings)
    }
)
"""Every setting of :class:`ServerSettings`, by field name."""
