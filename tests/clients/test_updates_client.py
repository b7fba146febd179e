"""UpdatesClient builds the requests the API means and reads its answers whole.

Against the in-test server (see conftest): it records each request as received.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from recsvc_client import CustomerUpdate, ErasureReceipt, Event, ProductUpdate, UpdatesClient
from recsvc_client.answers import RecordResult, UpdateResult

from recsvc.v1 import updates_pb2
from tests.clients.conftest import Script

CET = timezone(timedelta(hours=1))


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _client(script: Script) -> UpdatesClient:
    return UpdatesClient(f"localhost:{script.port}", timeout=5)


def test_record_events_sends_every_field_and_leaves_unset_ones_unset(scripted: Script) -> None:
    scripted.answers["RecordEvents"] = updates_pb2.RecordEventsResponse(
        recorded=1, duplicates=["e0"], sequence=42, unknown_items=1, dropped_forgotten=3
    )
    when = datetime(2026, 3, 1, 9, 30, tzinfo=CET)
    events = [
        Event(
            "e1", "C1", "CC-1", "purchase", time=when, weight=0.0, campaign_id="k", channel="sms"
        ),
        Event("e0", "C2", "MF-2", "view"),
    ]
    with _client(scripted) as client:
        result = client.record_events(events)
    assert result == RecordResult(
        recorded=1, duplicates=("e0",), sequence=42, unknown_items=1, dropped_forgotten=3
    )
    sent = scripted.requests["RecordEvents"]
    assert isinstance(sent, updates_pb2.RecordEventsRequest)
    first, second = sent.events
    assert (first.event_id, first.user_id, first.item_id, first.type) == (
        "e1",
        "C1",
        "CC-1",
        "purchase",
    )
    assert first.time.ToDatetime(timezone.utc) == datetime(2026, 3, 1, 8, 30, tzinfo=timezone.utc)
    assert first.HasField("weight") and first.weight == 0.0  # zero is a weight, not "unset"
    assert (first.campaign_id, first.channel) == ("k", "sms")
    assert not second.HasField("time") and not second.HasField("weight")


def test_a_naive_event_time_is_refused_before_any_call() -> None:
    with pytest.raises(ValueError, match=r"Event 'e1' time: a naive datetime"):
        Event("e1", "C1", "CC-1", "view", time=datetime(2026, 3, 1, 9, 30))


def test_customer_and_product_updates_send_false_but_not_none(scripted: Script) -> None:
    scripted.answers["UpdateCustomers"] = updates_pb2.UpdateCustomersResponse(updated=2, sequence=5)
    scripted.answers["UpdateProducts"] = updates_pb2.UpdateProductsResponse(updated=1, sequence=6)
    with _client(scripted) as client:
        customers = client.update_customers(
            [CustomerUpdate("C1", marketing_consent=False), CustomerUpdate("C2", risk_tolerance=4)]
        )
        products = client.update_products([ProductUpdate("CC-1", active=False, risk_level=2)])
    assert customers == UpdateResult(updated=2, sequence=5)
    assert products == UpdateResult(updated=1, sequence=6)
    c1, c2 = scripted.requests["UpdateCustomers"].customers  # type: ignore[attr-defined]
    assert c1.HasField("marketing_consent") and c1.marketing_consent is False
    assert not c1.HasField("risk_tolerance")
    assert c2.risk_tolerance == 4 and not c2.HasField("marketing_consent")
    (p,) = scripted.requests["UpdateProducts"].products  # type: ignore[attr-defined]
    assert p.HasField("active") and p.active is False and p.risk_level == 2


def test_erasure_receipts_read_whole_with_unset_times_as_none(scripted: Script) -> None:
    received = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
    pb = updates_pb2.ErasureReceipt(
        receipt_id="r-1",
        reference="CASE-9",
        subject="u_0123456789abcdef",
        received_at=_ts(received),
        effective_at=_ts(received + timedelta(seconds=1)),
        sequence=12,
        events_deleted=30,
        profile_deleted=True,
        bundles_holding=2,
        note="backups are out of scope",
    )
    scripted.answers["ForgetCustomer"] = scripted.answers["GetErasureReceipt"] = pb
    expected = ErasureReceipt(
        receipt_id="r-1",
        reference="CASE-9",
        subject="u_0123456789abcdef",
        received_at=received,
        effective_at=received + timedelta(seconds=1),
        sequence=12,
        events_deleted=30,
        profile_deleted=True,
        bundles_holding=2,
        complete=False,
        completed_at=None,
        note="backups are out of scope",
    )
    with _client(scripted) as client:
        assert client.forget_customer("C1", "CASE-9") == expected
        assert client.erasure_receipt("r-1") == expected
    forget = scripted.requests["ForgetCustomer"]
    assert (forget.user_id, forget.reference) == ("C1", "CASE-9")  # type: ignore[attr-defined]
    assert scripted.requests["GetErasureReceipt"].receipt_id == "r-1"  # type: ignore[attr-defined]
