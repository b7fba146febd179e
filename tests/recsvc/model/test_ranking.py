"""The data plane without gRPC: rules over every customer, fold-in and explain as implicit."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from recsvc.errors import NotFound
from recsvc.logs import Pseudonymizer
from recsvc.model.index import IndexSpec, VectorIndex
from recsvc.model.overlay import Overlay, apply
from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery
from recsvc.model.ranking import DropReason, Ranked, Recommender, Source
from recsvc.state import Changes, CustomerState, ProductState, StoredEvent
from tests.rules_oracle import Oracle
from training.fit import FitParams, apply_weighting


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


@pytest.fixture
def fresh(recommender: Recommender) -> Recommender:
    """A Recommender built for this test alone. The session's is built once, inside
    whichever test first asks for it, so only that test would meet a fault in building
    one (what its embeddings, parameters and popularity become)."""
    return Recommender(recommender.bundle)


def _live(rec: Recommender, changes: Changes) -> Overlay:
    """The live overlay of ``rec``'s bundle with ``changes`` applied."""
    return apply(rec.overlay(Pseudonymizer(b"k")), changes)


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
    fresh: Recommender, oracle: Oracle
) -> None:
    got = fresh.recommend(RecommendQuery(user_id="never-seen", k=500))
    assert got.source is Source.POPULAR
    ids = [it.item_id for it in got.items]
    assert ids and all(oracle.allowed("never-seen", i) for i in ids)
    assert len(ids) == oracle.n_allowed("never-seen")
    pop = [it.score for it in got.items]
    assert pop == sorted(pop, reverse=True)
    b = fresh.bundle
    counts = np.bincount(b.indices, minlength=len(b.items))
    expected = [counts[b.items.index(i)] / len(b.users) for i in ids]
    np.testing.assert_allclose(pop, expected, rtol=1e-6)  # the share of customers


def test_fold_in_matches_implicits_recalculate_user(fresh: Recommender) -> None:
    model = _implicit_twin(fresh)
    rows = np.array([3, 17, 40])
    conf = np.array([1.0, 2.5, 0.7], dtype=np.float32)
    user_items = sp.csr_matrix((conf, (np.zeros(3), rows)), shape=(1, len(fresh.bundle.items)))
    expected = model.recalculate_user(0, user_items)
    np.testing.assert_allclose(fresh.fold_in(rows, conf), expected, rtol=1e-3, atol=1e-4)


def test_explain_matches_implicits_explain(fresh: Recommender) -> None:
    model = _implicit_twin(fresh)
    b = fresh.bundle
    user = next(u for u in range(len(b.users)) if len(b.user_item_rows(u)) >= 4)
    got = fresh.recommend(RecommendQuery(user_id=b.users.ids[user], k=3, explain=True))
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
    with pytest.raises(NotFound) as err:
        recommender.similar_items(SimilarQuery(item_id="nope"))
    assert str(err.value) == f"item_id 'nope' is not in model {recommender.version}"


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
    # A product pulled from sale: the removed counts are the overlay's, not the bundle's.
    pulled = next(i for i in range(len(b.items)) if recommender.item_rules.active[i])
    products = (ProductState(b.items.ids[pulled], False, None, 1),)
    overlay = apply(recommender.overlay(p), Changes(1, events, customers, products, (p(gone),)))
    assert (
        recommender.suitability_basis("never-seen", overlay).removed["inactive"]
        == recommender.suitability_basis("never-seen").removed["inactive"] + 1
    )
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


def _with_params(rec: Recommender, **params: object) -> Recommender:
    """The same bundle, its manifest's trainer parameters replaced."""
    m = rec.bundle.manifest
    kept = {k: v for k, v in m.params.items() if k not in {"weighting", "bm25_k1", "bm25_b"}}
    manifest = dataclasses.replace(m, params={**kept, **params})
    return Recommender(dataclasses.replace(rec.bundle, manifest=manifest))


