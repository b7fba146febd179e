"""The mutation run's configuration names only things that exist.

mutmut runs each mutant against the tests that ``[tool.mutmut]`` selects; a test file
moved or renamed out from under that list would quietly leave the guarantee code with
fewer tests than the scores in docs/RELIABILITY.md claim. These tests keep it honest.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
# Options of the selection that take a value (the value is not a path).
_VALUED_OPTIONS = {"-m", "-k"}


def _mutmut() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["mutmut"]  # type: ignore[no-any-return]


def _selected_paths() -> list[str]:
    """The test paths and node ids of the selection, without its options."""
    args = _mutmut()["pytest_add_cli_args_test_selection"]
    paths: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in _VALUED_OPTIONS:
            skip_next = True
        elif not arg.startswith("-"):
            paths.append(arg)
    return paths


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


@pytest.mark.parametrize("selected", _selected_paths())
def test_every_selected_test_path_exists(selected: str) -> None:
    file, _, name = selected.partition("::")
    path = ROOT / file
    assert path.is_file(), f"[tool.mutmut] selects {file}, which does not exist"
    if name:
        top = name.split("::")[0].split("[")[0]
        assert top in _test_names(path), f"[tool.mutmut] selects {selected}: no {top} in {file}"


@pytest.mark.parametrize("module", _mutmut()["only_mutate"])
def test_every_mutated_module_exists_and_some_selected_test_imports_it(module: str) -> None:
    assert (ROOT / module).is_file(), f"[tool.mutmut] mutates {module}, which does not exist"
    dotted = module.removesuffix(".py").replace("/", ".")
    package, _, leaf = dotted.rpartition(".")
    imports = re.compile(
        rf"(from {re.escape(dotted)} import|import {re.escape(dotted)}\b"
        rf"|from {re.escape(package)} import [^\n]*\b{leaf}\b)"
    )
    files = {s.partition("::")[0] for s in _selected_paths()}
    importers = [f for f in files if imports.search((ROOT / f).read_text(encoding="utf-8"))]
    assert importers, f"no test file in [tool.mutmut]'s selection imports {dotted}"


def test_the_selection_finds_paths_when_given_some() -> None:
    # The checks above loop over what the parser returns: an empty list would pass them.
    assert len(_selected_paths()) >= len(_mutmut()["only_mutate"])
