"""A servable version: loaded, warmed, with the consent switch passed through."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.errors import BundleError, PreconditionFailed
from recsvc.model.queries import RecommendQuery, TargetQuery
from recsvc.model.ranking import Recommender
from recsvc.model.rules import MIN_LEVEL
from recsvc.serving.servable import load_served_model
from tests.conftest import PARAMS
from training.data import load_training_data
from training.fit import fit_model
from training.publish import publish


def test_a_version_loads_and_answers(bundle_path: Path) -> None:
    model = load_served_model(bundle_path)
    assert model.version == bundle_path.name == model.targeter.bundle.version
    user = model.recommender.bundle.users.ids[0]
    assert len(model.recommender.recommend(RecommendQuery(user_id=user, k=5)).items) == 5


def test_a_version_that_fails_warm_up_is_a_bad_version(
    bundle_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object, **_kw: object) -> None:
        raise RuntimeError("no similar items today")

    monkeypatch.setattr(Recommender, "similar_items", broken)
    with pytest.raises(BundleError, match=r"failed warm-up \(RuntimeError: no similar items"):
        load_served_model(bundle_path)


def test_no_consent_data_waives_consent_only_without_a_users_table(
    bundle_path: Path, sample_dir: Path, tmp_path: Path
) -> None:
    # A users table's consent always applies, whatever the switch says.
    assert not load_served_model(bundle_path, no_consent_data=True).targeter.no_consent_data
    data = load_training_data(sample_dir / "interactions.parquet", sample_dir / "items.parquet")
    folder = publish(tmp_path, data, fit_model(data.user_items, PARAMS, progress=False))
    waived = load_served_model(folder, no_consent_data=True).targeter
    # Unknown tolerance is the lowest level: only the lowest-risk products reach anyone.
    row = next(
        r for r, risk in enumerate(waived.item_risk) if risk == MIN_LEVEL and waived.item_active[r]
    )
    query = TargetQuery(item_ids=(waived.bundle.items.ids[row],), audience_size=5)
    assert waived.no_consent_data and len(waived.target(query).rows) == 5
    with pytest.raises(PreconditionFailed, match="no-consent-data"):
        load_served_model(folder).targeter.target(query)