@pytest.mark.parametrize(
    "params",
    [
        {"weighting": "bm25", "bm25_k1": 50.0, "bm25_b": 0.7},
        {"weighting": "raw"},
        {},  # a manifest without them: the trainer's defaults
    ],
    ids=["bm25", "raw", "defaults"],
)
def test_the_live_overlay_weighs_histories_as_the_trainer_did(
    recommender: Recommender, params: dict[str, object]
) -> None:
    """A refolded customer's confidences are what the trainer's weighting gives their
    strengths: the manifest's weighting and BM25 constants, FitParams' where absent."""
    rec = _with_params(recommender, **params)
    b = rec.bundle
    fit = FitParams(**params)  # type: ignore[arg-type]
    raw = sp.csr_matrix((b.strength, b.indices, b.indptr), shape=(len(b.users), len(b.items)))
    trained = apply_weighting(raw, fit)
    weighting = rec.overlay(Pseudonymizer(b"k")).context.weighting
    assert (weighting.kind, weighting.bm25_k1, weighting.bm25_b) == (
        fit.weighting,
        fit.bm25_k1,
        fit.bm25_b,
    )
    for row in range(0, len(b.users), 7):
        lo, hi = b.indptr[row], b.indptr[row + 1]
        got = weighting.row(b.indices[lo:hi], b.strength[lo:hi])
        np.testing.assert_allclose(
            got, trained.data[trained.indptr[row] : trained.indptr[row + 1]], rtol=1e-5
        )


def test_a_single_product_explains_every_recommendation(recommender: Recommender) -> None:
    """Folded in from one recent product, every recommendation is explained by it."""
    item = recommender.bundle.items.ids[5]
    got = recommender.recommend(
        RecommendQuery(user_id="one-product", k=4, recent_item_ids=(item,), explain=True)
    )
    assert got.source is Source.FOLD_IN and len(got.items) == 4
    for answer in got.items:
        assert [i for i, _ in answer.because] == [item]


def test_explanations_name_tied_products_in_catalogue_order(recommender: Recommender) -> None:
    """Products that contribute exactly as much (the same factors, the same confidence)
    are named in catalogue order, however many the customer has."""
    b = recommender.bundle
    twins = np.arange(10, 70)  # sixty products sharing three item vectors, in turn
    vectors = b.item_index.vectors.copy()
    vectors[twins] = vectors[twins[:3]][np.arange(len(twins)) % 3]
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    rec = Recommender(
        dataclasses.replace(b, item_index=VectorIndex(vectors, flat, IndexSpec("flat")))
    )
    recent = tuple(b.items.ids[r] for r in twins[::-1])  # the order asked does not matter
    got = rec.recommend(RecommendQuery(user_id="twins", k=5, recent_item_ids=recent, explain=True))
    assert got.items
    for answer in got.items:
        group = (b.items.index(answer.because[0][0]) - 10) % 3
        assert [i for i, _ in answer.because] == [b.items.ids[r] for r in twins[group::3][:3]]
        assert len({w for _, w in answer.because}) == 1


def test_info_describes_the_loaded_version(recommender: Recommender) -> None:
    b = recommender.bundle
    m = b.manifest
    assert recommender.info() == {
        "version": m.version,
        "created_at": m.created_at,
        "algorithm": m.algorithm,
        "n_users": len(b.users),
        "n_items": len(b.items),
        "factors": m.params["factors"],
        "suitability": m.rules.risk_levels,
        "active_only": m.rules.active_flag,
        "item_index": m.indexes.items.kind,
        "user_index": m.indexes.users.kind,
    }
    assert recommender.info()["version"] == b.path.name
    without = dataclasses.replace(m, params={k: v for k, v in m.params.items() if k != "factors"})
    bare = Recommender(dataclasses.replace(b, manifest=without))
    assert bare.info()["factors"] == m.dim  # an older manifest: the vectors' width
    bpr = dataclasses.replace(m, algorithm="bpr", params={**m.params, "factors": m.dim - 1})
    assert Recommender(dataclasses.replace(b, manifest=bpr)).info()["factors"] == m.dim - 1


