"""A few idle connections kept for reuse: each call takes its own, so threads never share one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from recsvc.errors import StateError

__all__ = ["Pool"]

C = TypeVar("C")


class Pool(Generic[C]):
    """Connections made on demand, up to ``keep`` of them kept idle between calls.

    Args:
        connect: Opens a connection (may raise the driver's errors).
        close: Closes one; errors are ignored.
        reusable: Whether a connection handed back may serve another call.
        keep: How many idle connections to keep.
    """

    def __init__(
        self,
        connect: Callable[[], C],
        close: Callable[[C], None],
        reusable: Callable[[C], bool],
        keep: int = 4,
    ) -> None:
        self._connect = connect
        self._close = close
        self._reusable = reusable
        self._keep = keep
        self._lock = threading.Lock()
        self._idle: list[C] = []
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[C]:
        with self._lock:
            if self._closed:
                raise StateError("the state store is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            self._put(conn)

    def _put(self, conn: C) -> None:
        try:
            reusable = self._reusable(conn)
        except Exception:
            reusable = False
        if reusable:
            with self._lock:
                if not self._closed and len(self._idle) < self._keep:
                    self._idle.append(conn)
                    return
        self._discard(conn)

    def _discard(self, conn: C) -> None:
        with contextlib.suppress(Exception):
            self._close(conn)

    def close(self) -> None:
        """Close the idle connections now, and those in use as they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)
