"""The data plane without gRPC: rules over every customer, fold-in and explain as implicit."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from recsvc.errors import NotFound
from recsvc.logs import Pseudonymizer
from recsvc.model.overlay import apply
from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery
from recsvc.model.ranking import DropReason, Ranked, Recommender, Source
from recsvc.state import Changes, CustomerState, StoredEvent
from tests.rules_oracle import Oracle


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


def _implicit_twin(rec: Recommender) -> AlternatingLeastSquares:
    m = rec.bundle.manifest.params
    model = AlternatingLeastSquares(
        factors=m["factors"], regularization=m["regularization"], alpha=m["alpha"]
    )
    model.item_factors = rec.bundle.item_index.vectors.copy()
    model.user_factors = rec.bundle.user_index.vectors.copy()
    return model


def test_rules_hold_for_every_customer(recommender: Recommender, oracle: Oracle) -> None:
    for user_id in recommender.bundle.users.ids:
        exclude = {"SAV-000001", "CC-000002"}
        got = recommender.recommend(
            RecommendQuery(user_id=user_id, k=25, exclude_item_ids=tuple(exclude))
        )
        ids, scores = [it.item_id for it in got.items], [it.score for it in got.items]
        oracle.check_recommended(user_id, 25, exclude, ids, scores)


def test_unknown_customer_gets_popular_low_risk_products(
    recommender: Recommender, oracle: Oracle
) -> None:
    got = recommender.recommend(RecommendQuery(user_id="never-seen", k=500))
    assert got.source is Source.POPULAR
    ids = [it.item_id for it in got.items]
    assert ids and all(oracle.allowed("never-seen", i) for i in ids)
    assert len(ids) == oracle.n_allowed("never-seen")
    pop = [it.score for it in got.items]
    assert pop == sorted(pop, reverse=True)


def test_fold_in_matches_implicits_recalculate_user(recommender: Recommender) -> None:
    model = _implicit_twin(recommender)
    rows = np.array([3, 17, 40])
    conf = np.array([1.0, 2.5, 0.7], dtype=np.float32)
    user_items = sp.csr_matrix(
        (conf, (np.zeros(3), rows)), shape=(1, len(recommender.bundle.items))
    )
    expected = model.recalculate_user(0, user_items)
    np.testing.assert_allclose(recommender.fold_in(rows, conf), expected, rtol=1e-3, atol=1e-4)


def test_explain_matches_implicits_explain(recommender: Recommender) -> None:
    model = _implicit_twin(recommender)
    b = recommender.bundle
    user = next(u for u in range(len(b.users)) if len(b.user_item_rows(u)) >= 4)
    got = recommender.recommend(RecommendQuery(user_id=b.users.ids[user], k=3, explain=True))
    rows, data = b.user_item_rows(user), b.user_item_data(user)
    user_items = sp.csr_matrix((data, (np.zeros(len(rows)), rows)), shape=(1, len(b.items)))
    for item in got.items:
        _, top, _ = model.explain(0, user_items, b.items.index(item.item_id), N=3)
        assert [b.items.ids[i] for i, _ in top] == [i for i, _ in item.because]
        np.testing.assert_allclose([w for _, w in item.because], [s for _, s in top], rtol=1e-3)


def test_recent_items_fold_in_an_anonymous_customer(
    recommender: Recommender, oracle: Oracle
) -> None:
    recent = ("CC-000001", "CC-000002")
    got = recommender.recommend(RecommendQuery(recent_item_ids=recent, k=10))
    assert got.source is Source.FOLD_IN
    ids = [it.item_id for it in got.items]
    assert not set(ids) & set(recent)
    assert all(oracle.allowed("", i, set(recent)) for i in ids)


def test_recent_items_refresh_a_known_customer(recommender: Recommender) -> None:
    user = recommender.bundle.users.ids[5]
    base = recommender.recommend(RecommendQuery(user_id=user, k=10))
    fresh = recommender.recommend(
        RecommendQuery(user_id=user, k=10, recent_item_ids=("TD-000003",))
    )
    assert base.source is Source.PERSONALIZED and fresh.source is Source.FOLD_IN
    assert "TD-000003" not in [it.item_id for it in fresh.items]


def test_include_interacted_allows_history(recommender: Recommender, oracle: Oracle) -> None:
    b = recommender.bundle
    user = next(u for u in b.users.ids if len(oracle.history.get(u, ())) >= 3)
    got = recommender.recommend(RecommendQuery(user_id=user, k=120, include_interacted=True))
    assert {it.item_id for it in got.items} & oracle.history[user]


def test_rank_items_orders_and_filters(recommender: Recommender, oracle: Oracle) -> None:
    b = recommender.bundle
    user = b.users.ids[10]
    candidates = (*b.items.ids[:60], "ghost", b.items.ids[0])
    got = recommender.rank_items(RankQuery(user_id=user, item_ids=candidates))
    ids = [it.item_id for it in got.items]
    assert got.unknown_item_ids == ("ghost",)
    assert set(ids) == {i for i in b.items.ids[:60] if oracle.allowed(user, i)}
    vec = b.user_index.vectors[b.users.index(user)]
    expected = sorted(ids, key=lambda i: -float(b.item_index.vectors[b.items.index(i)] @ vec))
    assert ids == expected


def _first_broken_rule(oracle: Oracle, user: str, item: str) -> DropReason | None:
    """The oracle's reason a candidate is left out: the first rule it breaks, in the API's order."""
    if item not in oracle.risk:
        return DropReason.UNKNOWN_ITEM
    if not oracle.active[item]:
        return DropReason.INACTIVE
    if oracle.risk[item] > oracle.tol(user):
        return DropReason.UNSUITABLE
    closed = oracle.category[item] in oracle.closed_categories(user)
    if closed and item not in oracle.held.get(user, set()):
        return DropReason.EXCLUSIVE_CATEGORY
    if item in oracle.history.get(user, set()):
        return DropReason.INTERACTED
    return None


@pytest.mark.parametrize("include_interacted", [False, True])
def test_rank_items_names_the_reason_of_every_candidate_left_out(
    recommender: Recommender, oracle: Oracle, include_interacted: bool
) -> None:
    b = recommender.bundle
    candidates = ("ghost", *b.items.ids[:150], b.items.ids[3], "phantom")
    seen: set[DropReason] = set()
    for user in [*b.users.ids[::75], "a-customer-nobody-knows"]:
        got = recommender.rank_items(
            RankQuery(user_id=user, item_ids=candidates, include_interacted=include_interacted)
        )
        want = {i: _first_broken_rule(oracle, user, i) for i in dict.fromkeys(candidates)}
        if include_interacted:
            want = {i: None if r is DropReason.INTERACTED else r for i, r in want.items()}
        assert [d.item_id for d in got.dropped] == [i for i, r in want.items() if r is not None]
        assert {d.item_id: d.reason for d in got.dropped} == {
            i: r for i, r in want.items() if r is not None
        }, user
        assert {it.item_id for it in got.items} == {i for i, r in want.items() if r is None}
        assert got.unknown_item_ids == ("ghost", "phantom")
        seen |= {d.reason for d in got.dropped}
    assert seen == set(DropReason) - ({DropReason.INTERACTED} if include_interacted else set())


def test_unknown_recent_items_are_named(recommender: Recommender) -> None:
    known = recommender.bundle.items.ids[5]
    assert recommender.unknown_items(("nope", known, "gone")) == ("nope", "gone")
    assert recommender.unknown_items(()) == ()


def test_similar_items_apply_the_customers_rules(recommender: Recommender, oracle: Oracle) -> None:
    b = recommender.bundle
    user = next(u for u in b.users.ids if oracle.tol(u) == 5)
    got = recommender.similar_items(SimilarQuery(item_id="ETF-000001", k=200, user_id=user))
    ids = [it.item_id for it in got.items]
    assert "ETF-000001" not in ids and all(oracle.allowed(user, i) for i in ids)
    anon = recommender.similar_items(SimilarQuery(item_id="ETF-000001", k=200))
    assert all(oracle.risk[it.item_id] <= 1 for it in anon.items)
    with pytest.raises(NotFound):
        recommender.similar_items(SimilarQuery(item_id="nope"))


def test_recent_items_never_free_a_known_customers_history(
    recommender: Recommender, oracle: Oracle
) -> None:
    # Recent items join the history that stays excluded; they never replace it.
    answers = {}
    for user_id in recommender.bundle.users.ids:
        history = oracle.history.get(user_id, set())
        if history:
            recent = next(i for i in sorted(oracle.risk) if i not in history)
            query = RecommendQuery(user_id=user_id, k=25, recent_item_ids=(recent,))
            answers[user_id, recent] = recommender.recommend(query)
    offered_own = [u for (u, _), got in answers.items() if oracle.history[u] & _ids(got)]
    assert len(answers) > 1000 and not offered_own, f"{len(offered_own)} of {len(answers)}"
    for (user_id, recent), got in answers.items():
        assert got.source is Source.FOLD_IN
        ids, scores = [it.item_id for it in got.items], [it.score for it in got.items]
        oracle.check_recommended(user_id, 25, {recent}, ids, scores)


def _ids(ranked: Ranked) -> set[str]:
    return {it.item_id for it in ranked.items}


@pytest.mark.parametrize("k", [1, 7, 10, 40])
def test_similar_items_returns_k_whenever_k_are_allowed(
    recommender: Recommender, oracle: Oracle, k: int
) -> None:
    b = recommender.bundle
    for user_id in ("", *b.users.ids[:200]):
        for item_id in ("ETF-000001", "SAV-000002"):
            got = recommender.similar_items(SimilarQuery(item_id=item_id, k=k, user_id=user_id))
            ids = [it.item_id for it in got.items]
            n_allowed = oracle.n_allowed(user_id, {item_id})
            assert len(ids) == len(set(ids)) == min(k, n_allowed), (user_id, item_id)
            assert all(oracle.allowed(user_id, i, {item_id}) for i in ids)


def test_every_answer_carries_the_suitability_basis_it_used(recommender: Recommender) -> None:
    b = recommender.bundle
    p = Pseudonymizer(b"basis-test")
    at = datetime(2026, 12, 1, tzinfo=timezone.utc)
    raised, viewer, new_rated, new_viewer, gone = (
        b.users.ids[1],
        b.users.ids[2],
        "NEW-RATED",
        "NEW-VIEWER",
        b.users.ids[3],
    )
    events = tuple(
        StoredEvent(f"e{n}", user, b.items.ids[n], "view", at, sequence=1)
        for n, user in enumerate((viewer, new_viewer))
    )
    customers = (CustomerState(raised, 5, True, 1), CustomerState(new_rated, 4, True, 1))
    overlay = apply(recommender.overlay(p), Changes(1, events, customers, (), (p(gone),)))
    expected = {
        b.users.ids[0]: (int(recommender.tolerance[0]), "bundle"),
        viewer: (int(recommender.tolerance[2]), "bundle"),  # events change no tolerance
        raised: (5, "live"),
        new_rated: (4, "live"),
        new_viewer: (1, "default"),
        gone: (1, "default"),  # forgotten: answered as nobody known
        "never-seen": (1, "default"),
        "": (1, "default"),
    }
    item = b.items.ids[0]
    for user, (tolerance, basis) in expected.items():
        answers = [
            recommender.recommend(
                RecommendQuery(user_id=user, k=5, recent_item_ids=() if user else (item,)),
                overlay,
            ),
            recommender.similar_items(SimilarQuery(item_id=item, k=5, user_id=user), overlay),
            recommender.rank_items(RankQuery(user_id=user, item_ids=b.items.ids[:30]), overlay),
        ]
        for answer in answers:
            got = answer.suitability
            assert got is not None and (got.tolerance, got.basis) == (tolerance, basis), user
            assert got == recommender.suitability_basis(user, overlay)
    assert recommender.suitability_basis(viewer, overlay).removed["interacted"] == len(
        overlay.users[viewer].rows
    )
