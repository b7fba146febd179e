"""The model and the bank's rules: plain Python over a loaded bundle, no gRPC.

``manifest`` (the bundle format), ``bundle`` (a verified version on disk), ``vocab``
(ids <-> rows), ``allowed`` and ``topk`` (allowed-row sets, top-k), ``index`` (FAISS
search among allowed rows), ``rules`` (suitability, activity, consent), ``weighting``
(confidences from strengths), ``overlay`` (live changes over a bundle), ``queries``
(validated request objects), ``ranking`` (Recommend, SimilarItems, RankItems) and
``targeting`` (TargetUsers audiences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsvc._exports import lazy_exports

if TYPE_CHECKING:
    from recsvc.model.allowed import AllowedSet
    from recsvc.model.bundle import Bundle, load_bundle, read_latest
    from recsvc.model.index import IndexSpec, VectorIndex
    from recsvc.model.queries import RankQuery, RecommendQuery, SimilarQuery, TargetQuery
    from recsvc.model.ranking import Ranked, Recommender, ScoredItem, Source
    from recsvc.model.rules import ItemRules
    from recsvc.model.targeting import Audience, ExclusionCounts, Targeter
    from recsvc.model.vocab import Vocabulary

__all__ = [
    "AllowedSet",
    "Audience",
    "Bundle",
    "ExclusionCounts",
    "IndexSpec",
    "ItemRules",
    "RankQuery",
    "Ranked",
    "RecommendQuery",
    "Recommender",
    "ScoredItem",
    "SimilarQuery",
    "Source",
    "TargetQuery",
    "Targeter",
    "VectorIndex",
    "Vocabulary",
    "load_bundle",
    "read_latest",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "AllowedSet": "allowed",
        "Audience": "targeting",
        "Bundle": "bundle",
        "ExclusionCounts": "targeting",
        "IndexSpec": "index",
        "ItemRules": "rules",
        "RankQuery": "queries",
        "Ranked": "ranking",
        "RecommendQuery": "queries",
        "Recommender": "ranking",
        "ScoredItem": "ranking",
        "SimilarQuery": "queries",
        "Source": "ranking",
        "TargetQuery": "queries",
        "Targeter": "targeting",
        "VectorIndex": "index",
        "Vocabulary": "vocab",
        "load_bundle": "bundle",
        "read_latest": "bundle",
    },
)
