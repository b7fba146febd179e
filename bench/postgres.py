"""A throwaway PostgreSQL cluster, for the benchmarks and the tests that need a real one.

Started from the server binaries on this machine (``pg_config --bindir`` or
``/usr/lib/postgresql/*/bin``) on a free loopback port with trust authentication,
durable as configured by default (fsync and synchronous commit on), and thrown
away on exit. As root, initdb and pg_ctl run as the ``postgres`` user, since they
refuse to run as root.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench.serving import free_port

__all__ = ["Cluster", "NoCluster", "throwaway_cluster"]


class NoCluster(Exception):
    """This machine cannot start a PostgreSQL cluster; the message says why."""


@dataclass
class Cluster:
    """A running throwaway PostgreSQL cluster."""

    port: int
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"state_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def emptied(self) -> str:
        """The URL of the shared ``state`` database, emptied: a new public schema.

        Much cheaper than a new database (which copies a template through the WAL).
        """
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'state'").fetchone():
                conn.execute("CREATE DATABASE state")
        with psycopg.connect(self.url("state"), autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")
        return self.url("state")


def _server_bindir() -> Path | None:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """A new cluster, stopped and deleted on exit.

    Raises:
        NoCluster: No server binaries, or running as root without a ``postgres``
            user or ``runuser`` to run them as.
    """
    bindir = _server_bindir()
    if bindir is None:
        raise NoCluster("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise NoCluster(
                "running as root and there is no postgres user to run PostgreSQL"
            ) from None
        if shutil.which("runuser") is None:
            raise NoCluster("running as root without runuser: cannot start PostgreSQL")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="recsvc-pg-"))  # not under pytest's 0700 root
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}{done.stderr}{server_log}")

    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        run(*initdb, "-E", "UTF8", "--locale=C", "--no-sync")
        port = free_port()
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        yield Cluster(port)
    finally:
        if (data / "postmaster.pid").exists():
            # The data is thrown away: skip the shutdown checkpoint ("fast" writes one).
            with contextlib.suppress(Exception):
                run(str(bindir / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate", "-w")
        shutil.rmtree(root, ignore_errors=True)
