"""The state store contract (``recsvc.state.base``), run against every backend."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.errors import InvalidArgument, StateError
from recsvc.state import (
    Changes,
    CustomerState,
    CustomerUpdate,
    Event,
    ProductState,
    ProductUpdate,
    RecordResult,
    StateStore,
    StoredEvent,
    UpdateResult,
    _prepare,
)
from tests.recsvc.state.conftest import PSEUDONYMIZE, Backend

AT = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def ev(
    event_id: str,
    user_id: str = "u1",
    item_id: str = "i1",
    *,
    type: str = "view",
    time: datetime = AT,
    weight: float | None = None,
    campaign_id: str = "",
    channel: str = "",
) -> Event:
    return Event(event_id, user_id, item_id, type, time, weight, campaign_id, channel)


def stored(event: Event, sequence: int) -> StoredEvent:
    return StoredEvent(**asdict(event), sequence=sequence)


# --- sequence ---------------------------------------------------------------------------


def test_an_empty_store_is_at_sequence_zero(store: StateStore) -> None:
    assert store.sequence() == 0
    assert store.changes_since(0) == Changes(0, (), (), (), ())
    assert store.forgotten() == frozenset()


def test_each_storing_call_takes_the_next_sequence_and_others_take_none(
    store: StateStore,
) -> None:
    assert store.record_events([ev("e1"), ev("e2")]).sequence == 1
    assert store.update_customers([CustomerUpdate("u1", risk_tolerance=3)]).sequence == 2
    assert store.update_products([ProductUpdate("i1", active=True)]).sequence == 3
    assert store.forget("u9", "ticket-1", AT).sequence == 4
    assert store.sequence() == 4
    # Nothing new: all duplicates, empty batches, updates that change nothing.
    assert store.record_events([ev("e1")]) == RecordResult(0, ("e1",), 0, 4)
    assert store.record_events([]) == RecordResult(0, (), 0, 4)
    assert store.update_customers([CustomerUpdate("u1", risk_tolerance=3)]) == UpdateResult(0, 4)
    assert store.update_customers([CustomerUpdate("u2")]) == UpdateResult(0, 4)
    assert store.update_products([ProductUpdate("i1", active=True)]) == UpdateResult(0, 4)
    assert store.update_products([]) == UpdateResult(0, 4)
    # Receipt bookkeeping is not a change readers fold in.
    assert store.complete_receipts(AT) == 1
    assert store.set_bundles_holding(PSEUDONYMIZE("u9"), 2) == 1
    assert store.sequence() == 4
    assert store.record_events([ev("e3")]).sequence == 5


# --- idempotency ------------------------------------------------------------------------


def test_duplicates_are_reported_by_id_and_the_first_write_wins(store: StateStore) -> None:
    first = store.record_events([ev("e1", item_id="i1"), ev("e2"), ev("e1", item_id="i2")])
    assert first == RecordResult(2, ("e1",), 0, 1)  # repeated within the batch
    again = store.record_events([ev("e2"), ev("e3"), ev("e1", item_id="i3"), ev("e3")])
    assert again == RecordResult(1, ("e2", "e1", "e3"), 0, 2)
    events = store.snapshot(2).events
    assert [(e.event_id, e.item_id, e.sequence) for e in events] == [
        ("e1", "i1", 1),
        ("e2", "i1", 1),
        ("e3", "i1", 2),
    ]


def test_a_retried_batch_stores_nothing_twice(store: StateStore) -> None:
    batch = [ev(f"e{i}", user_id=f"u{i % 3}") for i in range(50)]
    assert store.record_events(batch).recorded == 50
    retry = store.record_events(batch)
    assert retry == RecordResult(0, tuple(e.event_id for e in batch), 0, 1)
    assert sorted(e.event_id for e in store.snapshot(1).events) == sorted(e.event_id for e in batch)


def test_events_come_back_as_written_with_times_in_utc(store: StateStore) -> None:
    local = timezone(timedelta(hours=-5))
    written = [
        ev("e1", time=datetime(2024, 5, 1, 7, 0, 0, 123456, tzinfo=local), weight=2.5),
        ev("e2", type="", campaign_id="c" * 128, channel="app", weight=-0.0),
        ev("e3", user_id="ü" * 128, item_id="产品", weight=1e300),
    ]
    store.record_events(written)
    events = store.snapshot(1).events
    assert events == tuple(stored(e, 1) for e in written)
    assert events[0].time == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    assert all(e.time.utcoffset() == timedelta(0) for e in events)


# --- validation and atomic batches ------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (ev("e" * 129), "events[1].event_id"),
        (ev("e2", user_id=""), "events[1].user_id"),
        (ev("e2", item_id="i\x00"), "events[1].item_id"),
        (ev("e2", channel="\ud800"), "events[1].channel"),
        (ev("e2", type="t" * 129), "events[1].type"),
        (ev("e2", time=datetime(2024, 1, 1)), "events[1].time"),
        (ev("e2", weight=float("nan")), "events[1].weight"),
    ],
)
def test_a_bad_event_is_refused_naming_its_field(
    store: StateStore, event: Event, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        store.record_events([ev("e1"), event])
    assert caught.value.field == field
    assert store.sequence() == 0 and store.snapshot(0).events == ()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.update_customers([CustomerUpdate("u" * 129)]), "customers[0].user_id"),
        (lambda s: s.update_customers([CustomerUpdate("u1", True)]), "customers[0].risk_tolerance"),
        (
            lambda s: s.update_customers([CustomerUpdate("u1", 2**31)]),
            "customers[0].risk_tolerance",
        ),
        (
            lambda s: s.update_customers([CustomerUpdate("u1", None, 1)]),
            "customers[0].marketing_consent",
        ),
        (lambda s: s.update_products([ProductUpdate("i1", 1)]), "products[0].active"),
        (lambda s: s.update_products([ProductUpdate("")]), "products[0].item_id"),
        (lambda s: s.forget("", "ref", AT), "user_id"),
        (lambda s: s.forget("u1", "r" * 129, AT), "reference"),
        (lambda s: s.forget("u1", "ref", datetime(2024, 1, 1)), "received_at"),
        (lambda s: s.complete_receipts(AT, {"u_1": -1}), "bundles_holding"),
    ],
)
def test_bad_updates_are_refused_naming_their_field(
    store: StateStore, call: Callable[[StateStore], object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        call(store)
    assert caught.value.field == field
    assert store.sequence() == 0


def _skip_text_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let over-long strings through to the database's own CHECK constraints."""
    monkeypatch.setattr(_prepare, "check_text", lambda field, value, *, required: value)


