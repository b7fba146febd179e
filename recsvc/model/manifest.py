"""The bundle format: the files a version holds and the manifest that vouches for them.

This module is the one owner of ``manifest.json``. Publishing builds a
:class:`Manifest` and writes :meth:`Manifest.to_json`; loading reads it back with
:meth:`Manifest.from_json`, which refuses a missing, mistyped or unknown field and
names it. Nothing else reads manifest keys, and :data:`FILES` is the one table of
file names, for the writer and the reader alike.

Fields are read and written generically, from the dataclasses' own fields, so a new
field with a default is one line; manifests written before it read as the default.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, astuple, dataclass, fields, is_dataclass
from datetime import datetime
from functools import cache
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from recsvc.errors import BundleError
from recsvc.model.index import IndexSpec

__all__ = [
    "FILES",
    "MANIFEST",
    "SCHEMA_VERSION",
    "BundleFiles",
    "Counts",
    "Events",
    "FileEntry",
    "FoldIn",
    "Indexes",
    "Manifest",
    "RuleFlags",
]

SCHEMA_VERSION = 2
"""2: raw strengths (``FILES.strength``) and the event weights, for the live state."""
MANIFEST = "manifest.json"

_INDEX_KINDS = ("flat", "hnsw", "ivf")
_M = TypeVar("_M", bound="Manifest")


@dataclass(frozen=True)
class BundleFiles:
    """The name of every file a bundle holds besides the manifest; iterating gives them all."""

    items: str = "items.parquet"
    """The item table in row order."""
    users: str = "users.parquet"
    """The user table in row order."""
    item_factors: str = "item_factors.npy"
    user_factors: str = "user_factors.npy"
    indptr: str = "user_items_indptr.npy"
    """Each customer's products as CSR: where each user's slice starts (users + 1)."""
    indices: str = "user_items_indices.npy"
    """CSR item rows, increasing within a customer."""
    data: str = "user_items_data.npy"
    """CSR weighted strengths, what the model was fit on (before alpha)."""
    strength: str = "user_items_strength.npy"
    """CSR raw strengths (before weighting): what a customer's live events add to."""
    held: str = "user_items_held.npy"
    """CSR flags: the customer holds the product."""
    popularity: str = "popularity.npy"
    """Item rows, most customers first."""
    item_index: str = "items.faiss"
    user_index: str = "users.faiss"

    def __iter__(self) -> Iterator[str]:
        return iter(astuple(self))


FILES = BundleFiles()


@dataclass(frozen=True)
class FileEntry:
    """One file's size and checksum, verified before the file is parsed."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Counts:
    """How many of each the arrays hold; loading checks every array against them."""

    users: int
    items: int
    interactions: int
    """Stored (customer, product) pairs: the CSR's nnz."""
    held: int
    """Pairs the customer holds."""


@dataclass(frozen=True)
class RuleFlags:
    """Which rules the training data could support; each must be present, none defaults."""

    risk_levels: bool
    """The catalogue carries risk levels, so the suitability rule applies."""
    active_flag: bool
    """The catalogue carries an ``active`` column."""
    users_table: bool
    """A users table was given, so marketing consent is known."""


@dataclass(frozen=True)
class FoldIn:
    """Constants for folding recent items into a customer vector."""

    recent_confidence: float
    """Confidence a just-seen item gets: the typical weighted interaction."""


@dataclass(frozen=True)
class Events:
    """How events became strengths in the training data; live events count the same."""

    weights: Mapping[str, float]
    """Strength of one event of each kind (interactions the model learns from)."""
    held: tuple[str, ...]
    """Events that mean the customer holds the product from then on."""


