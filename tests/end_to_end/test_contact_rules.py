"""Contact policies over the sample: no audience holds a capped or cooling-down customer,
and audiences are full whenever enough eligible customers exist.

Hypothesis draws ``contacted`` and ``decline`` histories over the sample's customers at a
fixed ``now``; the oracle reads the raw events and the sample's Parquet files
(``rules_oracle.Oracle``) and shares no code with ``recsvc.model.contact``. Then one
scenario end to end: the RPC and the offline export answer alike, with the same counts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.errors import PreconditionFailed
from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import load_bundle, read_latest
from recsvc.model.contact import parse_policy
from recsvc.model.overlay import Overlay
from recsvc.model.queries import RecommendQuery, TargetQuery
from recsvc.model.ranking import Recommender
from recsvc.model.targeting import Audience, Targeter
from recsvc.state import Event, open_store
from recsvc.state.base import Changes, StoredEvent
from recsvc.v1 import recommender_pb2 as pb
from tests.conftest import ServerThread, settings_for
from tests.rules_oracle import Oracle
from training.cli import main as train_main

POLICY_DATA: dict[str, object] = {
    "window_days": 7,
    "max_per_channel": {"email": 2, "sms": 1},
    "max_all_channels": 3,
    "decline_cooldown_days": 30,
    "decline_cooldown_days_by_category": {"credit_card": 60, "mortgage": 90},
    "never_together": [["mortgage", "credit_card"]],
}
POLICY = parse_policy(POLICY_DATA)
NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
CHANNELS = ("email", "sms", "push", "call", "")
KEY = b"contact-rules-key"
PSEUDONYM = Pseudonymizer(KEY)


@dataclass(frozen=True)
class Drawn:
    user: str
    item: str
    kind: str
    channel: str
    time: datetime


class ContactOracle:
    """The policy restated over raw events: who is capped, who is cooling down."""

    def __init__(self, base: Oracle, events: list[Drawn], now: datetime) -> None:
        self.base, self.now = base, now
        self.by_user: dict[str, list[Drawn]] = {}
        for e in events:
            self.by_user.setdefault(e.user, []).append(e)

    def capped(self, user: str, channel: str) -> bool:
        since = self.now - timedelta(days=7)
        recent = [
            e.channel
            for e in self.by_user.get(user, ())
            if e.kind == "contacted" and since < e.time  # dated ahead of now: recent too
        ]
        caps = {"email": 2, "sms": 1}
        return len(recent) >= 3 or (channel in caps and recent.count(channel) >= caps[channel])

    def closed(self, user: str) -> tuple[set[str], set[str]]:
        """Categories, and products without one, the customer declined within the cooldown."""
        categories, products = set(), set()
        for e in self.by_user.get(user, ()):
            category = self.base.category[e.item]
            days = {"credit_card": 60, "mortgage": 90}.get(category or "", 30)
            if e.kind == "decline" and self.now - timedelta(days=days) < e.time:
                if category is None:
                    products.add(e.item)
                else:
                    categories.add(category)
        return categories, products

    def cooling(self, user: str, items: list[str]) -> bool:
        categories, products = self.closed(user)
        return any(self.base.category[i] in categories or i in products for i in items)

    def check(
        self,
        audience: Audience,
        members: list[str],
        items: list[str],
        size: int,
        include: bool,
        channel: str,
    ) -> None:
        """No capped or cooling member; full when enough are eligible; counts per rule."""
        eligible = self.base.audience_eligible(items, include)
        capped = {u for u in eligible if self.capped(u, channel)}
        cooling = {u for u in eligible - capped if self.cooling(u, items)}
        allowed = eligible - capped - cooling
        assert set(members) <= allowed
        assert len(members) == min(size, len(allowed)) == len(set(members))
        assert audience.excluded.contact_capped == len(capped)
        assert audience.excluded.declined_recently == len(cooling)
        assert audience.eligible == len(allowed)


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


@pytest.fixture
def targeter(recommender: Recommender) -> Targeter:
    return Targeter(recommender.bundle, contact_policy=POLICY)


@pytest.fixture(scope="module")
def policed(recommender: Recommender) -> Recommender:
    return Recommender(recommender.bundle, contact_policy=POLICY)


def _events(users: list[str], items: list[str]) -> st.SearchStrategy[list[Drawn]]:
    event = st.builds(
        Drawn,
        user=st.sampled_from(users),
        item=st.sampled_from(items),
        kind=st.sampled_from(("contacted", "decline")),
        channel=st.sampled_from(CHANNELS),
        # Up to 100 days back, some dated up to a day ahead (a skewed sender's clock).
        time=(st.integers(0, 100 * 86_400) | st.integers(-86_400, 0)).map(
            lambda s: NOW - timedelta(seconds=s)
        ),
    )
    return st.lists(event, min_size=1, max_size=150)


def _overlay(recommender: Recommender, events: list[Drawn]) -> Overlay:
    stored = tuple(
        StoredEvent(f"e{n}", e.user, e.item, e.kind, e.time, None, "c", e.channel, sequence=n + 1)
        for n, e in enumerate(events)
    )
    return recommender.overlay(PSEUDONYM, Changes(len(stored), stored, (), (), ()))


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_audience_holds_a_capped_or_cooling_customer_and_audiences_are_full(
    recommender: Recommender,
    targeter: Targeter,
    policed: Recommender,
    oracle: Oracle,
    data: st.DataObject,
) -> None:
    b = recommender.bundle
    # Few customers, many events: caps and cooldowns bind often.
    users = data.draw(st.lists(st.sampled_from(b.users.ids), min_size=1, max_size=60, unique=True))
    events = data.draw(_events(users, list(b.items.ids)))
    overlay = _overlay(recommender, events)
    expected = ContactOracle(oracle, events, NOW)
    ids = b.users.ids
    active = [i for i in b.items.ids if oracle.active[i]]
    for _ in range(3):
        items = data.draw(st.lists(st.sampled_from(active), min_size=1, max_size=3, unique=True))
        size = data.draw(st.integers(1, 1500))
        include = data.draw(st.booleans())
        channel = data.draw(st.sampled_from(CHANNELS))
        query = TargetQuery(item_ids=tuple(items), audience_size=size, include_holders=include)
        if {"mortgage", "credit_card"} <= {oracle.category[i] for i in items}:
            with pytest.raises(PreconditionFailed, match="'mortgage' and 'credit_card'"):
                targeter.target(query, overlay, channel=channel, now=NOW)
            continue
        audience = targeter.target(query, overlay, channel=channel, now=NOW)
        expected.check(audience, audience.ids(ids), items, size, include, channel)
    # The offline export of every product: no channel, so the cap across channels alone.
    for row, audience in targeter.target_each(40, overlay=overlay, now=NOW):
        item = b.items.ids[row]
        expected.check(audience, audience.ids(ids), [item], 40, False, "")
    # The mobile app: Recommend offers nothing of a category declined within its cooldown.
    for user in users:
        categories, products = expected.closed(user)
        shut = {i for i in b.items.ids if oracle.category[i] in categories} | products
        got = policed.recommend(RecommendQuery(user_id=user, k=40), overlay, NOW).items
        ids_got = [i.item_id for i in got]
        oracle.check_recommended(user, 40, shut, ids_got, [i.score for i in got])


# --- one scenario end to end: the RPC and the offline export ---------------------------


@dataclass(frozen=True)
class Scenario:
    models: Path
    state: str
    policy: Path
    item: str
    capped: str
    cooling: str
    kept: str
    sequence: int


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    recommender: Recommender,
    oracle: Oracle,
) -> Scenario:
    """A credit card campaign's top customers: one capped on email, one who declined a card."""
    b = recommender.bundle
    cards = [i for i in b.items.ids if oracle.category[i] == "credit_card" and oracle.active[i]]
    item, other = cards[0], cards[1]
    top = Targeter(b).target(TargetQuery(item_ids=(item,), audience_size=3)).ids(b.users.ids)
    capped, cooling, kept = top
    now = datetime.now(timezone.utc)
    d = tmp_path_factory.mktemp("contact")
    policy = d / "policy.json"
    policy.write_text(json.dumps(POLICY_DATA))
    state = f"sqlite:///{d / 'state.db'}"
    with open_store(state, PSEUDONYM) as store:
        store.record_events(
            [
                Event("c1", capped, item, "contacted", now - timedelta(days=1), channel="email"),
                Event("c2", capped, other, "contacted", now - timedelta(days=2), channel="email"),
                # Declined 40 days ago: past the default 30, within the cards' 60.
                Event("d1", cooling, other, "decline", now - timedelta(days=40)),
                Event("c3", kept, item, "contacted", now - timedelta(days=1), channel="sms"),
            ]
        )
        sequence = store.sequence()
    return Scenario(models_dir, state, policy, item, capped, cooling, kept, sequence)


