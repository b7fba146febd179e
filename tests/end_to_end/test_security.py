"""Authentication, TLS and mutual TLS, pseudonymous logs, and no pickle anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.cli import main as recsvc_main
from recsvc.serving.server import create_server
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc
from tests.conftest import ServerThread, settings_for

TOKEN = "s3cret-token-for-tests-0123456789"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text(TOKEN + "\n")
    return p


def _code(fn, request, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        r = fn(request, timeout=10, **kw)
        if hasattr(r, "__iter__") and not hasattr(r, "ListFields"):
            list(r)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]


def test_bearer_token_required_except_for_health(models_dir: Path, token_file: Path) -> None:
    s = ServerThread(settings_for(models_dir, auth_token_file=token_file))
    try:
        good = [("authorization", f"Bearer {TOKEN}")]
        req = pb.RecommendRequest(user_id="C00000001")
        assert _code(s.stub.Recommend, req) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _code(s.stub.Recommend, req, metadata=[("authorization", "Bearer nope")])
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            _code(s.stub.Recommend, req, metadata=[("authorization", TOKEN)])
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert _code(s.stub.Recommend, req, metadata=good) == grpc.StatusCode.OK
        target = pb.TargetUsersRequest(item_ids=["SAV-000002"], audience_size=3)
        assert _code(s.stub.TargetUsers, target) == grpc.StatusCode.UNAUTHENTICATED
        assert (
            _code(s.stub.GetModelInfo, pb.GetModelInfoRequest()) == grpc.StatusCode.UNAUTHENTICATED
        )
        health = health_pb2_grpc.HealthStub(s.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        port = s.running.port
        assert (
            recsvc_main(["info", "--target", f"localhost:{port}", "--token-file", str(token_file)])
            == 0
        )
        assert recsvc_main(["info", "--target", f"localhost:{port}"]) == 1
    finally:
        s.stop()


def test_short_tokens_are_refused(models_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ValueError, match="at least 16"):
        asyncio.run(create_server(settings_for(models_dir, auth_token_file=short)))


def _scoped_tokens(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens.json"
    entries = [
        {"name": "mobile-app", "token": "mobile-" + TOKEN, "scopes": ["recommend"]},
        {"name": "crm", "token": "crm-" + TOKEN, "scopes": ["target"]},
    ]
    path.write_text(json.dumps({"tokens": entries}))
    path.chmod(mode)
    return path


def test_scoped_tokens_reach_only_their_rpcs(models_dir: Path, tmp_path: Path) -> None:
    s = ServerThread(settings_for(models_dir, auth_tokens=_scoped_tokens(tmp_path)))
    try:
        mobile = [("authorization", f"Bearer mobile-{TOKEN}")]
        crm = [("authorization", f"Bearer crm-{TOKEN}")]
        recommend = pb.RecommendRequest(user_id="C00000001")
        target = pb.TargetUsersRequest(item_ids=["SAV-000002"], audience_size=3)
        assert _code(s.stub.Recommend, recommend, metadata=mobile) == grpc.StatusCode.OK
        assert _code(s.stub.GetModelInfo, pb.GetModelInfoRequest(), metadata=mobile) == (
            grpc.StatusCode.OK
        )
        assert _code(s.stub.TargetUsers, target, metadata=crm) == grpc.StatusCode.OK
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert _code(s.stub.TargetUsers, target, metadata=mobile) == denied
        assert _code(s.stub.Recommend, recommend, metadata=crm) == denied
        assert _code(s.stub.Recommend, recommend) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(s.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()


def test_serve_refuses_a_token_file_others_can_read(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _scoped_tokens(tmp_path, mode=0o644)
    assert recsvc_main(["serve", "--models", str(models_dir), "--auth-tokens", str(path)]) == 2
    assert f"recsvc: error: {path}: mode 0644 lets other users" in capsys.readouterr().err
    path.chmod(0o600)
    args = ["serve", "--models", str(models_dir), "--auth-tokens", str(path)]
    other = tmp_path / "token"
    other.write_text(TOKEN)
    assert recsvc_main([*args, "--auth-token-file", str(other)]) == 2
    assert "give one" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    client = ca.issue_cert("client@recsvc.test")
    paths = {
        "ca": d / "ca.pem",
        "cert": d / "server.pem",
        "key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return paths


def _info(port: int, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    addr = f"localhost:{port}"
    channel = grpc.secure_channel(addr, creds) if creds else grpc.insecure_channel(addr)
    try:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        return _code(stub.GetModelInfo, pb.GetModelInfoRequest())
    finally:
        channel.close()


def test_tls(models_dir: Path, pki: dict[str, Path]) -> None:
    s = ServerThread(settings_for(models_dir, tls_cert=pki["cert"], tls_key=pki["key"]), load=False)
    try:
        s.call(s.running.refresh())
        port = s.running.port
        ca = pki["ca"].read_bytes()
        assert _info(port, grpc.ssl_channel_credentials(ca)) == grpc.StatusCode.OK
        assert _info(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext is refused
        assert (
            recsvc_main(["info", "--target", f"localhost:{port}", "--tls-ca", str(pki["ca"])]) == 0
        )
    finally:
        s.stop()


def test_mutual_tls(models_dir: Path, pki: dict[str, Path]) -> None:
    settings = settings_for(
        models_dir, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"]
    )
    s = ServerThread(settings, load=False)
    try:
        s.call(s.running.refresh())
        port = s.running.port
        ca = pki["ca"].read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
        )
        assert _info(port, with_cert) == grpc.StatusCode.OK
        assert _info(port, grpc.ssl_channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE
        assert (
            recsvc_main(
                [
                    "info",
                    "--target",
                    f"localhost:{port}",
                    "--tls-ca",
                    str(pki["ca"]),
                    "--tls-cert",
                    str(pki["client_cert"]),
                    "--tls-key",
                    str(pki["client_key"]),
                ]
            )
            == 0
        )
    finally:
        s.stop()


def test_logs_carry_pseudonyms_never_raw_customer_ids(
    models_dir: Path,
    recommender,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    users = recommender.bundle.users.ids[:50]
    s = ServerThread(settings_for(models_dir))
    try:
        with caplog.at_level(logging.DEBUG):
            for u in users:
                s.stub.Recommend(pb.RecommendRequest(user_id=u, k=3), timeout=5)
                s.stub.RankItems(pb.RankItemsRequest(user_id=u, item_ids=["SAV-000001"]), timeout=5)
    finally:
        s.stop()
    from recsvc.logs import JsonFormatter

    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert re.search(r"u_[0-9a-f]{16}", text), "expected pseudonyms in the debug log"
    for u in users:
        assert u not in text


def test_no_pickle_anywhere_in_the_project() -> None:
    pattern = re.compile(
        r"^\s*(import pickle|from pickle|import cPickle)|allow_pickle\s*=\s*True|pickle\.loads?\(",
        re.M,
    )
    offenders = []
    for path in [
        *ROOT.glob("recsvc/**/*.py"),
        *ROOT.glob("training/**/*.py"),
        *ROOT.glob("bench/**/*.py"),
    ]:
        if "/v1/" in str(path) and path.name.endswith("_pb2.py"):
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