def test_resolve_user_gives_the_customers_own_vector_history_and_rules(
    recommender: Recommender,
) -> None:
    b = recommender.bundle
    row = next(r for r in range(len(b.users)) if b.held[b.indptr[r] : b.indptr[r + 1]].any())
    history = b.user_item_rows(row)
    user = recommender.resolve_user(b.users.ids[row], ())
    assert user.source is Source.PERSONALIZED
    np.testing.assert_array_equal(user.vector, b.user_index.vectors[row])
    np.testing.assert_array_equal(user.history, history)
    np.testing.assert_array_equal(user.confidence, b.user_item_data(row))
    np.testing.assert_array_equal(user.held, history[b.held[b.indptr[row] : b.indptr[row + 1]]])
    assert user.tolerance == int(recommender.tolerance[row])
    new = next(i for i in range(len(b.items)) if i not in set(history.tolist()))
    folded = recommender.resolve_user(b.users.ids[row], (b.items.ids[new],))
    assert folded.source is Source.FOLD_IN
    assert set(folded.history.tolist()) == {*history.tolist(), new}
    raised = Changes(1, (), (CustomerState(b.users.ids[row], 5, None, 1),), (), ())
    overlay = _live(recommender, raised)
    assert recommender.resolve_user(b.users.ids[row], (), overlay).tolerance == 5
    nobody = recommender.resolve_user("never-seen", ())
    assert (nobody.source, nobody.vector, nobody.tolerance) == (Source.POPULAR, None, 1)
    assert nobody.history.size == nobody.held.size == 0


def test_unknown_items_are_the_ids_the_catalogue_lacks_in_order(recommender: Recommender) -> None:
    ids = recommender.bundle.items.ids
    asked = ("nope-1", ids[0], "nope-2", ids[1], "nope-1")
    assert recommender.unknown_items(asked) == ("nope-1", "nope-2", "nope-1")
    assert recommender.unknown_items(()) == ()
    assert recommender.unknown_items((ids[0],)) == ()  # row 0 is a product like any other


def test_rank_items_judges_the_first_product_by_its_own_rules(recommender: Recommender) -> None:
    """Row 0 pulled from sale is dropped as inactive; the rows around it keep their own."""
    b = recommender.bundle
    active = recommender.item_rules.active
    assert active[0] and active[1]
    bold = (CustomerState("bold", 5, None, 1),)  # a new customer who may take any risk
    pulled = Changes(1, (), bold, (ProductState(b.items.ids[0], False, None, 1),), ())
    overlay = _live(recommender, pulled)
    got = recommender.rank_items(
        RankQuery(user_id="bold", item_ids=(b.items.ids[0], "nope", b.items.ids[1])),
        overlay,
    )
    assert [(d.item_id, d.reason) for d in got.dropped] == [
        (b.items.ids[0], DropReason.INACTIVE),
        ("nope", DropReason.UNKNOWN_ITEM),
    ]
    assert [it.item_id for it in got.items] == [b.items.ids[1]]
    assert (got.version, got.sequence) == (recommender.version, 1)


def test_rank_items_folds_in_recent_products(recommender: Recommender) -> None:
    """A stranger's recent products give them a folded-in vector: candidates are scored
    against it, and the recent products themselves are left out as interacted."""
    b = recommender.bundle
    recent = (b.items.ids[3], b.items.ids[8])
    candidates = b.items.ids[:40]
    got = recommender.rank_items(
        RankQuery(user_id="stranger", item_ids=tuple(candidates), recent_item_ids=recent)
    )
    assert (got.source, got.version, got.sequence) == (Source.FOLD_IN, recommender.version, 0)
    assert {d.item_id for d in got.dropped if d.reason is DropReason.INTERACTED} == set(recent)
    vector = recommender.resolve_user("stranger", recent).vector
    assert vector is not None
    for it in got.items:
        expected = b.item_index.vectors[b.items.index(it.item_id)] @ vector
        assert it.score == pytest.approx(float(expected), rel=1e-5)


