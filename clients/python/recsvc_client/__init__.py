"""recsvc_client: a light, typed client for the recsvc recommendation service.

Depends on grpcio and protobuf only; the API's generated code is built into the
package from ``proto/recsvc/v1`` (the contract).

    from recsvc_client import RecommenderClient

    with RecommenderClient("localhost:50051") as client:
        for item in client.recommend("C00000042", k=5).items:
            print(item.item_id, item.score)

Modules: ``channel`` (TLS, token, deadline, retries), ``recommender`` and ``updates``
(the two clients), ``answers`` (what they return), ``errors`` (what they raise).
"""

from __future__ import annotations

from recsvc_client.answers import (
    ActiveRules,
    Audience,
    Contribution,
    Dropped,
    DropReason,
    ErasureReceipt,
    ExclusionCounts,
    ModelInfo,
    Recommendation,
    RecordResult,
    ScoredItem,
    Source,
    UpdateResult,
)
from recsvc_client.channel import DEFAULT_RETRIES, DEFAULT_TIMEOUT, TLS, Retries, ServiceClient
from recsvc_client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RecsvcClientError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from recsvc_client.recommender import RecommenderClient
from recsvc_client.updates import CustomerUpdate, Event, ProductUpdate, UpdatesClient

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "TLS",
    "ActiveRules",
    "Audience",
    "Contribution",
    "CustomerUpdate",
    "DeadlineExceeded",
    "DropReason",
    "Dropped",
    "ErasureReceipt",
    "Event",
    "ExclusionCounts",
    "FailedPrecondition",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "ProductUpdate",
    "Recommendation",
    "RecommenderClient",
    "RecordResult",
    "RecsvcClientError",
    "ResourceExhausted",
    "Retries",
    "ScoredItem",
    "ServiceClient",
    "Source",
    "Unauthenticated",
    "Unavailable",
    "UpdateResult",
    "UpdatesClient",
]
