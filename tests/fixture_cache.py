"""The sample bank and its published bundle, built once and kept between test sessions.

The mutation run (``make mutation``) starts a fresh pytest session for every mutant, so
the session fixtures would write the sample and train and publish a model again for each
of thousands of mutants. With ``RECSVC_TEST_FIXTURE_CACHE`` naming a folder (the Makefile
sets it under ``mutants/``) they are built once into it and reused, keyed by a digest of
the code that makes them: the trainer, the package and the test fixtures. Without the
variable every session builds its own, as before.

Only the original code fills the cache: a session testing a mutant (mutmut names it in
``MUTANT_UNDER_TEST``) that finds no entry builds a private copy, so a broken publisher
can never leave a broken bundle for the mutants after it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path

import recsvc
import training

__all__ = ["ENV", "kept"]

ENV = "RECSVC_TEST_FIXTURE_CACHE"
# What mutmut puts in MUTANT_UNDER_TEST while it runs the unmutated code: nothing for
# the clean run, "stats" while it maps tests to functions.
_ORIGINAL_CODE = frozenset({"", "stats"})


@cache
def _digest() -> str:
    h = hashlib.sha256()
    roots = [Path(training.__file__).parent, Path(recsvc.__file__).parent]
    files = [p for root in roots for p in sorted(root.rglob("*.py"))]
    here = Path(__file__).parent
    for path in [*files, here / "conftest.py", Path(__file__)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def kept(name: str, build: Callable[[Path], None], fresh: Callable[[], Path]) -> Path:
    """The folder ``build`` fills, from the cache when one is configured.

    Args:
        name: the entry's name within one digest's folder ("sample", "models").
        build: fills an empty folder.
        fresh: makes an empty folder for a session's private copy.

    Returns:
        The filled folder; a cached one is shared, so callers must not write into it.
    """
    root = os.environ.get(ENV)
    if not root:
        out = fresh()
        build(out)
        return out
    entry = Path(root) / _digest() / name
    if entry.is_dir():
        return entry
    if os.environ.get("MUTANT_UNDER_TEST", "") not in _ORIGINAL_CODE:
        out = fresh()
        build(out)
        return out
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = entry.parent / f".{name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        build(partial)
        # Renaming is atomic: another session sees the whole entry or none.
        os.rename(partial, entry)
    except OSError:
        if not entry.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return entry
