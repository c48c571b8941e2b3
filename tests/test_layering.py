"""Imports flow one way: errors -> ir -> frontend -> passes/lowprec -> pipeline -> codegen -> runtime
-> api/cli, and fusec/ir and fusec/passes never import JAX."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fusec"
ORDER = ["errors", "ir", "frontend", "passes", "lowprec", "pipeline", "codegen", "runtime", "api", "cli"]
RANK = {name: i for i, name in enumerate(ORDER)}
RANK["lowprec"] = RANK["passes"]  # passes and lowprec sit side by side
RANK["cli"] = RANK["api"]
NO_JAX = {"ir", "passes"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fusec":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "package"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                out.append((node.lineno, node.module or ""))
    return out


def test_imports_follow_the_layers() -> None:
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        here = rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "package"
        if here not in RANK:
            continue
        for line, name in _imports(path):
            if here in NO_JAX and (name == "jax" or name.startswith(("jax.", "jaxlib"))):
                problems.append(f"{rel}:{line}: fusec/{here} imports {name}")
            target = _layer(name)
            if target in RANK and RANK[target] > RANK[here]:
                problems.append(f"{rel}:{line}: {here} imports the later layer {name}")
    assert not problems, "\n".join(problems)


def test_the_check_sees_every_layer() -> None:
    layers = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")}
    assert {"ir", "frontend", "passes", "codegen", "runtime", "api", "cli"} <= layers
