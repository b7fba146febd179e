"""Structured (JSON-lines) logging, and keyed pseudonyms for customer ids.

Customer ids never reach a log: code logs ``pseudonym(user_id)``, an HMAC-SHA256
under a configured key, so one customer's lines can be joined without the id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

__all__ = ["JsonFormatter", "Pseudonymizer", "configure_logging"]

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr at ``level`` (a name: ``"INFO"``, ``"debug"``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # faiss announces each CPU-feature library it tries at INFO; that is noise here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


_BLOCK = 64  # sha256's block size in bytes
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class Pseudonymizer:
    """Keyed pseudonyms of customer ids for logs.

    Example:
        >>> p = Pseudonymizer(b"secret")
        >>> p("C00000001") == p("C00000001"), "C00000001" in p("C00000001")
        (True, False)
    """

    def __init__(self, key: bytes) -> None:
        # HMAC-SHA256 (RFC 2104) with its two keyed states computed once: each call then
        # costs two sha256 copies, where hmac.new sets up an object (3 to 4 times as long;
        # on the serving path, with an audit record per answer, it is paid per answer).
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def __call__(self, user_id: str) -> str:
        if not user_id:
            return "anonymous"
        inner = self._inner.copy()
        inner.update(user_id.encode("utf-8", "surrogatepass"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return "u_" + outer.hexdigest()[:16]
