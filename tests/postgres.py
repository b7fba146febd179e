"""The session's throwaway PostgreSQL cluster (``bench.postgres``), for the tests that need one.

Without the server binaries the tests that need it are skipped, saying why (CI has
them: there, a skip is a failure of set-up).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.postgres import Cluster, NoCluster, throwaway_cluster
from bench.serving import free_port

__all__ = ["Cluster", "free_port", "pg_cluster"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    try:
        with throwaway_cluster() as cluster:
            yield cluster
    except NoCluster as exc:
        pytest.skip(str(exc))
