"""The state follower: changes reach the served model, and waiting costs no CPU."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from recsvc.logs import Pseudonymizer
from recsvc.model.bundle import LATEST
from recsvc.serving.live import StateFollower
from recsvc.serving.store import ModelStore
from recsvc.state import open_store
from recsvc.state.base import ProductUpdate
from tests.conftest import eventually


class _Counted:
    """A real store whose waits are counted."""

    def __init__(self, store: object) -> None:
        self._store = store
        self.waits = 0

    def wait_for_change(self, after: int, timeout: float) -> int:
        self.waits += 1
        return self._store.wait_for_change(after, timeout)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_follower_without_a_model_waits_instead_of_spinning(
    models_dir: Path, tmp_path: Path
) -> None:
    """Commits a server cannot apply yet (no model) are noted, then looked at once a wait."""
    models = tmp_path / "models"
    shutil.copytree(models_dir, models)
    (models / LATEST).unlink()
    pseudonym = Pseudonymizer(b"k")
    state = open_store(f"sqlite:///{tmp_path}/state.db", pseudonym)
    state.update_products([ProductUpdate("CC-000001", active=False)])
    counted = _Counted(state)
    store = ModelStore(models)
    follower = StateFollower(store, counted, pseudonym, wait=0.1)  # type: ignore[arg-type]
    follower.start()
    try:
        time.sleep(1.0)
        assert follower.committed == 1
        assert follower.lag_seconds() > 0.5
        # One wait every 0.1 s at most, not a busy loop answering at once.
        assert counted.waits <= 15, counted.waits
    finally:
        follower.stop()
        state.close()
        store.close()


def test_a_follower_applies_a_commit_to_the_served_model(models_dir: Path, tmp_path: Path) -> None:
    pseudonym = Pseudonymizer(b"k")
    state = open_store(f"sqlite:///{tmp_path}/state.db", pseudonym)
    store = ModelStore(models_dir)
    follower = StateFollower(store, state, pseudonym, wait=0.1)
    store.attach = follower.attach
    try:
        assert store.refresh()
        follower.start()
        state.update_products([ProductUpdate("CC-000001", active=False)])
        eventually(lambda: store.current().sequence == 1)
        assert follower.lag_seconds() == 0.0
        assert follower.applied == 1
    finally:
        follower.stop()
        state.close()
        store.close()
