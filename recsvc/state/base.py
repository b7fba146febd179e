"""The live customer state: its records and the interface every backend implements.

The contract (``tests/recsvc/state/test_contract.py`` runs it against every backend):

* **Sequence.** Each write call that stores anything commits under exactly one new
  sequence number, one more than the last; commit order is sequence order, even
  across processes, so a reader that has seen sequence N never later sees a commit
  numbered N or below. A call that stores nothing new returns the current sequence
  and allocates none. Receipt bookkeeping (``complete_receipts``,
  ``set_bundles_holding``) changes nothing a reader folds in and allocates none.
* **Durability.** A write returns only once its commit is durable.
* **Atomic batches.** A call is all or nothing; any error rolls it back.
* **Idempotency.** ``event_id`` is the key: a retried batch stores nothing twice,
  and every event not stored because its id is already stored, or came earlier in
  the same batch, is listed in ``RecordResult.duplicates`` (first write wins).
* **Profiles.** Customer and product updates merge field by field (``None`` keeps
  the stored value); a row that changes takes the call's sequence. An update that
  changes nothing is not counted and does not allocate.
* **Erasure.** ``forget`` deletes the customer's events and profile, and keeps only
  a tombstone and a receipt keyed by the pseudonym (``pseudonymize(user_id)``), never
  the raw id. Later events and profile updates for that customer are dropped and
  counted. Forgetting again issues a new receipt and keeps one tombstone.
* **Reading.** ``changes_since(after, upto)`` gives the current state of every row
  whose latest change has ``after < sequence <= upto``: events, the merged profile
  of each customer and product, and the pseudonyms erased. A row changed again
  after ``upto`` is left to the later window, and erased customers' events are gone
  from every later answer, so a reader folds consecutive windows in order
  (profiles replace, erasures delete) and misses nothing. Reads are one consistent
  snapshot. ``events_by_time(upto, since, types)`` gives the stored events of some
  types by time instead: those at or below ``upto`` dated after ``since`` (a bundle
  built at ``upto`` holds no contact history; the contact policies count by time).
* **Limits.** Every string is at most 128 characters (``MAX_TEXT``), free of NUL
  and valid Unicode; ids are not empty; times are timezone-aware and come back in
  UTC; integers fit 32 bits. A breach raises ``InvalidArgument`` naming the field.

A store object is safe to share between threads (each call takes its own
connection) and is opened in each process after any fork.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TypeVar

__all__ = [
    "MAX_TEXT",
    "SCHEMA_VERSION",
    "Changes",
    "CustomerState",
    "CustomerUpdate",
    "Event",
    "ProductState",
    "ProductUpdate",
    "Receipt",
    "RecordResult",
    "StateStore",
    "StoredEvent",
    "UpdateResult",
]

MAX_TEXT = 128
"""The longest string (in characters) any field may hold."""

SCHEMA_VERSION = 1
"""The schema this code writes; a store holding a newer one is refused."""

_S = TypeVar("_S", bound="StateStore")


@dataclass(frozen=True)
class Event:
    """One interaction of a customer with a product."""

    event_id: str
    """Globally unique; a retry reuses it, so the store keeps each event once."""
    user_id: str
    item_id: str
    type: str
    time: datetime
    """When it happened; timezone-aware (returned in UTC)."""
    weight: float | None = None
    campaign_id: str = ""
    channel: str = ""


@dataclass(frozen=True, kw_only=True)
class StoredEvent(Event):
    """An event as stored, with the sequence of the call that stored it."""

    sequence: int


@dataclass(frozen=True)
class CustomerUpdate:
    """New values for a customer's profile; ``None`` leaves a field as it is."""

    user_id: str
    risk_tolerance: int | None = None
    marketing_consent: bool | None = None


@dataclass(frozen=True)
class ProductUpdate:
    """New values for a product; ``None`` leaves a field as it is."""

    item_id: str
    active: bool | None = None
    risk_level: int | None = None


@dataclass(frozen=True)
class CustomerState:
    """A customer's merged latest profile; a field never set is ``None``."""

    user_id: str
    risk_tolerance: int | None
    marketing_consent: bool | None
    sequence: int
    """The sequence of the last call that changed this row."""


@dataclass(frozen=True)
class ProductState:
    """A product's merged latest state; a field never set is ``None``."""

    item_id: str
    active: bool | None
    risk_level: int | None
    sequence: int


@dataclass(frozen=True)
class RecordResult:
    """What ``record_events`` did: ``recorded + len(duplicates) + dropped_forgotten``
    is the number of events passed."""

    recorded: int
    duplicates: tuple[str, ...]
    """The id of every event not stored as a duplicate, in batch order."""
    dropped_forgotten: int
    """Events of erased customers, dropped."""
    sequence: int
    """The call's sequence, or the current one if nothing was recorded."""


