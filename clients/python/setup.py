"""Build hook: compile the API (``../../proto/recsvc/v1/*.proto``) into ``recsvc_client/_v1``.

protoc names each generated module after its proto path (``recsvc/v1/...``), so the
gRPC stubs import ``from recsvc.v1 import ..._pb2``; those imports are rewritten to
``recsvc_client._v1``. The proto file names stay ``recsvc/v1/*.proto``: protobuf's
descriptor pool is global, and the same file under the same name (the server's
``recsvc.v1`` holds it too) is registered once and shared, where a second name for
the same messages would be refused as duplicate symbols.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PACKAGE = "recsvc_client._v1"
# Only import lines: the stubs also hold method paths ("/recsvc.v1.Recommender/...").
_IMPORT = re.compile(r"^from recsvc\.v1 import ", re.MULTILINE)


def generate(out: Path) -> None:
    """Write the generated modules and their type stubs for every proto into ``out``."""
    from grpc_tools import protoc  # a build requirement, not a run-time one

    protos = sorted((PROTO_ROOT / "recsvc" / "v1").glob("*.proto"))
    if not protos:
        sys.exit(
            f"recsvc-client: no .proto files under {PROTO_ROOT / 'recsvc' / 'v1'}; "
            "build from a checkout of the repository (pip install clients/python)"
        )
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *map(str, protos),
        ]
        if protoc.main(argv) != 0:
            sys.exit(f"recsvc-client: protoc failed on {', '.join(p.name for p in protos)}")
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / "recsvc" / "v1").iterdir()):
            text = _IMPORT.sub(f"from {PACKAGE} import ", path.read_text())
            (out / path.name).write_text(text)


class BuildPyWithProto(build_py):
    """``build_py`` that also generates ``recsvc_client/_v1``.

    An editable install (``pip install -e``) imports from the source tree, so there
    the code is generated in place (ignored by git); a wheel gets it in its build folder.
    """

    def run(self) -> None:
        super().run()  # first, so that no stale generated file in the source wins
        root = HERE if self.editable_mode else Path(self.build_lib)
        generate(root / "recsvc_client" / "_v1")


setup(cmdclass={"build_py": BuildPyWithProto})
