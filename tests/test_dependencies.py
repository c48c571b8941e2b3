"""Every dependency pyproject.toml declares is imported by fusec, and optional ones stay optional:
``import fusec`` (and compiling on a CPU) needs neither jax-triton nor triton nor a GPU plugin."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fusec"
# The modules through which fusec uses each distribution. jaxlib is used through jax._src.lib, its
# MLIR and Triton-dialect bindings, which jax_internals reads kernels with.
IMPORTS = {"jax": ("jax",), "jaxlib": ("jaxlib", "jax._src.lib"), "jax-triton": ("jax_triton",),
           "numpy": ("numpy",), "lark": ("lark",), "networkx": ("networkx",), "absl-py": ("absl",)}
# Imported only inside functions, only in this module: where Triton kernels are lowered.
LAZY = {"jax-triton": PACKAGE / "runtime" / "jax_internals.py"}
SMOKE = ("test_every_declared_dependency_is_imported_by_fusec",
         "test_jax_triton_is_imported_lazily_and_only_where_triton_kernels_are_lowered",
         "test_import_fusec_needs_no_jax_triton_triton_or_gpu_plugin")


def _name(requirement: str) -> str:
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


def _imports() -> list[tuple[Path, str, bool]]:
    """(file, imported module, at module level) for every import in fusec/."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(path, a.name, id(node) in top) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.append((path, node.module, id(node) in top))
    return out


def _uses(found: list[tuple[Path, str, bool]], prefixes: tuple[str, ...]) -> list[tuple[Path, str, bool]]:
    return [f for f in found if any(f[1] == p or f[1].startswith(p + ".") for p in prefixes)]


def test_every_declared_dependency_is_imported_by_fusec() -> None:
    declared = [_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert set(declared) <= set(IMPORTS), f"say how fusec imports {sorted(set(declared) - set(IMPORTS))}"
    found = _imports()
    unused = [d for d in declared if not _uses(found, IMPORTS[d])]
    assert not unused, f"declared but never imported in fusec/: {unused}"


def test_jax_triton_is_imported_lazily_and_only_where_triton_kernels_are_lowered() -> None:
    for dist, home in LAZY.items():
        uses = _uses(_imports(), IMPORTS[dist])
        assert uses and all(path == home and not top for path, _, top in uses), uses


def test_import_fusec_needs_no_jax_triton_triton_or_gpu_plugin() -> None:
    blocked = ["jax_triton", "triton", "jax_cuda12_plugin", "jax_cuda12_pjrt", "jax_cuda13_plugin", "jax_cuda13_pjrt"]
    code = "\n".join([
        "import sys",
        f"for name in {blocked!r}: sys.modules[name] = None",
        "import jax, jax.numpy as jnp, fusec",
        "f = fusec.jit(lambda x: jax.nn.softmax(x) * 2.0, backend='pallas')",
        "y = f(jnp.ones((4, 8)))",
        "assert abs(float(y.sum()) - 8.0) < 1e-5, y",
        "print('ok')",
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