@pytest.fixture(scope="module")
def policed_server(scenario: Scenario) -> Iterator[ServerThread]:
    s = ServerThread(
        settings_for(
            scenario.models, state=scenario.state, pseudonym_key=KEY, contact_policy=scenario.policy
        )
    )
    yield s
    s.stop()


def _target(
    server: ServerThread, scenario: Scenario, items: list[str], channel: str
) -> list[pb.TargetUsersResponse]:
    request = pb.TargetUsersRequest(
        item_ids=items, audience_size=3, channel=channel, min_sequence=scenario.sequence
    )
    return list(server.stub.TargetUsers(request, timeout=30))


def test_the_rpc_leaves_out_capped_and_cooling_customers_and_counts_them(
    policed_server: ServerThread, scenario: Scenario
) -> None:
    answer = _target(policed_server, scenario, [scenario.item], "email")
    members = [u.user_id for m in answer for u in m.users]
    assert len(members) == 3
    assert scenario.kept in members
    assert not {scenario.capped, scenario.cooling} & set(members)
    assert (answer[-1].excluded.contact_capped, answer[-1].excluded.declined_recently) == (1, 1)
    # On SMS the email cap does not bind (two contacts, below the three across channels).
    sms = [
        u.user_id
        for m in _target(policed_server, scenario, [scenario.item], "sms")
        for u in m.users
    ]
    assert scenario.capped in sms and scenario.kept not in sms  # kept had their one SMS


