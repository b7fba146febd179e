"""Audiences: never without consent, never unsuitable, holders only on request;
the RPC, the CLI and the offline command agree."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.cli import main as recsvc_main
from recsvc.errors import InvalidArgument, NotFound, PreconditionFailed
from recsvc.logs import Pseudonymizer
from recsvc.model import targeting
from recsvc.model.bundle import Bundle, load_bundle
from recsvc.model.overlay import apply
from recsvc.model.queries import TargetQuery
from recsvc.model.ranking import Recommender
from recsvc.model.targeting import Audience, Targeter
from recsvc.state import Changes, CustomerState, ProductState, StoredEvent
from recsvc.v1 import recommender_pb2 as pb
from tests.conftest import PARAMS, ServerThread, settings_for
from tests.rules_oracle import Oracle
from training.cli import main as train_main
from training.data import load_training_data
from training.fit import fit_model
from training.publish import publish


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


@pytest.fixture
def targeter(bundle_path: Path) -> Targeter:
    """Built per test, so a fault in building one (the holders' lists) reaches every test
    that reads it, under the mutation run too (it maps code to the tests it ran in)."""
    return Targeter(load_bundle(bundle_path))


def _trained(
    tmp_path: Path,
    sample_dir: Path,
    interactions: Path | None = None,
    users: Path | None = None,
) -> Bundle:
    """A bundle trained and published from the sample, with some of its tables replaced."""
    data = load_training_data(
        interactions or sample_dir / "interactions.parquet",
        sample_dir / "items.parquet",
        users or sample_dir / "users.parquet",
    )
    folder = publish(tmp_path / "m", data, fit_model(data.user_items, PARAMS, progress=False))
    return load_bundle(folder)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_audience_rules_hold_for_any_campaign(
    targeter: Targeter, oracle: Oracle, data: st.DataObject
) -> None:
    oracle.check_drawn_campaign(targeter, data)


def test_holders_are_left_out_unless_asked(targeter: Targeter, oracle: Oracle) -> None:
    item = max(
        (i for i in targeter.bundle.items.ids if oracle.active[i] and oracle.risk[i] == 1),
        key=lambda i: sum(i in h for h in oracle.held.values()),
    )
    holders = {u for u, h in oracle.held.items() if item in h and oracle.consent[u]}
    assert holders
    without = targeter.target(TargetQuery(item_ids=(item,), audience_size=100_000))
    with_ = targeter.target(
        TargetQuery(item_ids=(item,), audience_size=100_000, include_holders=True)
    )
    ids = lambda a: {targeter.bundle.users.ids[r] for r in a.rows}  # noqa: E731
    assert not ids(without) & holders and holders <= ids(with_)
    assert without.excluded.holders == len(holders)


def test_min_score_and_errors(targeter: Targeter) -> None:
    a = targeter.target(
        TargetQuery(item_ids=("SAV-000001",), audience_size=100_000, min_score=0.05)
    )
    assert (a.scores >= 0.05).all() and a.excluded.below_min_score > 0
    assert a.scores.dtype == np.float32 and a.sequence == 0 and a.new_ids == ()
    assert a.excluded.below_min_score == a.eligible - len(a.rows)
    # A score equal to min_score stays.
    last = a.scores[-1]
    at = targeter.target(
        TargetQuery(item_ids=("SAV-000001",), audience_size=100_000, min_score=float(last))
    )
    assert at.rows[-1] == a.rows[-1] and at.scores[-1] == last
    version = targeter.bundle.version
    with pytest.raises(NotFound, match=f"^item_id 'nope' is not in model {version}$"):
        targeter.target(TargetQuery(item_ids=("SAV-000001", "nope"), audience_size=5))
    with pytest.raises(InvalidArgument, match="audience_size"):
        TargetQuery(item_ids=("x",), audience_size=0)
    with pytest.raises(InvalidArgument, match="audience_size"):
        TargetQuery(item_ids=("x",), audience_size=10_000_001)


def test_rpc_cli_and_offline_agree(
    server: ServerThread, targeter: Targeter, oracle: Oracle, models_dir: Path, tmp_path: Path
) -> None:
    items = ["MF-000001", "BF-000002"]
    req = pb.TargetUsersRequest(item_ids=items, audience_size=7000)
    msgs = list(server.stub.TargetUsers(req, timeout=30))
    users = [u.user_id for m in msgs for u in m.users]
    scores = [u.score for m in msgs for u in m.users]
    assert msgs[0].model_version == targeter.bundle.version
    assert msgs[-1].HasField("excluded") and msgs[-1].excluded.no_consent > 0
    oracle.check_audience(items, 7000, False, users, scores)

    target = f"localhost:{server.running.port}"
    cli_out, off_out = tmp_path / "cli.parquet", tmp_path / "offline.parquet"
    request = ["--item", items[0], "--item", items[1], "--size", "7000"]
    assert recsvc_main(["target", "--target", target, *request, "--out", str(cli_out)]) == 0
    offline = ["-q", "audience", "--models", str(models_dir), *request, "--out", str(off_out)]
    assert train_main(offline) == 0
    cli, off = pq.read_table(cli_out), pq.read_table(off_out)
    assert cli.column("user_id").to_pylist() == users == off.column("user_id").to_pylist()
    side = json.loads((tmp_path / "offline.parquet.json").read_text())
    assert side["model_version"] == targeter.bundle.version
    assert side["excluded"]["no_consent"] == msgs[-1].excluded.no_consent
    cli_side = json.loads((tmp_path / "cli.parquet.json").read_text())
    assert cli_side["rows"] == len(users)
    assert side["approximate"] is False and msgs[-1].approximate is False
    for key in ("model_version", "request", "eligible_users", "excluded", "approximate"):
        assert cli_side[key] == side[key], key


def test_rpc_errors(server: ServerThread) -> None:
    for req, code in [
        (pb.TargetUsersRequest(item_ids=["nope"], audience_size=5), grpc.StatusCode.NOT_FOUND),
        (
            pb.TargetUsersRequest(item_ids=["SAV-000001"], audience_size=0),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (pb.TargetUsersRequest(audience_size=5), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            list(server.stub.TargetUsers(req, timeout=10))
        assert err.value.code() == code


def test_all_items_export(
    models_dir: Path, tmp_path: Path, targeter: Targeter, oracle: Oracle
) -> None:
    out = tmp_path / "all"
    assert (
        train_main(
            [
                "-q",
                "audience",
                "--models",
                str(models_dir),
                "--all-items",
                "--size",
                "50",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = pq.read_table(out)
    by_item = table.group_by("item_id").aggregate([("user_id", "count")]).to_pylist()
    assert len(by_item) == sum(oracle.active.values())
    for row in table.to_pylist()[:500]:
        assert oracle.consent[row["user_id"]]
        assert oracle.tol(row["user_id"]) >= oracle.risk[str(row["item_id"])]


def test_no_users_table_needs_an_explicit_waiver(
    sample_dir: Path, tmp_path: Path, oracle: Oracle
) -> None:
    data = load_training_data(sample_dir / "interactions.parquet", sample_dir / "items.parquet")
    item = next(i for i in oracle.risk if oracle.risk[i] == 1 and oracle.active[i])
    folder = publish(tmp_path / "m", data, fit_model(data.user_items, PARAMS, progress=False))
    bundle = load_bundle(folder)
    unknown = (
        "^the model has no users table, so marketing consent is unknown; start the server "
        "with --no-consent-data if this data set carries no consent requirement$"
    )
    with pytest.raises(PreconditionFailed, match=unknown):
        Targeter(bundle).target(TargetQuery(item_ids=(item,), audience_size=5))
    # Waived: no consent rule; unknown tolerance is 1, so only risk-1 products reach anyone.
    assert (
        len(
            Targeter(bundle, no_consent_data=True)
            .target(TargetQuery(item_ids=(item,), audience_size=5))
            .rows
        )
        == 5
    )
    s = ServerThread(settings_for(tmp_path / "m"))
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(
                s.stub.TargetUsers(
                    pb.TargetUsersRequest(item_ids=["SAV-000001"], audience_size=5), timeout=10
                )
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        s.stop()


def test_a_users_table_without_consent_reaches_nobody(
    sample_dir: Path, tmp_path: Path, oracle: Oracle
) -> None:
    # Consent is never presumed: a users table that does not say, says no.
    users = pq.read_table(sample_dir / "users.parquet").drop_columns(["marketing_consent"])
    pq.write_table(users, tmp_path / "users.parquet")
    bundle = _trained(tmp_path, sample_dir, users=tmp_path / "users.parquet")
    targeter = Targeter(bundle, no_consent_data=True)  # the waiver cannot apply
    item = next(i for i in oracle.risk if oracle.risk[i] == 1 and oracle.active[i])
    audience = targeter.target(TargetQuery(item_ids=(item,), audience_size=100))
    assert len(audience.rows) == 0 and audience.eligible == 0
    assert audience.excluded.no_consent == users.num_rows
    assert not any(len(a.rows) for _, a in targeter.target_each(10))


@pytest.mark.parametrize("include_holders", [False, True])
def test_target_each_gives_every_product_its_own_audience(
    targeter: Targeter, include_holders: bool
) -> None:
    seen = 0
    for row, got in targeter.target_each(300, include_holders, block=7):
        item = targeter.bundle.items.ids[row]
        want = targeter.target(
            TargetQuery(item_ids=(item,), audience_size=300, include_holders=include_holders)
        )
        assert got.excluded == want.excluded and got.eligible == want.eligible, item
        assert (got.version, got.sequence, got.new_ids) == (want.version, 0, ()), item
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)
        # Same customers, up to near-ties that blocked and single products may order apart.
        differ = set(got.rows.tolist()) ^ set(want.rows.tolist())
        assert all(
            abs(got.scores[-1] - s) < 1e-5 for s in got.scores[np.isin(got.rows, list(differ))]
        )
        seen += 1
    assert seen == int(targeter.item_active.sum())
    # A block past the memory bound is cut to it (whole products), not refused.
    huge = dict(targeter.target_each(20, include_holders, block=10**12))
    small = dict(targeter.target_each(20, include_holders, block=7))
    assert huge.keys() == small.keys()
    assert all(np.array_equal(huge[r].rows, small[r].rows) for r in small)
    with pytest.raises(InvalidArgument, match="audience_size"):
        next(targeter.target_each(0))


def test_new_live_customers_are_named_in_an_audience_and_its_batches(
    targeter: Targeter,
) -> None:
    """Customers the bundle lacks join an audience as rows past its customers once they
    have an interaction (a profile alone gives no vector to score); ``ids`` and ``batches``
    name them by their own ids, in the audience's order."""
    b = targeter.bundle
    n = len(b.users)
    item = next(
        i for r, i in enumerate(b.items.ids) if b.item_rules.active[r] and b.item_rules.risk[r] == 1
    )
    when = datetime(2026, 11, 1, tzinfo=timezone.utc)
    new = ("new-a", "new-b", "new-c")
    events = tuple(
        StoredEvent(f"e{k}", user, b.items.ids[k], "view", when, sequence=2)
        for k, user in enumerate(new)
    )
    # Profiles only, one before the others (an earlier change) and one after: neither is
    # a candidate nor counted, and neither hides the others.
    first = Changes(1, (), (CustomerState("new-0", 5, True, 1),), (), ())
    profiles = tuple(CustomerState(user, 5, True, 2) for user in (*new, "new-z"))
    overlay = Recommender(b).overlay(Pseudonymizer(b"k"))
    overlay = apply(apply(overlay, first), Changes(2, events, profiles, (), ()))
    assert next(iter(overlay.users)) == "new-0"
    audience = targeter.target(TargetQuery(item_ids=(item,), audience_size=n + 10), overlay)
    assert audience.new_ids == new and audience.sequence == 2
    assert (
        audience.eligible
        == targeter.target(TargetQuery(item_ids=(item,), audience_size=1)).eligible + 3
    )
    rows = audience.rows.tolist()
    assert {r for r in rows if r >= n} == {n, n + 1, n + 2}
    ids = audience.ids(b.users.ids)
    assert ids == [b.users.ids[r] if r < n else new[r - n] for r in rows]
    assert set(new) <= set(ids)
    batched = list(audience.batches(b.users.ids, 7))
    assert [len(chunk) for chunk, _ in batched[:-1]] == [7] * (len(batched) - 1)
    assert [u for chunk, _ in batched for u in chunk] == ids
    np.testing.assert_array_equal(np.concatenate([s for _, s in batched]), audience.scores)


def test_a_customer_with_new_events_is_scored_by_their_refolded_vector(
    targeter: Targeter,
) -> None:
    b = targeter.bundle
    item = next(
        r for r in range(len(b.items)) if b.item_rules.active[r] and b.item_rules.risk[r] == 1
    )
    row = next(r for r in range(len(b.users)) if targeter.consent[r])
    user = b.users.ids[row]
    history = set(b.indices[b.indptr[row] : b.indptr[row + 1]].tolist())
    viewed = [r for r in range(len(b.items)) if r not in history and r != item][:3]
    when = datetime(2026, 11, 1, tzinfo=timezone.utc)
    events = tuple(
        StoredEvent(f"e{r}", user, b.items.ids[r], "view", when, sequence=1) for r in viewed
    )
    overlay = apply(
        Recommender(b).overlay(Pseudonymizer(b"k")),
        Changes(1, events, (CustomerState(user, 5, None, 1),), (), ()),
    )
    live = overlay.users[user]
    assert live.refolded and live.vector is not None
    query = TargetQuery(item_ids=(b.items.ids[item],), audience_size=len(b.users))
    audience = targeter.target(query, overlay)
    (at,) = np.flatnonzero(audience.rows == row)
    vectors = b.item_index.vectors
    assert audience.scores[at] == pytest.approx(float(live.vector @ vectors[item]), rel=1e-5)
    assert audience.scores[at] != pytest.approx(
        float(b.user_index.vectors[row] @ vectors[item]), rel=1e-3
    )
    # min_score holds for live customers as for the base: a score equal to it stays.
    score = audience.scores[at]
    for bar, kept in ((score, True), (np.nextafter(score, np.float32(np.inf)), False)):
        got = targeter.target(replace(query, min_score=float(bar)), overlay)
        assert (row in got.rows.tolist()) is kept
        assert got.excluded.below_min_score == got.eligible - len(got.rows) > 0
        assert got.scores.dtype == np.float32 and (got.scores >= bar).all()


def test_target_each_over_a_live_overlay(targeter: Targeter) -> None:
    """The offline export over live state: every audience names the version, the state
    sequence and the new customers; the cap across channels counts up to ``now``, not the
    clock; holders are let in on request."""
    b = targeter.bundle
    n = len(b.users)
    then = datetime(2020, 1, 6, tzinfo=timezone.utc)  # years before any clock reads this
    consenting = [r for r in range(n) if targeter.consent[r]]
    busy, holder = (b.users.ids[r] for r in consenting[:2])
    product = next(
        r for r in range(len(b.items)) if b.item_rules.active[r] and b.item_rules.risk[r] == 1
    )
    item = b.items.ids[product]
    events = (
        *(
            StoredEvent(f"c{k}", busy, item, "contacted", then, channel="email", sequence=3)
            for k in range(4)  # the default policy's cap across channels
        ),
        StoredEvent("p", holder, item, "purchase", then, sequence=3),
        StoredEvent("v", "new-a", item, "view", then, sequence=3),
    )
    profiles = (
        CustomerState(busy, 5, None, 3),
        CustomerState(holder, 5, None, 3),
        CustomerState("new-a", 5, True, 3),
    )
    overlay = apply(
        Recommender(b).overlay(Pseudonymizer(b"k")), Changes(3, events, profiles, (), ())
    )
    every = n + 1

    def export(include_holders: bool, now: datetime | None) -> dict[int, Audience]:
        return dict(targeter.target_each(every, include_holders, overlay=overlay, now=now))

    for row, audience in export(True, then + timedelta(hours=1)).items():
        assert (audience.version, audience.sequence) == (b.version, 3)
        assert audience.new_ids == ("new-a",) and audience.indexed is False
        members = set(audience.ids(b.users.ids))
        assert busy not in members and audience.excluded.contact_capped == 1, row
        if row == product:
            assert {holder, "new-a"} <= members and audience.excluded.holders == 0
    # target() over the same state: the same cap up to its own now.
    query = TargetQuery(item_ids=(item,), audience_size=every, include_holders=True)
    one = targeter.target(query, overlay, now=then + timedelta(hours=1))
    assert busy not in one.ids(b.users.ids) and one.excluded.contact_capped == 1
    each = export(True, then + timedelta(hours=1))[product]
    assert (each.excluded, each.eligible) == (one.excluded, one.eligible)
    without = export(False, then + timedelta(hours=1))[product]
    assert holder not in without.ids(b.users.ids) and without.excluded.holders >= 1
    # A week on, the contacts are out of the window.
    later = export(True, then + timedelta(days=8))[product]
    assert busy in later.ids(b.users.ids) and later.excluded.contact_capped == 0


def test_a_product_pulled_or_riskier_live_is_targeted_by_its_live_rules(
    targeter: Targeter,
) -> None:
    b = targeter.bundle
    pulled, raised = [
        b.items.ids[r]
        for r in range(len(b.items))
        if b.item_rules.active[r] and b.item_rules.risk[r] == 1
    ][:2]
    changes = Changes(
        1, (), (), (ProductState(pulled, False, None, 1), ProductState(raised, None, 5, 1)), ()
    )
    overlay = apply(Recommender(b).overlay(Pseudonymizer(b"k")), changes)
    with pytest.raises(PreconditionFailed, match=f"^item_id '{pulled}' is not an active product$"):
        targeter.target(TargetQuery(item_ids=(pulled,), audience_size=5), overlay)
    # Risk 5 now: only consenting customers of tolerance 5 remain (less the holders).
    after = targeter.target(TargetQuery(item_ids=(raised,), audience_size=1), overlay)
    consenting = int(targeter.consent.sum())
    tolerant = int((targeter.consent & (targeter.tolerance >= 5)).sum())
    assert after.excluded.unsuitable == consenting - tolerant > 0
    assert after.eligible == tolerant - after.excluded.holders


def test_the_user_index_answers_only_small_audiences_among_many_eligible(
    targeter: Targeter, oracle: Oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index path is taken exactly when no min_score is set, the audience is at most
    the index's limit and more customers are eligible than an exact pass should cover;
    its audience keeps every rule. (The limit is lowered so the sample can reach it.)"""
    monkeypatch.setattr(targeting, "_INDEX_MAX_AUDIENCE", 10)
    b = targeter.bundle
    item = next(i for i in b.items.ids if oracle.active[i] and oracle.risk[i] == 1)
    q = TargetQuery(item_ids=(item,), audience_size=10)
    exact = targeter.target(q)
    n = exact.eligible
    assert not exact.indexed and n > 10
    near = Targeter(b, exact_max_base=n - 1)
    got = near.target(q)
    assert got.indexed and got.eligible == n
    oracle.check_audience([item], 10, False, got.ids(b.users.ids), got.scores.tolist())
    assert not Targeter(b, exact_max_base=n).target(q).indexed
    assert not near.target(replace(q, audience_size=11)).indexed
    assert not near.target(replace(q, min_score=-1e9)).indexed


def test_live_customers_are_gathered_once_per_overlay(
    targeter: Targeter, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = targeter.bundle
    builds = []
    build = targeting._Live.build
    monkeypatch.setattr(
        targeting._Live, "build", classmethod(lambda cls, t, o: builds.append(o) or build(t, o))
    )
    overlay = apply(
        Recommender(b).overlay(Pseudonymizer(b"k")),
        Changes(1, (), (CustomerState(b.users.ids[0], 5, True, 1),), (), ()),
    )
    query = TargetQuery(item_ids=(b.items.ids[0],), audience_size=5)
    for _ in range(3):
        targeter.target(query, overlay)
    list(targeter.target_each(5, overlay=overlay))
    assert builds == [overlay]


def test_holders_of_every_product_including_one_nobody_holds_at_the_catalogue_end(
    sample_dir: Path, tmp_path: Path, oracle: Oracle
) -> None:
    """The holders' lists cover the whole catalogue: products past the last one anybody
    holds have empty lists, not an index error."""
    last = pq.read_table(sample_dir / "items.parquet").column("item_id")[-1].as_py()
    interactions = pq.read_table(sample_dir / "interactions.parquet")
    kept = interactions.filter(pc.not_equal(interactions["item_id"], last))
    pq.write_table(kept, tmp_path / "interactions.parquet")
    targeter = Targeter(
        _trained(tmp_path, sample_dir, interactions=tmp_path / "interactions.parquet")
    )
    b = targeter.bundle
    assert b.items.ids[-1] == last
    for row, item in enumerate(b.items.ids[:-1]):
        holders = {b.users.ids[u] for u in targeter.holders(row)}
        assert holders == {u for u, held in oracle.held.items() if item in held}, item
    assert len(targeter.holders(len(b.items) - 1)) == 0


def test_an_overlay_of_erasures_alone_leaves_the_forgotten_out_as_without_consent(
    targeter: Targeter,
) -> None:
    b = targeter.bundle
    pseudonym = Pseudonymizer(b"k")
    item = next(
        i for r, i in enumerate(b.items.ids) if b.item_rules.active[r] and b.item_rules.risk[r] == 1
    )
    query = TargetQuery(item_ids=(item,), audience_size=len(b.users))
    before = targeter.target(query)
    gone = before.ids(b.users.ids)[0]
    overlay = apply(Recommender(b).overlay(pseudonym), Changes(1, (), (), (), (pseudonym(gone),)))
    assert not overlay.users and len(overlay.erased_rows) == 1
    after = targeter.target(query, overlay)
    assert gone not in after.ids(b.users.ids)
    assert after.excluded.no_consent == before.excluded.no_consent + 1
    assert after.eligible == before.eligible - 1
