"""Every module declares a sorted, complete ``__all__``."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import recsvc
import training

SUBMODULES = sorted(
    m.name
    for pkg in (recsvc, training)
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
    if not m.name.startswith("recsvc.v1")
)
MODULES = ["recsvc", *SUBMODULES]


def _isort_key(name: str) -> tuple[int, str]:
    """Constants, then classes, then functions, each alphabetical (ruff's RUF022 order)."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    public = getattr(module, "__all__", None)
    assert public is not None, f"{name} has no __all__"
    assert list(public) == sorted(public, key=_isort_key), f"{name}.__all__ is not sorted"
    for attr in public:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"
