"""The smoke subset (`pytest -m smoke`, the second CI leg) takes a few cases from every test module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MODULES = sorted(p.name for p in TESTS.glob("test_*.py"))


def _smoke_modules(session: pytest.Session) -> set[str] | None:
    """Modules with a smoke case, from this session's items when it collected every module."""
    items = session.items
    if {item.path.name for item in items} != set(MODULES):
        return None
    return {item.path.name for item in items if item.get_closest_marker("smoke") is not None}


def test_every_module_contributes_to_the_smoke_subset(request: pytest.FixtureRequest) -> None:
    found = _smoke_modules(request.session)
    if found is None:  # a partial run: collect the smoke subset in a fresh process
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "smoke",
                              "-p", "no:cacheprovider"], cwd=TESTS.parent, capture_output=True, text=True)
        found = {line.split("::")[0].removeprefix("tests/") for line in out.stdout.splitlines() if "::" in line}
    missing = sorted(set(MODULES) - found)
    assert not missing, f"test modules with no smoke case: {missing}"


def test_modules_name_only_their_own_tests_as_smoke() -> None:
    for name in MODULES:
        tree = ast.parse((TESTS / name).read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SMOKE" for t in node.targets):
                named = ast.literal_eval(node.value)
                assert named and set(named) <= functions, f"{name}: SMOKE names {sorted(set(named) - functions)}"
