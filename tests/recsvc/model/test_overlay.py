"""The overlay applies each kind of change as training would have seen it."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from recsvc.logs import Pseudonymizer
from recsvc.model.contact import HISTORY_DAYS
from recsvc.model.overlay import ERASED, apply, contact_history, remember
from recsvc.model.queries import RecommendQuery, TargetQuery
from recsvc.model.ranking import Recommender
from recsvc.model.targeting import Targeter
from recsvc.model.weighting import RowWeighting
from recsvc.state import Changes, CustomerState, Event, ProductState, StoredEvent, open_store

P = Pseudonymizer(b"overlay-test")
T = datetime(2026, 12, 1, tzinfo=timezone.utc)


def _changes(seq: int, *events: StoredEvent, **kw: object) -> Changes:
    return Changes(
        sequence=seq,
        events=events,
        customers=tuple(kw.get("customers", ())),  # type: ignore[arg-type]
        products=tuple(kw.get("products", ())),  # type: ignore[arg-type]
        erased=tuple(kw.get("erased", ())),  # type: ignore[arg-type]
    )


def _ev(n: int, user: str, item: str, kind: str, at: datetime, seq: int) -> StoredEvent:
    return StoredEvent(f"e{n}", user, item, kind, at, sequence=seq)


def test_the_latest_held_or_close_event_by_time_decides(recommender: Recommender) -> None:
    b = recommender.bundle
    user, item = "NEW-1", b.items.ids[3]
    o = recommender.overlay(P)
    o = apply(o, _changes(1, _ev(1, user, item, "purchase", T, 1)))
    assert item in {b.items.ids[r] for r in o.users[user].held_rows}
    # A close recorded later but dated before the purchase changes nothing.
    o = apply(o, _changes(2, _ev(2, user, item, "close", T - timedelta(days=1), 2)))
    assert item in {b.items.ids[r] for r in o.users[user].held_rows}
    o = apply(o, _changes(3, _ev(3, user, item, "close", T + timedelta(days=1), 3)))
    assert o.users[user].held_rows.size == 0
    assert item in {b.items.ids[r] for r in o.users[user].rows}  # still interacted


def test_events_refold_the_vector_and_non_interactions_add_no_strength(
    recommender: Recommender,
) -> None:
    b = recommender.bundle
    user = b.users.ids[4]
    o = recommender.overlay(P)
    o = apply(o, _changes(1, _ev(1, user, b.items.ids[0], "decline", T, 1)))
    live = o.users[user]
    assert not live.refolded and len(live.rows) == len(b.user_item_rows(4))
    o = apply(o, _changes(2, _ev(2, user, b.items.ids[0], "view", T, 2)))
    live = o.users[user]
    assert live.refolded and live.vector is not None
    assert not np.allclose(live.vector, b.user_index.vectors[4])
    rows = live.rows.tolist()
    strength = dict(zip(rows, live.strength.tolist(), strict=True))
    before = dict(
        zip(
            b.user_item_rows(4).tolist(),
            b.strength[b.indptr[4] : b.indptr[5]].tolist(),
            strict=True,
        )
    )
    assert strength[0] == before.get(0, 0.0) + b.manifest.events.weights["view"]


def test_erasure_outranks_everything_and_products_update_the_rules(
    recommender: Recommender,
) -> None:
    b = recommender.bundle
    user = b.users.ids[6]
    o = recommender.overlay(P)
    o = apply(
        o,
        _changes(
            1,
            _ev(1, user, b.items.ids[0], "view", T, 1),
            customers=[CustomerState(user, 5, True, 1)],
            products=[ProductState(b.items.ids[2], False, None, 1)],
        ),
    )
    assert o.users[user].tolerance == 5 and not o.item_rules.active[2]
    o = apply(o, _changes(2, erased=[P(user)]))
    assert o.user(user) is ERASED and user not in o.users
    assert 6 in o.changed_rows.tolist() and o.erased_rows.tolist() == [6]
    # A change behind the overlay's sequence is not applied twice.
    assert apply(o, _changes(2, _ev(9, "X", b.items.ids[0], "view", T, 2))) is o


def test_older_contact_history_is_remembered_without_touching_the_model(
    recommender: Recommender,
) -> None:
    b = recommender.bundle
    user = b.users.ids[4]
    history = [
        StoredEvent("h1", user, b.items.ids[0], "contacted", T, channel="email", sequence=1),
        StoredEvent("h2", user, b.items.ids[1], "decline", T, sequence=1),
        StoredEvent("h3", user, b.items.ids[2], "view", T, sequence=1),  # not history: ignored
    ]
    o = recommender.overlay(P, history=history)
    assert o.sequence == b.manifest.state_sequence
    live = o.users[user]
    assert live.contacts == ((T, "email"),) and live.declined == {1: T}
    assert not live.refolded and live.rows.tolist() == b.user_item_rows(4).tolist()
    assert live.strength.tolist() == b.strength[b.indptr[4] : b.indptr[5]].tolist()
    later = T + timedelta(days=1)
    o = apply(o, _changes(9, _ev(4, user, b.items.ids[0], "contacted", later, 9)))
    assert sorted(c[0] for c in o.users[user].contacts) == [T, later]
    assert o.users[user].declined == {1: T}


def test_contact_history_is_the_contacts_and_declines_of_the_last_year_up_to_the_bundle(
    tmp_path: Path, recommender: Recommender
) -> None:
    """What a retrain must not forget: ``contacted`` and ``decline`` events stored at or
    below the bundle's sequence and dated after ``now`` less ``HISTORY_DAYS``; nothing
    for a bundle trained on no state."""
    items = recommender.bundle.items.ids
    year = timedelta(days=HISTORY_DAYS)
    store = open_store(f"sqlite:///{tmp_path}/state.db", P)
    try:
        calls = [
            [
                Event("old", "C1", items[0], "contacted", T - year, channel="email"),
                Event("edge", "C1", items[0], "decline", T - year + timedelta(seconds=1)),
                Event("d1", "C2", items[1], "decline", T - timedelta(days=10)),
            ],
            [
                Event("c2", "C1", items[2], "contacted", T - timedelta(days=1), channel="sms"),
                Event("v2", "C1", items[2], "view", T - timedelta(days=1)),  # not a contact
            ],
            [Event("later", "C2", items[3], "decline", T)],  # after the bundle's sequence
        ]
        for events in calls:
            store.record_events(events)
        assert [e.event_id for e in contact_history(store, 1, now=T)] == ["d1", "edge"]
        assert [e.event_id for e in contact_history(store, 2, now=T)] == ["d1", "edge", "c2"]
        assert [e.event_id for e in contact_history(store, 3, now=T)][-1] == "later"
        assert contact_history(store, 0, now=T) == ()
        # A year on, only T's own event is left; by default the clock says when now is.
        assert contact_history(store, 3, now=T + year - timedelta(seconds=1))[0].event_id == (
            "later"
        )
        recent = datetime.now(timezone.utc) - timedelta(days=1)
        store.record_events([Event("now", "C3", items[4], "decline", recent)])
        by_clock = {e.event_id for e in contact_history(store, 4)}
        assert "now" in by_clock and not by_clock & {"old", "edge", "v2"}  # T is in the past
    finally:
        store.close()


def test_a_profile_change_keeps_the_customers_history_as_the_bundle_has_it(
    recommender: Recommender,
) -> None:
    """A consent or tolerance update makes a live record of the customer; their history,
    strengths and confidences in it are the bundle's (32-bit, as fold-in takes them), so
    recent items still fold in beside the history, and a new customer starts empty."""
    b = recommender.bundle
    row = next(r for r in range(len(b.users)) if b.user_item_rows(r).size >= 2)
    known, new = b.users.ids[row], "NEW-PROFILE"
    o = apply(
        recommender.overlay(P),
        _changes(
            1,
            customers=[CustomerState(known, None, False, 1), CustomerState(new, 3, True, 1)],
        ),
    )
    live, fresh = o.users[known], o.users[new]
    assert live.row == row and not live.refolded
    assert live.rows.tolist() == b.user_item_rows(row).tolist()
    assert np.array_equal(live.confidence, b.user_item_data(row))
    assert np.array_equal(live.strength, b.strength[b.indptr[row] : b.indptr[row + 1]])
    assert fresh.row is None and fresh.rows.size == fresh.confidence.size == 0
    for user in (live, fresh):
        assert user.strength.dtype == user.confidence.dtype == np.float32
        assert user.held.dtype == bool and user.rows.dtype == np.int64
    recent = next(i for i in b.items.ids if b.items.index(i) not in set(live.rows.tolist()))
    query = RecommendQuery(user_id=known, k=5, recent_item_ids=(recent,))
    with_change = [i.item_id for i in recommender.recommend(query, o).items]
    assert with_change == [i.item_id for i in recommender.recommend(query).items]


def test_events_add_to_the_history_as_training_would(recommender: Recommender) -> None:
    """An event on a product the customer already has adds its weight (its own, or the
    event type's) to that strength; an event on a product the bundle lacks is counted and
    skipped without hiding the events after it; the newest decline of a product by time
    is the one kept."""
    b = recommender.bundle
    row = next(r for r in range(len(b.users)) if b.user_item_rows(r).size >= 2)
    user = b.users.ids[row]
    first, second = (int(r) for r in b.user_item_rows(row)[:2])
    own = b.strength[b.indptr[row] : b.indptr[row + 1]].tolist()
    before = dict(zip(b.user_item_rows(row).tolist(), own, strict=True))
    view = recommender.overlay(P).context.event_weights["view"]
    e1 = StoredEvent("w1", user, b.items.ids[first], "view", T, weight=2.5, sequence=1)
    e2 = StoredEvent("w2", user, "NO-SUCH-ITEM", "view", T, sequence=1)
    e3 = StoredEvent("w3", user, "NO-SUCH-ITEM-EITHER", "view", T, sequence=1)
    e4 = StoredEvent("w4", user, b.items.ids[second], "view", T, sequence=1)
    o = apply(recommender.overlay(P), _changes(1, e1, e2, e3, e4))
    live = o.users[user]
    strength = dict(zip(live.rows.tolist(), live.strength.tolist(), strict=True))
    assert strength[first] == pytest.approx(before[first] + 2.5)  # its own weight
    assert strength[second] == pytest.approx(before[second] + view)  # the type's
    assert o.unknown_item_events == 2
    o = apply(o, _changes(2, _ev(4, "C-NEW", "NO-SUCH-ITEM", "view", T, 2)))
    assert o.unknown_item_events == 3
    item = b.items.ids[first]
    o = apply(o, _changes(3, _ev(5, user, item, "decline", T, 3)))
    assert o.users[user].declined == {first: T}
    o = apply(o, _changes(4, _ev(6, user, item, "decline", T - timedelta(days=2), 4)))
    assert o.users[user].declined == {first: T}  # recorded late, dated earlier: no change
    o = apply(o, _changes(5, _ev(7, user, item, "decline", T + timedelta(days=1), 5)))
    assert o.users[user].declined == {first: T + timedelta(days=1)}


def test_holding_changes_only_by_held_and_close_events_and_a_tie_goes_to_the_later(
    recommender: Recommender,
) -> None:
    """As training orders them: the latest held or close event by time decides, and on a
    tie the one recorded later; any other event on a held product leaves it held."""
    b = recommender.bundle
    user, item = "NEW-HOLDER", b.items.ids[5]
    o = apply(recommender.overlay(P), _changes(1, _ev(1, user, item, "purchase", T, 1)))
    assert o.users[user].held_rows.tolist() == [5]
    o = apply(o, _changes(2, _ev(2, user, item, "view", T + timedelta(hours=1), 2)))
    assert o.users[user].held_rows.tolist() == [5]  # a view closes nothing
    o = apply(o, _changes(3, _ev(3, user, item, "close", T, 3)))  # same time, later
    assert o.users[user].held_rows.size == 0


def test_contact_history_kept_is_the_year_before_the_latest_event(
    recommender: Recommender,
) -> None:
    """Contacts and declines older than ``HISTORY_DAYS`` before the latest event are
    dropped (no policy window reaches them); one an instant younger is kept."""
    b = recommender.bundle
    user, year, tick = "NEW-CONTACTED", timedelta(days=HISTORY_DAYS), timedelta(microseconds=1)
    latest = T + year
    o = apply(
        recommender.overlay(P),
        _changes(
            1,
            StoredEvent("c1", user, b.items.ids[0], "contacted", T, channel="sms", sequence=1),
            StoredEvent(
                "c2", user, b.items.ids[1], "contacted", T + tick, channel="email", sequence=1
            ),
            _ev(3, user, b.items.ids[2], "decline", T, 1),
            _ev(4, user, b.items.ids[3], "decline", T + tick, 1),
            _ev(5, user, b.items.ids[4], "view", latest, 1),
        ),
    )
    assert o.users[user].contacts == ((T + tick, "email"),)
    assert o.users[user].declined == {3: T + tick}


def test_a_changed_history_is_weighed_on_its_own_products(recommender: Recommender) -> None:
    """A refolded customer's confidences are the trainer's weighting of their strengths on
    their own item rows (BM25 weighs each product by its idf), as 32-bit floats."""
    b = recommender.bundle
    bm25 = RowWeighting.from_training(
        "bm25", b.indptr, b.indices, b.strength, len(b.items), 50.0, 0.7
    )
    o = recommender.overlay(P)
    o = dataclasses.replace(o, context=dataclasses.replace(o.context, weighting=bm25))
    row = next(r for r in range(len(b.users)) if b.user_item_rows(r).size >= 2)
    user = b.users.ids[row]
    new = next(i for i in range(len(b.items)) if i not in set(b.user_item_rows(row).tolist()))
    o = apply(o, _changes(1, _ev(1, user, b.items.ids[new], "view", T, 1)))
    live = o.users[user]
    assert live.refolded and new in live.rows.tolist()
    assert live.rows.dtype == np.int64 and live.strength.dtype == np.float32
    np.testing.assert_allclose(live.confidence, bm25.row(live.rows, live.strength), rtol=1e-6)


def test_a_close_is_remembered_by_time_even_without_a_refold(recommender: Recommender) -> None:
    """A close carries no strength (no refold), yet its time is kept: a held event dated
    before it, recorded later, does not make the product held again."""
    b = recommender.bundle
    row = next(r for r in range(len(b.users)) if b.held[b.indptr[r] : b.indptr[r + 1]].any())
    user = b.users.ids[row]
    held_row = int(b.user_item_rows(row)[b.held[b.indptr[row] : b.indptr[row + 1]]][0])
    item = b.items.ids[held_row]
    o = apply(recommender.overlay(P), _changes(1, _ev(1, user, item, "close", T, 1)))
    assert not o.users[user].refolded and held_row not in o.users[user].held_rows.tolist()
    o = apply(o, _changes(2, _ev(2, user, item, "hold", T - timedelta(days=1), 2)))
    assert held_row not in o.users[user].held_rows.tolist()


def test_each_batch_of_events_re_solves_the_customer_from_their_whole_history(
    recommender: Recommender,
) -> None:
    """A second batch for the same customer solves their vector again, from everything
    they did (the bundle's history and both batches), not the first batch's vector."""
    b = recommender.bundle
    row = next(r for r in range(len(b.users)) if b.user_item_rows(r).size >= 2)
    user = b.users.ids[row]
    fresh = [i for i in range(len(b.items)) if i not in set(b.user_item_rows(row).tolist())]
    o = apply(
        recommender.overlay(P), _changes(1, _ev(1, user, b.items.ids[fresh[0]], "hold", T, 1))
    )
    first = o.users[user].vector
    o = apply(o, _changes(2, _ev(2, user, b.items.ids[fresh[1]], "hold", T, 2)))
    live = o.users[user]
    assert first is not None and live.vector is not None
    assert not np.allclose(live.vector, first)
    (expected,) = o.context.fold_in([(live.rows, live.confidence)])
    np.testing.assert_allclose(live.vector, expected, rtol=1e-5, atol=1e-6)


def test_product_updates_are_counted_and_one_the_bundle_lacks_hides_nothing(
    recommender: Recommender,
) -> None:
    b = recommender.bundle
    item = b.items.ids[2]
    products = [
        ProductState("NO-SUCH-PRODUCT", False, None, 1),
        ProductState(item, False, None, 1),
        ProductState(b.items.ids[3], None, None, 1),
    ]
    o = apply(recommender.overlay(P), _changes(1, products=products))
    assert o.products_changed == 2  # the bundle's products only, whether or not they differ
    assert not o.item_rules.active[2]
    o = apply(o, _changes(2, products=[ProductState(item, True, None, 2)]))
    assert o.products_changed == 3 and o.item_rules.active[2]


def test_a_batch_that_forgets_a_customer_drops_their_events_and_profile_only(
    recommender: Recommender,
) -> None:
    """An erasure in the same batch as the customer's own events or profile update wins
    (a race must not resurrect them); the others in the batch are applied."""
    b = recommender.bundle
    gone, kept, new = b.users.ids[3], b.users.ids[4], "NEW-FORGOTTEN"
    item = b.items.ids[6]
    o = apply(
        recommender.overlay(P),
        _changes(
            1,
            _ev(1, gone, item, "view", T, 1),
            _ev(2, new, item, "view", T, 1),
            _ev(3, kept, item, "view", T, 1),
            customers=[CustomerState(u, 2, None, 1) for u in (gone, new, kept)],
            erased=[P(gone), P(new)],
        ),
    )
    assert o.user(gone) is ERASED and o.user(new) is ERASED
    assert o.users[kept].refolded and o.users[kept].tolerance == 2
    assert o.erased_rows.tolist() == [3] and o.erased_rows.dtype == np.int64
    only_new = apply(recommender.overlay(P), _changes(1, erased=[P(new)]))
    assert only_new.erased_rows.dtype == np.int64 and only_new.erased_rows.size == 0


def test_a_profile_update_keeps_the_customers_live_events_and_other_field(
    recommender: Recommender,
) -> None:
    b = recommender.bundle
    user = b.users.ids[5]
    o = apply(recommender.overlay(P), _changes(1, _ev(1, user, b.items.ids[7], "view", T, 1)))
    refolded = o.users[user]
    o = apply(o, _changes(2, customers=[CustomerState(user, 2, None, 2)]))
    o = apply(o, _changes(3, customers=[CustomerState(user, None, False, 3)]))
    live = o.users[user]
    assert live.refolded and live.rows.tolist() == refolded.rows.tolist()
    assert live.vector is not None and np.array_equal(live.vector, refolded.vector)
    assert (live.tolerance, live.consent) == (2, False)  # None kept the earlier value
    o = apply(o, _changes(4, customers=[CustomerState(user, 4, None, 4)]))
    assert (o.users[user].tolerance, o.users[user].consent) == (4, False)


def test_suitability_still_applies_after_a_product_update(recommender: Recommender) -> None:
    b = recommender.bundle
    assert b.item_rules.suitability
    o = apply(
        recommender.overlay(P), _changes(1, products=[ProductState(b.items.ids[0], False, None, 1)])
    )
    assert o.item_rules.suitability
    user = next(u for u in b.users.ids if int(recommender.tolerance[b.users.index(u)]) == 1)
    items = recommender.recommend(RecommendQuery(user_id=user, k=10), o).items
    assert items and all(b.item_rules.risk[b.items.index(i.item_id)] <= 1 for i in items)


def test_remembered_history_never_brings_back_a_forgotten_customer(
    recommender: Recommender,
) -> None:
    """``remember`` over an overlay with changes: a forgotten customer's history stays
    out, and the history of a customer with a live record joins it without undoing it."""
    b = recommender.bundle
    gone, live_user, other = b.users.ids[3], b.users.ids[4], b.users.ids[5]
    item = b.items.ids[1]
    o = apply(
        recommender.overlay(P),
        _changes(1, _ev(1, live_user, b.items.ids[8], "view", T, 1), erased=[P(gone)]),
    )
    refolded = o.users[live_user]
    history = [
        StoredEvent("h1", gone, item, "decline", T, sequence=1),
        StoredEvent("h2", live_user, item, "decline", T, sequence=1),
        StoredEvent("h3", other, item, "contacted", T, channel="sms", sequence=1),
    ]
    o = remember(o, history)
    assert o.user(gone) is ERASED
    assert o.users[live_user].refolded and o.users[live_user].declined == {1: T}
    assert np.array_equal(o.users[live_user].rows, refolded.rows)
    assert o.users[other].contacts == ((T, "sms"),)


def test_a_remembered_contact_reaches_targeting(recommender: Recommender) -> None:
    """A bundle customer's remembered contacts make them a changed row, so targeting
    counts them: capped on the channel, they leave the audience."""
    b = recommender.bundle
    targeter = Targeter(b)
    item = next(
        i
        for i in b.items.ids
        if b.item_rules.active[b.items.index(i)] and b.item_rules.risk[b.items.index(i)] == 1
    )
    query = TargetQuery(item_ids=(item,), audience_size=len(b.users))
    base = recommender.overlay(P)
    audience = targeter.target(query, base, channel="sms", now=T)
    row = int(audience.rows[0])
    user = b.users.ids[row]
    contacted = [StoredEvent("h1", user, item, "contacted", T, channel="sms", sequence=1)]
    o = remember(base, contacted)
    assert row in o.changed_rows.tolist()
    again = targeter.target(query, o, channel="sms", now=T)
    assert row not in again.rows.tolist() and again.excluded.contact_capped == 1
