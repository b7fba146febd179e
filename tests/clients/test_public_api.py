"""Every module of the client declares a sorted, complete ``__all__``, as recsvc's do."""

from __future__ import annotations

import pkgutil

import pytest
import recsvc_client

from tests.test_public_api import test_all_is_sorted_and_resolves as check_all

MODULES = [
    "recsvc_client",
    *sorted(
        m.name
        for m in pkgutil.walk_packages(recsvc_client.__path__, "recsvc_client.")
        if not m.name.startswith("recsvc_client._v1")
    ),
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    check_all(name)
