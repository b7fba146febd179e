"""The README's shell blocks, run as written against a real server, so they cannot drift.

A scratch checkout gets what ``make run`` makes (the sample bank, a model, the embedded
state and its key) and a server started with ``make run``'s flags on a free port; then
every block runs in the README's order, 50051 and 50052 replaced by free ports (and
``RECSVC_SERVER`` pointing the client commands at the first). Blocks that cannot run
here are skipped, each with its reason.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_serving
from tests.docs import ROOT, Block, run_block, scratch_checkout, sh_blocks
from tests.postgres import free_port

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
RUN = ""
# Every block, by how its first command line starts: run (RUN), or why not.
BLOCKS = {
    "make run": "make run serves until stopped (this test starts the server as it does) "
    "and make test is this suite",
    ".venv/bin/recsvc health": RUN,
    "grpcurl ": RUN if shutil.which("grpcurl") else "needs grpcurl, which is not installed",
    "ITEM=$(.venv/bin/recsvc recommend": RUN,
    "M=Mrecsvc/v1/recommender.proto": "needs protoc with the Go, Java and TypeScript plugins "
    "(tests/clients runs the Python client)",
    ".venv/bin/recsvc serve --models var/models [": "a synopsis of what this test runs",
    ".venv/bin/recsvc serve --models var/models --audit-dir": "a synopsis, [options] and all "
    "(tests/recsvc/audit runs verify and find on trails a server wrote)",
    ".venv/bin/recsvc-train sample-data": RUN,
    ".venv/bin/recsvc-eval": RUN,
    ".venv/bin/recsvc-train import-movielens": "needs the MovieLens-100K download "
    "(tests/bench/test_ml100k.py runs its protocol where it is present)",
}
KEY = "0123456789abcdef" * 4


def _verdict(block: Block) -> str:
    for start, verdict in BLOCKS.items():
        if block.first.startswith(start):
            return verdict
    raise AssertionError(f"{block}: a new block; add it to BLOCKS, to run or with why not")


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[int, int]]]:
    """A checkout as ``make run`` leaves it, its server serving; the ports to use."""
    folder = scratch_checkout(tmp_path_factory.mktemp("readme") / "checkout")
    bin_ = folder / ".venv" / "bin"
    sample, models = "var/sample", "var/models"
    # The Makefile's sample and model recipes, then its run recipe on a free port.
    for argv in (
        ["recsvc-train", "-q", "sample-data", "--out", sample],
        [
            "recsvc-train", "-q", "fit", "--interactions", f"{sample}/interactions.parquet",
            "--items", f"{sample}/items.parquet", "--users", f"{sample}/users.parquet",
            "--models", models,
        ],
    ):  # fmt: skip
        subprocess.run([str(bin_ / argv[0]), *argv[1:]], cwd=folder, check=True, timeout=300)
    ports = {50051: free_port(), 50052: free_port()}
    serve = [
        str(bin_ / "recsvc"), "serve", "--models", models, "--state", "sqlite:///var/state.db",
        "--host", "localhost", "--port", str(ports[50051]),
    ]  # fmt: skip
    server = subprocess.Popen(
        serve,
        cwd=folder,
        env={"PATH": f"{bin_}:/usr/bin:/bin", "RECSVC_PSEUDONYM_KEY": KEY},
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_serving(ports[50051])
        yield folder, ports
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


@pytest.mark.parametrize("block", sh_blocks(README), ids=str)
def test_the_readme_block_runs_as_written(
    block: Block, reader: tuple[Path, dict[int, int]]
) -> None:
    verdict = _verdict(block)
    if verdict:
        pytest.skip(verdict)
    folder, ports = reader
    env = {"RECSVC_SERVER": f"localhost:{ports[50051]}"}
    run_block(block, folder, env, ports)