@dataclass(frozen=True)
class UpdateResult:
    """What ``update_customers`` or ``update_products`` did."""

    updated: int
    """Rows that changed."""
    sequence: int
    """The call's sequence, or the current one if nothing changed."""
    dropped_forgotten: int = 0
    """Updates for erased customers, dropped (never stored)."""


@dataclass(frozen=True)
class Receipt:
    """The record of one erasure request, keyed by pseudonym only."""

    receipt_id: str
    """``r_`` and 32 random hex digits."""
    reference: str
    """The caller's reference for the request (a ticket number, say)."""
    subject: str
    """The customer's pseudonym."""
    received_at: datetime
    effective_at: datetime
    """When the deletion committed."""
    sequence: int
    events_deleted: int
    profile_deleted: bool
    bundles_holding: int
    """Published model bundles still holding the subject's data, as last reported."""
    complete: bool
    """Derived data (model bundles) has been rebuilt without the subject."""
    completed_at: datetime | None


@dataclass(frozen=True)
class Changes:
    """Every row whose latest change falls in a window of sequences (see the module)."""

    sequence: int
    """The window's upper end: pass it as ``after`` to read on."""
    events: tuple[StoredEvent, ...]
    """Ordered by sequence, then id."""
    customers: tuple[CustomerState, ...]
    products: tuple[ProductState, ...]
    erased: tuple[str, ...]
    """Pseudonyms of customers erased in the window: drop all their data."""


class StateStore(abc.ABC):
    """The live customer state: events, profiles, products, erasures.

    Backends (``recsvc.state.sqlite``, ``recsvc.state.postgres``) are chosen by
    ``recsvc.state.open_store``; nothing else imports them.
    """

    @abc.abstractmethod
    def record_events(self, events: Iterable[Event]) -> RecordResult:
        """Store new events in one transaction, skipping duplicates and erased customers."""

    @abc.abstractmethod
    def update_customers(self, updates: Iterable[CustomerUpdate]) -> UpdateResult:
        """Merge profile updates in one transaction (later updates in the batch win)."""

    @abc.abstractmethod
    def update_products(self, updates: Iterable[ProductUpdate]) -> UpdateResult:
        """Merge product updates in one transaction (later updates in the batch win)."""

    @abc.abstractmethod
    def forget(self, user_id: str, reference: str, received_at: datetime) -> Receipt:
        """Erase a customer: delete events and profile, keep a tombstone; an incomplete receipt."""

    @abc.abstractmethod
    def receipt(self, receipt_id: str) -> Receipt | None:
        """The receipt with this id, or ``None``."""

    @abc.abstractmethod
    def complete_receipts(
        self,
        completed_at: datetime,
        bundles_holding_by_subject: Mapping[str, int] | None = None,
        *,
        upto: int | None = None,
    ) -> int:
        """Mark incomplete receipts complete once derived data is rebuilt.

        Args:
            completed_at: When the rebuild finished.
            bundles_holding_by_subject: Bundles still holding each subject's data;
                subjects it omits hold none. ``None`` keeps the recorded counts.
            upto: Complete only erasures at or below this sequence: pass the
                snapshot sequence the new bundle was built from, so an erasure
                that landed after that snapshot stays incomplete.

        Returns:
            How many receipts were completed.
        """

    @abc.abstractmethod
    def set_bundles_holding(self, subject: str, n: int) -> int:
        """Record that ``n`` bundles still hold this subject; returns receipts updated."""

    @abc.abstractmethod
    def sequence(self) -> int:
        """The highest committed sequence; 0 for an empty store."""

    @abc.abstractmethod
    def changes_since(self, after: int, upto: int | None = None) -> Changes:
        """Rows whose latest change has ``after < sequence <= upto``.

        ``upto`` defaults to, and is capped at, the current sequence; the answer's
        ``sequence`` is the ``upto`` used (``after`` if that is higher).
        """

    @abc.abstractmethod
    def events_by_time(
        self, upto: int, since: datetime, types: Collection[str]
    ) -> tuple[StoredEvent, ...]:
        """Stored events of ``types`` with ``sequence <= upto`` and ``time > since``,
        ordered by sequence, then id (erased customers' are gone, as everywhere)."""

    def snapshot(self, upto: int) -> Changes:
        """Everything up to ``upto``: what a trainer folds in."""
        return self.changes_since(0, upto)

    @abc.abstractmethod
    def forgotten(self) -> frozenset[str]:
        """The pseudonyms of every erased customer."""

    @abc.abstractmethod
    def wait_for_change(self, after: int, timeout: float) -> int:
        """Block until the sequence exceeds ``after`` or ``timeout`` seconds pass.

        Returns:
            The current sequence (at most ``after`` on a timeout).
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection; call once no other call is running."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