def test_similar_items_answers_carry_their_version_and_sequence(recommender: Recommender) -> None:
    item = recommender.bundle.items.ids[0]
    plain = recommender.similar_items(SimilarQuery(item_id=item, k=3))
    assert (plain.source, plain.version, plain.sequence) == (
        Source.PERSONALIZED,
        recommender.version,
        0,
    )
    overlay = _live(recommender, Changes(4, (), (), (), ()))
    live = recommender.similar_items(SimilarQuery(item_id=item, k=3), overlay)
    assert (live.version, live.sequence) == (recommender.version, 4)


def test_fold_in_many_solves_each_history_as_fold_in_does(recommender: Recommender) -> None:
    """Batched over more histories than two chunks hold: each row is its own fold-in."""
    rng = np.random.default_rng(3)
    n_items = len(recommender.bundle.items)
    histories = [
        (np.sort(rng.choice(n_items, size=1 + i % 5, replace=False)), rng.random(1 + i % 5))
        for i in range(1100)
    ]
    histories = [(rows, conf.astype(np.float32)) for rows, conf in histories]
    got = recommender.fold_in_many(histories)
    assert got.shape == (1100, recommender.bundle.manifest.dim) and got.dtype == np.float32
    for i in (0, 511, 512, 1023, 1024, 1099):
        np.testing.assert_allclose(got[i], recommender.fold_in(*histories[i]), rtol=1e-6)
    small = recommender.fold_in_many(histories[:3], chunk=2)
    np.testing.assert_allclose(small, got[:3], rtol=1e-6)


def test_a_bpr_fold_in_pairs_the_item_bias_with_a_constant_one(recommender: Recommender) -> None:
    """BPR's last factor is the item bias: a folded-in vector keeps the full width and
    ends in 1, so its score is the inner product with the factors plus the bias."""
    b = recommender.bundle
    bpr = Recommender(
        dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, algorithm="bpr"))
    )
    rows, conf = np.array([2, 9, 30]), np.array([1.0, 2.0, 0.5], dtype=np.float32)
    vector = bpr.fold_in(rows, conf)
    assert vector.shape == (b.manifest.dim,) and vector.dtype == np.float32
    assert vector[-1] == 1.0


@pytest.mark.parametrize("exact_subset_max", [None, 0], ids=["exact", "through-faiss"])
def test_similar_items_are_ranked_by_cosine_similarity(
    recommender: Recommender, exact_subset_max: int | None
) -> None:
    """Searched exactly or through the FAISS index: the cosine of the item vectors."""
    b = recommender.bundle
    if exact_subset_max is not None:
        index = b.item_index
        searched = VectorIndex(
            index.vectors, index.index, index.spec, exact_subset_max=exact_subset_max
        )
        b = dataclasses.replace(b, item_index=searched)
    rec = Recommender(b)
    v = b.item_index.vectors.astype(np.float64)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    bold = Changes(1, (), (CustomerState("bold", 5, None, 1),), (), ())
    overlay = _live(rec, bold)
    got = rec.similar_items(SimilarQuery(item_id=b.items.ids[7], k=5, user_id="bold"), overlay)
    allowed = np.flatnonzero(rec.item_rules.active)
    allowed = allowed[allowed != 7]
    cosine = unit[allowed] @ unit[7]
    best = allowed[np.argsort(-cosine, kind="stable")[:5]]
    assert [it.item_id for it in got.items] == [b.items.ids[r] for r in best]
    np.testing.assert_allclose([it.score for it in got.items], np.sort(cosine)[::-1][:5], rtol=1e-5)


