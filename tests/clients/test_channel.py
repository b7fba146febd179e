"""Deadlines on every call, gRPC's retries on UNAVAILABLE for the calls safe to repeat only.

Against the in-test server (see conftest), which counts attempts and fails on cue.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from recsvc_client import (
    TLS,
    DeadlineExceeded,
    Event,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RecommenderClient,
    RecsvcClientError,
    ResourceExhausted,
    Retries,
    Unauthenticated,
    Unavailable,
    UpdatesClient,
)
from recsvc_client.channel import RETRIED, service_config

from recsvc.v1 import updates_pb2
from tests.clients.conftest import Script

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EVENT = Event("e1", "C1", "CC-1", "view")


def test_idempotent_calls_are_retried_on_unavailable(scripted: Script) -> None:
    target = f"localhost:{scripted.port}"
    scripted.fail = {"RecordEvents": (UNAVAILABLE, 2), "GetModelInfo": (UNAVAILABLE, 3)}
    with UpdatesClient(target) as updates, RecommenderClient(target) as recommender:
        assert updates.record_events([EVENT]).sequence == 7
        assert recommender.model_info().version == "v-scripted"
    assert scripted.attempts == {"RecordEvents": 3, "GetModelInfo": 4}


def test_forget_customer_is_never_retried(scripted: Script) -> None:
    scripted.fail = {"ForgetCustomer": (UNAVAILABLE, 1)}
    scripted.answers["ForgetCustomer"] = updates_pb2.ErasureReceipt(receipt_id="second")
    with (
        UpdatesClient(f"localhost:{scripted.port}") as client,
        pytest.raises(Unavailable, match="ForgetCustomer: scripted failure"),
    ):
        client.forget_customer("C1", "CASE-1")
    assert scripted.attempts["ForgetCustomer"] == 1  # a retry would have issued a receipt


def test_retries_give_up_after_max_attempts_and_can_be_off(scripted: Script) -> None:
    target = f"localhost:{scripted.port}"
    scripted.fail = {"RecordEvents": (UNAVAILABLE, 10)}
    with (
        UpdatesClient(target, retries=Retries(max_attempts=2)) as client,
        pytest.raises(Unavailable),
    ):
        client.record_events([EVENT])
    assert scripted.attempts["RecordEvents"] == 2
    with (
        UpdatesClient(target, retries=Retries(max_attempts=1)) as client,
        pytest.raises(Unavailable),
    ):
        client.record_events([EVENT])
    assert scripted.attempts["RecordEvents"] == 3


def test_other_codes_are_not_retried(scripted: Script) -> None:
    scripted.fail = {"RecordEvents": (grpc.StatusCode.INTERNAL, 1)}
    with (
        UpdatesClient(f"localhost:{scripted.port}") as client,
        pytest.raises(RecsvcClientError) as err,
    ):
        client.record_events([EVENT])
    assert type(err.value) is RecsvcClientError and err.value.code is grpc.StatusCode.INTERNAL
    assert isinstance(err.value.__cause__, grpc.RpcError)
    assert scripted.attempts["RecordEvents"] == 1


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
        (grpc.StatusCode.INTERNAL, RecsvcClientError),
        (grpc.StatusCode.UNKNOWN, RecsvcClientError),
    ],
)
def test_each_status_raises_its_error(
    scripted: Script, code: grpc.StatusCode, error: type[RecsvcClientError]
) -> None:
    scripted.fail = {"GetModelInfo": (code, 1)}
    client = RecommenderClient(f"localhost:{scripted.port}", retries=Retries(max_attempts=1))
    with client, pytest.raises(RecsvcClientError) as err:
        client.model_info()
    assert type(err.value) is error
    assert (err.value.code, err.value.details) == (code, "GetModelInfo: scripted failure")
    assert str(err.value) == f"{code.name}: GetModelInfo: scripted failure"


def test_every_call_has_a_deadline_by_default(scripted: Script) -> None:
    scripted.delay = 1.5
    with RecommenderClient(f"localhost:{scripted.port}", timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.model_info()
    assert time.monotonic() - started < 1.2


def test_the_service_config_names_every_retried_method_and_not_forget_customer() -> None:
    config = json.loads(service_config(Retries()))
    (method,) = config["methodConfig"]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.100s",
        "maxBackoff": "2.000s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    names = {(n["service"], n.get("method")) for n in method["name"]}
    assert names == set(RETRIED)
    assert ("recsvc.v1.Updates", "ForgetCustomer") not in names
    assert ("recsvc.v1.Updates", None) not in names
    assert json.loads(service_config(Retries(max_attempts=1))) == {}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Retries(max_attempts=6), "max_attempts must be between 1 and 5, got 6"),
        (lambda: Retries(initial_backoff=0), "initial_backoff must be > 0"),
        (lambda: RecommenderClient("localhost:1", timeout=0), "timeout: must be > 0"),
        (lambda: RecommenderClient("localhost:1", token="a\nb"), "token: must be non-empty"),
        (lambda: TLS(certificate_chain=b"pem"), "needs its private key"),
        (lambda: TLS.from_files(ca="/no/such/ca.pem"), "tls ca: cannot read /no/such/ca.pem"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


def test_ids_given_as_one_string_are_refused(scripted: Script) -> None:
    with (
        RecommenderClient(f"localhost:{scripted.port}") as client,
        pytest.raises(TypeError, match="item_ids: a sequence of ids, not one string"),
    ):
        client.target_users("CC-000001", 10)


def test_code_from_another_revision_of_the_proto_is_named_on_import(tmp_path: Path) -> None:
    # A different recsvc/v1/recommender.proto registered first, as a copy generated
    # from another revision of the proto would be.
    code = (
        "from google.protobuf import descriptor_pb2, descriptor_pool\n"
        "fd = descriptor_pb2.FileDescriptorProto(name='recsvc/v1/recommender.proto')\n"
        "fd.message_type.add(name='Other')\n"
        "descriptor_pool.Default().Add(fd)\n"
        "import recsvc_client\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "ImportError: recsvc_client and code already loaded in this process" in proc.stderr
    assert "duplicate file name recsvc/v1/recommender.proto" in proc.stderr
