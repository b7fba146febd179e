"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists its public names and the module each lives in; a name is imported
on first use. ``import recsvc`` stays cheap (the client commands need no FAISS),
and ``python -m recsvc.serving.trial`` does not import its own module twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``, which re-exports ``exports``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
