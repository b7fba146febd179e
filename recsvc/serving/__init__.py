"""Serving: the gRPC edge over the model, the server process, and which version serves.

``service`` and ``updates`` (protobuf <-> domain, errors -> status codes),
``writer`` (the write path's data plane), ``live`` (the follower that keeps the
served overlay current), ``server`` and ``drain`` (process, health, reflection,
reload loop, SIGTERM drain, workers), ``auth`` (bearer tokens), ``servable`` (what a
served version is: loaded and warmed), ``store`` (which version serves: verify,
trial, load, swap) and ``trial`` (the throwaway child that parses an untrusted
version first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recsvc._exports import lazy_exports

if TYPE_CHECKING:
    from recsvc.serving.servable import ServedModel
    from recsvc.serving.server import RunningServer, create_server, serve, serve_forever
    from recsvc.serving.service import RecommenderService
    from recsvc.serving.store import ModelStore

__all__ = [
    "ModelStore",
    "RecommenderService",
    "RunningServer",
    "ServedModel",
    "create_server",
    "serve",
    "serve_forever",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ModelStore": "store",
        "RecommenderService": "service",
        "RunningServer": "server",
        "ServedModel": "servable",
        "create_server": "server",
        "serve": "server",
        "serve_forever": "server",
    },
)