@dataclass(frozen=True)
class Indexes:
    """How the item and user FAISS indexes were built."""

    items: IndexSpec
    users: IndexSpec


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A version's ``manifest.json``, validated.

    Example:
        >>> Manifest.from_json(json.loads(text), folder.name).rules.risk_levels
    """

    schema_version: int = SCHEMA_VERSION
    version: str
    """The folder name it was published under."""
    created_at: datetime
    algorithm: str
    """``als`` or ``bpr``."""
    params: Mapping[str, Any]
    """The trainer's hyper-parameters, as ``training.fit.FitParams.to_json`` writes them."""
    counts: Counts
    dim: int
    """Factors per vector (BPR's item bias included)."""
    indexes: Indexes
    rules: RuleFlags
    fold_in: FoldIn
    events: Events
    data_fingerprint: str
    """sha256 of the training matrix and ids (``TrainingData.fingerprint``)."""
    data_report: Mapping[str, int]
    """What the trainer read and dropped, by reason."""
    fit_seconds: float
    files: Mapping[str, FileEntry]
    """Every file of the bundle, by name."""
    evaluation: bool = False
    """Published by an offline evaluation into its report folder, not for serving."""
    state_sequence: int = 0
    """The live state sequence folded into the training data: servers overlay what came after."""

    @classmethod
    def from_json(cls: type[_M], obj: object, folder_name: str) -> _M:
        """Validate a parsed ``manifest.json`` found in folder ``folder_name``.

        Raises:
            BundleError: a field missing, mistyped, unknown or out of range (named), a
                schema other than ``SCHEMA_VERSION``, another version's name, or no
                entry for one of ``FILES``.
        """
        where = f"{folder_name}: {MANIFEST}"
        if not isinstance(obj, dict):
            raise BundleError(f"{where} is not an object")
        # First, so a manifest of another schema is named as such, whatever its fields.
        if "schema_version" not in obj:
            raise BundleError(f"{where} field 'schema_version' is missing")
        schema = obj["schema_version"]
        if type(schema) is not int or schema != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: schema_version {schema!r} is not the supported {SCHEMA_VERSION}"
            )
        try:
            manifest: _M = _decode(cls, obj, "")
        except _Invalid as exc:
            raise BundleError(f"{where} field {exc.field!r} {exc.problem}") from None
        if manifest.version != folder_name:
            raise BundleError(f"{folder_name}: manifest names version {manifest.version!r}")
        missing = [name for name in FILES if name not in manifest.files]
        if missing:
            raise BundleError(f"{folder_name}: manifest lists no {', '.join(missing)}")
        for name in manifest.files:
            if "/" in name or name.startswith("."):
                raise BundleError(f"{folder_name}: manifest entry for {name!r} is malformed")
        for f in fields(Counts):
            if getattr(manifest.counts, f.name) < 0:
                raise BundleError(f"{where} field 'counts.{f.name}' is negative")
        if manifest.state_sequence < 0:
            raise BundleError(f"{where} field 'state_sequence' is negative")
        for event, weight in manifest.events.weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                raise BundleError(f"{where} field 'events.weights[{event!r}]' is {weight}")
        if manifest.dim < 1:
            raise BundleError(f"{where} field 'dim' is not positive")
        confidence = manifest.fold_in.recent_confidence
        if not (math.isfinite(confidence) and confidence >= 0):
            message = f"{where} field 'fold_in.recent_confidence' is {confidence}"
            raise BundleError(message)
        return manifest

    def to_json(self) -> dict[str, Any]:
        """The JSON object publishing writes; ``from_json`` reads it back equal."""
        encoded: dict[str, Any] = _encode(self)
        return encoded


class _Invalid(Exception):
    """A field that does not decode; ``field`` is its dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _decode(hint: Any, value: Any, path: str) -> Any:
    """``value`` (parsed JSON) as the type ``hint``, or ``_Invalid`` naming ``path``."""
    if hint is IndexSpec:
        return _decode_index(value, path)
    if hint is datetime:
        try:
            return datetime.fromisoformat(_decode(str, value, path))
        except ValueError:
            raise _Invalid(path, "is not an ISO 8601 time") from None
    if is_dataclass(hint):
        return _decode_fields(hint, value, path)
    if get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise _Invalid(path, "is not a list")
        item = get_args(hint)[0]
        return tuple(_decode(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if get_origin(hint) is Mapping:
        if not isinstance(value, dict):
            raise _Invalid(path, "is not an object")
        item = get_args(hint)[1]
        return {k: _decode(item, v, f"{path}[{k!r}]") for k, v in value.items()}
    if hint is Any:
        return value
    # JSON has one kind of number: an integral float is written without a point.
    accepted = (int, float) if hint is float else (hint,)
    if not isinstance(value, accepted) or (isinstance(value, bool) and hint is not bool):
        raise _Invalid(path, f"is {type(value).__name__}, not {hint.__name__}")
    return hint(value)


def _decode_fields(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _Invalid(path or "(top level)", "is not an object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise _Invalid(_join(path, unknown[0]), "is unknown")
    hints = _hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name in value:
            kwargs[name] = _decode(hints[name], value[name], _join(path, name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _Invalid(_join(path, name), "is missing")
    return cls(**kwargs)


def _decode_index(value: Any, path: str) -> IndexSpec:
    entry = _decode(Mapping[str, Any], value, path)
    odd = sorted(set(entry) ^ {"type", "params"})
    if odd:
        raise _Invalid(_join(path, odd[0]), "is unknown" if odd[0] in entry else "is missing")
    kind = _decode(str, entry["type"], _join(path, "type"))
    if kind not in _INDEX_KINDS:
        raise _Invalid(_join(path, "type"), f"is {kind!r}, not one of {', '.join(_INDEX_KINDS)}")
    return IndexSpec(kind, _decode(Mapping[str, int], entry["params"], _join(path, "params")))


def _encode(value: Any) -> Any:
    if isinstance(value, IndexSpec):
        return value.to_json()
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value
