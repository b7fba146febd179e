"""The record format: every byte under its own hash, payloads named once, no raw ids."""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsvc.audit.record import (
    GENESIS,
    Members,
    answer_payload,
    audience_payload,
    audience_sha256,
    chains,
    encode_answer,
    encode_payload,
    encode_record,
    parse_record,
    segment_name,
    worker_folder,
)
from tests.recsvc.audit.helpers import an_answer

WHEN = datetime(2026, 11, 28, 5, 12, tzinfo=timezone.utc)


def _line(seq: int = 7, payload: dict[str, object] | None = None) -> bytes:
    line, _ = encode_record(seq, GENESIS, WHEN, "answer", encode_payload(payload or an_answer(1)))
    return line


def test_a_record_is_one_json_line_whose_hash_covers_the_rest() -> None:
    line = _line()
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert list(record)[:5] == ["v", "seq", "prev", "time", "kind"] and list(record)[-1] == "hash"
    assert record["v"] == 1 and record["seq"] == 7 and record["prev"] == GENESIS
    assert record["time"] == "2026-11-28T05:12:00.000000+00:00"
    payload = [k for k in record if k not in ("v", "seq", "prev", "time", "kind", "hash")]
    assert payload == sorted(payload)
    body = line[: line.rindex(b',"hash"')] + b"}"
    assert hashlib.sha256(body).hexdigest() == record["hash"]
    head = parse_record(line[:-1])
    assert head is not None and (head.seq, head.hash, head.kind) == (7, record["hash"], "answer")


@given(st.data())
def test_any_changed_byte_breaks_the_record(data: st.DataObject) -> None:
    line = _line()[:-1]
    pos = data.draw(st.integers(0, len(line) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != line[pos]))
    assert parse_record(line[:pos] + bytes([byte]) + line[pos + 1 :]) is None


def test_an_empty_payload_and_odd_text_still_make_one_line() -> None:
    line, _ = encode_record(0, GENESIS, WHEN, "start", encode_payload({}))
    assert parse_record(line[:-1]) is not None
    odd = _line(payload={"note": 'a\nb"c\u202e\x00é'})
    assert odd.count(b"\n") == 1 and odd.isascii()
    assert json.loads(odd)["note"] == 'a\nb"c\u202e\x00é'


def test_payloads_may_not_shadow_the_envelope_or_hold_non_json() -> None:
    with pytest.raises(ValueError, match="may not set hash, prev"):
        encode_payload({"prev": "x", "hash": "y"})
    with pytest.raises(ValueError):
        encode_payload({"score": float("inf")})


@pytest.mark.parametrize("subject", ["C00000042", "", "u_0123", "U_0123456789ABCDEF"])
def test_an_answer_names_its_customer_by_pseudonym_only(subject: str) -> None:
    with pytest.raises(ValueError, match="pseudonym"):
        an_answer(1, subject=subject)


def test_the_suitability_basis_is_one_of_three() -> None:
    fields = an_answer(1)
    assert fields["suitability"] == {"tolerance": 3, "basis": "bundle"}
    with pytest.raises(ValueError, match="basis must be one of"):
        answer_payload(**{**_answer_args(), "basis": "guess"})


def _answer_args() -> dict[str, object]:
    return {
        "recommendation_id": "ab" * 16,
        "method": "SimilarItems",
        "caller": None,
        "subject": "anonymous",
        "model_version": "v1",
        "state_sequence": 0,
        "source": None,
        "tolerance": 1,
        "basis": "default",
        "removed": {},
        "items": [],
    }


_ids = st.text(st.characters(codec="utf-8"), max_size=12)
_answers = st.fixed_dictionaries(
    {
        "recommendation_id": st.text("0123456789abcdef", min_size=32, max_size=32),
        "method": st.sampled_from(["Recommend", "SimilarItems", "RankItems"]),
        "caller": st.none() | _ids,
        "subject": st.just("anonymous")
        | st.text("0123456789abcdef", min_size=16, max_size=16).map(lambda h: "u_" + h),
        "model_version": _ids,
        "state_sequence": st.integers(0, 2**63 - 1),
        "source": st.none() | st.sampled_from(["PERSONALIZED", "FOLD_IN", "POPULAR"]),
        "tolerance": st.integers(1, 5),
        "basis": st.sampled_from(["bundle", "live", "default"]),
        "removed": st.dictionaries(_ids, st.integers(0, 10**7), max_size=5),
        "items": st.lists(
            st.tuples(_ids, st.floats(width=32, allow_nan=False, allow_infinity=False)),
            max_size=12,
        ),
    }
)


@given(_answers)
def test_the_serving_paths_encoding_is_the_payloads(fields: dict[str, object]) -> None:
    fast = encode_answer(**fields)  # type: ignore[arg-type]
    slow = encode_payload(answer_payload(**fields))  # type: ignore[arg-type]
    assert fast.isascii() and json.loads(fast) == json.loads(slow)
    assert list(json.loads(fast)) == sorted(json.loads(fast))
    line, _ = encode_record(3, GENESIS, WHEN, "answer", fast)
    assert parse_record(line[:-1]) is not None


