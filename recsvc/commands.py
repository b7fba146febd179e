"""What every command does around its work: parse its flags, log at the configured level,
and turn an expected error into one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from recsvc.errors import RecsvcError
from recsvc.logs import configure_logging
from recsvc.settings import SETTINGS

__all__ = ["run_main"]

_LOG_LEVEL = SETTINGS["log_level"]


def run_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    errors: tuple[type[Exception], ...] = (RecsvcError, ValueError),
) -> int:
    """A command's ``main``: parse ``argv``, set up logging, return ``run(args)``.

    The log level is the command's ``--log-level`` where it has one, else
    ``RECSVC_LOG_LEVEL``, else INFO. One of ``errors`` is printed as
    ``PROG: error: ...`` and gives exit status 2.
    """
    args = parser.parse_args(argv)
    try:
        configure_logging(_LOG_LEVEL.resolve(getattr(args, _LOG_LEVEL.name, None), os.environ))
        return int(run(args))
    except errors as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
