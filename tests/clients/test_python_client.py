"""The client distribution: installed into a fresh venv with its own two dependencies,
it talks to a real server, and the README's five-line example runs as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recsvc.v1 import recommender_pb2 as pb
from tests.clients.conftest import Script
from tests.conftest import ServerThread

pytestmark = pytest.mark.slow  # one venv and one pip install per session: about 20-40 s

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
# Everything a build could leave in the source folder, so the copy proves it builds from git.
_NOT_SOURCE = shutil.ignore_patterns("*_pb2*", "build", "*.egg-info", "__pycache__", ".*_cache")

# Runs in the fresh venv: every call once, the answers as JSON for the test to check.
CALLS = """
import json, sys
from recsvc_client import Event, RecommenderClient, UpdatesClient

with RecommenderClient(sys.argv[1]) as client:
    rec = client.recommend("C00000004", 3, explain=True)
    similar = client.similar_items("CC-000001", 4)
    ranked = client.rank_items("C00000004", ["CC-000001", "SAV-000002", "nope"])
    info = client.model_info()
    audience = client.target_users(["SAV-000002"], 50)
with UpdatesClient(sys.argv[2]) as updates:
    recorded = updates.record_events([Event("e1", "C00000004", "CC-000001", "view")])
print(json.dumps({
    "recommend": [[it.item_id, it.score, [c.item_id for c in it.because]] for it in rec.items],
    "source": rec.source.name,
    "similar": [it.item_id for it in similar.items],
    "ranked": [it.item_id for it in ranked.items],
    "unknown": list(ranked.unknown_item_ids),
    "version": info.version,
    "created_at": info.created_at.isoformat(),
    "audience": list(audience.user_ids),
    "no_consent": audience.excluded.no_consent,
    "sequence": recorded.sequence,
}))
"""


def _run(python: Path, *args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="session")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh venv holding recsvc-client, built from a copy of its sources."""
    base = tmp_path_factory.mktemp("client-venv")
    shutil.copytree(ROOT / "proto", base / "repo" / "proto")
    shutil.copytree(CLIENT, base / "repo" / "clients" / "python", ignore=_NOT_SOURCE)
    _run(Path(sys.executable), "-m", "venv", str(base / "venv"), cwd=base)
    python = base / "venv" / "bin" / "python"
    _run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        str(base / "repo" / "clients" / "python"),
        cwd=base,
    )
    return python


def test_it_installs_with_grpcio_and_protobuf_only(client_python: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.metadata as md, importlib.util as u, json\n"
        "heavy = ['faiss', 'implicit', 'scipy', 'numpy', 'pyarrow', 'recsvc']\n"
        "print(json.dumps({'present': [m for m in heavy if u.find_spec(m)],\n"
        "                  'requires': md.requires('recsvc-client')}))\n"
    )
    found = json.loads(_run(client_python, "-c", probe, cwd=tmp_path))
    assert found == {"present": [], "requires": ["grpcio>=1.66.2", "protobuf>=5.27.2"]}
    for module in ("faiss", "implicit", "scipy"):
        proc = subprocess.run([str(client_python), "-c", f"import {module}"], capture_output=True)
        assert proc.returncode == 1 and b"ModuleNotFoundError" in proc.stderr


def test_it_calls_a_real_server(
    client_python: Path, server: ServerThread, scripted: Script, tmp_path: Path
) -> None:
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    target = f"localhost:{server.running.port}"
    got = json.loads(
        _run(client_python, str(script), target, f"localhost:{scripted.port}", cwd=tmp_path)
    )
    raw = server.stub.Recommend(pb.RecommendRequest(user_id="C00000004", k=3, explain=True))
    assert got["recommend"] == [
        [it.item_id, it.score, [c.item_id for c in it.because]] for it in raw.items
    ]
    assert got["source"] == "PERSONALIZED"
    similar = server.stub.SimilarItems(pb.SimilarItemsRequest(item_id="CC-000001", k=4))
    assert got["similar"] == [it.item_id for it in similar.items]
    assert got["unknown"] == ["nope"] and set(got["ranked"]) <= {"CC-000001", "SAV-000002"}
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert got["version"] == info.version and got["created_at"].endswith("+00:00")
    msgs = list(
        server.stub.TargetUsers(pb.TargetUsersRequest(item_ids=["SAV-000002"], audience_size=50))
    )
    assert (
        got["audience"] == [u.user_id for m in msgs for u in m.users] and len(got["audience"]) == 50
    )
    assert got["no_consent"] == msgs[-1].excluded.no_consent
    assert got["sequence"] == 7 and scripted.attempts["RecordEvents"] == 1


def test_the_readme_example_runs_as_written(
    client_python: Path, server: ServerThread, tmp_path: Path
) -> None:
    text = (CLIENT / "README.md").read_text()
    example = re.search(r"## Five lines\n\n```python\n(.*?)```", text, re.S)
    assert example is not None, "the README lost its five-line example"
    code = example.group(1)
    assert len(code.strip().splitlines()) == 5 and "localhost:50051" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("localhost:50051", f"localhost:{server.running.port}"))
    lines = _run(client_python, str(script), cwd=tmp_path).splitlines()
    raw = server.stub.Recommend(pb.RecommendRequest(user_id="C00000042", k=5))
    assert lines == [f"{it.item_id} {round(it.score, 3)}" for it in raw.items]
