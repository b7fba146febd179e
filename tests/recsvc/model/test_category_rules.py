"""Category rules: exclusive categories and a cap per category, with k items whenever k exist.

The rules oracle states both independently; every "every rule over every customer" test
checks the exclusive categories through it, and these tests the rest: each configuration
over every customer, a property test that a capped answer is the exact ranking walked
from the top, live holdings, products without a category, the setting and the RPC field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsvc.errors import InvalidArgument
from recsvc.logs import Pseudonymizer
from recsvc.model import ranking as ranking_module
from recsvc.model.allowed import AllowedSet
from recsvc.model.bundle import Bundle, load_bundle
from recsvc.model.index import VectorIndex
from recsvc.model.queries import MAX_K, RankQuery, RecommendQuery, SimilarQuery
from recsvc.model.ranking import Recommender, Source
from recsvc.model.rules import NO_CATEGORY, Categories, ExclusiveCategories, cap_per_category
from recsvc.settings import EXCLUSIVE_CATEGORIES, SETTINGS
from recsvc.state.base import Changes, StoredEvent
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc
from tests.conftest import ServerThread, settings_for
from tests.rules_oracle import Oracle


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


@pytest.fixture(scope="module")
def bundle(bundle_path: Path) -> Bundle:
    return load_bundle(bundle_path)


def _ids(recommender: Recommender, q: RecommendQuery) -> list[str]:
    return [it.item_id for it in recommender.recommend(q).items]


def _holder(oracle: Oracle, category: str) -> str:
    """A customer who holds a product of ``category`` and has others of it within reach."""
    return next(
        u
        for u in sorted(oracle.held)
        if category in {oracle.category[i] for i in oracle.held[u]}
        and any(
            oracle.category[i] == category and i not in oracle.history[u]
            for i in oracle.risk
            if oracle.active[i] and oracle.risk[i] <= oracle.tol(u)
        )
    )


# --- the pure functions --------------------------------------------------------------


def test_categories_come_from_the_category_column() -> None:
    table = pa.table(
        {"item_id": list("abcdef"), "category": ["loan", None, "loan", "card", "", "x"]}
    )
    c = Categories.from_table(table)
    assert c.names == ("loan", "card", "x")
    assert c.codes.tolist() == [0, NO_CATEGORY, 0, 1, NO_CATEGORY, 2]
    none = Categories.from_table(table.drop_columns(["category"]))
    assert none.names == () and none.codes.tolist() == [NO_CATEGORY] * 6
    assert c.codes.dtype == none.codes.dtype == np.int32


def test_a_cap_walks_the_ranking_and_goes_on_where_it_stopped() -> None:
    codes = np.array([0, 0, 0, 1, NO_CATEGORY, 1, NO_CATEGORY])
    counts: dict[int, int] = {}
    first = cap_per_category(np.array([0, 1, 2, 3]), codes, 2, 10, counts)
    assert first.tolist() == [0, 1, 3] and counts == {0: 2, 1: 1}
    # The same walk, further down: category 0 stays full, products without one never fill.
    rest = cap_per_category(np.array([4, 2, 5, 6]), codes, 2, 3, counts)
    assert rest.tolist() == [0, 2, 3]
    assert cap_per_category(np.array([3, 5, 4]), codes, 1, 2, {}).tolist() == [0, 2]


def test_exclusive_sets_are_built_once_and_keep_what_may_be_shown_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[tuple[int, ...]] = []
    without_categories = Categories.without

    def counted(self: Categories, allowed: AllowedSet, codes, keep=None):  # type: ignore[no-untyped-def]
        built.append(tuple(codes))
        return without_categories(self, allowed, codes, keep)

    monkeypatch.setattr(Categories, "without", counted)
    codes = np.array([0, 0, 1, 1, 2, NO_CATEGORY], dtype=np.int32)
    rules = ExclusiveCategories(Categories(codes, ("mortgage", "card", "pension")), ["mortgage"])
    base = AllowedSet.from_mask(np.ones(6, dtype=bool))
    assert rules.held_categories(np.array([1, 2, 5])) == (0,)
    assert rules.held_categories(np.array([2, 4])) == ()
    without = rules.allowed(base, (0,))
    assert without.rows().tolist() == [2, 3, 4, 5]
    assert rules.allowed(base, (0,)) is without  # shared, so the index keeps its parameters
    assert built == [(0,)]  # and built once
    assert rules.allowed(base, (0,), keep=np.array([1])).rows().tolist() == [1, 2, 3, 4, 5]
    assert rules.offered(np.array([0, 1, 2]), (0,), np.array([1])).tolist() == [False, True, True]
    elsewhere = ExclusiveCategories(Categories(codes, ("a", "b", "c")), ["mortgage"])
    assert elsewhere.held_categories(np.arange(6)) == ()


# --- every customer, under each configuration -----------------------------------------


@pytest.mark.parametrize(
    ("exclusive", "k", "cap"),
    [
        (EXCLUSIVE_CATEGORIES, 10, 0),
        (EXCLUSIVE_CATEGORIES, 10, 1),
        (EXCLUSIVE_CATEGORIES, 40, 2),
        ((), 15, 1),
        (("etf", "mutual_fund", "credit_card"), 25, 3),
    ],
)
def test_every_customer_under_each_configuration(
    bundle: Bundle, sample_dir: Path, exclusive: tuple[str, ...], k: int, cap: int
) -> None:
    recommender = Recommender(bundle, exclusive_categories=exclusive)
    oracle = Oracle(sample_dir, exclusive)
    exclude = {"MTG-000001", "ETF-000002"}
    items = bundle.items.ids
    sources = set()
    for n, user_id in enumerate([*bundle.users.ids, "stranger"]):
        q = RecommendQuery(
            user_id=user_id, k=k, exclude_item_ids=tuple(exclude), max_per_category=cap
        )
        got = recommender.recommend(q)
        sources.add(got.source)
        ids, scores = [it.item_id for it in got.items], [it.score for it in got.items]
        oracle.check_recommended(user_id, k, exclude, ids, scores, cap)
        if n % 5:
            continue  # every customer's RankItems is the other suites' (default categories)
        ranked = recommender.rank_items(RankQuery(user_id=user_id, item_ids=tuple(items)))
        assert {it.item_id for it in ranked.items} == {
            i for i in items if oracle.allowed(user_id, i)
        }, user_id
    assert sources == {Source.PERSONALIZED, Source.POPULAR}


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_capped_answer_is_the_exact_ranking_walked_from_the_top(
    recommender: Recommender, oracle: Oracle, data: st.DataObject
) -> None:
    users = recommender.bundle.users.ids
    user_id = data.draw(st.sampled_from([*users, "stranger"]))
    items = recommender.bundle.items.ids
    recent = tuple(data.draw(st.lists(st.sampled_from(items), max_size=2, unique=True)))
    exclude = data.draw(st.sets(st.sampled_from(items), max_size=6))
    k, cap = data.draw(st.integers(1, 60)), data.draw(st.integers(1, 4))
    q = RecommendQuery(user_id=user_id, k=k, exclude_item_ids=tuple(exclude))
    if recent:
        q = dataclasses.replace(q, recent_item_ids=recent)
    ranking = _ids(recommender, dataclasses.replace(q, k=MAX_K))  # every allowed item
    with pytest.MonkeyPatch.context() as patch:
        # Fetching just what is missing, so that the small catalogue takes many rounds.
        patch.setattr(ranking_module, "_OVER_FETCH", data.draw(st.sampled_from([1, 4])))
        got = recommender.recommend(dataclasses.replace(q, max_per_category=cap))
    ids = [it.item_id for it in got.items]
    assert ids == oracle.walk_capped(ranking, cap, k)
    if not recent:  # recent items join the history the oracle knows
        oracle.check_recommended(user_id, k, exclude, ids, [it.score for it in got.items], cap)


def test_the_cap_holds_through_the_faiss_search_too(bundle: Bundle, oracle: Oracle) -> None:
    # Few rows allowed: search would take the dense shortcut; without it, FAISS searches
    # under each round's selector.
    index = bundle.item_index
    through = Recommender(
        dataclasses.replace(
            bundle,
            item_index=VectorIndex(index.vectors, index.index, index.spec, exact_subset_max=0),
        )
    )
    exact = Recommender(bundle)
    for user_id in bundle.users.ids[:300]:
        q = RecommendQuery(user_id=user_id, k=12, max_per_category=1)
        assert _ids(through, q) == _ids(exact, q), user_id


# --- what the rules mean --------------------------------------------------------------


def test_a_mortgage_holder_is_offered_no_other_mortgage(
    recommender: Recommender, oracle: Oracle, bundle: Bundle
) -> None:
    user = _holder(oracle, "mortgage")
    mortgages = {i for i in bundle.items.ids if oracle.category[i] == "mortgage"}
    answers = [
        _ids(recommender, RecommendQuery(user_id=user, k=MAX_K)),
        _ids(recommender, RecommendQuery(user_id=user, k=MAX_K, recent_item_ids=("CC-000001",))),
        [
            it.item_id
            for it in recommender.similar_items(
                SimilarQuery(item_id="MTG-000001", k=MAX_K, user_id=user)
            ).items
        ],
        [
            it.item_id
            for it in recommender.rank_items(
                RankQuery(user_id=user, item_ids=tuple(bundle.items.ids))
            ).items
        ],
    ]
    assert all(ids and not set(ids) & mortgages for ids in answers)
    # Not exclusive here: the same customer gets other mortgages again.
    free = Recommender(bundle, exclusive_categories=())
    assert set(_ids(free, RecommendQuery(user_id=user, k=MAX_K))) & mortgages


def test_the_audit_counts_what_the_exclusive_categories_removed(
    recommender: Recommender, oracle: Oracle
) -> None:
    user = _holder(oracle, "mortgage")
    closed = {
        i
        for i, c in oracle.category.items()
        if c in oracle.closed_categories(user)
        and oracle.active[i]
        and oracle.risk[i] <= oracle.tol(user)
    }
    removed = recommender.suitability_basis(user).removed
    assert closed and removed["exclusive_category"] == len(closed)
    assert recommender.suitability_basis("stranger").removed["exclusive_category"] == 0


def test_a_held_product_may_come_back_but_no_other_of_its_category(
    recommender: Recommender, oracle: Oracle, bundle: Bundle
) -> None:
    user = _holder(oracle, "mortgage")
    held = {i for i in oracle.held[user] if oracle.category[i] == "mortgage"}
    q = RecommendQuery(user_id=user, k=MAX_K, include_interacted=True)
    ids = set(_ids(recommender, q))
    ranked = recommender.rank_items(
        RankQuery(user_id=user, item_ids=tuple(bundle.items.ids), include_interacted=True)
    )
    for answer in (ids, {it.item_id for it in ranked.items}):
        assert {i for i in answer if oracle.category[i] == "mortgage"} == held


def test_a_live_purchase_closes_its_category(recommender: Recommender, oracle: Oracle) -> None:
    user = next(
        u
        for u in recommender.bundle.users.ids
        if not oracle.closed_categories(u) and oracle.tol(u) >= 3
    )
    mortgages = {i for i in recommender.bundle.items.ids if oracle.category[i] == "mortgage"}
    assert set(_ids(recommender, RecommendQuery(user_id=user, k=MAX_K))) & mortgages
    now = datetime(2026, 1, 5, tzinfo=timezone.utc)
    bought = StoredEvent("e1", user, "MTG-000002", "purchase", now, sequence=1)
    viewed = StoredEvent("e2", user, "PEN-000001", "view", now, sequence=1)
    overlay = recommender.overlay(Pseudonymizer(b"k"), Changes(1, (bought, viewed), (), (), ()))
    ids = [
        it.item_id
        for it in recommender.recommend(RecommendQuery(user_id=user, k=MAX_K), overlay).items
    ]
    assert ids and not set(ids) & mortgages
    # A view holds nothing: pensions stay on offer (all but the one viewed).
    assert {i for i in ids if oracle.category[i] == "pension"}


def test_a_product_without_a_category_is_never_capped(bundle: Bundle) -> None:
    table = bundle.item_table
    category = table.column("category").to_pylist()
    blank = [None if row % 3 == 0 else c for row, c in enumerate(category)]
    where = table.schema.get_field_index("category")
    partial = dataclasses.replace(
        bundle, item_table=table.set_column(where, "category", pa.array(blank, pa.string()))
    )
    recommender = Recommender(partial)
    user = bundle.users.ids[7]
    ranking = _ids(recommender, RecommendQuery(user_id=user, k=MAX_K))
    capped = _ids(recommender, RecommendQuery(user_id=user, k=30, max_per_category=1))
    codes = partial.categories.codes
    rows = [bundle.items.index(i) for i in capped]
    named = [int(codes[r]) for r in rows if codes[r] != NO_CATEGORY]
    assert len(capped) == 30 and len(named) == len(set(named))
    counts: dict[int, int] = {}
    expected = cap_per_category(
        np.array([bundle.items.index(i) for i in ranking]), codes, 1, 30, counts
    )
    assert capped == [ranking[p] for p in expected.tolist()]
    # No category column at all: both rules are off.
    none = Recommender(dataclasses.replace(bundle, item_table=table.drop_columns(["category"])))
    q = RecommendQuery(user_id=user, k=20)
    assert _ids(none, dataclasses.replace(q, max_per_category=1)) == _ids(none, q)


@pytest.mark.parametrize("cap", [-1, MAX_K + 1])
def test_a_bad_cap_names_the_field(cap: int) -> None:
    with pytest.raises(InvalidArgument) as err:
        RecommendQuery(user_id="u", max_per_category=cap)
    assert err.value.field == "max_per_category"


# --- the edge: the RPC field and the setting ------------------------------------------


def test_the_cap_over_grpc(
    stub: recommender_pb2_grpc.RecommenderStub, recommender: Recommender, oracle: Oracle
) -> None:
    for user_id in [*recommender.bundle.users.ids[:100], "stranger"]:
        resp = stub.Recommend(
            pb.RecommendRequest(user_id=user_id, k=12, max_per_category=1), timeout=10
        )
        ids = [it.item_id for it in resp.items]
        oracle.check_recommended(user_id, 12, set(), ids, [it.score for it in resp.items], 1)
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb.RecommendRequest(user_id="u", max_per_category=-2), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("max_per_category:")


@pytest.fixture
def server_without_exclusive(models_dir: Path) -> Iterator[ServerThread]:
    s = ServerThread(settings_for(models_dir, exclusive_categories=(), trial_in_child=False))
    yield s
    s.stop()


def test_the_setting_reaches_the_served_recommender(
    server_without_exclusive: ServerThread,
    stub: recommender_pb2_grpc.RecommenderStub,
    oracle: Oracle,
) -> None:
    user = _holder(oracle, "mortgage")
    mortgages = {i for i in oracle.category if oracle.category[i] == "mortgage"}

    def offered(s: recommender_pb2_grpc.RecommenderStub) -> set[str]:
        resp = s.Recommend(pb.RecommendRequest(user_id=user, k=MAX_K), timeout=10)
        return {it.item_id for it in resp.items}

    assert not offered(stub) & mortgages  # the default
    assert offered(server_without_exclusive.stub) & mortgages


def test_the_setting_parses_names_or_none() -> None:
    parse = SETTINGS["exclusive_categories"].parse
    assert parse(" mortgage, pension ,mortgage") == ("mortgage", "pension")
    assert parse("None") == ()
    with pytest.raises(ValueError, match="separated by commas"):
        parse("mortgage,,pension")
    assert SETTINGS["exclusive_categories"].default == EXCLUSIVE_CATEGORIES
