"""The manifest module owns the bundle format: it reads back exactly what publish
writes, and refuses a missing, mistyped or unknown field by name."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest

from recsvc.errors import BundleError
from recsvc.model.bundle import read_manifest
from recsvc.model.manifest import FILES, MANIFEST, SCHEMA_VERSION, Manifest, RuleFlags

# Top-level fields a manifest may leave out: they read as their default.
_OPTIONAL = {"evaluation", "state_sequence"}


@pytest.fixture
def raw(bundle_path: Path) -> dict[str, Any]:
    """The published manifest as parsed JSON; each test gets its own copy."""
    parsed: dict[str, Any] = json.loads((bundle_path / MANIFEST).read_text())
    return parsed


def _reject(raw: dict[str, Any], field: str, problem: str) -> None:
    folder = raw.get("version", "v0")  # the field itself may be the one removed
    with pytest.raises(BundleError, match=re.escape(f"field {field!r} {problem}")):
        Manifest.from_json(raw, folder)


def _holder(raw: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    obj = raw
    for key in keys[:-1]:
        obj = obj[key]
    return obj


def test_publish_writes_what_to_json_writes(raw: dict[str, Any], bundle_path: Path) -> None:
    manifest = Manifest.from_json(copy.deepcopy(raw), bundle_path.name)
    assert manifest.to_json() == raw
    assert Manifest.from_json(manifest.to_json(), manifest.version) == manifest
    assert read_manifest(bundle_path) == manifest


def test_the_files_table_is_what_publish_writes(bundle_path: Path) -> None:
    assert {p.name for p in bundle_path.iterdir()} == {*FILES, MANIFEST}
    assert set(read_manifest(bundle_path).files) == set(FILES)


@pytest.mark.parametrize("flag", [f.name for f in fields(RuleFlags)])
def test_a_manifest_missing_any_rule_flag_is_rejected(raw: dict[str, Any], flag: str) -> None:
    del raw["rules"][flag]
    _reject(raw, f"rules.{flag}", "is missing")


def test_a_renamed_rule_flag_is_rejected_not_read_as_off(raw: dict[str, Any]) -> None:
    raw["rules"]["risk_level"] = raw["rules"].pop("risk_levels")
    _reject(raw, "rules.risk_level", "is unknown")


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        *(((f.name,), f.name) for f in fields(Manifest) if f.name not in _OPTIONAL),
        (("counts", "held"), "counts.held"),
        (("fold_in", "recent_confidence"), "fold_in.recent_confidence"),
        (("events", "weights"), "events.weights"),
        (("events", "held"), "events.held"),
        (("indexes", "users", "params"), "indexes.users.params"),
        (("files", FILES.item_factors, "sha256"), f"files[{FILES.item_factors!r}].sha256"),
    ],
)
def test_a_manifest_missing_a_field_is_rejected_naming_it(
    raw: dict[str, Any], keys: tuple[str, ...], field: str
) -> None:
    del _holder(raw, keys)[keys[-1]]
    _reject(raw, field, "is missing")


@pytest.mark.parametrize(
    ("keys", "value", "field", "problem"),
    [
        (("dim",), "16", "dim", "is str, not int"),
        (("counts", "users"), True, "counts.users", "is bool, not int"),
        (("rules", "active_flag"), 1, "rules.active_flag", "is int, not bool"),
        (("fold_in", "recent_confidence"), "1.0", "fold_in.recent_confidence", "is str"),
        (("created_at",), "yesterday", "created_at", "is not an ISO 8601 time"),
        (("indexes", "items", "type"), "annoy", "indexes.items.type", "is 'annoy', not one of"),
        (("indexes", "items", "params"), {"M": "32"}, "indexes.items.params['M']", "is str"),
        (("files", FILES.users), [], f"files[{FILES.users!r}]", "is not an object"),
        (("params",), [], "params", "is not an object"),
        (("dim",), 0, "dim", "is not positive"),
        (("counts", "held"), -1, "counts.held", "is negative"),
        (("fold_in", "recent_confidence"), float("nan"), "fold_in.recent_confidence", "is nan"),
    ],
)
def test_a_mistyped_or_out_of_range_field_is_rejected_naming_it(
    raw: dict[str, Any], keys: tuple[str, ...], value: object, field: str, problem: str
) -> None:
    _holder(raw, keys)[keys[-1]] = value
    _reject(raw, field, problem)


@pytest.mark.parametrize(
    ("keys", "field"),
    [(("data_fingerprnt",), "data_fingerprnt"), (("counts", "pairs"), "counts.pairs")],
)
def test_an_unknown_field_is_rejected_naming_it(
    raw: dict[str, Any], keys: tuple[str, ...], field: str
) -> None:
    _holder(raw, keys)[keys[-1]] = 0
    _reject(raw, field, "is unknown")


@pytest.mark.parametrize("schema", [None, 1, 3, True, "2"])
def test_another_schema_is_named_before_any_field(raw: dict[str, Any], schema: object) -> None:
    if schema is None:
        del raw["schema_version"]
        _reject(raw, "schema_version", "is missing")
    else:
        raw["schema_version"] = schema
        raw["a_field_of_that_schema"] = 1
        with pytest.raises(BundleError, match=f"is not the supported {SCHEMA_VERSION}"):
            Manifest.from_json(raw, raw["version"])


def test_a_field_with_a_default_reads_older_manifests_as_the_default(
    raw: dict[str, Any],
) -> None:
    """A new field is one line: declared with its default, read and written generically."""

    @dataclass(frozen=True, kw_only=True)
    class Later(Manifest):
        retention_days: int = 0

    older = Later.from_json(copy.deepcopy(raw), raw["version"])
    assert older.retention_days == 0 and older.to_json() == {**raw, "retention_days": 0}
    newer = Later.from_json({**raw, "retention_days": 7}, raw["version"])
    assert newer.retention_days == 7
    del raw["evaluation"], raw["state_sequence"]
    older_manifest = Manifest.from_json(raw, raw["version"])
    assert older_manifest.evaluation is False and older_manifest.state_sequence == 0
