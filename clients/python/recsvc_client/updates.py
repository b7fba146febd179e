"""``UpdatesClient``: the write path of the live customer state (``recsvc.v1.Updates``).

Every write answers with a state ``sequence``; pass it as ``min_sequence`` to a
``RecommenderClient`` call to read your own write. A batch is checked whole by the
server: one bad field and nothing of it is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from recsvc_client._proto import timestamp, to_datetime, updates_pb2, updates_pb2_grpc
from recsvc_client.answers import ErasureReceipt, RecordResult, UpdateResult
from recsvc_client.channel import ServiceClient

__all__ = ["CustomerUpdate", "Event", "ProductUpdate", "UpdatesClient"]


@dataclass(frozen=True)
class Event:
    """A customer event: a view, click, apply, purchase, hold, close, decline, contact ...

    ``event_id`` is the idempotency key (at most 128 characters): a retried event
    with a known id is never counted twice. ``time`` must be timezone-aware (None:
    the server's receive time); ``weight`` None takes the model's weight for ``type``.
    """

    event_id: str
    user_id: str
    item_id: str
    type: str
    time: datetime | None = None
    weight: float | None = None
    campaign_id: str = ""
    channel: str = ""

    def __post_init__(self) -> None:
        if self.time is not None:
            try:
                timestamp(self.time)
            except ValueError as exc:
                raise ValueError(f"Event {self.event_id!r} time: {exc}") from exc


@dataclass(frozen=True)
class CustomerUpdate:
    """A customer's risk tolerance (1..5) or marketing consent; None leaves it as it is."""

    user_id: str
    risk_tolerance: int | None = None
    marketing_consent: bool | None = None


@dataclass(frozen=True)
class ProductUpdate:
    """A product withdrawn (``active=False``) or given a new risk level (1..5)."""

    item_id: str
    active: bool | None = None
    risk_level: int | None = None


class UpdatesClient(ServiceClient):
    """Record events, update customers and products, erase customers.

    RecordEvents, UpdateCustomers, UpdateProducts and GetErasureReceipt are retried
    on UNAVAILABLE (see ``Retries``); ForgetCustomer is not, since a second attempt
    issues a second receipt: on ``Unavailable`` or ``DeadlineExceeded`` the erasure
    may or may not have happened, and calling again makes sure, at the price of a
    second receipt.
    """

    _stub_type = updates_pb2_grpc.UpdatesStub

    def record_events(self, events: Sequence[Event]) -> RecordResult:
        """Store 1 to 1,000 events (those with a known ``event_id`` are not stored again)."""
        request = updates_pb2.RecordEventsRequest(events=[_event(e) for e in events])
        resp: updates_pb2.RecordEventsResponse = self._call(self._stub.RecordEvents, request)
        return RecordResult(
            recorded=resp.recorded,
            duplicates=tuple(resp.duplicates),
            sequence=resp.sequence,
            unknown_items=resp.unknown_items,
            dropped_forgotten=resp.dropped_forgotten,
        )

    def update_customers(self, customers: Sequence[CustomerUpdate]) -> UpdateResult:
        """Set 1 to 1,000 customers' risk tolerance or consent (unknown ones are created)."""
        request = updates_pb2.UpdateCustomersRequest(customers=[_customer(c) for c in customers])
        resp: updates_pb2.UpdateCustomersResponse = self._call(self._stub.UpdateCustomers, request)
        return UpdateResult(updated=resp.updated, sequence=resp.sequence)

    def update_products(self, products: Sequence[ProductUpdate]) -> UpdateResult:
        """Withdraw 1 to 1,000 products from sale, or change their risk level."""
        request = updates_pb2.UpdateProductsRequest(products=[_product(p) for p in products])
        resp: updates_pb2.UpdateProductsResponse = self._call(self._stub.UpdateProducts, request)
        return UpdateResult(updated=resp.updated, sequence=resp.sequence)

    def forget_customer(self, user_id: str, reference: str) -> ErasureReceipt:
        """Erase a customer (GDPR Art. 17) under the bank's case ``reference``; never retried."""
        request = updates_pb2.ForgetCustomerRequest(user_id=user_id, reference=reference)
        return _receipt(self._call(self._stub.ForgetCustomer, request))

    def erasure_receipt(self, receipt_id: str) -> ErasureReceipt:
        """Read an erasure receipt again, e.g. to see whether it is complete."""
        request = updates_pb2.GetErasureReceiptRequest(receipt_id=receipt_id)
        return _receipt(self._call(self._stub.GetErasureReceipt, request))


def _event(e: Event) -> updates_pb2.Event:
    return updates_pb2.Event(
        event_id=e.event_id,
        user_id=e.user_id,
        item_id=e.item_id,
        type=e.type,
        time=None if e.time is None else timestamp(e.time),
        weight=e.weight,
        campaign_id=e.campaign_id,
        channel=e.channel,
    )


# Unset optional fields stay unset (None); the bools are set apart, since the
# generated stubs type a bool argument as never None.
def _customer(c: CustomerUpdate) -> updates_pb2.CustomerUpdate:
    message = updates_pb2.CustomerUpdate(user_id=c.user_id, risk_tolerance=c.risk_tolerance)
    if c.marketing_consent is not None:
        message.marketing_consent = c.marketing_consent
    return message


def _product(p: ProductUpdate) -> updates_pb2.ProductUpdate:
    message = updates_pb2.ProductUpdate(item_id=p.item_id, risk_level=p.risk_level)
    if p.active is not None:
        message.active = p.active
    return message


def _receipt(r: updates_pb2.ErasureReceipt) -> ErasureReceipt:
    return ErasureReceipt(
        receipt_id=r.receipt_id,
        reference=r.reference,
        subject=r.subject,
        received_at=to_datetime(r, "received_at"),
        effective_at=to_datetime(r, "effective_at"),
        sequence=r.sequence,
        events_deleted=r.events_deleted,
        profile_deleted=r.profile_deleted,
        bundles_holding=r.bundles_holding,
        complete=r.complete,
        completed_at=to_datetime(r, "completed_at"),
        note=r.note,
    )
