"""What a servable version is: a bundle loaded, its recommender and targeter built, warmed up.

Both the server (``store``) and the trial child (``trial``) load a version through
:func:`load_served_model`, so a version the child accepts is one the server can serve.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from recsvc.errors import BundleError
from recsvc.model.bundle import load_bundle
from recsvc.model.contact import DEFAULT_POLICY, ContactPolicy
from recsvc.model.overlay import Overlay
from recsvc.model.queries import RecommendQuery, SimilarQuery
from recsvc.model.ranking import Recommender
from recsvc.model.targeting import Targeter
from recsvc.settings import EXCLUSIVE_CATEGORIES

__all__ = ["ServedModel", "load_served_model"]


@dataclass(frozen=True)
class ServedModel:
    """One version, ready to answer: what a request takes from the store and uses to the end.

    With a state store, ``overlay`` holds every live change after the bundle's own state
    sequence; the follower swaps in a new ``ServedModel`` with the next overlay.
    """

    recommender: Recommender
    targeter: Targeter
    overlay: Overlay | None = None

    @property
    def version(self) -> str:
        return self.recommender.version

    @property
    def sequence(self) -> int:
        """The live state sequence answers reflect (0 without a state store)."""
        return self.overlay.sequence if self.overlay is not None else 0


def _warm_up(model: ServedModel) -> None:
    """Touch every path once so the first real request pays no first-use costs."""
    b = model.recommender.bundle
    if len(b.users):
        model.recommender.recommend(RecommendQuery(user_id=b.users.ids[0], k=10, explain=True))
    if len(b.items):
        model.recommender.recommend(RecommendQuery(recent_item_ids=(b.items.ids[0],), k=10))
        model.recommender.similar_items(SimilarQuery(item_id=b.items.ids[0], k=10))


def load_served_model(
    folder: Path,
    no_consent_data: bool = False,
    verify: bool = True,
    exclusive_categories: Collection[str] = EXCLUSIVE_CATEGORIES,
    contact_policy: ContactPolicy = DEFAULT_POLICY,
) -> ServedModel:
    """Verify (unless told it is done), load and warm one version.

    Args:
        folder: the version's folder.
        no_consent_data: the data carries no consent requirement (see ``Targeter``).
        verify: check every file against the manifest first.
        exclusive_categories: see ``Recommender``.
        contact_policy: see ``Recommender`` and ``Targeter``.

    Raises:
        BundleError: on any defect, a failed warm-up included.
    """
    bundle = load_bundle(folder, verify=verify)
    try:
        recommender = Recommender(
            bundle, exclusive_categories=exclusive_categories, contact_policy=contact_policy
        )
        targeter = Targeter(bundle, no_consent_data, contact_policy=contact_policy)
        model = ServedModel(recommender, targeter)
        _warm_up(model)
    except BundleError:
        raise
    except Exception as exc:  # a bundle that verifies but cannot serve is still a bad bundle
        raise BundleError(f"{folder.name}: failed warm-up ({type(exc).__name__}: {exc})") from exc
    return model
