"""Every rule holds under live changes, exactly as if the changes had been in the training data.

Hypothesis draws interleavings of events, profile and product updates and erasures;
each is written to a real state store and read back as the served overlay. The oracle
is the sample's rules (``rules_oracle.Oracle``, from the raw Parquet files) with the
same changes applied to its plain dictionaries, sharing no code with the overlay.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.logs import Pseudonymizer
from recsvc.model.overlay import Overlay
from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery, TargetQuery
from recsvc.model.ranking import Recommender
from recsvc.model.targeting import Targeter
from recsvc.state import CustomerUpdate, Event, ProductUpdate, StateStore, open_store
from tests.rules_oracle import Oracle

PSEUDONYM = Pseudonymizer(b"live-rules-key")
WEIGHTED = ("view", "click", "apply", "purchase", "hold")
HELD = ("purchase", "hold")
EVENT_TYPES = (*WEIGHTED, "close", "decline", "contacted")
NEW = ("N-0001", "N-0002", "N-0003")
T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
# Contact windows and decline cooldowns have all passed by then: test_contact_rules checks them.
LATER = T0 + timedelta(days=400)


class LiveOracle:
    """The oracle's dictionaries with the drawn changes applied, the way training would."""

    def __init__(self, base: Oracle) -> None:
        self.o = copy.deepcopy(base)
        self.forgotten: set[str] = set()
        # Customers the model does not know, before they have an interaction: not scorable,
        # so in no audience, but their consent counts once they are. A tolerance governs
        # at once (training would add them to the users table with it).
        self.pending_consent: dict[str, bool] = {}

    def _ensure(self, user: str) -> None:
        if user not in self.o.consent:
            self.o.tolerance.setdefault(user, 1)
            self.o.consent[user] = self.pending_consent.pop(user, False)

    def event(self, user: str, item: str, kind: str) -> None:
        if user in self.forgotten:
            return  # dropped by the store
        history = self.o.history.setdefault(user, set())
        held = self.o.held.setdefault(user, set())
        if kind in WEIGHTED:
            self._ensure(user)
            history.add(item)
        if kind in HELD:
            held.add(item)
        elif kind == "close" and item in history:
            held.discard(item)

    def customer(self, user: str, tolerance: int | None, consent: bool | None) -> None:
        if user in self.forgotten:
            return
        if tolerance is not None:
            self.o.tolerance[user] = tolerance
        if consent is not None:
            known = user in self.o.consent
            (self.o.consent if known else self.pending_consent)[user] = consent

    def product(self, item: str, active: bool | None, risk: int | None) -> None:
        if active is not None:
            self.o.active[item] = active
        if risk is not None:
            self.o.risk[item] = risk

    def forget(self, user: str) -> None:
        self.forgotten.add(user)
        for table in (self.o.tolerance, self.o.consent, self.o.history, self.o.held):
            table.pop(user, None)
        self.pending_consent.pop(user, None)


def _ops(users: list[str], items: list[str]) -> st.SearchStrategy[list[tuple[object, ...]]]:
    user = st.sampled_from(users + list(NEW))
    item = st.sampled_from(items)
    level = st.none() | st.integers(1, 5)
    flag = st.none() | st.booleans()
    op = st.one_of(
        st.tuples(st.just("event"), user, item, st.sampled_from(EVENT_TYPES)),
        st.tuples(st.just("customer"), user, level, flag),
        st.tuples(st.just("product"), item, flag, level),
        st.tuples(st.just("forget"), user),
    )
    return st.lists(op, min_size=1, max_size=30)


def _write(store: StateStore, oracle: LiveOracle, ops: list[tuple[object, ...]]) -> None:
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "event":
            _, user, item, event = op
            at = T0 + timedelta(seconds=n)
            store.record_events([Event(f"e{n}", str(user), str(item), str(event), at)])
            oracle.event(str(user), str(item), str(event))
        elif kind == "customer":
            _, user, tolerance, consent = op
            update = CustomerUpdate(str(user), tolerance, consent)  # type: ignore[arg-type]
            store.update_customers([update])
            oracle.customer(str(user), tolerance, consent)  # type: ignore[arg-type]
        elif kind == "product":
            _, item, active, risk = op
            store.update_products([ProductUpdate(str(item), active, risk)])  # type: ignore[arg-type]
            oracle.product(str(item), active, risk)  # type: ignore[arg-type]
        else:
            _, user = op
            store.forget(str(user), "case", T0)
            oracle.forget(str(user))


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


