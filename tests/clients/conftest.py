"""An in-test gRPC server for the client's tests: real, on port 0, with scripted answers.

The Updates service is not served by recsvc on this branch yet, and the real server
cannot be made to fail on cue; this one answers from the generated servicer bases,
records every attempt, and fails or stalls a method when told to.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from recsvc.v1 import recommender_pb2, recommender_pb2_grpc, updates_pb2, updates_pb2_grpc


@dataclass
class Script:
    """What the server has seen, and how it answers next."""

    port: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    requests: dict[str, Message] = field(default_factory=dict)
    fail: dict[str, tuple[grpc.StatusCode, int]] = field(default_factory=dict)
    """method -> (code, n): fail the next n attempts of the method with code."""
    delay: float = 0.0
    answers: dict[str, Message] = field(default_factory=dict)

    def answer(self, method: str, request: Message, context: grpc.ServicerContext) -> Any:
        self.attempts[method] += 1
        self.requests[method] = request
        time.sleep(self.delay)
        code, left = self.fail.get(method, (grpc.StatusCode.OK, 0))
        if left:
            self.fail[method] = (code, left - 1)
            context.abort(code, f"{method}: scripted failure")
        return self.answers[method]


def _servicer(base: type, script: Script, methods: list[str]) -> Any:
    """An instance of ``base`` whose ``methods`` answer from ``script``."""

    def handler(name: str) -> Callable[..., Any]:
        return lambda self, request, context: script.answer(name, request, context)

    return type(f"Scripted{base.__name__}", (base,), {m: handler(m) for m in methods})()


@pytest.fixture
def scripted() -> Iterator[Script]:
    script = Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    updates = [
        "RecordEvents",
        "UpdateCustomers",
        "UpdateProducts",
        "ForgetCustomer",
        "GetErasureReceipt",
    ]
    updates_pb2_grpc.add_UpdatesServicer_to_server(
        _servicer(updates_pb2_grpc.UpdatesServicer, script, updates), server
    )
    recommender_pb2_grpc.add_RecommenderServicer_to_server(
        _servicer(recommender_pb2_grpc.RecommenderServicer, script, ["GetModelInfo"]), server
    )
    script.port = server.add_insecure_port("localhost:0")
    script.answers["GetModelInfo"] = recommender_pb2.ModelInfo(version="v-scripted")
    script.answers["RecordEvents"] = updates_pb2.RecordEventsResponse(recorded=1, sequence=7)
    server.start()
    yield script
    server.stop(grace=None).wait()
