"""The gRPC edge of the write path: protobuf in, checked batches to the writer, receipts out.

Every call runs its transaction in a worker thread (a durable commit waits on the
disk), then answers; errors map to status codes through the Recommender edge's table.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from recsvc.errors import PreconditionFailed
from recsvc.serving.service import Context, edge
from recsvc.serving.writer import RECEIPT_NOTE, StateWriter
from recsvc.state.base import CustomerUpdate, Event, ProductUpdate, Receipt
from recsvc.v1 import updates_pb2 as _pb
from recsvc.v1 import updates_pb2_grpc as _pb_grpc

__all__ = ["UpdatesService"]


def _stamp(t: datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def _receipt(r: Receipt) -> _pb.ErasureReceipt:
    return _pb.ErasureReceipt(
        receipt_id=r.receipt_id,
        reference=r.reference,
        subject=r.subject,
        received_at=_stamp(r.received_at),
        effective_at=_stamp(r.effective_at),
        sequence=r.sequence,
        events_deleted=r.events_deleted,
        profile_deleted=r.profile_deleted,
        bundles_holding=r.bundles_holding,
        complete=r.complete,
        completed_at=_stamp(r.completed_at),
        note=RECEIPT_NOTE,
    )


def _event(e: _pb.Event, received: datetime) -> Event:
    return Event(
        event_id=e.event_id,
        user_id=e.user_id,
        item_id=e.item_id,
        type=e.type,
        time=e.time.ToDatetime(tzinfo=timezone.utc) if e.HasField("time") else received,
        weight=e.weight if e.HasField("weight") else None,
        campaign_id=e.campaign_id,
        channel=e.channel,
    )


class UpdatesService(_pb_grpc.UpdatesServicer):
    """Thin servicer over :class:`recsvc.state.writer.StateWriter` (None: no state store)."""

    def __init__(self, writer: StateWriter | None) -> None:
        self._writer = writer
        self.stats: Counter[tuple[str, str]] = Counter()
        """Answers by (method, status code name), for tests and diagnostics."""

    def _require(self) -> StateWriter:
        if self._writer is None:
            raise PreconditionFailed(
                "this server has no state store: start it with --state URL to accept updates"
            )
        return self._writer

    @edge
    async def RecordEvents(
        self, request: _pb.RecordEventsRequest, context: Context
    ) -> _pb.RecordEventsResponse:
        writer = self._require()
        received = datetime.now(timezone.utc)
        events = [_event(e, received) for e in request.events]
        done = await asyncio.to_thread(writer.record_events, events)
        r = done.result
        return _pb.RecordEventsResponse(
            recorded=r.recorded,
            duplicates=list(r.duplicates),
            sequence=r.sequence,
            unknown_items=done.unknown_items,
            dropped_forgotten=r.dropped_forgotten,
        )

    @edge
    async def UpdateCustomers(
        self, request: _pb.UpdateCustomersRequest, context: Context
    ) -> _pb.UpdateCustomersResponse:
        writer = self._require()
        updates = [
            CustomerUpdate(
                user_id=c.user_id,
                risk_tolerance=c.risk_tolerance if c.HasField("risk_tolerance") else None,
                marketing_consent=c.marketing_consent if c.HasField("marketing_consent") else None,
            )
            for c in request.customers
        ]
        r = await asyncio.to_thread(writer.update_customers, updates)
        return _pb.UpdateCustomersResponse(updated=r.updated, sequence=r.sequence)

    @edge
    async def UpdateProducts(
        self, request: _pb.UpdateProductsRequest, context: Context
    ) -> _pb.UpdateProductsResponse:
        writer = self._require()
        updates = [
            ProductUpdate(
                item_id=p.item_id,
                active=p.active if p.HasField("active") else None,
                risk_level=p.risk_level if p.HasField("risk_level") else None,
            )
            for p in request.products
        ]
        r = await asyncio.to_thread(writer.update_products, updates)
        return _pb.UpdateProductsResponse(updated=r.updated, sequence=r.sequence)

    @edge
    async def ForgetCustomer(
        self, request: _pb.ForgetCustomerRequest, context: Context
    ) -> _pb.ErasureReceipt:
        writer = self._require()
        return _receipt(await asyncio.to_thread(writer.forget, request.user_id, request.reference))

    @edge
    async def GetErasureReceipt(
        self, request: _pb.GetErasureReceiptRequest, context: Context
    ) -> _pb.ErasureReceipt:
        writer = self._require()
        return _receipt(await asyncio.to_thread(writer.receipt, request.receipt_id))