@pytest.fixture
def targeter(recommender: Recommender) -> Targeter:
    return Targeter(recommender.bundle)


@pytest.fixture
def live_store() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield d


def _touched(ops: list[tuple[object, ...]], users: list[str]) -> list[str]:
    named = {str(op[1]) for op in ops if op[0] in ("event", "customer", "forget")}
    return sorted(named | set(users[:20]))


def _check_rankings(
    r: Recommender, overlay: Overlay, oracle: LiveOracle, users: list[str], items: list[str]
) -> None:
    o = oracle.o
    for user in users:
        for k in (5, 40):
            got = r.recommend(RecommendQuery(user_id=user, k=k), overlay, LATER)
            o.check_recommended(
                user, k, set(), [i.item_id for i in got.items], [i.score for i in got.items]
            )
        ranked = r.rank_items(RankQuery(user_id=user, item_ids=tuple(items)), overlay)
        expected = {i for i in items if o.allowed(user, i)}
        assert {i.item_id for i in ranked.items} == expected, user
        similar = r.similar_items(SimilarQuery(item_id=items[0], k=10, user_id=user), overlay)
        ids = [i.item_id for i in similar.items]
        o.check_recommended(user, 10, {items[0]}, ids, [i.score for i in similar.items])


def _check_audiences(
    t: Targeter, overlay: Overlay, oracle: LiveOracle, data: st.DataObject
) -> None:
    o = oracle.o
    ids = t.bundle.users.ids
    erased = len(oracle.forgotten & set(ids))  # counted as without consent
    active = [i for i in t.bundle.items.ids if o.active[i]]
    for _ in range(3):
        items = data.draw(st.lists(st.sampled_from(active), min_size=1, max_size=3, unique=True))
        size = data.draw(st.integers(1, 2000))
        include = data.draw(st.booleans())
        query = TargetQuery(item_ids=tuple(items), audience_size=size, include_holders=include)
        audience = t.target(query, overlay, now=LATER)
        members = audience.ids(ids)
        assert not set(members) & oracle.forgotten
        o.check_audience(items, size, include, members, audience.scores.tolist())
        o.check_audience_counts(items, include, audience, erased)
        assert audience.excluded.contact_capped == audience.excluded.declined_recently == 0
    # The offline export of every product: the same rules, one pass.
    for row, audience in t.target_each(50, overlay=overlay, now=LATER):
        item = t.bundle.items.ids[row]
        assert o.active[item]
        o.check_audience([item], 50, False, audience.ids(ids), audience.scores.tolist())
        o.check_audience_counts([item], False, audience, erased)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_rule_holds_under_any_interleaving_of_live_changes(
    recommender: Recommender,
    targeter: Targeter,
    oracle: Oracle,
    live_store: str,
    data: st.DataObject,
) -> None:
    b = recommender.bundle
    users, items = list(b.users.ids[:60]), list(b.items.ids)
    ops = data.draw(_ops(users, items))
    expected = LiveOracle(oracle)
    path = Path(live_store) / f"state-{np.random.default_rng().integers(1 << 62)}.db"
    with open_store(f"sqlite:///{path}", PSEUDONYM) as store:
        _write(store, expected, ops)
        overlay = recommender.overlay(PSEUDONYM, store.changes_since(0))
        assert overlay.sequence == store.sequence()
    touched = _touched(ops, users)
    sample = data.draw(st.lists(st.sampled_from(items), min_size=1, max_size=12, unique=True))
    _check_rankings(recommender, overlay, expected, touched, sample)
    _check_audiences(targeter, overlay, expected, data)
