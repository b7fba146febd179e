"""The write path's data plane: checked batches into the state store, receipts out.

Knows nothing of gRPC (``recsvc.serving.updates`` is its edge). Every call checks its
batch whole (``recsvc.state.batches``), then writes it in one durable transaction;
the caller is answered only after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsvc.errors import InvalidArgument, NotFound
from recsvc.model.bundle import list_versions
from recsvc.model.manifest import FILES
from recsvc.model.vocab import Vocabulary
from recsvc.state.base import (
    CustomerUpdate,
    Event,
    ProductUpdate,
    Receipt,
    RecordResult,
    StateStore,
    UpdateResult,
)
from recsvc.state.batches import check_customers, check_events, check_products

__all__ = ["RECEIPT_NOTE", "Recorded", "StateWriter", "versions_holding"]

log = logging.getLogger(__name__)

RECEIPT_NOTE = (
    "Covers the live state and the model versions this service publishes. The bank's "
    "own source logs (the Parquet files training reads) are the bank's to purge."
)


@dataclass(frozen=True)
class Recorded:
    """What ``record_events`` stored, and how many events name products the model lacks."""

    result: RecordResult
    unknown_items: int


def versions_holding(models: Path, user_id: str) -> list[str]:
    """Published versions under ``models`` whose users table holds ``user_id``."""
    out = []
    for version in list_versions(models):
        try:
            ids = pq.read_table(models / version / FILES.users, columns=["user_id"])
        except OSError:  # pruned while we looked, or unreadable: the trainer checks again
            continue
        if pc.any(pc.equal(ids.column("user_id"), user_id)).as_py():
            out.append(version)
    return out


class StateWriter:
    """Checked writes into one state store.

    Args:
        store: the state store.
        models: the models folder (erasure receipts count the versions holding a customer).
        event_types: the event types this deployment accepts (the served model's).
        catalogue: the served model's products (events on others are stored and counted).
    """

    def __init__(
        self,
        store: StateStore,
        models: Path,
        event_types: Callable[[], Collection[str]],
        catalogue: Callable[[], Vocabulary | None],
    ) -> None:
        self.store = store
        self._models = models
        self._event_types = event_types
        self._catalogue = catalogue

    def record_events(self, events: Sequence[Event]) -> Recorded:
        check_events(events, self._event_types())
        items = self._catalogue()
        unknown = sum(1 for e in events if items is None or e.item_id not in items)
        return Recorded(self.store.record_events(events), unknown)

    def update_customers(self, customers: Sequence[CustomerUpdate]) -> UpdateResult:
        check_customers(customers)
        return self.store.update_customers(customers)

    def update_products(self, products: Sequence[ProductUpdate]) -> UpdateResult:
        check_products(products)
        return self.store.update_products(products)

    def forget(self, user_id: str, reference: str) -> Receipt:
        if not user_id:
            raise InvalidArgument("user_id", "is required")
        if len(reference) > 128:
            raise InvalidArgument("reference", "must be at most 128 characters")
        receipt = self.store.forget(user_id, reference, datetime.now(timezone.utc))
        holding = len(versions_holding(self._models, user_id))
        if holding != receipt.bundles_holding:
            self.store.set_bundles_holding(receipt.subject, holding)
            receipt = self.store.receipt(receipt.receipt_id) or receipt
        log.info("customer forgotten", extra={"subject": receipt.subject, "bundles": holding})
        return receipt

    def receipt(self, receipt_id: str) -> Receipt:
        if not receipt_id:
            raise InvalidArgument("receipt_id", "is required")
        receipt = self.store.receipt(receipt_id)
        if receipt is None:
            raise NotFound(f"receipt_id {receipt_id[:64]!r}: no such erasure receipt")
        return receipt