def test_a_constraint_error_mid_batch_rolls_the_whole_batch_back(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert store.record_events([ev("e0")]).sequence == 1
    _skip_text_checks(monkeypatch)
    batch = [ev(f"e{i}") for i in range(1, 100)]
    batch[50] = ev("x" * 200)
    with pytest.raises(StateError):
        store.record_events(batch)
    updates = [CustomerUpdate(f"u{i}", 1) for i in range(10)] + [CustomerUpdate("u" * 200, 1)]
    with pytest.raises(StateError):
        store.update_customers(updates)
    with pytest.raises(StateError):
        store.update_products([ProductUpdate("i1", True), ProductUpdate("i" * 200, True)])
    with pytest.raises(StateError):
        store.forget("e0-user", "r" * 200, AT)  # fails on the receipt, after the deletes
    monkeypatch.undo()
    assert store.sequence() == 1
    assert store.snapshot(1) == Changes(1, (stored(ev("e0"), 1),), (), (), ())
    assert store.forgotten() == frozenset()
    # The store (and its pooled connections) still work.
    assert store.record_events(batch[:50]) == RecordResult(50, (), 0, 2)


def test_any_error_inside_a_write_rolls_it_back(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record_events([ev("e1", user_id="u1"), ev("e2", user_id="u2")])
    store.update_customers([CustomerUpdate("u1", 4)])

    def boom(*args: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(store, "_bump", boom)  # after every row is written, before commit
    for call in (
        lambda: store.record_events([ev("e3")]),
        lambda: store.update_customers([CustomerUpdate("u1", 5)]),
        lambda: store.update_products([ProductUpdate("i1", False)]),
        lambda: store.forget("u1", "ref", AT),
    ):
        with pytest.raises(RuntimeError, match="injected"):
            call()
    monkeypatch.undo()
    snap = store.snapshot(2)
    assert store.sequence() == 2
    assert [e.event_id for e in snap.events] == ["e1", "e2"]
    assert snap.customers == (CustomerState("u1", 4, None, 2),)
    assert snap.products == () and snap.erased == () and store.forgotten() == frozenset()


# --- profiles ---------------------------------------------------------------------------


def test_profiles_merge_field_by_field(store: StateStore) -> None:
    store.update_customers(
        [CustomerUpdate("u1", risk_tolerance=2), CustomerUpdate("u2", None, False)]
    )
    result = store.update_customers(
        [
            CustomerUpdate("u1", marketing_consent=True),
            CustomerUpdate("u1", risk_tolerance=5),  # later in the batch wins
            CustomerUpdate("u1", risk_tolerance=4),
            CustomerUpdate("u2", None, False),  # no change
        ]
    )
    assert result == UpdateResult(1, 2)
    assert store.changes_since(0).customers == (
        CustomerState("u2", None, False, 1),
        CustomerState("u1", 4, True, 2),
    )
    assert store.changes_since(1).customers == (CustomerState("u1", 4, True, 2),)
    # An update that ends where it started changes nothing.
    back = [CustomerUpdate("u1", risk_tolerance=1), CustomerUpdate("u1", risk_tolerance=4)]
    assert store.update_customers(back) == UpdateResult(0, 2)
    store.update_products([ProductUpdate("i1", active=True, risk_level=3)])
    store.update_products([ProductUpdate("i1", active=False), ProductUpdate("i2", risk_level=1)])
    assert store.changes_since(2).products == (
        ProductState("i1", False, 3, 4),
        ProductState("i2", None, 1, 4),
    )


# --- reading ----------------------------------------------------------------------------


def test_events_by_time_reach_behind_a_sequence_by_type_and_date(store: StateStore) -> None:
    since = AT - timedelta(days=365)
    old = ev("d", type="decline", time=since - timedelta(seconds=1))
    first = [
        ev("b", type="decline", time=AT),
        ev("a", type="contacted", time=since + timedelta(microseconds=1), channel="email"),
        ev("c", type="view", time=AT),
        old,
        ev("f", "u2", type="contacted", time=AT, channel="sms"),
    ]
    assert store.record_events(first).sequence == 1
    later = ev("e", type="contacted", time=AT - timedelta(days=400))
    assert store.record_events([later, ev("g", type="decline")]).sequence == 2
    kinds = ("contacted", "decline")
    assert store.events_by_time(1, since, kinds) == (
        stored(first[1], 1),
        stored(first[0], 1),
        stored(first[4], 1),
    )
    assert store.events_by_time(2, since, kinds)[-1] == stored(ev("g", type="decline"), 2)
    further = store.events_by_time(2, since - timedelta(days=40), kinds)
    assert stored(later, 2) in further and stored(old, 1) in further
    assert store.events_by_time(0, since, kinds) == ()
    assert store.events_by_time(2, since, ()) == ()
    with pytest.raises(ValueError, match="timezone-aware"):
        store.events_by_time(2, since.replace(tzinfo=None), kinds)
    store.forget("u1", "ref", AT)
    assert store.events_by_time(3, since, kinds) == (stored(first[4], 1),)


def test_changes_since_gives_each_window_and_a_row_changed_later_waits_for_its_window(
    store: StateStore,
) -> None:
    store.record_events([ev("e1", user_id="u1")])  # 1
    store.update_customers([CustomerUpdate("u1", 1)])  # 2
    store.update_products([ProductUpdate("i1", True)])  # 3
    store.record_events([ev("e2", user_id="u2")])  # 4
    store.update_customers([CustomerUpdate("u1", None, True)])  # 5: u1's row moves to 5
    full = store.changes_since(0)
    assert full.sequence == 5
    for after in range(6):
        for upto in range(after, 8):
            window = store.changes_since(after, upto)
            end = min(upto, 5)
            assert window.sequence == max(end, after)

            def inside(sequence: int, a: int = after, e: int = end) -> bool:
                return a < sequence <= e

            assert window.events == tuple(e for e in full.events if inside(e.sequence))
            assert window.customers == tuple(c for c in full.customers if inside(c.sequence))
            assert window.products == tuple(p for p in full.products if inside(p.sequence))
    assert store.changes_since(0, 3).customers == ()  # u1 changed again at 5
    assert store.changes_since(3).customers == (CustomerState("u1", 1, True, 5),)
    assert store.snapshot(3) == store.changes_since(0, 3)
    assert store.changes_since(9) == Changes(9, (), (), (), ())  # a reader ahead stays put
    with pytest.raises(ValueError, match="upto"):
        store.changes_since(3, 2)
    with pytest.raises(ValueError, match="after"):
        store.changes_since(-1)


# --- erasure ----------------------------------------------------------------------------

RAW = "CUST-8675309"


def test_forget_deletes_everything_and_keeps_only_the_pseudonym(
    backend: Backend, store: StateStore
) -> None:
    store.record_events([ev(f"{RAW}-view-{i}", user_id=RAW) for i in range(3)])  # 1
    store.record_events([ev("other-1", user_id="CUST-0000001")])  # 2
    store.update_customers([CustomerUpdate(RAW, 3, True)])  # 3
    received = AT - timedelta(days=1)
    before = datetime.now(timezone.utc)
    receipt = store.forget(RAW, "DSR-2024-17", received)
    subject = PSEUDONYMIZE(RAW)
    assert receipt.subject == subject and receipt.sequence == 4
    assert receipt.receipt_id.startswith("r_") and len(receipt.receipt_id) == 34
    assert (receipt.reference, receipt.received_at) == ("DSR-2024-17", received)
    assert before <= receipt.effective_at <= datetime.now(timezone.utc)
    assert (receipt.events_deleted, receipt.profile_deleted) == (3, True)
    assert (receipt.complete, receipt.completed_at, receipt.bundles_holding) == (False, None, 0)
    assert store.receipt(receipt.receipt_id) == receipt
    assert store.forgotten() == {subject}
    dump = backend.dump()
    assert RAW not in dump and RAW.lower() not in dump.lower()
    assert "CUST-0000001" in dump and subject in dump  # the dump does show the rows
    # Gone from every answer given after the erasure, including windows before it.
    for after, upto in [(0, None), (0, 1), (0, 3), (3, None)]:
        window = store.changes_since(after, upto)
        assert all(e.user_id != RAW for e in window.events)
        assert all(c.user_id != RAW for c in window.customers)
    assert store.changes_since(3) == Changes(4, (), (), (), (subject,))
    assert store.changes_since(0, 3).erased == ()


def test_after_forget_new_events_and_updates_are_dropped(store: StateStore) -> None:
    store.forget(RAW, "ref", AT)  # 1
    mixed = [ev("a", user_id=RAW), ev("b", user_id="u2"), ev("a", user_id=RAW)]
    assert store.record_events(mixed) == RecordResult(1, (), 2, 2)
    assert store.record_events([ev("c", user_id=RAW)]) == RecordResult(0, (), 1, 2)
    updates = [CustomerUpdate(RAW, 1), CustomerUpdate("u2", 2), CustomerUpdate(RAW, None, True)]
    assert store.update_customers(updates) == UpdateResult(1, 3, dropped_forgotten=2)
    assert store.update_customers([CustomerUpdate(RAW, 4)]) == UpdateResult(0, 3, 1)
    snap = store.snapshot(3)
    assert [e.event_id for e in snap.events] == ["b"]
    assert snap.customers == (CustomerState("u2", 2, None, 3),)


def test_forgetting_twice_issues_a_second_receipt_and_keeps_one_tombstone(
    backend: Backend, store: StateStore
) -> None:
    store.record_events([ev("e1", user_id=RAW)])
    first = store.forget(RAW, "ref-1", AT)
    second = store.forget(RAW, "ref-2", AT)
    assert second.receipt_id != first.receipt_id
    assert (second.sequence, second.events_deleted, second.profile_deleted) == (3, 0, False)
    assert store.receipt(first.receipt_id) == first and store.receipt(second.receipt_id) == second
    assert store.forgotten() == {PSEUDONYMIZE(RAW)}
    tombstones = [line for line in backend.dump().splitlines() if line.startswith("state_tomb")]
    assert len(tombstones) == 1
    assert store.changes_since(0).erased == (PSEUDONYMIZE(RAW),)


def test_receipts_complete_up_to_a_snapshot_with_the_bundles_still_holding(
    store: StateStore,
) -> None:
    assert store.receipt("r_" + "0" * 32) is None
    early = store.forget("u1", "a", AT)  # 1
    store.forget("u2", "b", AT)  # 2
    late = store.forget("u3", "c", AT)  # 3: after the bundle's snapshot
    done = AT + timedelta(hours=2)
    holding = {PSEUDONYMIZE("u1"): 2, "u_not-a-receipt": 9}
    assert store.complete_receipts(done, holding, upto=2) == 2
    first = store.receipt(early.receipt_id)
    assert first == replace(early, complete=True, completed_at=done, bundles_holding=2)
    second = store.receipt(store.forget("u9", "x", AT).receipt_id)
    assert second is not None and not second.complete
    assert store.receipt(late.receipt_id) == late  # still incomplete
    assert store.set_bundles_holding(PSEUDONYMIZE("u1"), 0) == 1
    assert store.receipt(early.receipt_id).bundles_holding == 0  # type: ignore[union-attr]
    assert store.complete_receipts(done, upto=2) == 0  # nothing left at or below 2
    assert store.complete_receipts(done) == 2  # u3 and u9; counts kept
    assert all(
        store.receipt(r.receipt_id).complete  # type: ignore[union-attr]
        for r in (early, late, second)
    )


# --- waiting ----------------------------------------------------------------------------


def _commit_later(backend: Backend, delay: float, committed: list[float]) -> threading.Thread:
    def write() -> None:
        time.sleep(delay)
        with backend.open() as writer:
            writer.record_events([ev("late")])
            committed.append(time.monotonic())

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_wait_for_change_wakes_on_another_connections_commit(
    backend: Backend, store: StateStore
) -> None:
    start = time.monotonic()
    assert store.wait_for_change(0, 0.3) == 0
    assert time.monotonic() - start >= 0.29
    committed: list[float] = []
    thread = _commit_later(backend, 0.3, committed)
    try:
        assert store.wait_for_change(0, 10) == 1
        woke = time.monotonic()
    finally:
        thread.join()
    assert woke - committed[0] < 1.0
    assert store.wait_for_change(0, 10) == 1  # already past: at once


# --- ordering under concurrency ---------------------------------------------------------


class Follower:
    """Folds changes_since windows in order, as a server would, checking each one."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.position = 0
        self.seen: dict[str, int] = {}

    def catch_up(self) -> None:
        window = self.store.changes_since(self.position)
        for event in window.events:
            assert self.position < event.sequence <= window.sequence
            assert event.event_id not in self.seen, "an event came twice"
            self.seen[event.event_id] = event.sequence
        self.position = window.sequence


def test_commit_order_is_sequence_order_with_concurrent_writers(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]  # two stores: separate connections
    acked: dict[str, int] = {}
    lock = threading.Lock()
    done = threading.Event()

    def write(w: int) -> None:
        for n in range(20):
            batch = [ev(f"w{w}-{n}-{j}", user_id=f"u{j}") for j in range(5)]
            sequence = stores[w % 2].record_events(batch).sequence
            with lock:
                acked.update((e.event_id, sequence) for e in batch)

    follower = Follower(stores[0])
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    try:
        for t in writers:
            t.start()
        reader_errors: list[BaseException] = []

        def follow() -> None:
            try:
                while not done.is_set():
                    follower.catch_up()
            except BaseException as exc:
                reader_errors.append(exc)

        reader = threading.Thread(target=follow)
        reader.start()
        for t in writers:
            t.join()
        done.set()
        reader.join()
        assert not reader_errors, reader_errors
        follower.catch_up()
    finally:
        for s in stores:
            s.close()
    assert sorted(set(acked.values())) == list(range(1, 81))
    assert follower.seen == acked  # nothing missed: no commit landed behind a reader


_WRITER = """
import sys
from datetime import datetime, timezone
from recsvc.logs import Pseudonymizer
from recsvc.state import Event, open_store

url, prefix, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
at = datetime(2024, 5, 1, tzinfo=timezone.utc)
with open_store(url, Pseudonymizer(b"state-test-key")) as store:
    for n in range(batches):
        batch = [Event(f"{prefix}-{n}-{j}", f"u{j}", "i1", "view", at) for j in range(20)]
        print(n, store.record_events(batch).sequence, flush=True)
"""


def _writer(backend: Backend, prefix: str, batches: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, backend.url, prefix, str(batches)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _acknowledged(lines: list[str], prefix: str) -> dict[str, int]:
    acked = {}
    for line in lines:
        n, sequence = line.split()
        acked.update({f"{prefix}-{n}-{j}": int(sequence) for j in range(20)})
    return acked


def test_processes_writing_at_once_commit_in_sequence_order(backend: Backend) -> None:
    children = [_writer(backend, f"p{i}", 25) for i in range(2)]
    acked: dict[str, int] = {}
    with backend.open() as store:
        follower = Follower(store)
        while any(c.poll() is None for c in children):
            follower.catch_up()
        for i, child in enumerate(children):
            out, _ = child.communicate()
            assert child.returncode == 0
            acked |= _acknowledged(out.splitlines(), f"p{i}")
        follower.catch_up()
    assert sorted(set(acked.values())) == list(range(1, 51))
    assert follower.seen == acked


def test_every_acknowledged_batch_survives_a_sigkill(backend: Backend) -> None:
    backend.open().close()  # schema in place before the child starts
    child = _writer(backend, "k", 100_000)
    assert child.stdout is not None
    lines = []
    try:
        while len(lines) < 30:
            line = child.stdout.readline()
            assert line, "the writer stopped early"
            lines.append(line)
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL
    lines += rest.splitlines()  # printed, so acknowledged, before the kill
    acked = _acknowledged(lines, "k")
    with backend.open() as store:
        events = {e.event_id: e.sequence for e in store.snapshot(store.sequence()).events}
        assert store.sequence() >= max(acked.values())
    assert {k: events.get(k) for k in acked} == acked


# --- the model --------------------------------------------------------------------------


class Model:
    """The contract as plain dictionaries."""

    def __init__(self) -> None:
        self.sequence = 0
        self.events: dict[str, StoredEvent] = {}
        self.customers: dict[str, CustomerState] = {}
        self.products: dict[str, ProductState] = {}
        self.tombstones: dict[str, int] = {}

    def _erased(self, user_id: str) -> bool:
        return PSEUDONYMIZE(user_id) in self.tombstones

    def record_events(self, events: list[Event]) -> RecordResult:
        keep: dict[str, Event] = {}
        duplicates, dropped = [], 0
        for e in events:
            if self._erased(e.user_id):
                dropped += 1
            elif e.event_id in self.events or e.event_id in keep:
                duplicates.append(e.event_id)
            else:
                keep[e.event_id] = e
        if keep:
            self.sequence += 1
            self.events |= {k: stored(e, self.sequence) for k, e in keep.items()}
        return RecordResult(len(keep), tuple(duplicates), dropped, self.sequence)

    def update_customers(self, updates: list[CustomerUpdate]) -> UpdateResult:
        live = [u for u in updates if not self._erased(u.user_id)]
        rows = {k: (c.risk_tolerance, c.marketing_consent) for k, c in self.customers.items()}
        new = dict(rows)
        for u in live:
            risk, consent = new.get(u.user_id, (None, None))
            new[u.user_id] = (
                risk if u.risk_tolerance is None else u.risk_tolerance,
                consent if u.marketing_consent is None else u.marketing_consent,
            )
        changed = {k: v for k, v in new.items() if v != rows.get(k, (None, None))}
        if changed:
            self.sequence += 1
            for k, (risk, consent) in changed.items():
                self.customers[k] = CustomerState(k, risk, consent, self.sequence)
        return UpdateResult(len(changed), self.sequence, len(updates) - len(live))

    def update_products(self, updates: list[ProductUpdate]) -> UpdateResult:
        rows = {k: (p.active, p.risk_level) for k, p in self.products.items()}
        new = dict(rows)
        for u in updates:
            active, risk = new.get(u.item_id, (None, None))
            new[u.item_id] = (
                active if u.active is None else u.active,
                risk if u.risk_level is None else u.risk_level,
            )
        changed = {k: v for k, v in new.items() if v != rows.get(k, (None, None))}
        if changed:
            self.sequence += 1
            for k, (active, risk) in changed.items():
                self.products[k] = ProductState(k, active, risk, self.sequence)
        return UpdateResult(len(changed), self.sequence)

    def forget(self, user_id: str) -> tuple[int, bool]:
        self.sequence += 1
        gone = [k for k, e in self.events.items() if e.user_id == user_id]
        for k in gone:
            del self.events[k]
        self.tombstones[PSEUDONYMIZE(user_id)] = self.sequence
        return len(gone), self.customers.pop(user_id, None) is not None

    def changes_since(self, after: int, upto: int) -> Changes:
        erased = sorted((s, p) for p, s in self.tombstones.items() if after < s <= upto)
        return Changes(
            max(after, upto),
            _window(self.events, after, upto),
            _window(self.customers, after, upto),
            _window(self.products, after, upto),
            tuple(p for _, p in erased),
        )


Row = TypeVar("Row", StoredEvent, CustomerState, ProductState)


def _window(table: dict[str, Row], after: int, upto: int) -> tuple[Row, ...]:
    """The rows with ``after < sequence <= upto``, by sequence then key."""
    picked = sorted((r.sequence, k) for k, r in table.items() if after < r.sequence <= upto)
    return tuple(table[k] for _, k in picked)


_USERS = st.sampled_from(["u1", "u2", "u3", "u4"])
_ITEMS = st.sampled_from(["i1", "i2", "i3"])
_SMALL = st.none() | st.integers(0, 4)
_FLAG = st.none() | st.booleans()
_EVENT = st.builds(
    Event,
    event_id=st.sampled_from([f"e{i}" for i in range(15)]),
    user_id=_USERS,
    item_id=_ITEMS,
    type=st.sampled_from(["view", "buy", ""]),
    time=st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(timezone.utc)),
    weight=st.none() | st.floats(-1e9, 1e9, allow_nan=False),
    campaign_id=st.sampled_from(["", "c1"]),
    channel=st.sampled_from(["", "app", "branch"]),
)
_OPERATION = st.one_of(
    st.tuples(st.just("events"), st.lists(_EVENT, max_size=6)),
    st.tuples(
        st.just("customers"),
        st.lists(st.builds(CustomerUpdate, _USERS, _SMALL, _FLAG), max_size=4),
    ),
    st.tuples(
        st.just("products"),
        st.lists(st.builds(ProductUpdate, _ITEMS, _FLAG, _SMALL), max_size=4),
    ),
    st.tuples(st.just("forget"), _USERS),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(_OPERATION, max_size=14), cut=st.integers(0, 16))
def test_any_interleaving_matches_the_model(
    backend: Backend, store: StateStore, operations: list[tuple[str, Any]], cut: int
) -> None:
    backend.reset()
    model = Model()
    for kind, arg in operations:
        if kind == "events":
            assert store.record_events(arg) == model.record_events(arg)
        elif kind == "customers":
            assert store.update_customers(arg) == model.update_customers(arg)
        elif kind == "products":
            assert store.update_products(arg) == model.update_products(arg)
        else:
            receipt = store.forget(arg, "ref", AT)
            deleted = model.forget(arg)
            assert (receipt.events_deleted, receipt.profile_deleted) == deleted
            assert receipt.sequence == model.sequence
    assert store.sequence() == model.sequence
    assert store.snapshot(model.sequence) == model.changes_since(0, model.sequence)
    upto = min(cut, model.sequence)
    assert store.snapshot(cut) == model.changes_since(0, upto)
    assert store.changes_since(upto) == model.changes_since(upto, model.sequence)
    assert store.forgotten() == set(model.tombstones)