def test_recommend_shuts_a_declined_category_for_its_cooldown(recommender: Recommender) -> None:
    """A customer who declined a product is offered nothing of its category until the
    policy's cooldown has passed; ``now`` ends it, the clock by default."""
    b = recommender.bundle
    policy = recommender.contact_policy
    codes = b.categories.codes
    user = b.users.ids[0]
    query = RecommendQuery(user_id=user, k=len(b.items))
    before = recommender.recommend(query).items
    declined = next(it.item_id for it in before if codes[b.items.index(it.item_id)] >= 0)
    code = codes[b.items.index(declined)]
    name = b.categories.names[code]
    days = policy.decline_cooldown_days_by_category.get(name, policy.decline_cooldown_days)
    at = datetime.now(timezone.utc) - timedelta(days=1)
    event = StoredEvent("d1", user, declined, "decline", at, sequence=3)
    overlay = _live(recommender, Changes(3, (event,), (), (), ()))

    def categories(got: Ranked) -> set[int]:
        return {int(codes[b.items.index(it.item_id)]) for it in got.items}

    shut = recommender.recommend(query, overlay)  # by the clock: a day into the cooldown
    assert code not in categories(shut) and shut.items and shut.sequence == 3
    inside = recommender.recommend(query, overlay, now=at + timedelta(days=days - 0.01))
    assert code not in categories(inside)
    after = recommender.recommend(query, overlay, now=at + timedelta(days=days + 0.01))
    assert code in categories(after)
    assert recommender.recommend(query).sequence == 0


def test_a_declined_product_without_a_category_is_shut_alone(recommender: Recommender) -> None:
    b = recommender.bundle
    user = b.users.ids[0]
    query = RecommendQuery(user_id=user, k=len(b.items))
    declined = recommender.recommend(query).items[0].item_id
    at_row = b.items.index(declined)
    table = b.item_table
    category = [None if i == at_row else c for i, c in enumerate(table["category"].to_pylist())]
    where = table.schema.get_field_index("category")
    rec = Recommender(
        dataclasses.replace(b, item_table=table.set_column(where, "category", pa.array(category)))
    )
    at = datetime(2026, 12, 1, tzinfo=timezone.utc)
    event = StoredEvent("d1", user, declined, "decline", at, sequence=1)
    overlay = _live(rec, Changes(1, (event,), (), (), ()))
    days = rec.contact_policy.decline_cooldown_days
    inside = rec.recommend(query, overlay, now=at + timedelta(days=1))
    offered = [it.item_id for it in inside.items]
    assert declined not in offered
    assert len(offered) == len(rec.recommend(query).items) - 1  # its category's others stay
    after = rec.recommend(query, overlay, now=at + timedelta(days=days + 1))
    assert declined in [it.item_id for it in after.items]


def test_a_known_customer_gets_their_best_allowed_products_by_inner_product(
    recommender: Recommender, oracle: Oracle
) -> None:
    """The personal ranking: the customer's vector against every allowed product they
    have not interacted with, best first, scored by the inner product; explain changes
    only the reasons, which come only when asked for."""
    b = recommender.bundle
    row = next(r for r in range(len(b.users)) if b.user_item_rows(r).size >= 3)
    user = b.users.ids[row]
    got = recommender.recommend(RecommendQuery(user_id=user, k=10))
    history = set(b.user_item_rows(row).tolist())
    candidates = [
        r for r in range(len(b.items)) if r not in history and oracle.allowed(user, b.items.ids[r])
    ]
    scores = b.item_index.vectors[candidates] @ b.user_index.vectors[row]
    best = [candidates[i] for i in np.argsort(-scores, kind="stable")[:10]]
    assert got.source is Source.PERSONALIZED
    assert [it.item_id for it in got.items] == [b.items.ids[r] for r in best]
    np.testing.assert_allclose(
        [it.score for it in got.items], np.sort(scores)[::-1][:10], rtol=1e-5
    )
    assert all(it.because == () for it in got.items)
    explained = recommender.recommend(RecommendQuery(user_id=user, k=10, explain=True))
    assert [(it.item_id, it.score) for it in explained.items] == [
        (it.item_id, it.score) for it in got.items
    ]
    assert all(it.because for it in explained.items)