def test_the_rpc_refuses_categories_kept_apart_naming_them(
    policed_server: ServerThread, scenario: Scenario, oracle: Oracle
) -> None:
    mortgage = next(
        i for i in oracle.category if oracle.category[i] == "mortgage" and oracle.active[i]
    )
    with pytest.raises(grpc.RpcError) as err:
        _target(policed_server, scenario, [scenario.item, mortgage], "email")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'mortgage' and 'credit_card'" in (err.value.details() or "")


def test_recommend_offers_no_product_of_a_category_declined_within_the_cooldown(
    policed_server: ServerThread, scenario: Scenario, oracle: Oracle
) -> None:
    request = pb.RecommendRequest(user_id=scenario.cooling, k=50, min_sequence=scenario.sequence)
    got = [i.item_id for i in policed_server.stub.Recommend(request, timeout=30).items]
    assert got and not [i for i in got if oracle.category[i] == "credit_card"]
    other = pb.RecommendRequest(user_id=scenario.kept, k=50, min_sequence=scenario.sequence)
    kept = [i.item_id for i in policed_server.stub.Recommend(other, timeout=30).items]
    assert any(oracle.category[i] == "credit_card" for i in kept)  # the rule, not the data


def test_the_offline_audience_matches_the_rpc_and_its_sidecar_counts(
    policed_server: ServerThread,
    scenario: Scenario,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSVC_PSEUDONYM_KEY", KEY.decode())
    out = tmp_path / "audience.parquet"
    argv = [
        "-q",
        "audience",
        "--models",
        str(scenario.models),
        "--item",
        scenario.item,
        "--size",
        "3",
    ]
    argv += ["--state", scenario.state, "--contact-policy", str(scenario.policy)]
    assert train_main([*argv, "--channel", "email", "--out", str(out)]) == 0
    offline = pq.read_table(out).column("user_id").to_pylist()
    online = [
        u.user_id
        for m in _target(policed_server, scenario, [scenario.item], "email")
        for u in m.users
    ]
    assert offline == online
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["excluded"]["contact_capped"] == 1
    assert sidecar["excluded"]["declined_recently"] == 1


def test_a_retrain_that_folds_the_state_in_forgets_no_contact(
    scenario: Scenario,
    sample_dir: Path,
    oracle: Oracle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Contacts and declines are in no bundle: once a retrain's state sequence passes them,
    the overlay reads them by time, so the capped and the cooling customers stay out."""
    state_db = tmp_path / "state.db"
    with (
        sqlite3.connect(scenario.state.removeprefix("sqlite:///")) as src,
        sqlite3.connect(state_db) as dst,
    ):
        src.backup(dst)  # a copy: the fit below must not touch the module's store
    state = f"sqlite:///{state_db}"
    monkeypatch.setenv("RECSVC_PSEUDONYM_KEY", KEY.decode())
    models = tmp_path / "models"
    fit = ["-q", "fit", "--models", str(models), "--state", state]
    for flag, name in (
        ("--interactions", "interactions"),
        ("--items", "items"),
        ("--users", "users"),
    ):
        fit += [flag, str(sample_dir / f"{name}.parquet")]
    assert train_main([*fit, "--factors", "8", "--iterations", "2", "--seed", "1"]) == 0
    version = read_latest(models)
    assert version is not None
    assert load_bundle(models / version).manifest.state_sequence == scenario.sequence
    retrained = replace(scenario, models=models, state=state)
    s = ServerThread(
        settings_for(models, state=state, pseudonym_key=KEY, contact_policy=scenario.policy)
    )
    try:
        request = pb.TargetUsersRequest(
            item_ids=[scenario.item], audience_size=400, channel="email"
        )
        answer = list(s.stub.TargetUsers(request, timeout=30))
        members = {u.user_id for m in answer for u in m.users}
        assert len(members) == 400 and not {scenario.capped, scenario.cooling} & members
        assert (answer[-1].excluded.contact_capped, answer[-1].excluded.declined_recently) == (1, 1)
        recommend = pb.RecommendRequest(user_id=scenario.cooling, k=50)
        got = [i.item_id for i in s.stub.Recommend(recommend, timeout=30).items]
        assert got and not [i for i in got if oracle.category[i] == "credit_card"]
    finally:
        s.stop()
    out = tmp_path / "audience.parquet"
    offline = ["-q", "audience", "--models", str(models), "--item", scenario.item, "--size", "400"]
    offline += ["--state", retrained.state, "--contact-policy", str(scenario.policy)]
    assert train_main([*offline, "--channel", "email", "--out", str(out)]) == 0
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert (sidecar["excluded"]["contact_capped"], sidecar["excluded"]["declined_recently"]) == (
        1,
        1,
    )
