"""Following the live state: every change in effect on this server within a poll.

The state store is the truth; this process keeps a cache of it, the overlay of the
served model. A loaded version gets its overlay (every change after the bundle's own
state sequence) before it is swapped in; then a follower thread waits on the store
for new commits and swaps in the same version with the next overlay. A missed
wake-up costs latency, never correctness: the follower reads by sequence.

The store keeps no commit times, so the apply lag is counted from when this server
learned of a commit (the sequence a wait on the store returned): a missed wake-up
adds up to one wait (0.25 s), uncounted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import replace

from recsvc.errors import ModelUnavailable, RecsvcError
from recsvc.model.overlay import CLOSE_EVENT, apply
from recsvc.model.vocab import Vocabulary
from recsvc.serving.servable import ServedModel
from recsvc.serving.store import ModelStore
from recsvc.state.base import StateStore

__all__ = ["NON_INTERACTIONS", "StateFollower"]

log = logging.getLogger(__name__)

NON_INTERACTIONS = frozenset({CLOSE_EVENT, "decline", "contacted"})
"""Events recorded for what they mean (a closure, the contact policies), not learned from."""


class StateFollower:
    """Keeps a model store's overlay current with a state store.

    Args:
        models: the model store whose served version gets the overlay.
        state: the state store.
        pseudonymize: the keyed pseudonym of a customer id (erasures carry only that).
        wait: the longest wait for a change before looking again (seconds).
    """

    def __init__(
        self,
        models: ModelStore,
        state: StateStore,
        pseudonymize: Callable[[str], str],
        wait: float = 0.25,
    ) -> None:
        self.models = models
        self.state = state
        self._pseudonymize = pseudonymize
        self._wait = wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""
        self.applied = 0
        """Overlays swapped in since start (for tests and diagnostics)."""
        self.committed = 0
        """The newest state sequence the store has reported, applied here or not."""
        self._behind_since: float | None = None  # monotonic time a newer commit was first seen

    def attach(self, model: ServedModel) -> ServedModel:
        """``model`` with its overlay: every change after its bundle's state sequence."""
        base = model.recommender.bundle.manifest.state_sequence
        overlay = model.recommender.overlay(self._pseudonymize, self.state.changes_since(base))
        return replace(model, overlay=overlay)

    def event_types(self) -> Collection[str]:
        """The event types the served model knows, and the non-interactions."""
        events = self._served().recommender.bundle.manifest.events
        return frozenset(events.weights) | frozenset(events.held) | NON_INTERACTIONS

    def catalogue(self) -> Vocabulary | None:
        model = self.models.loaded()
        return model.recommender.bundle.items if model is not None else None

    def _served(self) -> ServedModel:
        model = self.models.loaded()
        if model is None:
            raise ModelUnavailable("no model is loaded yet, so the event types are not known")
        return model

    def catch_up(self) -> bool:
        """Apply every committed change to the served overlay once. True if one was swapped in."""
        model = self.models.loaded()
        if model is None or model.overlay is None:
            return False
        changes = self.state.changes_since(model.overlay.sequence)
        if changes.sequence <= model.overlay.sequence:
            return False
        swapped = self.models.advance(model, replace(model, overlay=apply(model.overlay, changes)))
        self.applied += swapped
        return swapped

    def lag_seconds(self) -> float:
        """How long the oldest commit reported but not yet applied here has waited (0: none)."""
        since = self._behind_since
        return 0.0 if since is None else time.monotonic() - since

    def _note(self, committed: int, applied: int) -> None:
        """Record what the store reported against what this server has applied."""
        if committed > self.committed:
            self.committed = committed
        if applied >= self.committed:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = time.monotonic()

    def _applied(self) -> int:
        model = self.models.loaded()
        return model.sequence if model is not None and model.overlay else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                after = self._applied()
                committed = self.state.wait_for_change(after, self._wait)
                if committed > after or self.models.loaded() is None:
                    self.catch_up()
                applied = self._applied()
                self._note(committed, applied)
                self._last_error = ""
                if applied < committed and applied == after:
                    # Nothing could be applied (no model loaded yet): the store would answer
                    # the same wait at once, so look again after a wait, not in a spin.
                    self._stop.wait(self._wait)
            except RecsvcError as exc:  # the store is down: keep trying, log once per error
                if str(exc) != self._last_error:
                    self._last_error = str(exc)
                    log.error("cannot follow the state store", extra={"reason": str(exc)})
                self._stop.wait(self._wait)
            except Exception:
                log.exception("following the state store failed")
                self._stop.wait(self._wait)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="state-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 + self._wait)