def test_recent_products_fold_in_with_the_manifests_confidence(fresh: Recommender) -> None:
    """Recent products join the customer's history at ``recent_confidence`` (added to the
    confidence of a product already there); unknown ids are ignored; row 0 counts."""
    b = fresh.bundle
    c = b.manifest.fold_in.recent_confidence
    row = next(
        r for r in range(len(b.users)) if b.user_item_rows(r).size and b.user_item_rows(r)[0] > 0
    )
    own, own_conf = b.user_item_rows(row), b.user_item_data(row)
    again = int(own[0])  # a product of the customer's history, seen again
    recent = (b.items.ids[0], "not-a-product", b.items.ids[again], b.items.ids[0])
    user = fresh.resolve_user(b.users.ids[row], recent)
    rows = np.array(sorted({*own.tolist(), 0}))
    expected = {int(r): float(w) for r, w in zip(own, own_conf, strict=True)}
    expected[0] = c
    expected[again] += c
    conf = np.array([expected[int(r)] for r in rows], dtype=np.float32)
    assert user.source is Source.FOLD_IN
    np.testing.assert_array_equal(user.history, rows)
    np.testing.assert_allclose(user.confidence, conf, rtol=1e-6)
    np.testing.assert_allclose(user.vector, fresh.fold_in(rows, conf), rtol=1e-5, atol=1e-6)
    stranger = fresh.resolve_user("stranger", ("not-a-product", b.items.ids[0]))
    np.testing.assert_array_equal(stranger.history, [0])
    np.testing.assert_allclose(
        stranger.vector, fresh.fold_in(np.array([0]), np.array([c], np.float32)), rtol=1e-5
    )
    nothing = fresh.resolve_user("stranger", ("not-a-product",))
    assert (nothing.source, nothing.vector, nothing.history.size) == (Source.POPULAR, None, 0)


def test_live_customers_are_answered_from_their_live_vector_or_popularity(
    fresh: Recommender,
) -> None:
    """A customer whose events changed is answered from their re-solved vector
    (FOLD_IN); a new customer with only a profile has no vector: popular products."""
    b = fresh.bundle
    user = b.users.ids[4]
    new = next(i for i in range(len(b.items)) if i not in set(b.user_item_rows(4).tolist()))
    event = StoredEvent(
        "e1", user, b.items.ids[new], "view", datetime.now(timezone.utc), sequence=1
    )
    profile = CustomerState("profile-only", 5, True, 1)
    overlay = _live(fresh, Changes(1, (event,), (profile,), (), ()))
    live = overlay.users[user]
    assert live.refolded and live.vector is not None
    got = fresh.recommend(RecommendQuery(user_id=user, k=5), overlay)
    assert got.source is Source.FOLD_IN
    for it in got.items:
        expected = b.item_index.vectors[b.items.index(it.item_id)] @ live.vector
        assert it.score == pytest.approx(float(expected), rel=1e-5)
    explained = fresh.recommend(RecommendQuery(user_id=user, k=2, explain=True), overlay)
    assert all(it.because for it in explained.items)  # from the live history
    only = fresh.recommend(RecommendQuery(user_id="profile-only", k=5), overlay)
    assert only.source is Source.POPULAR and len(only.items) == 5


