"""Training closes the loop: ``fit --state`` folds the live state in, once.

Each event is in the model or in the overlay, never both, never neither; the
trainer counts events as the overlay does; profile and product updates reach the
bundle's tables; a forgotten customer leaves every version on disk, and receipts
complete only up to the sequence the bundle was built from.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import Bundle, list_versions, load_bundle, read_latest
from recsvc.model.overlay import Overlay
from recsvc.model.ranking import Recommender
from recsvc.state import CustomerUpdate, Event, ProductUpdate, StateStore, open_store
from tests.conftest import PARAMS
from tests.postgres import Cluster
from training.cli import main as train_main
from training.data import DataConfig, TrainingData, load_training_data
from training.fit import fit_model
from training.publish import publish
from training.state import complete_erasure, read_state

KEY = "trainer-test-key"
PSEUDONYMIZE = Pseudonymizer(KEY.encode())
T0 = datetime(2027, 6, 1, tzinfo=timezone.utc)  # after every event of the sample's year
NEW = "N-only-live"  # a customer the logs never saw


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSVC_PSEUDONYM_KEY", KEY)


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    return cluster.emptied()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


def _open(url: str) -> StateStore:
    return open_store(url, PSEUDONYMIZE)


def _inputs(sample: Path) -> list[str]:
    return [
        "--interactions",
        str(sample / "interactions.parquet"),
        "--items",
        str(sample / "items.parquet"),
        "--users",
        str(sample / "users.parquet"),
    ]


def _fit(sample: Path, models: Path, *extra: str) -> Bundle:
    """``recsvc-train fit`` on ``sample`` (plus ``extra`` flags); the bundle it published."""
    args = ["-q", "fit", *_inputs(sample), "--models", str(models)]
    code = train_main([*args, "--factors", "8", "--iterations", "2", "--seed", "1", *extra])
    assert code == 0
    version = read_latest(models)
    assert version is not None
    return load_bundle(models / version)


def _pair(bundle: Bundle, user_id: str, item_id: str) -> tuple[float, bool] | None:
    """The pair's raw strength and held flag in the bundle, or None if it has none."""
    row, item = bundle.users.index(user_id), bundle.items.index(item_id)
    assert row is not None and item is not None
    lo, hi = int(bundle.indptr[row]), int(bundle.indptr[row + 1])
    at = np.flatnonzero(bundle.indices[lo:hi] == item)
    if not len(at):
        return None
    return float(bundle.strength[lo + at[0]]), bool(bundle.held[lo + at[0]])


def _strength(bundle: Bundle, user_id: str, item_id: str) -> float:
    pair = _pair(bundle, user_id, item_id)
    assert pair is not None
    return pair[0]


def _live_pair(
    bundle: Bundle, after: int, url: str, user_id: str, item_id: str
) -> tuple[Overlay, tuple[float, bool]]:
    """The overlay of ``bundle`` with the store's changes after ``after``, and the live pair."""
    with _open(url) as store:
        overlay = Recommender(bundle).overlay(PSEUDONYMIZE, store.changes_since(after))
    live = overlay.users[user_id]
    item = bundle.items.index(item_id)
    at = np.flatnonzero(live.rows == item)
    return overlay, (float(live.strength[at[0]]), bool(live.held[at[0]]))


def _logged_pair(data: TrainingData) -> tuple[str, str, float]:
    """A customer and product the logs hold a pair of, with its strength."""
    m = data.user_items.tocoo()
    return data.users.ids[m.row[0]], data.items.ids[m.col[0]], float(m.data[0])


