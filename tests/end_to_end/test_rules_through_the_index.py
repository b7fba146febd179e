"""The rules over every customer again, through the approximate (HNSW) indexes.

The shared sample is small enough that every search takes the exact path. Production
bundles search HNSW graphs of 8-bit codes under the rules' selectors, over-fetch for
exclusions, merge in the products left out of the graph (all-zero embeddings) and fall
back to exact search when a selective filter runs the graph dry. Here a bundle is
published with HNSW indexes and the exact-subset shortcut is turned off, so those paths
carry the guarantees.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsvc.model.bundle import load_bundle, read_latest
from recsvc.model.index import VectorIndex
from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery
from recsvc.model.ranking import Recommender, Source
from recsvc.model.targeting import Targeter
from tests.conftest import PARAMS
from tests.rules_oracle import Oracle
from training.data import TrainingData
from training.fit import fit_model
from training.publish import publish


@pytest.fixture(scope="module")
def oracle(sample_dir: Path) -> Oracle:
    return Oracle(sample_dir)


@pytest.fixture(scope="module")
def hnsw_bundle(tmp_path_factory: pytest.TempPathFactory, training_data: TrainingData) -> Path:
    models = tmp_path_factory.mktemp("hnsw-models")
    params = dataclasses.replace(PARAMS, exact_max=0)
    publish(models, training_data, fit_model(training_data.user_items, params, progress=False))
    version = read_latest(models)
    assert version is not None
    return models / version


def _no_exact_shortcut(index: VectorIndex) -> VectorIndex:
    """The index searched however few rows are allowed (the shortcut is below 4,096)."""
    return VectorIndex(index.vectors, index.index, index.spec, exact_subset_max=0)


@pytest.fixture(scope="module")
def recommender(hnsw_bundle: Path) -> Recommender:
    bundle = load_bundle(hnsw_bundle)
    rec = Recommender(
        dataclasses.replace(
            bundle,
            item_index=_no_exact_shortcut(bundle.item_index),
            user_index=_no_exact_shortcut(bundle.user_index),
        )
    )
    assert rec.bundle.item_index.spec.kind == "hnsw"
    assert rec.bundle.user_index.spec.kind == "hnsw"
    return rec


def test_recommend_rules_hold_for_every_customer(recommender: Recommender, oracle: Oracle) -> None:
    sources = set()
    for user_id in recommender.bundle.users.ids:
        for k, exclude in ((10, set()), (40, {"SAV-000001", "CC-000002", "MF-000003"})):
            got = recommender.recommend(
                RecommendQuery(user_id=user_id, k=k, exclude_item_ids=tuple(exclude))
            )
            sources.add(got.source)
            ids, scores = [it.item_id for it in got.items], [it.score for it in got.items]
            oracle.check_recommended(user_id, k, exclude, ids, scores)
    assert Source.PERSONALIZED in sources


def test_every_allowed_item_comes_back_when_k_asks_for_all(
    recommender: Recommender, oracle: Oracle
) -> None:
    # k above what is allowed: the graph cannot hold every allowed product in its beam,
    # so the exact fallback and the all-zero rows must make up the rest.
    for user_id in recommender.bundle.users.ids[:300]:
        got = recommender.recommend(RecommendQuery(user_id=user_id, k=500))
        ids, scores = [it.item_id for it in got.items], [it.score for it in got.items]
        oracle.check_recommended(user_id, 500, set(), ids, scores)


def test_similar_and_rank_items_apply_the_rules(recommender: Recommender, oracle: Oracle) -> None:
    items = recommender.bundle.items.ids
    for user_id in recommender.bundle.users.ids[:200]:
        similar = recommender.similar_items(
            SimilarQuery(item_id=items[len(user_id) % len(items)], k=20, user_id=user_id)
        )
        assert all(oracle.allowed(user_id, it.item_id) for it in similar.items), user_id
        ranked = recommender.rank_items(RankQuery(user_id=user_id, item_ids=tuple(items[:80])))
        assert {it.item_id for it in ranked.items} == {
            i for i in items[:80] if oracle.allowed(user_id, i)
        }, user_id


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_audiences_through_the_user_index(
    recommender: Recommender, oracle: Oracle, data: st.DataObject
) -> None:
    targeter = Targeter(recommender.bundle, exact_max_base=0)  # small audiences: the index
    audience = oracle.check_drawn_campaign(targeter, data)
    assert audience.indexed or audience.eligible == 0
