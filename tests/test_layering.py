"""Imports flow one way: errors -> ir -> frontend -> passes/lowprec/roofline -> pipeline -> codegen ->
runtime -> report/picture -> api/cli; fusec/ir and fusec/passes never import JAX; and no package's
modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fusec"
ORDER = ["errors", "ir", "frontend", "passes", "pipeline", "codegen", "runtime", "report", "api"]
RANK = {name: i for i, name in enumerate(ORDER)}
# Side by side with a layer above: the low-bit formats and the GPU roofline beside the passes, the
# fused-graph picture and the static GPU profile beside the report, the CLI and the tuner beside the API.
RANK |= {"lowprec": RANK["passes"], "roofline": RANK["passes"], "picture": RANK["report"],
         "picture_svg": RANK["report"], "gpu_profile": RANK["report"], "cli": RANK["api"],
         "tune": RANK["api"]}
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


def test_the_check_sees_every_module() -> None:
    layers = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert layers <= set(RANK), f"modules the layering check does not place: {sorted(layers - set(RANK))}"


def test_no_import_cycles_inside_a_package() -> None:
    """Module imports (lazy and type-checking ones included) within each package form no cycle."""
    import networkx as nx

    graph = nx.DiGraph()
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__init__.py":
            continue  # a package's __init__ re-exports its modules; importing it is not a cycle
        here = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = here.rpartition(".")[0]
        graph.add_node(here)
        for _, name in _imports(path):
            if name.rpartition(".")[0] == package and (ROOT.parent / (name.replace(".", "/") + ".py")).exists():
                graph.add_edge(here, name)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"