def test_each_event_is_in_the_model_or_the_overlay_never_both(
    state_url: str, sample_dir: Path, training_data: TrainingData, tmp_path: Path, keyed: None
) -> None:
    user, item, logged = _logged_pair(training_data)
    other = training_data.items.ids[-1]
    models = tmp_path / "models"
    with _open(state_url) as store:
        s1 = store.record_events(
            [
                Event("e1", NEW, item, "view", T0),
                Event("e2", NEW, other, "purchase", T0),
                Event("e3", user, item, "click", T0, weight=2.5),
            ]
        ).sequence

    first = _fit(sample_dir, models, "--state", state_url)
    assert first.manifest.state_sequence == s1
    assert first.manifest.data_report["state_events"] == 3
    assert _pair(first, NEW, item) == (1.0, False)  # only live events: in the bundle's CSR
    assert _pair(first, NEW, other) == (8.0, True)
    assert _strength(first, user, item) == pytest.approx(logged + 2.5)

    with _open(state_url) as store:
        s2 = store.record_events(
            [
                Event("e4", NEW, item, "click", T0 + timedelta(days=1)),
                Event("e5", user, item, "view", T0 + timedelta(days=1)),
            ]
        ).sequence
    # The overlay over the first bundle adds exactly the events after s1.
    overlay, live = _live_pair(first, s1, state_url, NEW, item)
    assert overlay.sequence == s2 and set(overlay.users) == {NEW, user}
    assert live == (1.0 + 2.0, False)
    assert _live_pair(first, s1, state_url, user, item)[1][0] == pytest.approx(logged + 2.5 + 1.0)

    second = _fit(sample_dir, models, "--state", state_url)
    assert second.manifest.state_sequence == s2
    assert _pair(second, NEW, item) == (1.0 + 2.0, False)  # each event once
    assert _strength(second, user, item) == pytest.approx(logged + 2.5 + 1.0)
    with _open(state_url) as store:
        after = Recommender(second).overlay(PSEUDONYMIZE, store.changes_since(s2))
    assert after.sequence == s2 and not after.users


def test_the_trainer_counts_events_as_the_overlay_does(
    sqlite_url: str, sample_dir: Path, training_data: TrainingData, tmp_path: Path, keyed: None
) -> None:
    """The same events, live over a bundle and folded into the next: equal strengths and holds."""
    user, item, _ = _logged_pair(training_data)
    a, b, c = training_data.items.ids[-3:]
    base = _fit(sample_dir, tmp_path / "models")
    day = timedelta(days=1)
    events = [
        Event("w", user, item, "purchase", T0, weight=0.5),  # its own weight wins
        Event("c", user, item, "close", T0 + day),  # no longer held, strength kept
        Event("p", user, a, "hold", T0),
        Event("d", user, a, "decline", T0 + day),  # no interaction: adds nothing
        Event("t", user, b, "contacted", T0),  # no interaction: makes no pair
        Event("z", user, c, "zap", T0),  # a type the trainer does not weigh: nothing
        Event("q", user, "NOT-IN-CATALOGUE", "view", T0),
    ]
    with _open(sqlite_url) as store:
        store.record_events(events)
        overlay = Recommender(base).overlay(PSEUDONYMIZE, store.changes_since(0))
    live = overlay.users[user]
    live_pairs = {
        base.items.ids[r]: (s, h)
        for r, s, h in zip(
            live.rows.tolist(), live.strength.tolist(), live.held.tolist(), strict=True
        )
    }

    folded = _fit(sample_dir, tmp_path / "models", "--state", sqlite_url)
    for item_id in (item, a, b, c):
        got = _pair(folded, user, item_id)
        want = live_pairs.get(item_id)
        assert (got is None) == (want is None), item_id
        if got is not None and want is not None:
            assert got[0] == pytest.approx(want[0]) and got[1] == want[1], item_id
    assert live_pairs[item][1] is False and live_pairs[a][1] is True
    assert b not in live_pairs and c not in live_pairs
    assert folded.manifest.data_report["unknown_items"] == 1


def _write(path: Path, **cols: object) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


def _held_pairs(data: TrainingData) -> dict[tuple[str, str], bool]:
    rows, cols = data.user_items.nonzero()
    return {
        (data.users.ids[u], data.items.ids[i]): bool(h)
        for u, i, h in zip(rows, cols, data.held, strict=True)
    }


