"""Every example runs, and its IR round-trips through the text form."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import fusec
from fusec.ir import parse_module, print_module, verify_module

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path: Path) -> None:
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matches jax.jit" in result.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_ir_round_trips_at_every_stage(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = next(getattr(module, name) for name in ("gpt2_block", "model", "main") if hasattr(module, name))
    lowered = fusec.jit(fn).lower(*module.example_inputs())
    for _, stage_module in lowered.program.stages:
        verify_module(stage_module)
        assert parse_module(print_module(stage_module)) == stage_module