@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=10))
def test_scores_are_recorded_as_sent_in_at_most_nine_digits(scores: list[float]) -> None:
    fields = {**_answer_args(), "items": [(f"SAV-{i:06d}", s) for i, s in enumerate(scores)]}
    recorded = json.loads(encode_answer(**fields))["items"]  # type: ignore[arg-type]
    sent = np.array(scores, dtype=np.float32)  # protobuf float: what the client got
    assert np.array_equal(np.array([s for _, s in recorded], dtype=np.float32), sent)
    text = encode_answer(**fields)  # type: ignore[arg-type]
    texts = re.findall(r",(-?[0-9.e+-]+)\]", text.split('"method"')[0])
    assert len(texts) == len(scores)
    mantissas = [t.split("e")[0].replace("-", "").replace(".", "") for t in texts]
    assert all(len(m.strip("0")) <= 9 for m in mantissas)  # significant digits
    # and no longer than the shortest decimal that names the float (what numpy writes)
    shortest = [str(np.float32(s)).split("e")[0].replace("-", "").replace(".", "") for s in scores]
    assert [len(m.strip("0")) for m in mantissas] == [len(m.strip("0")) for m in shortest]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_score_that_is_not_finite_is_refused(bad: float) -> None:
    fields = {**_answer_args(), "items": [("SAV-000001", bad)]}
    with pytest.raises(ValueError, match="finite"):
        encode_answer(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        answer_payload(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pseudonym"):
        encode_answer(**{**_answer_args(), "subject": "C00000042"})  # type: ignore[arg-type]


def test_an_audience_is_recorded_by_size_and_hash() -> None:
    ids = ["C1", "C2", "C3"]
    assert audience_sha256(ids) == hashlib.sha256(b"C1\nC2\nC3\n").hexdigest()
    assert audience_sha256(ids) != audience_sha256(ids[::-1])  # the order counts
    payload = audience_payload(
        recommendation_id="cd" * 16,
        caller="crm",
        model_version="v1",
        state_sequence=9,
        campaign_id="spring-savings",
        channel="email",
        request={"item_ids": ["SAV-000002"], "audience_size": 3},
        consent=True,
        excluded={"no_consent": 5, "unsuitable": 2, "holders": 1, "below_min_score": 0},
        audience_size=len(ids),
        audience_sha256=audience_sha256(ids),
    )
    assert payload == {
        "recommendation_id": "cd" * 16,
        "method": "TargetUsers",
        "caller": "crm",
        "model_version": "v1",
        "state_sequence": 9,
        "subject": None,
        "campaign_id": "spring-savings",
        "channel": "email",
        "request": {"item_ids": ["SAV-000002"], "audience_size": 3},
        "consent": True,
        "excluded": {"no_consent": 5, "unsuitable": 2, "holders": 1, "below_min_score": 0},
        "audience_size": 3,
        "audience_sha256": hashlib.sha256(b"C1\nC2\nC3\n").hexdigest(),
    }
    assert "C1" not in encode_payload(payload)


def test_segment_names_sort_by_first_record() -> None:
    names = [segment_name(seq, WHEN - timedelta(hours=seq)) for seq in (0, 9, 10, 1_000_000)]
    assert names == sorted(names)
    assert names[0] == "audit-000000000000-20261128T051200.000000Z.jsonl"


def test_an_audience_hash_is_each_id_in_order_with_a_newline() -> None:
    ids = ["C1", "é", "\udc80"]  # a lone surrogate, as a gRPC string can carry
    raw = b"C1\n" + "é".encode() + b"\n" + b"\xed\xb2\x80\n"
    assert audience_sha256(ids) == hashlib.sha256(raw).hexdigest()
    assert audience_sha256([]) == hashlib.sha256(b"").hexdigest()


def test_chains_are_the_folders_own_then_each_worker_in_number_order(tmp_path: Path) -> None:
    for n in (10, 2, 0):
        worker_folder(tmp_path, n).mkdir()
    assert worker_folder(tmp_path, 3) == tmp_path / "worker-3"
    (tmp_path / "notes").mkdir()  # not a worker's
    (tmp_path / "worker-9").write_text("a file, not a chain")
    workers = [tmp_path / f"worker-{n}" for n in (0, 2, 10)]
    assert chains(tmp_path) == workers
    (tmp_path / segment_name(0, datetime(2026, 12, 1, tzinfo=timezone.utc))).write_text("")
    assert chains(tmp_path) == [tmp_path, *workers]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert chains(empty) == [empty]


def test_a_segment_is_named_in_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        created = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5)))
        assert segment_name(42, created) == "audit-000000000042-20261201T170000.123456Z.jsonl"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_an_empty_payload_makes_a_record_of_the_envelope_alone() -> None:
    line, digest = encode_record(
        0, GENESIS, datetime(2026, 12, 1, tzinfo=timezone.utc), "start", Members("{}")
    )
    record = json.loads(line)
    assert list(record) == ["v", "seq", "prev", "time", "kind", "hash"] and record["hash"] == digest


def test_removed_counts_in_any_mapping_are_recorded_as_a_dict() -> None:
    args: dict[str, Any] = {
        "recommendation_id": "ef" * 16,
        "method": "Recommend",
        "caller": None,
        "subject": "u_0123456789abcdef",
        "model_version": "v20261128-051200-123456",
        "state_sequence": 3,
        "source": "FOLD_IN",
        "tolerance": 4,
        "basis": "live",
        "removed": MappingProxyType({"unsuitable": 1, "inactive": 2}),
        "items": [("SAV-000001", 0.5), ("CC-000002", 0.25)],
    }
    assert encode_answer(**args) == encode_payload(answer_payload(**args))
    # Ids orjson refuses (a lone surrogate) go the json way, to the same members.
    odd = {**args, "items": [("\udc80", 0.5)]}
    assert encode_answer(**odd) == encode_payload(answer_payload(**odd))
    with pytest.raises(ValueError) as err:
        encode_answer(**{**args, "subject": "C00000001"})
    assert str(err.value) == "audit subject must be a keyed pseudonym (Pseudonymizer), not an id"