def test_the_removed_counts_are_each_rules_own(fresh: Recommender) -> None:
    """Inactive products; active ones above the tolerance; suitable ones of an exclusive
    category the customer holds; the customer's history: counted from the catalogue."""
    b = fresh.bundle
    rules = fresh.item_rules
    codes = b.categories.codes
    for row in range(0, len(b.users), 25):
        user = b.users.ids[row]
        tolerance = int(fresh.tolerance[row])
        history = b.user_item_rows(row)
        held = history[b.held[b.indptr[row] : b.indptr[row + 1]]]
        suitable = rules.active & (rules.risk <= tolerance)
        shut = set(fresh.exclusive.held_categories(held))
        closed = suitable & np.isin(codes, sorted(shut))
        got = fresh.recommend(RecommendQuery(user_id=user, k=3)).suitability
        assert got is not None
        assert got.removed == {
            "inactive": int((~rules.active).sum()),
            "unsuitable": int((rules.active & ~suitable).sum()),
            "exclusive_category": int(closed.sum()),
            "interacted": len(history),
        }, user
    assert int((~rules.active).sum()) > 0  # the sample has products off sale


def test_a_profile_change_keeps_the_customers_trained_vector(fresh: Recommender) -> None:
    """A live tolerance alone re-solves nothing: the bundle's vector answers, personally."""
    b = fresh.bundle
    row = next(r for r in range(len(b.users)) if b.user_item_rows(r).size >= 2)
    user = b.users.ids[row]
    overlay = _live(
        fresh,
        Changes(1, (), (CustomerState(user, 5, None, 1),), (), ()),
    )
    got = fresh.recommend(RecommendQuery(user_id=user, k=5), overlay)
    assert got.source is Source.PERSONALIZED and got.items
    assert got.suitability is not None and got.suitability.basis == "live"
    for it in got.items:
        expected = b.item_index.vectors[b.items.index(it.item_id)] @ b.user_index.vectors[row]
        assert it.score == pytest.approx(float(expected), rel=1e-5)
    explained = fresh.recommend(RecommendQuery(user_id=user, k=2, explain=True), overlay)
    assert all(it.because for it in explained.items)


def _solve(y: np.ndarray, rows: np.ndarray, c: np.ndarray, reg: float) -> np.ndarray:
    """implicit's recalculate_user written out: (YtY + reg I + Yu^T (Cu - I) Yu) x = Yu^T Cu."""
    y = y.astype(np.float64)
    yu = y[rows]
    a = y.T @ y + reg * np.eye(y.shape[1]) + (yu.T * (c - 1.0)) @ yu
    return np.linalg.solve(a, yu.T @ c)


@pytest.mark.parametrize("algorithm", ["als", "bpr"])
def test_fold_in_reads_alpha_and_regularization_from_the_manifest(
    recommender: Recommender, algorithm: str
) -> None:
    """ALS confidences are scaled by alpha, BPR's are not (it has no alpha); BPR's last
    factor is its item bias, left out of the solve. Without the keys (an older
    manifest): alpha 1, no regularization."""
    b = recommender.bundle
    rows, conf = np.array([2, 9, 30]), np.array([1.0, 2.0, 0.5], dtype=np.float32)
    params = dict(b.manifest.params)
    y = b.item_index.vectors[:, :-1] if algorithm == "bpr" else b.item_index.vectors
    for given in (
        params,
        {k: v for k, v in params.items() if k not in {"alpha", "regularization"}},
    ):
        manifest = dataclasses.replace(b.manifest, algorithm=algorithm, params=given)
        rec = Recommender(dataclasses.replace(b, manifest=manifest))
        alpha = float(given.get("alpha", 1.0)) if algorithm == "als" else 1.0
        expected = _solve(
            y, rows, alpha * conf.astype(np.float64), float(given.get("regularization", 0.0))
        )
        np.testing.assert_allclose(
            rec.fold_in(rows, conf)[: y.shape[1]], expected, rtol=1e-4, atol=1e-6
        )
    assert float(params["alpha"]) != 1.0 and float(params["regularization"]) > 0


def test_a_product_nobody_chose_has_no_popularity(recommender: Recommender) -> None:
    b = recommender.bundle
    last = len(b.items) - 1
    rec = Recommender(dataclasses.replace(b, indices=np.where(b.indices == last, 0, b.indices)))
    assert rec.popularity_score.shape == (len(b.items),)
    assert rec.popularity_score[last] == 0.0