def test_the_logs_close_holdings_and_know_non_interactions(tmp_path: Path) -> None:
    t = [T0 + timedelta(days=d) for d in range(3)]
    path = _write(
        tmp_path / "i.parquet",
        user_id=["a", "a", "b", "b", "c", "c", "d"],
        item_id=["x", "x", "x", "x", "y", "y", "y"],
        event=["purchase", "close", "close", "purchase", "decline", "contacted", "zap"],
        ts=pa.array([t[0], t[1], t[0], t[2], t[0], t[0], t[0]], pa.timestamp("s", tz="UTC")),
    )
    data = load_training_data(path)
    assert _held_pairs(data) == {("a", "x"): False, ("b", "x"): True, ("d", "y"): False}
    assert data.user_items[data.users.index("a"), data.items.index("x")] == 8.0
    assert data.report.unknown_events == 1  # zap; decline and contacted are known
    assert data.report.duplicates_merged == 0  # close events are no interactions: none merged

    # A weighted decline counts, as a live one would; without times, row order decides.
    path = _write(
        tmp_path / "j.parquet",
        user_id=["a", "a", "a"],
        item_id=["x", "x", "y"],
        event=["close", "hold", "decline"],
    )
    data = load_training_data(path, config=DataConfig(event_weights={"hold": 3, "decline": 0.5}))
    assert _held_pairs(data) == {("a", "x"): True, ("a", "y"): False}
    assert data.user_items[0, data.items.index("y")] == 0.5


