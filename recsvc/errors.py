"""The one error tree of recsvc.

Domain code raises these; the gRPC edge (``recsvc.serving.service``) maps each class
to a status code in one table (``status_for``). Anything else that escapes is a bug
and becomes INTERNAL with a generic message.

    RecsvcError
    ├── InvalidArgument        INVALID_ARGUMENT: a malformed request field (``field``)
    ├── NotFound               NOT_FOUND: an item the served model does not have
    ├── PreconditionFailed     FAILED_PRECONDITION: valid, but the data cannot answer safely
    ├── ModelUnavailable       UNAVAILABLE: no model loaded yet
    ├── AuditUnavailable       UNAVAILABLE: the audit trail cannot be written (no answer without it)
    ├── DeadlineExpired        DEADLINE_EXCEEDED: the deadline passed before any work
    ├── BundleError            INTERNAL: a version missing, corrupt or inconsistent
    │   └── BundleUnreadable   (an I/O error: retried, not a verdict)
    ├── DataError              training input breaks the data contract (the trainer's)
    ├── FitError               a fit diverged under its parameters (the trainer's)
    └── StateError             INTERNAL: the live state store refused or failed a write
        └── StateUnavailable   UNAVAILABLE: the store cannot be reached (retry)

Backends map their drivers' exceptions (``sqlite3``, ``psycopg``) to ``StateError``
and ``StateUnavailable`` in one place each (``recsvc.state``).
"""

from __future__ import annotations

__all__ = [
    "AuditUnavailable",
    "BundleError",
    "BundleUnreadable",
    "DataError",
    "DeadlineExpired",
    "FitError",
    "InvalidArgument",
    "ModelUnavailable",
    "NotFound",
    "PreconditionFailed",
    "RecsvcError",
    "StateError",
    "StateUnavailable",
]


class RecsvcError(Exception):
    """Base class of every error recsvc raises on purpose."""


class InvalidArgument(RecsvcError):
    """A request field is malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(RecsvcError):
    """A named entity (an item, a product) is not in the served model."""


class PreconditionFailed(RecsvcError):
    """The request is valid, but the served data cannot answer it safely."""


class ModelUnavailable(RecsvcError):
    """No model is loaded yet."""


class AuditUnavailable(RecsvcError):
    """The audit trail cannot be written (an I/O error, a full disk, a broken chain).

    While audit is on, no answer is sent without its record: the RPC fails instead,
    and the server reports NOT_SERVING until it is restarted (which resumes the chain).
    """


class DeadlineExpired(RecsvcError):
    """The client's deadline passed before work started: do none."""


class BundleError(RecsvcError):
    """A model bundle is missing, corrupt or does not match its manifest."""


class BundleUnreadable(BundleError):
    """A bundle file (or LATEST) could not be read at all: an I/O error, maybe passing."""


class DataError(RecsvcError):
    """Training input breaks the data contract; the message names file and column."""


class FitError(RecsvcError):
    """A fit diverged (it raised, or left factors that are not finite); the message names
    the algorithm and its parameters. Nothing fit from it is published."""


class StateError(RecsvcError):
    """The live state store refused or failed an operation (a write rolled back, a bad schema)."""


class StateUnavailable(StateError):
    """The state store cannot be reached or stayed locked past its timeout: maybe passing.

    Lost during a commit, a write may or may not have landed; every write is safe to
    retry (events are idempotent by id, updates merge to the same values).
    """
