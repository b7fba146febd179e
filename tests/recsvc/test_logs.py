"""JSON-lines logs at the level they are given, and keyed pseudonyms for customer ids."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsvc.logs import Pseudonymizer, configure_logging


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, put back as it was (pytest's capture handlers included)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_level_is_the_argument_not_the_environment(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSVC_LOG_LEVEL", "DEBUG")
    configure_logging("warning")
    assert root_logger.level == logging.WARNING


def test_a_record_is_one_json_line(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO")
    logging.getLogger("recsvc.test").info("served", extra={"version": "v1"})
    logging.getLogger("recsvc.test").debug("below the level")
    (line,) = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["msg"], entry["version"]) == (
        "info",
        "recsvc.test",
        "served",
        "v1",
    )


def test_pseudonyms_join_a_customer_without_the_id() -> None:
    p, other = Pseudonymizer(b"k1"), Pseudonymizer(b"k2")
    assert p("C00000001") == p("C00000001") != p("C00000002")
    assert p("C00000001") != other("C00000001") and "C00000001" not in p("C00000001")
    assert p("") == "anonymous"


@given(st.binary(min_size=1, max_size=200), st.text(min_size=1, max_size=40))
def test_a_pseudonym_is_hmac_sha256_of_the_id(key: bytes, user_id: str) -> None:
    # The pseudonym is a published construction (audit find and the trainer's exports
    # compute it too): keys past sha256's 64-byte block are hashed first, as RFC 2104 says.
    raw = user_id.encode("utf-8", "surrogatepass")
    expected = "u_" + hmac.new(key, raw, hashlib.sha256).hexdigest()[:16]
    assert Pseudonymizer(key)(user_id) == expected
