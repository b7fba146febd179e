"""Structured (JSON-lines) logging, and keyed pseudonyms for customer ids.

Customer ids never reach a log: code logs ``pseudonym(user_id)``, an HMAC-SHA256
under a configured key, so one customer's lines can be joined without the id.
"""

from __future__ import annotations

import hashlib
import hmac
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


class Pseudonymizer:
    """Keyed pseudonyms of customer ids for logs.

    Example:
        >>> p = Pseudonymizer(b"secret")
        >>> p("C00000001") == p("C00000001"), "C00000001" in p("C00000001")
        (True, False)
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, user_id: str) -> str:
        if not user_id:
            return "anonymous"
        digest = hmac.new(self._key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return "u_" + digest.hexdigest()[:16]
