"""recsvc: personalized financial-product recommendations over gRPC.

Layers, each importing only those above it:

- ``recsvc.errors``, ``recsvc.settings``, ``recsvc.logs``, ``recsvc.files``: the error
  tree, typed settings, JSON logs with pseudonymized ids, durable file writes;
- ``recsvc.model``: a verified bundle, its indexes and the bank's rules, ranking and
  targeting, in plain Python;
- ``recsvc.serving``: the gRPC edge, the server process and the served version;
- ``recsvc.audience_file``: an audience on disk (Parquet and its sidecar);
- ``recsvc.commands``, ``recsvc.cli``: what every command does around its work (flags,
  log level, exit status); the ``recsvc`` command.

The names below are imported on first use, so ``import recsvc`` costs nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsvc._exports import lazy_exports

if TYPE_CHECKING:
    from recsvc.errors import RecsvcError
    from recsvc.model.bundle import Bundle, load_bundle
    from recsvc.model.ranking import Recommender
    from recsvc.model.targeting import Targeter
    from recsvc.serving.server import create_server, serve_forever
    from recsvc.serving.store import ModelStore
    from recsvc.settings import ServerSettings

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "ModelStore",
    "Recommender",
    "RecsvcError",
    "ServerSettings",
    "Targeter",
    "create_server",
    "load_bundle",
    "serve_forever",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "Bundle": "model.bundle",
        "ModelStore": "serving.store",
        "Recommender": "model.ranking",
        "RecsvcError": "errors",
        "ServerSettings": "settings",
        "Targeter": "model.targeting",
        "create_server": "serving.server",
        "load_bundle": "model.bundle",
        "serve_forever": "serving.server",
    },
)
