"""Which version is served: follow LATEST, verify and trial a version, then swap it in.

Plain Python, no gRPC. What a served version is, and how one is loaded, is
``servable``; the throwaway child that parses it first, ``trial``. A request takes
``store.current()`` once and uses that object to the end, so a swap never changes a
model under a request in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from recsvc.errors import BundleError, BundleUnreadable, ModelUnavailable, StateError
from recsvc.model.bundle import (
    LATEST,
    VERSION_RE,
    list_versions,
    read_latest,
    read_manifest,
    verify_files,
)
from recsvc.model.contact import DEFAULT_POLICY, ContactPolicy
from recsvc.serving.servable import ServedModel, load_served_model
from recsvc.serving.trial import TrialRunner
from recsvc.settings import EXCLUSIVE_CATEGORIES

__all__ = ["ModelStore"]

log = logging.getLogger(__name__)


@dataclass
class ReloadStats:
    loaded: int = 0
    rejected: int = 0
    rejected_versions: list[str] = field(default_factory=list)
    unreadable: int = 0  # read failures (I/O), retried every poll, counted once per error
    last_error: str = ""


class ModelStore:
    """Holds the served model and follows ``models/LATEST``."""

    def __init__(
        self,
        models: Path,
        no_consent_data: bool = False,
        trial_in_child: bool = True,
        attach: Callable[[ServedModel], ServedModel] | None = None,
        exclusive_categories: Collection[str] = EXCLUSIVE_CATEGORIES,
        contact_policy: ContactPolicy = DEFAULT_POLICY,
    ) -> None:
        """
        Args:
            models: the models folder.
            no_consent_data: the data carries no consent requirement (see ``Targeter``).
            trial_in_child: parse each new version in a throwaway child first.
            attach: completes a loaded version before it is swapped in (the live
                overlay); a ``StateError`` from it is retried on the next poll.
            exclusive_categories: see ``Recommender``.
            contact_policy: see ``Recommender`` and ``Targeter``.
        """
        self.models = models
        self.attach = attach
        self.no_consent_data = no_consent_data
        # Not for the trial child: which categories are exclusive cannot make a version fail.
        self.exclusive_categories = tuple(exclusive_categories)
        self.contact_policy = contact_policy
        self._trials = TrialRunner(no_consent_data) if trial_in_child else None
        self._model: ServedModel | None = None
        self._rejected: set[str] = set()  # defective versions: never tried again
        self._unreadable: dict[str, str] = {}  # what could not be read, and why: retried
        self._lock = threading.Lock()  # one load at a time; reads need no lock
        self._swap = threading.Lock()  # a reload's swap against the follower's advance
        self.stats = ReloadStats()

    def close(self) -> None:
        """Stop the waiting trial process, if any."""
        if self._trials is not None:
            self._trials.close()

    def current(self) -> ServedModel:
        model = self._model  # one read: the swap is a single reference assignment
        if model is None:
            raise ModelUnavailable("no model is loaded yet")
        return model

    @property
    def version(self) -> str | None:
        model = self._model
        return model.version if model is not None else None

    def loaded(self) -> ServedModel | None:
        """The served model, or None before the first load."""
        return self._model

    def advance(self, expected: ServedModel, model: ServedModel) -> bool:
        """Swap in ``model`` (the same version, a newer overlay) if ``expected`` still serves."""
        with self._swap:
            if self._model is not expected:
                return False  # a reload won: the follower catches the new version up
            self._model = model
            return True

    def _try(self, version: str) -> bool:
        if version in self._rejected:
            return False
        start = time.perf_counter()
        folder = self.models / version
        try:
            if not VERSION_RE.match(version):
                raise BundleError(f"LATEST names {version[:64]!r}, which is not a version name")
            # Checksums first, in this process (pure Python, nothing parsed yet); then a
            # child parses the files, so a crash in a native reader cannot take us down.
            # Published folders are immutable, so the checked files are the loaded ones.
            verify_files(folder, read_manifest(folder))
            if self._trials is not None:
                self._trials.trial(folder)
            model = load_served_model(
                folder,
                self.no_consent_data,
                verify=False,
                exclusive_categories=self.exclusive_categories,
                contact_policy=self.contact_policy,
            )
            if self.attach is not None:
                model = self.attach(model)
        except (BundleUnreadable, StateError) as exc:  # may pass (a volume, a database)
            self._note_unreadable(version, str(exc))
            return False
        except Exception as exc:  # any other failure: this version is never served
            reason = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
            self._reject(version, reason)
            return False
        self._unreadable.pop(version, None)
        with self._swap:
            self._model = model
        self.stats.loaded += 1
        log.info(
            "serving model version",
            extra={"version": version, "load_seconds": round(time.perf_counter() - start, 3)},
        )
        return True

    def _reject(self, key: str, reason: str) -> None:
        """Count and log a rejection once; ``key`` is never tried again."""
        self._rejected.add(key)
        self.stats.rejected += 1
        self.stats.rejected_versions.append(key)
        self.stats.last_error = reason
        log.error("rejected model version", extra={"version": key, "reason": reason})

    def _note_unreadable(self, key: str, reason: str) -> None:
        """Count and log a read failure once per distinct error; ``key`` is retried."""
        if self._unreadable.get(key) != reason:
            self._unreadable[key] = reason
            self.stats.unreadable += 1
            self.stats.last_error = reason
            log.error("cannot read model version", extra={"version": key, "reason": reason})

    def _latest(self) -> str | None:
        try:
            latest = read_latest(self.models)
        except BundleUnreadable as exc:  # as if absent until it can be read again
            self._note_unreadable(LATEST, str(exc))
            return None
        self._unreadable.pop(LATEST, None)
        return latest

    def refresh(self) -> bool:
        """Load the version LATEST names if it is new and valid. Returns True on a swap.

        Before anything is served, falls back to the newest valid older version.
        """
        with self._lock:
            latest = self._latest()
            if latest is not None and latest == self.version:
                return False
            if latest is not None and self._try(latest):
                return True
            if self._model is None:
                for version in reversed(list_versions(self.models)):
                    if version != latest and self._try(version):
                        return True
            return False
