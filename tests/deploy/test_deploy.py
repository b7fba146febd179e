"""docs/DEPLOY.md, run as written: deploy/local-cluster starts PostgreSQL, a fit and two
servers; a write through one is read through the other, a balanced client reaches both,
a rolling restart fails no call, a published model reaches both, and stopping leaves
nothing running."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from recsvc_client import CustomerUpdate, Event, RecommenderClient, UpdatesClient

from tests.docs import ROOT, Block, run_block, scratch_checkout, sh_blocks
from tests.postgres import free_port

pytestmark = pytest.mark.slow

DEPLOY = ROOT / "docs" / "DEPLOY.md"
BALANCED = [("grpc.lb_policy_name", "round_robin")]
# Each block of the page in order, by what only it says.
STEPS = (
    "deploy/local-cluster up var/cluster",
    "recsvc health",
    "--min-sequence",
    "round_robin",
    "deploy/local-cluster restart",
    "recsvc-train -q fit",
    "deploy/local-cluster down",
)


def _postgres_binaries() -> bool:
    return bool(shutil.which("pg_config") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    if not _postgres_binaries():
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL")
    folder = scratch_checkout(tmp_path / "checkout")
    ports = [free_port() for _ in range(5)]
    env = {
        "CLUSTER_PORTS": f"{ports[0]} {ports[1]}",
        "CLUSTER_METRICS_PORTS": f"{ports[2]} {ports[3]}",
        "CLUSTER_PG_PORT": str(ports[4]),
    }
    yield folder, env
    if (folder / "var" / "cluster").exists():  # the page's last step did not run
        run_block(Block("teardown", 0, "deploy/local-cluster clean var/cluster"), folder, env)


def _cluster_env(folder: Path) -> dict[str, str]:
    text = (folder / "var" / "cluster" / "env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines())


def _recommend_calls(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    prefix = 'recsvc_requests_total{code="OK",method="Recommend",service="recsvc.v1.Recommender"}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


class BalancedLoad:
    """Recommend through a round-robin client, back to back, until stopped."""

    def __init__(self, target: str) -> None:
        self.client = RecommenderClient(target, options=BALANCED, timeout=10)
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.recommend(f"C{self.answered % 9000:08d}", k=5)
                self.answered += 1
            except Exception as exc:  # every failure is a finding
                self.failures.append(repr(exc))
            self._stop.wait(0.01)

    def __enter__(self) -> BalancedLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()


def _pids(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted((folder / "var" / "cluster").glob("server*.pid"))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_deploy_recipe_runs_as_written(checkout: tuple[Path, dict[str, str]]) -> None:
    folder, env = checkout
    blocks = sh_blocks(DEPLOY)
    assert len(blocks) == len(STEPS), [str(b) for b in blocks]
    for block, step in zip(blocks, STEPS, strict=True):
        assert step in block.text, f"{block}: expected the step {step!r} here"
    up, probes, write_read, balanced, restart, publish, stop = blocks

    run_block(up, folder, env)
    cluster = _cluster_env(folder)
    server1, server2 = cluster["SERVER1"], cluster["SERVER2"]
    assert run_block(probes, folder, env).count(": SERVING") == 2
    run_block(write_read, folder, env)

    # A write through one server is in effect on the other: a purchase, then consent.
    with RecommenderClient(server1) as one, RecommenderClient(server2) as two:
        user = "C00000043"
        item = one.recommend(user, k=1).items[0].item_id
        with UpdatesClient(server1) as updates:
            done = updates.record_events([Event("deploy-1", user, item, "purchase")])
        offered = two.recommend(user, k=20, min_sequence=done.sequence).items
        assert item not in {it.item_id for it in offered}
        campaign = ["CC-000001"]
        member = one.target_users(campaign, 50).user_ids[0]
        with UpdatesClient(server2) as updates:
            withdrawn = updates.update_customers([CustomerUpdate(member, marketing_consent=False)])
        audience = one.target_users(campaign, 10_000, min_sequence=withdrawn.sequence)
        assert member not in audience.user_ids

    before = [_recommend_calls(cluster[m]) for m in ("METRICS1", "METRICS2")]
    run_block(balanced, folder, env)
    after = [_recommend_calls(cluster[m]) for m in ("METRICS1", "METRICS2")]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    with BalancedLoad(cluster["SERVERS"]) as load:
        run_block(restart, folder, env)
    assert load.failures == [] and load.answered > 100

    run_block(publish, folder, env)
    latest = (Path(cluster["MODELS"]) / "LATEST").read_text().strip()
    for server in (server1, server2):
        with RecommenderClient(server) as client:
            assert client.model_info().version == latest

    pids, pg_port = _pids(folder), int(env["CLUSTER_PG_PORT"])
    assert len(pids) == 2 and all(_alive(p) for p in pids) and _listening(pg_port)
    run_block(stop, folder, env)
    assert not any(_alive(p) for p in pids), "a server outlived down"
    assert not _listening(pg_port), "PostgreSQL outlived down"
    assert not (folder / "var" / "cluster").exists()