def test_updates_reach_audiences_at_once_and_the_bundle_after_a_fit(
    sqlite_url: str,
    sample_dir: Path,
    tmp_path: Path,
    keyed: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = tmp_path / "models"
    base = _fit(sample_dir, models)
    risky = next(
        base.items.ids[r]
        for r in np.argsort(base.item_rules.risk, kind="stable")
        if base.item_rules.active[r] and base.item_rules.risk[r] >= 2
    )
    dropped = next(
        base.items.ids[r]
        for r in np.flatnonzero(base.item_rules.active)
        if base.items.ids[r] != risky
    )

    def audience(item: str, *state: str) -> list[str]:
        out = tmp_path / "aud.parquet"
        args = ["-q", "audience", "--models", str(models), "--item", item, "--size", "100000"]
        assert train_main([*args, "--out", str(out), *state]) == 0
        return [str(u) for u in pq.read_table(out)["user_id"].to_pylist()]

    members = audience(risky)
    withdrawn, cautious = members[0], members[1]
    with _open(sqlite_url) as store:
        store.update_customers(
            [
                CustomerUpdate(withdrawn, marketing_consent=False),
                CustomerUpdate(cautious, risk_tolerance=1),
                CustomerUpdate(NEW, risk_tolerance=5, marketing_consent=True),
            ]
        )
        store.record_events([Event("n1", NEW, risky, "view", T0)])
        s = store.update_products(
            [ProductUpdate(dropped, active=False), ProductUpdate("NO-SUCH", active=False)]
        ).sequence

    # Before any fit: the offline audience answers through the live state.
    live = audience(risky, "--state", sqlite_url)
    assert withdrawn not in live and cautious not in live and NEW in live
    assert set(live) - {NEW} < set(members)
    assert f'"state_sequence": {s},' in (tmp_path / "aud.parquet.json").read_text()
    args = ["-q", "audience", "--models", str(models), "--item", dropped, "--size", "10"]
    capsys.readouterr()
    assert train_main([*args, "--out", str(tmp_path / "x.parquet"), "--state", sqlite_url]) == 2
    assert "not an active product" in capsys.readouterr().err
    everything = tmp_path / "all"
    args = ["-q", "audience", "--models", str(models), "--all-items", "--size", "100000"]
    code = train_main([*args, "--out", str(everything), "--state", sqlite_url])
    assert code == 0 and (everything / "_state_sequence").read_text() == f"{s}\n"
    table = pq.read_table(everything)
    assert dropped not in set(pc.unique(table["item_id"]).to_pylist())
    assert withdrawn not in set(table["user_id"].to_pylist())

    # After a fit, the bundle's own tables carry them.
    folded = _fit(sample_dir, models, "--state", sqlite_url)
    users = {r["user_id"]: r for r in folded.user_table.to_pylist()}
    assert users[withdrawn]["marketing_consent"] is False
    assert users[cautious]["risk_tolerance"] == 1
    assert users[NEW]["marketing_consent"] is True and users[NEW]["risk_tolerance"] == 5
    items = {r["item_id"]: r for r in folded.item_table.to_pylist()}
    assert items[dropped]["active"] is False
    assert folded.manifest.data_report["unknown_products"] == 1
    assert set(audience(risky)) == set(live)  # the same customers, now from the bundle alone


def _rows_of(path: Path, user_id: str) -> int:
    table = pq.read_table(path, columns=["user_id"])
    return int(pc.sum(pc.equal(table["user_id"], user_id).cast(pa.int64())).as_py())


def _without(sample: Path, user_id: str, out: Path) -> Path:
    """A copy of the sample's inputs with no row of ``user_id``."""
    out.mkdir()
    for name in ("interactions", "items", "users"):
        table = pq.read_table(sample / f"{name}.parquet")
        if "user_id" in table.column_names:
            table = table.filter(pc.not_equal(table["user_id"], user_id))
        pq.write_table(table, out / f"{name}.parquet")
    return out


def _holding(models: Path, user_id: str) -> list[str]:
    """The versions on disk whose users table holds ``user_id``."""
    return [
        v
        for v in list_versions(models)
        if user_id in pq.read_table(models / v / "users.parquet")["user_id"].to_pylist()
    ]


def test_a_forgotten_customer_leaves_every_version_on_disk(
    sqlite_url: str,
    sample_dir: Path,
    tmp_path: Path,
    keyed: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    users = pq.read_table(sample_dir / "interactions.parquet")["user_id"]
    gone, later = (str(u) for u in pc.unique(users)[:2].to_pylist())
    models = tmp_path / "models"
    clean = _fit(_without(sample_dir, gone, tmp_path / "clean"), models).version
    for _ in range(3):
        _fit(sample_dir, models)
    assert len(_holding(models, gone)) == 3
    with _open(sqlite_url) as store:
        first = store.forget(gone, "case-1", T0)
    # What an erasure that crashed part-way leaves: a version renamed aside, not yet removed.
    leftover = models / f".erasing-{clean}"
    shutil.copytree(models / clean, leftover)

    capsys.readouterr()
    folded = _fit(sample_dir, models, "--state", sqlite_url)
    out = capsys.readouterr().out
    assert _holding(models, gone) == []
    assert list_versions(models) == [clean, folded.version]  # keep-N does not outrank erasure
    logged = _rows_of(sample_dir / "interactions.parquet", gone)
    assert logged > 0 and folded.manifest.data_report["forgotten_rows"] == logged
    assert f"{logged:,} of their log rows dropped" in out and "purging those is the bank's" in out
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []

    with _open(sqlite_url) as store:
        done = store.receipt(first.receipt_id)
        assert done is not None and done.complete and done.completed_at is not None
        # An erasure after the snapshot a bundle is built from stays incomplete.
        state = read_state(store, PSEUDONYMIZE)
        second = store.forget(later, "case-2", T0)
        data = load_training_data(
            sample_dir / "interactions.parquet",
            sample_dir / "items.parquet",
            sample_dir / "users.parquet",
            state=state,
        )
        published = publish(models, data, fit_model(data.user_items, PARAMS, progress=False))
        erasure = complete_erasure(store, models, published.name, state)
        assert erasure.versions_deleted == () and erasure.receipts_completed == 0
        pending = store.receipt(second.receipt_id)
        assert pending is not None and not pending.complete
    assert len(_holding(models, later)) == 3

    _fit(sample_dir, models, "--state", sqlite_url)
    assert _holding(models, later) == [] and _holding(models, gone) == []
    with _open(sqlite_url) as store:
        now_done = store.receipt(second.receipt_id)
        assert now_done is not None and now_done.complete


@pytest.mark.parametrize("command", ["fit", "audience"])
def test_state_without_the_pseudonym_key_is_refused(
    command: str,
    sample_dir: Path,
    models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("RECSVC_PSEUDONYM_KEY", raising=False)
    db = tmp_path / "state.db"
    models = tmp_path / "models"
    args: Callable[[], list[str]] = {
        "fit": lambda: ["fit", *_inputs(sample_dir), "--models", str(models)],
        "audience": lambda: [
            *("audience", "--models", str(models_dir), "--all-items", "--size", "5"),
            *("--out", str(tmp_path / "all")),
        ],
    }[command]
    assert train_main(["-q", *args(), "--state", f"sqlite:///{db}"]) == 2
    assert "RECSVC_PSEUDONYM_KEY" in capsys.readouterr().err
    assert not db.exists() and not models.exists() and not (tmp_path / "all").exists()
