"""The write path on real servers: every change in effect at once, durable, validated whole."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import load_bundle
from recsvc.state import open_store
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc
from recsvc.v1 import updates_pb2 as upb
from recsvc.v1 import updates_pb2_grpc
from tests.conftest import (
    NEW_CONNECTION,
    ServerThread,
    serve_process,
    serving_on_a_new_connection,
    settings_for,
    wait_serving,
)
from tests.postgres import Cluster, free_port

KEY = b"updates-test-key"


class Live:
    """A server with a state store, and stubs for both services."""

    def __init__(self, models: Path, state: str) -> None:
        self.server = ServerThread(settings_for(models, state=state, pseudonym_key=KEY))
        self.rec = self.server.stub
        self.upd = updates_pb2_grpc.UpdatesStub(self.server.channel)

    def close(self) -> None:
        self.server.stop()


def _code(call: Callable[..., object], request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    return err.value.code(), err.value.details()  # type: ignore[attr-defined]


@pytest.fixture
def live(models_dir: Path, tmp_path: Path) -> Iterator[Live]:
    s = Live(models_dir, f"sqlite:///{tmp_path}/state.db")
    yield s
    s.close()


def _events(*events: tuple[str, str, str, str]) -> upb.RecordEventsRequest:
    return upb.RecordEventsRequest(
        events=[upb.Event(event_id=e, user_id=u, item_id=i, type=t) for e, u, i, t in events]
    )


def _ids(response: pb.RecommendResponse) -> list[str]:
    return [it.item_id for it in response.items]


def test_a_purchase_is_excluded_on_the_next_answer(live: Live, bundle_path: Path) -> None:
    user = load_bundle(bundle_path).users.ids[3]
    first = live.rec.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10)
    bought = first.items[0].item_id
    ack = live.upd.RecordEvents(_events(("e-1", user, bought, "purchase")), timeout=10)
    assert ack.recorded == 1 and ack.sequence >= 1 and not ack.duplicates
    after = live.rec.Recommend(
        pb.RecommendRequest(user_id=user, k=5, min_sequence=ack.sequence), timeout=10
    )
    assert after.state_sequence >= ack.sequence
    assert bought not in _ids(after) and len(after.items) == 5
    again = live.upd.RecordEvents(_events(("e-1", user, bought, "purchase")), timeout=10)
    assert again.recorded == 0 and list(again.duplicates) == ["e-1"]


def test_consent_withdrawn_leaves_every_audience(live: Live, bundle_path: Path) -> None:
    item = load_bundle(bundle_path).items.ids[0]
    request = pb.TargetUsersRequest(item_ids=[item], audience_size=50)
    first = list(live.rec.TargetUsers(request, timeout=10))
    before = [u.user_id for m in first for u in m.users]
    gone = before[0]
    ack = live.upd.UpdateCustomers(
        upb.UpdateCustomersRequest(
            customers=[upb.CustomerUpdate(user_id=gone, marketing_consent=False)]
        ),
        timeout=10,
    )
    assert ack.updated == 1
    request.min_sequence = ack.sequence
    messages = list(live.rec.TargetUsers(request, timeout=10))
    after = [u.user_id for m in messages for u in m.users]
    assert gone not in after and len(after) == len(before)
    assert messages[0].state_sequence >= ack.sequence
    assert messages[-1].excluded.no_consent == first[-1].excluded.no_consent + 1


def test_a_withdrawn_product_is_never_recommended(live: Live, bundle_path: Path) -> None:
    b = load_bundle(bundle_path)
    user = b.users.ids[8]
    top = live.rec.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10).items[0].item_id
    ack = live.upd.UpdateProducts(
        upb.UpdateProductsRequest(products=[upb.ProductUpdate(item_id=top, active=False)]),
        timeout=10,
    )
    for u in b.users.ids[:40]:
        r = live.rec.Recommend(
            pb.RecommendRequest(user_id=u, k=50, min_sequence=ack.sequence), timeout=10
        )
        assert top not in _ids(r)
    with pytest.raises(grpc.RpcError) as err:
        list(live.rec.TargetUsers(pb.TargetUsersRequest(item_ids=[top], audience_size=5)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_forgotten_customer_is_answered_as_unknown_with_a_receipt(
    live: Live, bundle_path: Path
) -> None:
    user = load_bundle(bundle_path).users.ids[11]
    receipt = live.upd.ForgetCustomer(
        upb.ForgetCustomerRequest(user_id=user, reference="case-17"), timeout=10
    )
    assert receipt.subject == Pseudonymizer(KEY)(user) and user not in str(receipt)
    assert receipt.reference == "case-17" and receipt.bundles_holding == 1
    assert not receipt.complete and "bank's to purge" in receipt.note
    r = live.rec.Recommend(
        pb.RecommendRequest(user_id=user, k=5, min_sequence=receipt.sequence), timeout=10
    )
    assert r.source == pb.POPULAR
    read = live.upd.GetErasureReceipt(
        upb.GetErasureReceiptRequest(receipt_id=receipt.receipt_id), timeout=10
    )
    assert read.receipt_id == receipt.receipt_id and read.sequence == receipt.sequence
    code, _ = _code(
        live.upd.GetErasureReceipt, upb.GetErasureReceiptRequest(receipt_id="r_" + "0" * 32)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    dropped = live.upd.RecordEvents(_events(("e-9", user, "x", "view")), timeout=10)
    assert dropped.recorded == 0 and dropped.dropped_forgotten == 1


def test_a_bad_batch_names_the_entry_and_stores_nothing(
    live: Live, bundle_path: Path, tmp_path: Path
) -> None:
    b = load_bundle(bundle_path)
    user, item = b.users.ids[0], b.items.ids[0]
    code, details = _code(
        live.upd.RecordEvents,
        _events(("ok-1", user, item, "view"), ("bad-1", user, item, "teleport")),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("events[1].type")
    code, details = _code(
        live.upd.UpdateCustomers,
        upb.UpdateCustomersRequest(
            customers=[upb.CustomerUpdate(user_id=user), upb.CustomerUpdate(risk_tolerance=9)]
        ),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("customers[1].")
    code, details = _code(live.upd.RecordEvents, upb.RecordEventsRequest())
    assert details.startswith("events:")
    with open_store(f"sqlite:///{tmp_path}/state.db", Pseudonymizer(KEY)) as store:
        assert store.sequence() == 0


def test_min_sequence_beyond_what_exists_is_unavailable(live: Live) -> None:
    code, details = _code(
        live.rec.Recommend, pb.RecommendRequest(user_id="C00000001", min_sequence=10**9)
    )
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("min_sequence")
    code, _ = _code(live.rec.Recommend, pb.RecommendRequest(min_sequence=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_without_a_state_store_updates_are_refused(server: ServerThread) -> None:
    upd = updates_pb2_grpc.UpdatesStub(server.channel)
    code, details = _code(upd.RecordEvents, _events(("e", "u", "i", "view")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no state store" in details
    code, _ = _code(server.stub.Recommend, pb.RecommendRequest(user_id="C1", min_sequence=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def _until(check: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until ``check`` holds (fails the test past ``timeout``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "the change never took effect"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(params=["sqlite", "postgres"])
def shared_state(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared.db"
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


def test_two_servers_sharing_a_state_see_each_others_writes(
    models_dir: Path, bundle_path: Path, shared_state: str
) -> None:
    b = load_bundle(bundle_path)
    one, two = Live(models_dir, shared_state), Live(models_dir, shared_state)
    try:
        user = b.users.ids[21]
        bought = one.rec.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10)
        item = bought.items[0].item_id
        one.upd.RecordEvents(_events(("p-1", user, item, "purchase")), timeout=10)

        def excluded_on_two() -> bool:
            r = two.rec.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10)
            return item not in _ids(r)

        _until(excluded_on_two)
        target = pb.TargetUsersRequest(item_ids=[b.items.ids[1]], audience_size=20)
        member = next(iter(two.rec.TargetUsers(target, timeout=10))).users[0].user_id
        one.upd.UpdateCustomers(
            upb.UpdateCustomersRequest(
                customers=[upb.CustomerUpdate(user_id=member, marketing_consent=False)]
            ),
            timeout=10,
        )

        def left_two() -> bool:
            users = [u.user_id for m in two.rec.TargetUsers(target, timeout=10) for u in m.users]
            return member not in users

        _until(left_two)
        forgotten = b.users.ids[22]
        receipt = two.upd.ForgetCustomer(upb.ForgetCustomerRequest(user_id=forgotten), timeout=10)
        for s in (one, two):
            r = s.rec.Recommend(
                pb.RecommendRequest(user_id=forgotten, k=3, min_sequence=receipt.sequence),
                timeout=10,
            )
            assert r.source == pb.POPULAR
    finally:
        one.close()
        two.close()


def _process_env() -> dict[str, str]:
    return {"RECSVC_PSEUDONYM_KEY": KEY.decode()}


def test_workers_share_one_sqlite_state(
    models_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    state = f"sqlite:///{tmp_path}/workers.db"
    proc = serve_process(models_dir, port, "--workers", "2", "--state", state, env=_process_env())
    try:
        wait_serving(port)
        _until(lambda: all(serving_on_a_new_connection(port) for _ in range(20)), timeout=60)
        user = load_bundle(bundle_path).users.ids[30]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            rec = pb_grpc.RecommenderStub(channel)
            item = rec.Recommend(pb.RecommendRequest(user_id=user, k=3), timeout=10).items[0]
            upd = updates_pb2_grpc.UpdatesStub(channel)
            upd.RecordEvents(_events(("w-1", user, item.item_id, "purchase")), timeout=10)

        def excluded_on_fresh_connections() -> bool:
            # SO_REUSEPORT spreads connections over the workers: ask on many new ones.
            for _ in range(12):
                with grpc.insecure_channel(f"127.0.0.1:{port}", options=NEW_CONNECTION) as c:
                    r = pb_grpc.RecommenderStub(c).Recommend(
                        pb.RecommendRequest(user_id=user, k=3), timeout=10
                    )
                    if item.item_id in _ids(r):
                        return False
            return True

        _until(excluded_on_fresh_connections, timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sigkill_after_acknowledged_writes_loses_nothing(
    models_dir: Path, bundle_path: Path, tmp_path: Path
) -> None:
    b = load_bundle(bundle_path)
    port, url = free_port(), f"sqlite:///{tmp_path}/killed.db"
    proc = serve_process(models_dir, port, "--state", url, env=_process_env())
    acked: list[str] = []
    try:
        wait_serving(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            upd = updates_pb2_grpc.UpdatesStub(channel)
            for n in range(40):
                batch = [(f"k-{n}-{j}", b.users.ids[n], b.items.ids[j], "view") for j in range(5)]
                upd.RecordEvents(_events(*batch), timeout=10)
                acked += [e for e, *_ in batch]
            last = upd.UpdateCustomers(
                upb.UpdateCustomersRequest(
                    customers=[upb.CustomerUpdate(user_id=b.users.ids[0], risk_tolerance=2)]
                ),
                timeout=10,
            )
        proc.kill()  # no drain, no shutdown: only what was committed survives
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open_store(url, Pseudonymizer(KEY)) as store:
        assert store.sequence() == last.sequence
        changes = store.changes_since(0)
        assert {e.event_id for e in changes.events} == set(acked)
        assert [c.risk_tolerance for c in changes.customers] == [2]
